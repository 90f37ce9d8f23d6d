"""DataPlane.infer(): the one entry point for every inference.

REST, gRPC and (later) pipeline steps, experiments and explainers all call `infer()`, so
validation, pinning, statistics, metrics and error mapping happen here and only here.

Time limits (Triton's queue policy) are kept here too. A request's deadline (its own, or its
model's `default_timeout_microseconds` from its arrival, the sooner) bounds the caller's wait: at
the deadline it is answered 504. Work not yet begun by then (waiting for a predict slot, or in a
batch whose every member's deadline passed) is dropped and never runs; a predict already running
cannot be stopped, so it runs to its end holding its slot, and its answer is dropped. A model's
`max_queue_size` bounds the requests waiting for its predict slots: one more is refused at once
(503). A model without either setting and a request without a deadline pay an attribute test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from concurrent.futures import Executor

import numpy as np

from fleetserve import tracing
from fleetserve.errors import DeadlineExceeded, FleetError, InferenceError, InvalidInput, NotFound, Overloaded, describe
from fleetserve.runtime import metrics
from fleetserve.runtime.batching import AdaptiveBatcher
from fleetserve.runtime.registry import ModelVersion, Registry
from fleetserve.settings import TensorMetadata
from fleetserve.types import NUMPY_DTYPES, WIRE_DTYPES, InferenceRequest, InferenceResponse, Tensor

log = logging.getLogger(__name__)


class DataPlane:
    def __init__(self, registry: Registry, executor: Executor, inline_predict_us: float = 0.0):
        self.registry = registry
        self.executor = executor
        self.inline_below_ns = int(inline_predict_us * 1000)
        self.threaded = 0  # predicts running on worker threads now
        if tracing.TRACER is not None:  # else the entry point stays unwrapped
            self.infer = self._traced_infer

    async def _traced_infer(self, name: str, version: str | None, request: InferenceRequest) -> InferenceResponse:
        """infer() in a span named after the model (Triton's), with its queue and compute under it."""
        with tracing.span(name, model_name=name, model_version=version, request_id=request.id) as span:
            response = await DataPlane.infer(self, name, version, request)
            span.set_attribute("model_version", response.model_version or "")
            return response

    async def infer(self, name: str, version: str | None, request: InferenceRequest) -> InferenceResponse:
        model = self.registry.get_ready(name, version)
        if version is not None and version != model.version:
            request.model_version = version  # one of its backend's own versions (Triton's)
        started = time.perf_counter_ns()
        model.in_flight += 1  # pinned: never evicted or unloaded while this request needs it
        try:
            _check_inputs(model, request)
            if request.deadline is None and not model.settings.default_timeout_microseconds:
                response, computed = await self._answer(model, request, None)
            else:
                response, computed = await self._answer_by_deadline(model, request)
            response = _select_outputs(model, request, response)
        except asyncio.CancelledError:  # the client went away or hit its deadline
            self._record_failure(model, started, "Cancelled")
            raise
        except FleetError as error:
            self._record_failure(model, started, type(error).__name__)
            raise
        except BaseException as error:  # a model's code may raise anything, even SystemExit; the client gets the reason
            self._record_failure(model, started, "InferenceError")
            log.warning("model %s failed: %s: %s", name, type(error).__name__, error)
            raise InferenceError(f"model '{name}' failed: {describe(error)}") from error
        finally:
            model.in_flight -= 1
        elapsed = time.perf_counter_ns() - started
        stats = model.stats
        stats.success_count += 1
        stats.success_ns += elapsed
        stats.queue_ns += computed - started
        stats.compute_infer_ns += started + elapsed - computed
        stats.latency_buckets[bisect_left(metrics.LATENCY_BUCKETS_NS, elapsed)] += 1
        if tracing.TRACER is not None:
            tracing.phases(started, computed, started + elapsed)
        stats.last_inference = time.time_ns() // 1_000_000
        response.model_name = model.name
        if model.version is not None:  # else the backend's own (Triton answers the version it ran)
            response.model_version = model.version
        response.id = request.id
        return response

    async def _answer(self, model: ModelVersion, request: InferenceRequest,
                      deadline: float | None) -> tuple[InferenceResponse, int]:
        """The model's answer, reloaded if it was evicted, batched if it batches."""
        if model.runtime is None:
            if tracing.TRACER is None:
                await self.registry.ensure_resident(model)
            else:
                with tracing.span("reload", model_name=model.name):
                    await self.registry.ensure_resident(model)
        self.registry.memory.touch(model)
        batcher = model.batcher if model.batcher is not None else self._batcher_for(model)
        if batcher:
            return await batcher.submit(request, deadline)
        return await self._compute(model, request)  # this caller's own deadline cancels its wait

    async def _answer_by_deadline(self, model: ModelVersion, request: InferenceRequest) -> tuple[InferenceResponse, int]:
        now = time.monotonic()
        deadline = request.deadline
        if model.settings.default_timeout_microseconds:
            by_default = now + model.settings.default_timeout_microseconds / 1e6
            deadline = by_default if deadline is None else min(deadline, by_default)
        if deadline <= now:
            raise _too_late(model)
        try:
            async with asyncio.timeout(deadline - now) as limit:
                return await self._answer(model, request, deadline)
        except TimeoutError:
            if limit.expired():
                raise _too_late(model) from None
            raise

    async def call(self, name: str, version: str | None, method: str, *args):
        """A runtime's own entry point beside predict (an MLflow model's scoring protocol):
        pinned, reloaded if evicted and run on a worker thread, like a predict."""
        model = self.registry.get_ready(name, version)
        model.in_flight += 1
        try:
            if model.runtime is None:
                await self.registry.ensure_resident(model)
            self.registry.memory.touch(model)
            function = getattr(model.runtime, method, None)
            if function is None:
                why = " (its runtime runs in worker processes: parallel_workers)" if model.pooled else ""
                raise NotFound(f"model '{name}' ({type(model.runtime).__name__}) does not answer {method}{why}")
            await model.slots.acquire()
            try:
                future = asyncio.get_running_loop().run_in_executor(self.executor, function, *args)
            except BaseException:  # the executor is shut down
                model.slots.release()
                raise
            model.in_flight += 1  # until the thread is done, even if the caller is not
            future.add_done_callback(lambda done: (model.slots.release(), _unpin(done, model)))
            return await asyncio.shield(future)
        except (FleetError, asyncio.CancelledError):
            raise
        except BaseException as error:  # the runtime's own code: the client gets the reason
            log.warning("model %s failed in %s: %s: %s", name, method, type(error).__name__, error)
            raise InferenceError(f"model '{name}' failed: {describe(error)}") from error
        finally:
            model.in_flight -= 1

    async def _compute(self, model: ModelVersion, request: InferenceRequest, deadline: float | None = None,
                       requests: int = 1) -> tuple[InferenceResponse, int]:
        """The runtime's answer, and when its predict began (the rest was queueing).

        Pins the model for as long as the predict runs, even past a cancelled caller: a worker
        thread cannot be stopped, and an async runtime's predict is shielded like one. `request`
        may be a batch of `requests`; a batch waits for a slot no later than `deadline`.
        """
        if model.predict_is_async:
            if model.pooled:
                await _take_slot(model, deadline, requests)
            else:
                model.in_flight += 1
            began = time.perf_counter_ns()
            task = asyncio.ensure_future(model.runtime.predict(request))
            task.add_done_callback(lambda done: _unpin(done, model, release_slot=model.pooled))
            return await asyncio.shield(task), began
        pace = model.pace or self._pace_for(model)
        input_bytes = sum(tensor.data.nbytes for tensor in request.inputs)
        if pace.inline(input_bytes):
            return self._inline(model, request)
        await _take_slot(model, deadline, requests)
        if pace.inline(input_bytes):  # proven fast while this request queued for a thread
            model.slots.release()
            model.in_flight -= 1
            return self._inline(model, request)
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self.executor, _timed_predict, model.runtime.predict, request
            )
        except BaseException:  # the executor is shut down
            model.slots.release()
            model.in_flight -= 1
            raise
        self.threaded += 1
        future.add_done_callback(lambda done: self._release(done, model, input_bytes))
        response, began, _, _ = await asyncio.shield(future)
        return response, began

    def _inline(self, model: ModelVersion, request: InferenceRequest) -> tuple[InferenceResponse, int]:
        # Other predicts on threads take the GIL from this one: its wall time then says little
        # about the model, its CPU time does.
        contended = self.threaded > 0
        cpu = time.thread_time_ns() if contended else 0  # a system call: only when it is needed
        began = time.perf_counter_ns()
        try:
            return model.runtime.predict(request), began
        finally:
            took = time.thread_time_ns() - cpu if contended else time.perf_counter_ns() - began
            if model.pace.record_inline(took):
                log.info(
                    "model %s: a predict on the event loop took %.2f ms; back on worker threads until %d fast ones",
                    model.name, took / 1e6, model.pace.needed,
                )

    def _release(self, done: asyncio.Future, model: ModelVersion, input_bytes: int) -> None:
        """When the worker thread is done, whether or not its caller still waits."""
        self.threaded -= 1
        model.slots.release()
        _unpin(done, model)
        if not done.cancelled() and done.exception() is None:
            wall_ns, cpu_ns = done.result()[2:]
            model.pace.record_threaded(wall_ns, cpu_ns, input_bytes)

    def _pace_for(self, model: ModelVersion) -> "Pace":
        model.pace = Pace(self.inline_below_ns if model.runtime.steady_cost else 0)
        return model.pace

    def _batcher_for(self, model: ModelVersion) -> AdaptiveBatcher | bool:
        settings = model.settings
        if settings.max_batch_size <= 1 or settings.max_batch_time <= 0:
            model.batcher = False
        else:
            model.batcher = AdaptiveBatcher(
                model, lambda request, deadline, requests: self._compute(model, request, deadline, requests),
                settings.max_batch_size, settings.max_batch_time,
            )
        return model.batcher

    @staticmethod
    def _record_failure(model: ModelVersion, started: int, outcome: str) -> None:
        stats = model.stats
        stats.fail_count += 1
        stats.fail_ns += time.perf_counter_ns() - started
        stats.failures[outcome] = stats.failures.get(outcome, 0) + 1


