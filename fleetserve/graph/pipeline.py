"""Seldon Core 2 Pipelines: the spec, checked once when a manifest arrives, and one run per request.

A run is dataflow, as in Seldon's Kafka streams but in process: every step that completes
delivers its tensors to the steps (and the output) that read them; a step fires when its
`inputs` and `triggers` joins are satisfied. So a step whose wanted tensors never come does
not run (conditional routing), `any` joins take what arrives first, `outer` joins take what
has arrived once nothing more can come (or `joinWindowMs` passed), and cycles simply
deliver again, bounded by `maxStepRevisits`. The response is sent as soon as the output's
join fires; steps the output does not depend on keep running after it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import numpy as np

from fleetserve import tracing
from fleetserve.errors import DeadlineExceeded, FleetError, InferenceError, InvalidInput
from fleetserve.types import InferenceRequest, InferenceResponse, Tensor

log = logging.getLogger(__name__)

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
JOIN_TYPES = ("inner", "outer", "any")
OUTPUT = ""  # the output's key among the consumers: no step can be named so
INSPECT_DEPTH = 10  # messages kept per step for `inspect`
INSPECT_TENSOR_BYTES = 64 * 1024  # larger tensors are kept as their name, datatype and shape

_STEP_KEYS = {"name", "inputs", "triggers", "tensorMap", "inputsJoinType", "triggersJoinType", "joinWindowMs", "batch"}
_OUTPUT_KEYS = {"steps", "stepsJoin", "tensorMap", "joinWindowMs"}
# `dataflow` tells Seldon what to do with Kafka topics: nothing to do in process.
_SPEC_KEYS = {"steps", "output", "allowCycles", "maxStepRevisits", "dataflow", "input"}


@dataclass(frozen=True)
class Ref:
    """`source[.inputs|.outputs[.TENSOR]]`: a step's or the pipeline's tensors, or one of them."""

    source: str
    kind: str  # "inputs" or "outputs"
    tensor: str | None

    def __str__(self) -> str:
        return f"{self.source}.{self.kind}" + (f".{self.tensor}" if self.tensor is not None else "")


@dataclass
class Join:
    refs: list[Ref]
    how: str  # inner, outer or any

    def ready(self, arrived: dict[Ref, list[Tensor]], force: bool) -> bool:
        """Whether the arrived refs satisfy the join; `force`: nothing more will arrive in time."""
        if not self.refs:
            return True
        if self.how == "inner":
            return len(arrived) == len(self.refs)
        if self.how == "any" or force:
            return bool(arrived)
        return len(arrived) == len(self.refs)


@dataclass
class Step:
    name: str
    inputs: Join
    triggers: Join
    tensor_map: dict[str, str]
    window_s: float | None = None  # joinWindowMs: how long an outer join waits for the rest
    batch_size: int = 1
    batch_window_s: float | None = None
    cyclic: bool = False  # on a cycle: may fire again for one request


@dataclass
class Pipeline:
    name: str
    steps: dict[str, Step]
    output: Step | None
    allow_cycles: bool
    max_step_revisits: int
    manifest: dict[str, Any]
    consumers: dict[str, list[str]] = field(default_factory=dict)  # source -> steps (and OUTPUT) reading it
    order: list[str] = field(default_factory=list)  # steps, each after the steps it reads (cycles aside)
    needed: frozenset[str] = frozenset()  # the steps the output depends on
    batches: dict[str, "StepBatch"] = field(default_factory=dict)
    inspect: dict[str, deque] = field(default_factory=dict)  # step (or the pipeline's name) -> recent messages
    step_errors: dict[str, int] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return list(self.steps)


# --- the spec ------------------------------------------------------------------------------

def pipeline_from_manifest(document: dict[str, Any]) -> Pipeline:
    """A `kind: Pipeline` manifest, checked: names, references, joins, cycles."""
    name, spec = graph_manifest(document, "pipeline", _SPEC_KEYS)
    where = f"pipeline '{name}'"
    if spec.get("input") is not None:
        raise InvalidInput(f"{where}: spec.input (reading other pipelines' data) is not supported; "
                           "call the pipelines one after the other, or put their steps in one pipeline")
    raw_steps = spec.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise InvalidInput(f"{where}: spec.steps must be a non-empty list of steps")
    names: list[str] = []
    for raw in raw_steps:
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where}: each step must be a mapping, got {raw!r}")
        step_name = raw.get("name")
        if not isinstance(step_name, str) or not NAME.match(step_name):
            raise InvalidInput(f"{where}: invalid step name {step_name!r}: lower-case letters, digits and '-'")
        if step_name == name:
            raise InvalidInput(f"{where}: a step cannot have the pipeline's name '{name}'")
        if step_name in names:
            raise InvalidInput(f"{where}: step '{step_name}' appears twice")
        names.append(step_name)
    steps = {raw["name"]: _step(raw, name, names) for raw in raw_steps}
    output = _output(spec.get("output"), name, names)
    allow_cycles = spec.get("allowCycles", False)
    if not isinstance(allow_cycles, bool):
        raise InvalidInput(f"{where}: allowCycles must be true or false")
    revisits = spec.get("maxStepRevisits", 0)
    if not isinstance(revisits, int) or isinstance(revisits, bool) or revisits < 0:
        raise InvalidInput(f"{where}: maxStepRevisits must be a non-negative integer")
    pipeline = Pipeline(name, steps, output, allow_cycles, revisits, as_json(document))
    _wire(pipeline)
    return pipeline


def graph_manifest(document: dict[str, Any], kind: str, known: set[str]) -> tuple[str, dict[str, Any]]:
    """A pipeline's or experiment's name (Seldon's rule for them) and spec, checked for typos."""
    name = (document.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidInput(f"invalid {kind} name {name!r}: lower-case letters, digits and '-', "
                           "starting and ending with a letter or digit")
    spec = document.get("spec")
    if not isinstance(spec, dict):
        raise InvalidInput(f"{kind} '{name}': spec must be a mapping")
    _refuse_unknown(spec, known, f"{kind} '{name}': spec")
    return name, spec


def as_json(document: dict[str, Any]) -> dict[str, Any]:
    """A manifest as it can be shown back: YAML allows keys and values JSON has no words for."""
    try:
        return json.loads(json.dumps(document, default=str, skipkeys=True))
    except (ValueError, RecursionError):  # an alias that contains itself
        raise InvalidInput("the manifest refers to itself (a YAML alias inside its own anchor)") from None


def _refuse_unknown(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(str(key) for key in set(raw) - known)
    if unknown:
        raise InvalidInput(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")


def _ref(text: Any, pipeline: str, steps: list[str], where: str) -> Ref:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"{where}: empty reference; use step, step.outputs[.TENSOR] or {pipeline}.inputs[.TENSOR]")
    source, dot, rest = text.partition(".")
    kind, dot_tensor, tensor = rest.partition(".")
    if (dot and not kind) or (dot_tensor and not tensor):
        raise InvalidInput(f"{where}: '{text}' ends with '.' where a name belongs")
    if source != pipeline and source not in steps:
        raise InvalidInput(f"{where}: '{text}' refers to '{source}', which is neither a step ({steps}) nor the pipeline")
    if not kind:
        kind = "inputs" if source == pipeline else "outputs"
    if kind not in ("inputs", "outputs"):
        raise InvalidInput(f"{where}: '{text}': after the step comes 'inputs' or 'outputs', not '{kind}'")
    if source == pipeline and kind == "outputs":
        raise InvalidInput(f"{where}: '{text}': a pipeline's steps cannot read its own outputs")
    return Ref(source, kind, tensor or None)


def _refs(raw: Any, field_name: str, pipeline: str, steps: list[str], where: str) -> list[Ref]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidInput(f"{where}: {field_name} must be a list")
    refs = [_ref(item, pipeline, steps, f"{where}: {field_name}") for item in raw]
    repeated = sorted({str(ref) for ref in refs if refs.count(ref) > 1})
    if repeated:  # an inner join would wait for the same tensors twice
        raise InvalidInput(f"{where}: {field_name} lists {repeated} more than once")
    return refs


def _join_type(raw: dict, key: str, where: str) -> str:
    how = raw.get(key, "inner")
    if how not in JOIN_TYPES:
        raise InvalidInput(f"{where}: {key} must be one of {list(JOIN_TYPES)}, got {how!r}")
    return how


def _window(raw: dict, where: str) -> float | None:
    window = raw.get("joinWindowMs")
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise InvalidInput(f"{where}: joinWindowMs must be a non-negative integer")
    return window / 1000


def _tensor_map(raw: dict, refs: list[Ref], pipeline: str, steps: list[str], where: str) -> dict[str, str]:
    mapping = raw.get("tensorMap") or {}
    if not isinstance(mapping, dict):
        raise InvalidInput(f"{where}: tensorMap must be a mapping from source.outputs.TENSOR to a new name")
    checked = {}
    for key, value in mapping.items():
        ref = _ref(key, pipeline, steps, f"{where}: tensorMap")
        if ref.tensor is None:
            raise InvalidInput(f"{where}: tensorMap key '{key}' must name a tensor (source.outputs.TENSOR)")
        if not any(read.source == ref.source and read.kind == ref.kind and read.tensor in (None, ref.tensor) for read in refs):
            raise InvalidInput(f"{where}: tensorMap key '{key}' renames a tensor it does not read ({[str(r) for r in refs]})")
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{where}: tensorMap '{key}' must map to a tensor name")
        checked[str(ref)] = value
    return checked


def _step(raw: dict, pipeline: str, steps: list[str]) -> Step:
    where = f"pipeline '{pipeline}': step '{raw['name']}'"
    _refuse_unknown(raw, _STEP_KEYS, where)
    window = _window(raw, where)
    inputs = _refs(raw.get("inputs"), "inputs", pipeline, steps, where) or [Ref(pipeline, "inputs", None)]
    triggers = _refs(raw.get("triggers"), "triggers", pipeline, steps, where)
    batch = raw.get("batch") or {}
    if not isinstance(batch, dict):
        raise InvalidInput(f"{where}: batch must be a mapping with size and windowMs")
    _refuse_unknown(batch, {"size", "windowMs", "rolling"}, f"{where}: batch")
    if batch.get("rolling"):
        raise InvalidInput(f"{where}: batch.rolling is not supported")
    size = batch.get("size", 1)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise InvalidInput(f"{where}: batch.size must be a positive integer")
    batch_window = _window({"joinWindowMs": batch.get("windowMs")}, f"{where}: batch.windowMs")
    return Step(
        name=raw["name"],
        inputs=Join(inputs, _join_type(raw, "inputsJoinType", where)),
        triggers=Join(triggers, _join_type(raw, "triggersJoinType", where)),
        tensor_map=_tensor_map(raw, inputs, pipeline, steps, where),
        window_s=window,
        batch_size=size,
        batch_window_s=batch_window,
    )


def _output(raw: Any, pipeline: str, steps: list[str]) -> Step | None:
    if raw is None:
        return None
    where = f"pipeline '{pipeline}': output"
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where} must be a mapping with steps")
    _refuse_unknown(raw, _OUTPUT_KEYS, where)
    refs = _refs(raw.get("steps"), "steps", pipeline, steps, where)
    if not refs:
        raise InvalidInput(f"{where}: steps must name at least one step")
    return Step(
        name=OUTPUT,
        inputs=Join(refs, _join_type(raw, "stepsJoin", where)),
        triggers=Join([], "inner"),
        tensor_map=_tensor_map(raw, refs, pipeline, steps, where),
        window_s=_window(raw, where),
    )


def _wire(pipeline: Pipeline) -> None:
    """Consumers per source, cycles (refused unless allowed), and the steps the output needs."""
    readers = list(pipeline.steps.values()) + ([pipeline.output] if pipeline.output else [])
    for reader in readers:
        for ref in reader.inputs.refs + reader.triggers.refs:
            consumers = pipeline.consumers.setdefault(ref.source, [])
            if reader.name not in consumers:
                consumers.append(reader.name)
    sources = {step.name: {ref.source for ref in step.inputs.refs + step.triggers.refs if ref.source in pipeline.steps}
               for step in pipeline.steps.values()}
    for step in pipeline.steps.values():
        step.cyclic = step.name in _reachable(step.name, sources)  # the step reads, at some remove, itself
    cyclic = [step.name for step in pipeline.steps.values() if step.cyclic]
    if cyclic and not pipeline.allow_cycles:
        raise InvalidInput(f"pipeline '{pipeline.name}': steps {cyclic} form a cycle; set allowCycles: true "
                           "(and maxStepRevisits) to allow it")
    if pipeline.output:
        wanted = {ref.source for ref in pipeline.output.inputs.refs if ref.source in pipeline.steps}
        pipeline.needed = frozenset(wanted.union(*(_reachable(name, sources) for name in wanted)))
    pipeline.order = _upstream_first(sources)
    for step in pipeline.steps.values():
        if step.batch_size == 1:
            continue
        if step.name in pipeline.needed:
            # Only the request that completes a batch gets the step's answer: the others would fail.
            raise InvalidInput(
                f"pipeline '{pipeline.name}': step '{step.name}' has batch.size {step.batch_size}, but the output "
                "needs it; batch side steps the output does not read (a drift detector, say)")
        pipeline.batches[step.name] = StepBatch(step.batch_size, step.batch_window_s)


def _upstream_first(sources: dict[str, set[str]]) -> list[str]:
    """The steps in dataflow order (a cycle's steps in the order they were written)."""
    order: list[str] = []
    waiting = dict(sources)
    while waiting:
        free = [name for name, needs in waiting.items() if not (needs & waiting.keys())]
        for name in free or [next(iter(waiting))]:
            order.append(name)
            del waiting[name]
    return order


def _reachable(start: str, sources: dict[str, set[str]]) -> set[str]:
    """Every step `start` reads from, directly or through others."""
    seen: set[str] = set()
    stack = list(sources[start])
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(sources[name])
    return seen


# --- a run ---------------------------------------------------------------------------------

Call = Callable[[str, InferenceRequest], Awaitable[InferenceResponse]]
Run = Callable[[list[Tensor]], Awaitable[list[Tensor]]]

# The loop keeps tasks only weakly: steps still running after their request answered are held here.
_RUNNING: set[asyncio.Task] = set()


def _keep(task: asyncio.Task) -> asyncio.Task:
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
    return task


class StepBatch:
    """`batch.size` for one step across requests: the step runs once per `size` messages, on
    their tensors joined along the first axis, and its answer goes to the message that completed
    the batch (with `windowMs`, a partial batch runs when the window ends, answering the last)."""

    def __init__(self, size: int, window_s: float | None):
        self.size = size
        self.window_s = window_s
        self.waiting: list[tuple[list[Tensor], asyncio.Future, Run]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    def submit(self, inputs: list[Tensor], run: Run) -> asyncio.Future:
        """A future for this message's answer: the outputs, or None when another message's run carries it."""
        future = asyncio.get_running_loop().create_future()
        if self.closed:  # a run of a pipeline since replaced or deleted
            future.set_result(None)
            return future
        self.waiting.append((inputs, future, run))
        if len(self.waiting) >= self.size:
            self._flush()
        elif self.timer is None and self.window_s is not None:
            self.timer = asyncio.get_running_loop().call_later(self.window_s, self._flush)
        return future

    def close(self) -> None:
        """The pipeline is gone: messages still waiting get no answer."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        for _, future, _ in self.waiting:
            if not future.done():
                future.set_result(None)
        self.waiting = []

    def _flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        batch, self.waiting = self.waiting, []
        if not batch:
            return
        *carried, (_, last, run) = batch
        for _, future, _ in carried:
            if not future.done():
                future.set_result(None)
        try:
            merged = _concatenate([inputs for inputs, _, _ in batch])
        except InvalidInput as error:
            if not last.done():
                last.set_exception(error)
            return
        _keep(asyncio.ensure_future(run(merged))).add_done_callback(lambda done: _settle(last, done))


def _settle(future: asyncio.Future, done: asyncio.Future) -> None:
    error = None if done.cancelled() else done.exception()  # read even when nobody waits any more
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(done.result())


def _concatenate(messages: list[list[Tensor]]) -> list[Tensor]:
    names = [tensor.name for tensor in messages[0]]
    for message in messages[1:]:
        if [tensor.name for tensor in message] != names:
            raise InvalidInput(f"batched messages differ in tensors: {names} and {[t.name for t in message]}")
    try:
        return [Tensor(name, np.concatenate([message[index].data for message in messages]), messages[-1][index].parameters)
                for index, name in enumerate(names)]
    except ValueError as error:
        raise InvalidInput(f"batched messages cannot be joined: {error}") from None


@dataclass
class Seen:
    """A tensor as `inspect` keeps it: a copy of its data when small, else only its description."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray | None

    @classmethod
    def of(cls, tensor: Tensor) -> "Seen":
        data = tensor.data.copy() if _size_within(tensor.data, INSPECT_TENSOR_BYTES) else None
        return cls(tensor.name, tensor.datatype, list(tensor.data.shape), data)


def _size_within(array: np.ndarray, limit: int) -> bool:
    """Whether the array's data, BYTES elements counted by their length, fits in `limit` bytes."""
    if array.dtype.kind != "O":
        return array.nbytes <= limit
    total = 0
    for item in array.flat:  # object arrays hold references: nbytes says 8 per element
        total += len(item) if isinstance(item, (bytes, str)) else 8
        if total > limit:
            return False
    return True


class PipelineRun:
    """One request through a pipeline. `call(model, request)` is the data plane."""

    def __init__(self, pipeline: Pipeline, request: InferenceRequest, request_id: str, call: Call):
        self.pipeline = pipeline
        self.request_id = request_id
        self.call = call
        self.arrived: dict[str, dict[Ref, list[Tensor]]] = {name: {} for name in [*pipeline.steps, OUTPUT]}
        self.triggered: dict[str, dict[Ref, list[Tensor]]] = {name: {} for name in [*pipeline.steps, OUTPUT]}
        self.fired: dict[str, int] = {name: 0 for name in pipeline.steps}
        self.running: dict[str, int] = {name: 0 for name in pipeline.steps}
        self.windows: dict[str, asyncio.TimerHandle] = {}
        self.tasks: dict[asyncio.Task, str] = {}  # running step -> its name
        self.response: asyncio.Future = asyncio.get_running_loop().create_future()
        self.inputs = request.inputs
        self.deadline = request.deadline  # each step's model answers by the pipeline request's deadline

    async def run(self) -> list[Tensor]:
        """The output's tensors; steps off the response path may still be running after it."""
        if self.pipeline.output is None:
            raise InvalidInput(f"pipeline '{self.pipeline.name}' has no output steps, so it has no answer to give")
        self._deliver(self.pipeline.name, self.inputs, [])
        self._check_settled()
        try:
            outputs = await asyncio.shield(self.response)
        except asyncio.CancelledError:  # the caller went away: stop what only its answer needed
            self._abandon()
            raise
        except FleetError as error:
            self._record(self.pipeline.name, self.inputs, [], error.message)
            raise
        self._record(self.pipeline.name, self.inputs, outputs)
        return outputs

    def _abandon(self) -> None:
        needed = self.pipeline.needed
        for task, step in list(self.tasks.items()):
            if step in needed:
                task.cancel()
        for step in [step for step in self.windows if step in needed or step == OUTPUT]:
            self.windows.pop(step).cancel()
        if not self.response.done():
            self.response.cancel()

    # Tensors arrive, steps fire.

    def _deliver(self, source: str, inputs: list[Tensor], outputs: list[Tensor]) -> None:
        """A step (or the pipeline's input) produced a message: hand each reader what it asked for."""
        for reader in self.pipeline.consumers.get(source, ()):
            step = self.pipeline.output if reader == OUTPUT else self.pipeline.steps[reader]
            for join, arrived in ((step.inputs, self.arrived[reader]), (step.triggers, self.triggered[reader])):
                for ref in join.refs:
                    if ref.source == source:
                        tensors = _select(ref, inputs if ref.kind == "inputs" else outputs)
                        if tensors is not None:
                            arrived[ref] = tensors
            self._try_fire(step, force=False)

    def _try_fire(self, step: Step, force: bool) -> bool:
        """Run `step` if its joins are satisfied; `force`: nothing more will arrive in time."""
        if step.name == OUTPUT:
            if self.response.done():
                return False
        elif self.fired[step.name] and not step.cyclic:
            return False  # off a cycle, a step runs once per request: later arrivals are too late
        arrived, triggered = self.arrived[step.name], self.triggered[step.name]
        if not (step.inputs.ready(arrived, force) and step.triggers.ready(triggered, force)):
            outer = "outer" in (step.inputs.how, step.triggers.how)
            if (arrived or triggered) and outer and step.window_s is not None and step.name not in self.windows:
                self.windows[step.name] = asyncio.get_running_loop().call_later(step.window_s, self._window_closed, step)
            return False
        tensors = [_renamed(tensor, ref, step.tensor_map) for ref in step.inputs.refs if ref in arrived for tensor in arrived[ref]]
        arrived.clear()
        triggered.clear()
        window = self.windows.pop(step.name, None)
        if window is not None:
            window.cancel()
        names = [tensor.name for tensor in tensors]
        if len(set(names)) < len(names):
            twice = sorted({name for name in names if names.count(name) > 1})
            error = InvalidInput(f"the joined tensors name {twice} more than once; rename them with tensorMap")
            if step.name != OUTPUT:
                self._fail(step.name, error)
            elif not self.response.done():
                self.response.set_exception(InferenceError(f"output : {error.message}"))
            return True
        if step.name == OUTPUT:
            self.response.set_result(tensors)
            return True
        self.fired[step.name] += 1
        if self.fired[step.name] > 1 + self.pipeline.max_step_revisits:
            self._fail(step.name, InferenceError(
                f"step '{step.name}' would run {self.fired[step.name]} times; maxStepRevisits is "
                f"{self.pipeline.max_step_revisits}"))
            return True
        self.running[step.name] += 1
        task = _keep(asyncio.ensure_future(self._run_step(step, tensors)))
        self.tasks[task] = step.name
        task.add_done_callback(self.tasks.pop)
        return True

    def _window_closed(self, step: Step) -> None:
        self.windows.pop(step.name, None)
        self._try_fire(step, force=True)
        self._check_settled()

    async def _run_step(self, step: Step, inputs: list[Tensor]) -> None:
        try:
            outputs = await self._answer(step, inputs)
        except FleetError as error:
            outputs, failure = None, error
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this request was abandoned
                raise
            outputs, failure = None, InferenceError("cancelled (the server is stopping)")
        except Exception as error:  # a bug: still this request's error, not the loop's
            log.exception("pipeline %s: step %s", self.pipeline.name, step.name)
            outputs, failure = None, InferenceError(f"{type(error).__name__}: {error}")
        else:
            failure = None
        finally:
            self.running[step.name] -= 1
        try:
            if failure is not None:
                self._fail(step.name, failure)
            elif outputs is not None:
                self._record(step.name, inputs, outputs)
                self._deliver(step.name, inputs, outputs)
            self._check_settled()
        except Exception as error:  # a bug here must still answer the request
            log.exception("pipeline %s: after step %s", self.pipeline.name, step.name)
            self._fail(step.name, InferenceError(f"{type(error).__name__}: {error}"))

    async def _answer(self, step: Step, inputs: list[Tensor]) -> list[Tensor] | None:
        """The step's outputs; None when it is batched and another request's message carries the batch."""
        async def run(tensors: list[Tensor]) -> list[Tensor]:
            request = InferenceRequest(inputs=tensors, id=self.request_id, deadline=self.deadline)
            if tracing.TRACER is None:
                return (await self.call(step.name, request)).outputs
            with tracing.span(f"{self.pipeline.name}.{step.name}", pipeline=self.pipeline.name, step=step.name):
                return (await self.call(step.name, request)).outputs

        batch = self.pipeline.batches.get(step.name)
        if batch is None:
            return await run(inputs)
        return await batch.submit(inputs, run)

    def _fail(self, step: str, error: FleetError) -> None:
        message = f"{step} : {error.message}"
        self.pipeline.step_errors[step] = self.pipeline.step_errors.get(step, 0) + 1
        if step in self.pipeline.needed and not self.response.done():
            # The request's own deadline is not the step's fault: it keeps its 504.
            self.response.set_exception((DeadlineExceeded if isinstance(error, DeadlineExceeded) else InferenceError)(message))
            return
        log.warning("pipeline %s (request %s): %s", self.pipeline.name, self.request_id, message)

    # Nothing more can come.

    def _busy(self, steps) -> bool:
        return any(self.running[name] or name in self.windows for name in steps)

    def _force_outer_joins(self, steps) -> None:
        """Outer joins among `steps` left waiting for sources that will not come take what they
        have, upstream first and one at a time: what one produces may complete a join below it."""
        while not self._busy(steps):
            waiting = (name for name in self.pipeline.order if name in steps and (self.arrived[name] or self.triggered[name]))
            if not any(self._try_fire(self.pipeline.steps[name], force=True) for name in waiting):
                return

    def _check_settled(self) -> None:
        """When no step the output needs is running or waiting for a window, nothing more can
        arrive for it: its outer joins take what they have, and if the output still cannot be
        formed the request gets the reason instead of waiting for ever. Steps off the response
        path get the same treatment once nothing at all is running."""
        needed = self.pipeline.needed
        if not self.response.done():
            self._force_outer_joins(needed)
            if not self._busy(needed) and not self.response.done() and not self._try_fire(self.pipeline.output, force=True):
                missing = [str(ref) for ref in self.pipeline.output.inputs.refs if ref not in self.arrived[OUTPUT]]
                self.response.set_exception(InferenceError(
                    f"pipeline '{self.pipeline.name}' produced no output: {missing} did not arrive "
                    f"(stepsJoin {self.pipeline.output.inputs.how})"))
        if not self._busy(self.pipeline.steps):
            self._force_outer_joins([name for name in self.pipeline.steps if name not in needed])

    def _record(self, key: str, inputs: list[Tensor], outputs: list[Tensor], error: str | None = None) -> None:
        message = {"id": self.request_id, "inputs": [Seen.of(t) for t in inputs], "outputs": [Seen.of(t) for t in outputs]}
        if error is not None:
            message["error"] = error
        self.pipeline.inspect.setdefault(key, deque(maxlen=INSPECT_DEPTH)).append(message)


def _select(ref: Ref, tensors: list[Tensor]) -> list[Tensor] | None:
    """What `ref` reads from a message, or None when the message lacks it."""
    if ref.tensor is None:
        return tensors if tensors or ref.kind == "inputs" else None
    for tensor in tensors:
        if tensor.name == ref.tensor:
            return [tensor]
    return None


def _renamed(tensor: Tensor, ref: Ref, tensor_map: dict[str, str]) -> Tensor:
    new_name = tensor_map.get(f"{ref.source}.{ref.kind}.{tensor.name}")
    return tensor if new_name is None else Tensor(new_name, tensor.data, tensor.parameters)
