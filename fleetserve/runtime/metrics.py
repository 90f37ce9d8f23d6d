"""Prometheus metrics, recorded by the registry and the data plane and served by server/."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Inference latencies span sub-millisecond tabular models to multi-second transformers.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

INFER_REQUESTS = Counter(
    "fleetserve_infer_requests",
    "Inference requests by model, version and outcome (success or error kind).",
    ["model", "version", "outcome"],
)
INFER_LATENCY = Histogram(
    "fleetserve_infer_duration_seconds",
    "Time spent in the model's predict, queueing for a worker thread included.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
MODELS_LOADED = Gauge("fleetserve_models_loaded", "Model versions ready to serve.")
# Load and reload histograms have no model label: one series set however many models there are;
# the log has each model's own durations.
MODEL_LOAD_DURATION = Histogram(
    "fleetserve_model_load_duration_seconds",
    "Time to load a model version, by outcome.",
    ["outcome"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
)
MODEL_RELOAD_DURATION = Histogram(
    "fleetserve_model_reload_duration_seconds",
    "Time to bring an evicted model back into memory, waiting for room included.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
BATCH_SIZE = Histogram(
    "fleetserve_batch_size",
    "Requests merged into one predict by adaptive batching.",
    ["model", "version"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_QUEUE_TIME = Histogram(
    "fleetserve_batch_queue_seconds",
    "Time a request waited for its adaptive batch to be sent to the model.",
    ["model", "version"],
    buckets=LATENCY_BUCKETS,
)