class Pace:
    """Whether a version's predict may run on the event loop: the thread hop costs more than a
    tabular model's predict.

    Earned by `needed` worker-thread predicts that took at most `below_ns` of CPU each, for
    inputs no larger than those; a predict that used more CPU starts the count again. Wall time
    on a thread includes waiting for the GIL, so it cannot say "fast", only "waits": a predict
    that took more than WAIT_NS of wall time (sleeping, on I/O, or starved) does not count.
    Inline, the wall time is what the loop pays (its CPU time while predicts on threads compete
    for the GIL): when its moving average passes SLOW_FACTOR * `below_ns` the model goes back to
    the threads, needing twice the count to return. A single outlier (a GC pass, a preempted
    core) moves the average little; one stall of 16 times the limit is enough. So the loop pays
    for a misjudged model a few stalls shorter than WAIT_NS, ever more rarely. Object (BYTES)
    inputs are sized by their element count, not contents."""

    STREAK = 32
    MAX_STREAK = 4096
    WAIT_NS = 5_000_000  # about one GIL switch interval: what a fast predict may wait for the GIL
    SLOW_FACTOR = 4
    __slots__ = ("below_ns", "fast_runs", "largest_fast_input", "needed", "inline_ns")

    def __init__(self, below_ns: int):
        self.below_ns = below_ns
        self.fast_runs = 0
        self.largest_fast_input = -1
        self.needed = self.STREAK if below_ns > 0 else -1
        self.inline_ns = 0.0  # moving average of what inline predicts took

    def inline(self, input_bytes: int) -> bool:
        return self.fast_runs >= self.needed > 0 and input_bytes <= self.largest_fast_input

    def record_threaded(self, wall_ns: int, cpu_ns: int, input_bytes: int) -> None:
        if cpu_ns > self.below_ns:
            self.fast_runs, self.largest_fast_input = 0, -1
        elif wall_ns <= self.WAIT_NS:
            self.fast_runs += 1
            self.largest_fast_input = max(self.largest_fast_input, input_bytes)

    def record_inline(self, took_ns: int) -> bool:
        """True when this predict sent the model back to the threads."""
        self.inline_ns += (took_ns - self.inline_ns) / 16
        if self.inline_ns <= self.SLOW_FACTOR * self.below_ns:
            return False
        self.fast_runs, self.largest_fast_input, self.inline_ns = 0, -1, 0.0
        self.needed = min(2 * self.needed, self.MAX_STREAK)
        return True


