"""Where an inference goes: a model, a pipeline or an experiment.

The front doors call `Router.infer()` with the path's model and the `seldon-model` and
`x-seldon-route` headers; every model call still goes through `DataPlane.infer()`. An
experiment with a `default` takes over that model's (or pipeline's) own endpoint while all its
candidates are ready; removing it gives the endpoint back at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from bisect import bisect_left
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

from fleetserve import tracing
from fleetserve.errors import FleetError, InvalidInput, NotFound, NotReady
from fleetserve.graph.experiment import Experiment
from fleetserve.graph.pipeline import Pipeline, PipelineRun
from fleetserve.runtime.dataplane import DataPlane
from fleetserve.runtime.metrics import LATENCY_BUCKETS_NS, latency_buckets
from fleetserve.runtime.registry import Registry
from fleetserve.types import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

PIPELINE_SUFFIX, EXPERIMENT_SUFFIX = ".pipeline", ".experiment"
MIRRORS_IN_FLIGHT = 256  # copies still running, over all experiments; more are skipped and counted


# An answer, and the `x-seldon-route` to send with it when an experiment chose where it went.
Routed = tuple[InferenceResponse, str | None]


def seldon_target(kind: str, name: str, version: str | None, seldon_model: str | None, route: str | None,
                  response: InferenceResponse | None) -> tuple[str, str, str | None] | None:
    """What Seldon's call series count a call under, as ("models" or "pipelines", name, version):
    the candidate an experiment chose (its `route`), else what `seldon-model` names, else the
    path's; with the version that ran (the path's when the call failed). None for an experiment
    that failed before it chose."""
    target = route.strip(":") if route else seldon_model
    if not target or (target == name and kind == "models"):
        return kind, name, response.model_version if response is not None else version
    if target.endswith(EXPERIMENT_SUFFIX):
        return None
    if target.endswith(PIPELINE_SUFFIX):
        return "pipelines", target[: -len(PIPELINE_SUFFIX)], None
    return "models", target, response.model_version if response is not None else None


@dataclass
class GraphStats:
    """Per pipeline, read by GraphCollector at scrape time."""

    outcomes: dict[str, int]
    latency_buckets: list[int]
    latency_ns: int = 0

    @classmethod
    def empty(cls) -> "GraphStats":
        return cls({}, [0] * (len(LATENCY_BUCKETS_NS) + 1))

    def record(self, outcome: str, elapsed_ns: int) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if outcome == "success":
            self.latency_ns += elapsed_ns
            self.latency_buckets[bisect_left(LATENCY_BUCKETS_NS, elapsed_ns)] += 1


class Router:
    def __init__(self, registry: Registry, dataplane: DataPlane):
        self.registry = registry
        self.dataplane = dataplane
        self.pipelines: dict[str, Pipeline] = {}
        self.experiments: dict[str, Experiment] = {}
        self.takeovers: dict[tuple[str, str], Experiment] = {}  # (resource type, default) -> experiment
        self.stats: dict[str, GraphStats] = {}  # per pipeline
        self.routed: dict[str, dict[str, int]] = {}  # experiment -> candidate (or "mirror:NAME") -> requests
        self.mirroring: set[asyncio.Task] = set()
        self.fleet = None  # fleet/forward.py's Hops when this replica is in a fleet: steps run where their models are

    # Manifests.

    def add_pipeline(self, pipeline: Pipeline) -> None:
        """Create or replace a pipeline; it serves once all its step models are ready."""
        previous = self.pipelines.get(pipeline.name)
        self.pipelines[pipeline.name] = pipeline
        self.stats.setdefault(pipeline.name, GraphStats.empty())
        if previous is not None:
            _close(previous)

    def delete_pipeline(self, name: str) -> None:
        pipeline = self.pipelines.pop(name, None)
        if pipeline is None:
            raise NotFound(f"pipeline '{name}' not found")
        self.stats.pop(name, None)
        _close(pipeline)

    def check_experiments(self, experiments: list[Experiment]) -> None:
        """Refuse, before any is applied, an experiment whose default another one already takes over."""
        replaced = {experiment.name for experiment in experiments}
        holders = {key: holder.name for key, holder in self.takeovers.items() if holder.name not in replaced}
        for experiment in experiments:
            if experiment.default is None:
                continue
            key = (experiment.resource_type, experiment.default)
            holder = holders.setdefault(key, experiment.name)
            if holder != experiment.name:
                raise InvalidInput(f"experiment '{experiment.name}': {experiment.resource_type} '{experiment.default}' "
                                   f"is already the default of experiment '{holder}'")

    def add_experiment(self, experiment: Experiment) -> None:
        self.check_experiments([experiment])
        previous = self.experiments.get(experiment.name)
        if previous is not None and previous.default is not None:
            self.takeovers.pop((previous.resource_type, previous.default), None)
        self.experiments[experiment.name] = experiment
        if experiment.default is not None:
            self.takeovers[(experiment.resource_type, experiment.default)] = experiment
        self.routed.setdefault(experiment.name, {})

    def delete_experiment(self, name: str) -> None:
        experiment = self.experiments.pop(name, None)
        if experiment is None:
            raise NotFound(f"experiment '{name}' not found")
        if experiment.default is not None:
            self.takeovers.pop((experiment.resource_type, experiment.default), None)
        self.routed.pop(name, None)

    # Readiness.

    def model_problem(self, name: str) -> str | None:
        try:
            self.registry.get_ready(name)
        except FleetError as error:
            if self.fleet is not None and self.fleet.models.known(name):
                return None  # served by a peer, or loaded on demand
            return error.message
        return None

    def pipeline_problem(self, name: str) -> str | None:
        pipeline = self.pipelines.get(name)
        if pipeline is None:
            return f"pipeline '{name}' not found"
        problems = [problem for model in pipeline.models if (problem := self.model_problem(model))]
        return "; ".join(problems) or None

    def experiment_problem(self, name: str) -> str | None:
        experiment = self.experiments[name]
        check = self.pipeline_problem if experiment.resource_type == "pipeline" else self.model_problem
        targets = [candidate for candidate, _ in experiment.candidates] + ([experiment.mirror] if experiment.mirror else [])
        problems = [problem for target in targets if (problem := check(target))]
        return "; ".join(problems) or None

    def get_pipeline(self, name: str) -> Pipeline:
        pipeline = self.pipelines.get(name)
        if pipeline is None:
            raise NotFound(f"pipeline '{name}' not found")
        return pipeline

    def get_experiment(self, name: str) -> Experiment:
        experiment = self.experiments.get(name)
        if experiment is None:
            raise NotFound(f"experiment '{name}' not found")
        return experiment

    # Inference.

    async def infer(self, name: str, version: str | None, request: InferenceRequest,
                    seldon_model: str | None = None, route: str | None = None) -> Routed:
        """An inference addressed by path (`name`, `version`) and `seldon-model`, which wins."""
        if seldon_model:
            if seldon_model.endswith(EXPERIMENT_SUFFIX):
                return await self.infer_experiment(seldon_model[: -len(EXPERIMENT_SUFFIX)], request, route)
            if seldon_model.endswith(PIPELINE_SUFFIX):
                return await self.infer_pipeline(seldon_model[: -len(PIPELINE_SUFFIX)], request, route)
            if seldon_model != name:
                name, version = seldon_model, None
        if version is None and self.takeovers:
            experiment = self.takeovers.get(("model", name))
            if experiment is not None and self.experiment_problem(experiment.name) is None:
                return await self._split(experiment, request, route)
        return await self.dataplane.infer(name, version, request), None

    async def infer_pipeline(self, name: str, request: InferenceRequest, route: str | None = None) -> Routed:
        experiment = self.takeovers.get(("pipeline", name))
        if experiment is not None and self.experiment_problem(experiment.name) is None:
            return await self._split(experiment, request, route)
        return await self.run_pipeline(name, request), None

    async def infer_experiment(self, name: str, request: InferenceRequest, route: str | None) -> Routed:
        experiment = self.get_experiment(name)
        problem = self.experiment_problem(name)
        if problem:
            raise NotReady(f"experiment '{name}' is not ready: {problem}")
        return await self._split(experiment, request, route)

    async def run_pipeline(self, name: str, request: InferenceRequest) -> InferenceResponse:
        pipeline = self.get_pipeline(name)
        problem = self.pipeline_problem(name)
        if problem:
            raise NotReady(f"pipeline '{name}' is not ready: {problem}")
        request_id = request.id or uuid.uuid4().hex
        stats = self.stats[name]
        started = time.perf_counter_ns()
        try:
            outputs = await PipelineRun(pipeline, request, request_id, self._call_model).run()
            if request.outputs:
                produced = {tensor.name: tensor for tensor in outputs}
                missing = [wanted.name for wanted in request.outputs if wanted.name not in produced]
                if missing:
                    raise InvalidInput(f"pipeline '{name}' has no output {missing}; it produced {list(produced)}")
                outputs = [produced[wanted.name] for wanted in request.outputs]
        except FleetError as error:
            stats.record(type(error).__name__, 0)
            raise
        except asyncio.CancelledError:
            stats.record("Cancelled", 0)
            raise
        stats.record("success", time.perf_counter_ns() - started)
        # Seldon answers for a pipeline with an empty model name.
        return InferenceResponse(model_name="", outputs=outputs, id=request_id)

    async def _call_model(self, model: str, request: InferenceRequest) -> InferenceResponse:
        if self.fleet is not None and self.fleet.models.elsewhere(model):
            answer = await self.fleet.infer_request(model, request)
            if answer is not None:
                return answer
        return await self.dataplane.infer(model, None, request)

    async def _split(self, experiment: Experiment, request: InferenceRequest, route: str | None) -> Routed:
        candidate = experiment.choose(route)
        routed = self.routed[experiment.name]
        routed[candidate] = routed.get(candidate, 0) + 1
        if tracing.TRACER is not None:
            tracing.annotate(**{"seldon.experiment": experiment.name, "seldon.candidate": candidate})
        if experiment.mirrors():
            # A mirror slower than the traffic would pile up copies (and their tensors) without end.
            target = f"mirror:{experiment.mirror}" if len(self.mirroring) < MIRRORS_IN_FLIGHT else f"mirror-skipped:{experiment.mirror}"
            routed[target] = routed.get(target, 0) + 1
            if target.startswith("mirror:"):
                copy = InferenceRequest(inputs=list(request.inputs), id=request.id, parameters=dict(request.parameters),
                                        outputs=list(request.outputs))
                task = asyncio.ensure_future(self._mirror(experiment, copy))
                self.mirroring.add(task)
                task.add_done_callback(self.mirroring.discard)
        try:
            response = await self._call_target(experiment, candidate, request)
        except FleetError as error:
            error.route = experiment.route_entry(candidate)  # Seldon's series count the candidate's failure
            raise
        return response, experiment.route_entry(candidate)

    async def _call_target(self, experiment: Experiment, target: str, request: InferenceRequest) -> InferenceResponse:
        if experiment.resource_type == "pipeline":
            return await self.run_pipeline(target, request)
        return await self._call_model(target, request)

    async def _mirror(self, experiment: Experiment, request: InferenceRequest) -> None:
        try:
            await self._call_target(experiment, experiment.mirror, request)
        except FleetError as error:  # the mirror's answer is never the caller's, nor its errors
            log.info("experiment %s: mirror %s failed: %s", experiment.name, experiment.mirror, error.message)


def _close(pipeline: Pipeline) -> None:
    for batch in pipeline.batches.values():
        batch.close()


class GraphCollector:
    """fleetserve_pipeline_* and fleetserve_experiment_* series, read from the router at scrape time."""

    def __init__(self, router: Router):
        self.router = router

    def collect(self):
        requests = CounterMetricFamily("fleetserve_pipeline_requests", "Pipeline requests by outcome.",
                                       labels=["pipeline", "outcome"])
        latency = HistogramMetricFamily("fleetserve_pipeline_duration_seconds",
                                        "Time from a pipeline request to its answer (successes).", labels=["pipeline"])
        step_errors = CounterMetricFamily("fleetserve_pipeline_step_errors", "Failed step runs, by pipeline and step.",
                                          labels=["pipeline", "step"])
        routed = CounterMetricFamily("fleetserve_experiment_requests",
                                     "Experiment requests by the candidate (or mirror:NAME) they went to.",
                                     labels=["experiment", "target"])
        for name, stats in list(self.router.stats.items()):
            for outcome, count in dict(stats.outcomes).items():
                requests.add_metric([name, outcome], count)
            latency.add_metric([name], latency_buckets(list(stats.latency_buckets)), stats.latency_ns / 1e9)
        for pipeline in list(self.router.pipelines.values()):
            for step, count in dict(pipeline.step_errors).items():
                step_errors.add_metric([pipeline.name, step], count)
        for experiment, targets in list(self.router.routed.items()):
            for target, count in dict(targets).items():
                routed.add_metric([experiment, target], count)
        yield from (requests, latency, step_errors, routed)
