"""Prometheus metrics, recorded by the registry and the data plane and served by server/."""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Iterable

from prometheus_client import Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# Inference latencies span sub-millisecond tabular models to multi-second transformers.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS)


def latency_buckets(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (over LATENCY_BUCKETS, then one past the last) as a histogram's cumulative buckets."""
    cumulative = list(itertools.accumulate(counts))
    return [*((floatToGoString(bound), count) for bound, count in zip(LATENCY_BUCKETS, cumulative)), ("+Inf", cumulative[-1])]


class InferenceCollector:
    """fleetserve_infer_requests_total and fleetserve_infer_duration_seconds, read at scrape
    time from each version's Statistics: the data plane counts a request with a few integer
    additions instead of prometheus_client's locked counters, and the figures cannot drift from
    the statistics endpoint's. A version's series go when the version is unloaded."""

    def __init__(self, versions: Callable[[], Iterable]):
        self.versions = versions

    def collect(self):
        requests = CounterMetricFamily(
            "fleetserve_infer_requests",
            "Inference requests by model, version and outcome (success or error kind).",
            labels=["model", "version", "outcome"],
        )
        latency = HistogramMetricFamily(
            "fleetserve_infer_duration_seconds",
            "Time from a request reaching the data plane to its answer (successes), queueing included.",
            labels=["model", "version"],
        )
        for version in self.versions():
            stats = version.stats
            labels = [version.name, version.version or ""]
            failures = dict(stats.failures)  # copied in one step: the event loop adds outcomes meanwhile
            if stats.success_count:
                requests.add_metric([*labels, "success"], stats.success_count)
                latency.add_metric(labels, latency_buckets(stats.latency_buckets), stats.success_ns / 1e9)
            for outcome, count in failures.items():
                requests.add_metric([*labels, outcome], count)
        yield requests
        yield latency


class DriftResults:
    """Each drift detector's latest result and how many checks found drift or not, by model name.
    Kept here rather than on the runtime so that an evicted detector's last word stays on
    /metrics; the collector forgets a model at the first scrape after it is gone."""

    def __init__(self):
        self.latest: dict[str, int] = {}
        self.checks: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()  # detectors record on worker threads while /metrics reads on another

    def record(self, model: str, drift: bool) -> None:
        with self.lock:
            self.latest[model] = int(drift)
            key = (model, "drift" if drift else "no_drift")
            self.checks[key] = self.checks.get(key, 0) + 1

    def snapshot(self, registered: set[str]) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
        """The figures of the registered models; the others' are forgotten."""
        with self.lock:
            self.latest = {model: drift for model, drift in self.latest.items() if model in registered}
            self.checks = {key: count for key, count in self.checks.items() if key[0] in registered}
            return dict(self.latest), dict(self.checks)


DRIFT_RESULTS = DriftResults()


class DriftCollector:
    """fleetserve_drift_detected and fleetserve_drift_checks_total, for the registered models."""

    def __init__(self, models: Callable[[], Iterable[str]], results: DriftResults = DRIFT_RESULTS):
        self.models = models
        self.results = results

    def collect(self):
        latest, checks = self.results.snapshot(set(self.models()))
        detected = GaugeMetricFamily("fleetserve_drift_detected",
                                     "1 when a drift detector's latest check found drift, else 0.", labels=["model"])
        for model, drift in latest.items():
            detected.add_metric([model], drift)
        counted = CounterMetricFamily("fleetserve_drift_checks", "Drift checks by model and outcome (drift or no_drift).",
                                      labels=["model", "outcome"])
        for (model, outcome), count in checks.items():
            counted.add_metric([model, outcome], count)
        yield detected
        yield counted


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