async def _take_slot(model: ModelVersion, deadline: float | None, requests: int) -> None:
    """One of the model's predict slots, pinning the model until the caller gives both back."""
    model.in_flight += 1
    try:
        if deadline is None and not model.settings.max_queue_size:
            await model.slots.acquire()
        else:
            await _queue_for_slot(model, deadline, requests)
    except BaseException:
        model.in_flight -= 1
        raise


async def _queue_for_slot(model: ModelVersion, deadline: float | None, requests: int) -> None:
    """Wait for one of the model's predict slots, as its queue policy allows: refused at once
    when `max_queue_size` requests already wait, dropped when `deadline` passes first."""
    limit = model.settings.max_queue_size
    if limit and model.queued >= limit:
        raise Overloaded(
            f"model '{model.name}' exceeds its maximum queue size: {model.queued} requests wait for it "
            f"(max_queue_size {limit}); retry shortly"
        )
    model.queued += requests
    try:
        if deadline is None:
            await model.slots.acquire()
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise _too_late(model)
        try:
            async with asyncio.timeout(left) as waiting:
                await model.slots.acquire()
        except TimeoutError:
            if waiting.expired():
                raise _too_late(model) from None
            raise
    finally:
        model.queued -= requests


def _too_late(model: ModelVersion) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"Deadline Exceeded: model '{model.name}' did not answer within the request's deadline (request timeout expired)")


