"""Prometheus metrics, recorded by the registry, the data plane and the front doors, served by server/.

Beside fleetserve's own series, the ones dashboards and autoscalers already read: Seldon Core 2's
agent series (its names, some without `_total`, and its labels) and Triton's `nv_inference_*`
series, for every model.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Iterable

from prometheus_client import Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

# Seldon Core 2's agent labels: the Server's name and this replica (the fleet's name and the
# replica's id in a fleet; see configure_server_labels).
SERVER_LABELS = {"server": "fleetserve", "server_replica": "0"}


def configure_server_labels(fleet: str, replica_id: str) -> None:
    SERVER_LABELS.update(server=fleet or "fleetserve", server_replica=replica_id or "0")

# Inference latencies span sub-millisecond tabular models to multi-second transformers.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS_NS = tuple(round(bound * 1e9) for bound in LATENCY_BUCKETS)


def latency_buckets(counts: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (over LATENCY_BUCKETS, then one past the last) as a histogram's cumulative buckets."""
    cumulative = list(itertools.accumulate(counts))
    return [*((floatToGoString(bound), count) for bound, count in zip(LATENCY_BUCKETS, cumulative)), ("+Inf", cumulative[-1])]


class InferenceCollector:
    """fleetserve_infer_requests_total and fleetserve_infer_duration_seconds, Triton's
    nv_inference_* and Seldon's loaded-model series, read at scrape time from each version's
    Statistics: the data plane counts a request with a few integer additions instead of
    prometheus_client's locked counters, and the figures cannot drift from the statistics
    endpoint's. A version's series go when the version is unloaded."""

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
        triton = {name: Metric(f"nv_inference_{name}", text, "counter") for name, text in _TRITON_COUNTERS}
        pending = GaugeMetricFamily("nv_inference_pending_request_count",
                                    "Requests waiting for the model to run them, by model and version.",
                                    labels=["model", "version"])
        loaded = GaugeMetricFamily("seldon_loaded_model_gauge", "Models loaded (1) or registered and not ready (0)",
                                   labels=[*SERVER_LABELS, "model_internal"])
        server = list(SERVER_LABELS.values())
        for version in self.versions():
            stats = version.stats
            labels = [version.name, version.version or ""]
            failures = dict(stats.failures)  # copied in one step: the event loop adds outcomes meanwhile
            if stats.success_count:
                requests.add_metric([*labels, "success"], stats.success_count)
                latency.add_metric(labels, latency_buckets(stats.latency_buckets), stats.success_ns / 1e9)
            for outcome, count in failures.items():
                requests.add_metric([*labels, outcome], count)
            # Triton's version label is never empty: an unversioned model is version 1 there.
            triton_labels = {"model": version.name, "version": version.version or "1"}
            for name, value in (("request_success", stats.success_count), ("request_failure", sum(failures.values())),
                                ("count", stats.success_count), ("exec_count", stats.success_count),
                                ("request_duration_us", (stats.success_ns + stats.fail_ns) // 1000),
                                ("queue_duration_us", stats.queue_ns // 1000),
                                ("compute_infer_duration_us", stats.compute_infer_ns // 1000)):
                triton[name].add_sample(f"nv_inference_{name}", triton_labels, value)
            pending.add_metric(list(triton_labels.values()), version.queued)
            loaded.add_metric([*server, internal_name(version.name, version.version)], int(version.state == "READY"))
        yield requests
        yield latency
        yield from triton.values()
        yield pending
        yield loaded


# Triton's cumulative counters, named as Triton names them: no _total (which CounterMetricFamily adds).
_TRITON_COUNTERS = (
    ("request_success", "Successful inference requests, by model and version."),
    ("request_failure", "Failed inference requests, by model and version."),
    ("count", "Inferences performed (requests answered; a batched request counts once)."),
    ("exec_count", "Model executions performed."),
    ("request_duration_us", "Cumulative time requests spent in the server, in microseconds."),
    ("queue_duration_us", "Cumulative time requests waited for the model (threads, batching), in microseconds."),
    ("compute_infer_duration_us", "Cumulative time the model computed, in microseconds."),
)


def internal_name(name: str, version: str | None) -> str:
    """Seldon's name for a model on a server (`model_internal`): the model and its version."""
    return f"{name}_{version or 1}"


class ModelChanges:
    """Models loaded and unloaded through the control plane (Seldon's seldon_load_model_counter and
    seldon_unload_model_counter; reloads after eviction are seldon_cache_miss_count)."""

    def __init__(self):
        self.loads = 0
        self.unloads = 0

    def collect(self):
        for name, count, text in (("seldon_load_model_counter", self.loads, "Models loaded"),
                                  ("seldon_unload_model_counter", self.unloads, "Models unloaded")):
            family = Metric(name, text, "counter")  # Seldon's names: no _total, which Counter would add
            family.add_sample(name, dict(SERVER_LABELS), count)
            yield family


MODEL_CHANGES = ModelChanges()


class InferenceCalls:
    """Inference calls as the front doors answered them, for Seldon's seldon_model_infer_* and
    seldon_pipeline_infer_* series: by model or pipeline, door (rest or grpc) and code (an HTTP
    status, or a gRPC code as Go names it). A call answered by a fleet peer is counted there.

    `label` names what a call is counted under: a model's `model_internal` (the version a request
    naming none resolves to, so `iris` and `iris/versions/1` are one series), "" for a pipeline,
    None for what the server does not have, so requests for made-up names cannot grow the series
    without bound; the series of one deleted go at the next scrape. Each request's own key is
    looked up once, then shares its series' counters."""

    def __init__(self, label: Callable[[str, str, str | None], str | None]):
        self.label = label
        self.calls: dict[tuple[str, str, str | None, str, str], list] = {}  # a request's key: its series' [count, seconds]
        self.series: dict[tuple[str, str, str, str, str], list] = {}  # labels: [count, seconds, a version they resolve from]

    def record(self, kind: str, name: str, version: str | None, door: str, code, seconds: float) -> None:
        key = (kind, name, version, door, str(code))
        entry = self.calls.get(key)
        if entry is None:
            label = self.label(kind, name, version)
            if label is None:
                return
            entry = self.calls[key] = self.series.setdefault((kind, name, label, door, str(code)), [0, 0.0, version])
        entry[0] += 1
        entry[1] += seconds

    def collect(self):
        server = list(SERVER_LABELS.values())
        families = {}
        for prefix, labels in (("seldon_model", ["model", "model_internal", "method_type", "code"]),
                               ("seldon_pipeline", ["pipeline", "method_type", "code"])):
            for kind in ("infer", "aggregate_infer"):
                shown = labels if kind == "infer" else ["method_type"]
                text = f"{'Calls' if kind == 'infer' else 'All calls'} to {prefix.removeprefix('seldon_')}s"
                families[prefix, kind] = (
                    CounterMetricFamily(f"{prefix}_{kind}", text, labels=[*SERVER_LABELS, *shown]),
                    CounterMetricFamily(f"{prefix}_{kind}_seconds", f"{text}: their seconds",
                                        labels=[*SERVER_LABELS, *shown]))
        aggregates: dict[tuple[str, str], list] = {}
        gone = False
        for key, (count, seconds, version) in list(self.series.items()):
            kind, name, label, door, code = key
            if self.label(kind, name, version) != label:
                del self.series[key]
                gone = True
                continue
            prefix = "seldon_model" if kind == "models" else "seldon_pipeline"
            labels = [name, label, door, code] if kind == "models" else [name, door, code]
            calls, duration = families[prefix, "infer"]
            calls.add_metric([*server, *labels], count)
            duration.add_metric([*server, *labels], seconds)
            total = aggregates.setdefault((prefix, door), [0, 0.0])
            total[0] += count
            total[1] += seconds
        if gone:  # the requests' keys are only a cache of their series: each is looked up again once
            self.calls.clear()
        for (prefix, door), (count, seconds) in aggregates.items():
            calls, duration = families[prefix, "aggregate_infer"]
            calls.add_metric([*server, door], count)
            duration.add_metric([*server, door], seconds)
        for pair in families.values():
            yield from pair


def grpc_code_name(code) -> str:
    """A gRPC status as Seldon's Go code names it in its `code` label (OK, NotFound, Canceled...)."""
    return _GO_CODE_NAMES.get(code.name, code.name)


_GO_CODE_NAMES = {"OK": "OK", "CANCELLED": "Canceled"} | {
    name: "".join(part.capitalize() for part in name.split("_"))
    for name in ("UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
                 "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
                 "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")}


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