def _unpin(done: asyncio.Future, model: ModelVersion, release_slot: bool = False) -> None:
    """When an async predict is done, whether or not its caller still waits."""
    if release_slot:
        model.slots.release()
    model.in_flight -= 1
    if not done.cancelled():
        done.exception()  # retrieved, so asyncio does not warn about a cancelled caller's failure


def _timed_predict(predict, request: InferenceRequest) -> tuple[InferenceResponse, int, int, int]:
    """Runs on a worker thread: the answer, when the predict began (before it, the request
    queued for a thread), and its wall and CPU time."""
    began, cpu = time.perf_counter_ns(), time.thread_time_ns()
    response = predict(request)
    return response, began, time.perf_counter_ns() - began, time.thread_time_ns() - cpu


def _check_inputs(model: ModelVersion, request: InferenceRequest) -> None:
    """Inputs must match the model's declared inputs, where it declares them; no two inputs, nor
    two requested outputs, may share a name."""
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    if len(request.inputs) > 1:
        _refuse_repeated_names(request.inputs, "input")
    if len(request.outputs) > 1:
        _refuse_repeated_names(request.outputs, "requested output")
    checks = model.input_checks if model.input_checks is not None else _input_checks(model)
    if not checks:
        return
    for tensor in request.inputs:
        check = checks.get(tensor.name)
        if check is None:
            raise InvalidInput(
                f"model '{model.name}' has no input '{tensor.name}'; it expects {[t.name for t in model.settings.inputs]}"
            )
        expected, dtype, fixed_dims = check
        data = tensor.data
        if data.dtype != dtype and tensor.datatype != expected.datatype:
            raise InvalidInput(
                f"input '{tensor.name}' of model '{model.name}' must be {expected.datatype}, got {tensor.datatype}"
            )
        if fixed_dims is None:
            continue
        shape = data.shape
        if len(shape) != len(expected.shape) or any(shape[axis] != size for axis, size in fixed_dims):
            raise InvalidInput(
                f"input '{tensor.name}' of model '{model.name}' must have shape {expected.shape}, got {list(shape)}"
            )


def _refuse_repeated_names(items: list, what: str) -> None:
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise InvalidInput(f"the request names {what}s {repeated} more than once")


def _input_checks(model: ModelVersion) -> dict[str, tuple[TensorMetadata, np.dtype, tuple | None]]:
    """Per declared input: its metadata, numpy dtype and the dimensions fixed by its shape
    (None when the shape is not declared), worked out once per version."""
    model.input_checks = {
        declared.name: (
            declared,
            NUMPY_DTYPES[declared.datatype],
            None if declared.shape is None else tuple((axis, size) for axis, size in enumerate(declared.shape) if size != -1),
        )
        for declared in model.settings.inputs
    }
    return model.input_checks


def _select_outputs(model: ModelVersion, request: InferenceRequest, response: InferenceResponse) -> InferenceResponse:
    """Keep only the outputs the request names, in its order; a missing one is an error."""
    if not isinstance(response, InferenceResponse):
        raise _bad_response(model, response)
    for tensor in response.outputs:
        if not isinstance(tensor, Tensor) or not isinstance(tensor.data, np.ndarray):
            raise _bad_response(model, response)
        if tensor.data.dtype not in WIRE_DTYPES:
            tensor.datatype  # raises for a dtype the protocol cannot carry (complex, datetime64, ...)
    if not request.outputs:
        return response
    produced: dict[str, Tensor] = {tensor.name: tensor for tensor in response.outputs}
    selected = []
    for wanted in request.outputs:
        tensor = produced.get(wanted.name)
        if tensor is None:
            raise InvalidInput(f"model '{model.name}' has no output '{wanted.name}'; it produced {list(produced)}")
        selected.append(tensor)
    response.outputs = selected
    return response


def _bad_response(model: ModelVersion, response) -> InferenceError:
    return InferenceError(
        f"model '{model.name}' returned {type(response).__name__}; predict() must return an InferenceResponse "
        "whose outputs are Tensors holding numpy arrays"
    )
