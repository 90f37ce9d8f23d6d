"""DataPlane.infer(): the one entry point for every inference.

REST, gRPC and (later) pipeline steps, experiments and explainers all call `infer()`, so
validation, pinning, statistics, metrics and error mapping happen here and only here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

import numpy as np

from fleetserve.errors import FleetError, InferenceError, InvalidInput, describe
from fleetserve.runtime import metrics
from fleetserve.runtime.registry import ModelVersion, Registry
from fleetserve.settings import TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse, Tensor

log = logging.getLogger(__name__)


class DataPlane:
    def __init__(self, registry: Registry, executor: Executor):
        self.registry = registry
        self.executor = executor

    async def infer(self, name: str, version: str | None, request: InferenceRequest) -> InferenceResponse:
        model = self.registry.get_ready(name, version)
        _check_inputs(model, request)
        started = time.perf_counter_ns()
        model.in_flight += 1  # pinned: never evicted or unloaded while this request needs it
        still_running = None  # a worker thread whose caller was cancelled: the model stays pinned
        try:
            if model.runtime is None:
                await self.registry.ensure_resident(model)
            self.registry.memory.touch(model)
            if model.predict_is_async:
                response = await model.runtime.predict(request)
                computed = started
            else:
                await model.slots.acquire()
                future = asyncio.get_running_loop().run_in_executor(
                    self.executor, _timed_predict, model.runtime.predict, request
                )
                try:
                    response, computed = await asyncio.shield(future)
                except asyncio.CancelledError:
                    still_running = future
                    raise
                finally:
                    if still_running is None:
                        model.slots.release()
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
            if still_running is None:
                model.in_flight -= 1
            else:
                _release_when_done(still_running, model)
        elapsed = time.perf_counter_ns() - started
        stats = model.stats
        stats.success_count += 1
        stats.success_ns += elapsed
        stats.queue_ns += computed - started
        stats.compute_infer_ns += time.perf_counter_ns() - computed
        stats.last_inference = time.time_ns() // 1_000_000
        successes, latency = model.success_metrics or _bind_success_metrics(model)
        successes.inc()
        latency.observe(elapsed / 1e9)
        response.model_name = model.name
        response.model_version = model.version
        response.id = request.id
        return response

    @staticmethod
    def _record_failure(model: ModelVersion, started: int, outcome: str) -> None:
        elapsed = time.perf_counter_ns() - started
        model.stats.fail_count += 1
        model.stats.fail_ns += elapsed
        metrics.INFER_REQUESTS.labels(model.name, model.version or "", outcome).inc()


def _bind_success_metrics(model: ModelVersion):
    """The version's labelled metric children, looked up once rather than on every request."""
    version = model.version or ""
    model.success_metrics = (
        metrics.INFER_REQUESTS.labels(model.name, version, "success"),
        metrics.INFER_LATENCY.labels(model.name, version),
    )
    return model.success_metrics


def _release_when_done(future: asyncio.Future, model: ModelVersion) -> None:
    def release(done: asyncio.Future) -> None:
        if not done.cancelled():
            done.exception()  # retrieved, so asyncio does not warn about it
        model.slots.release()
        model.in_flight -= 1

    future.add_done_callback(release)


def _timed_predict(predict, request: InferenceRequest) -> tuple[InferenceResponse, int]:
    """Runs on a worker thread; the start time tells how long the request queued for it."""
    began = time.perf_counter_ns()
    return predict(request), began


def _check_inputs(model: ModelVersion, request: InferenceRequest) -> None:
    """Inputs must match the model's declared inputs, where it declares them."""
    if not request.inputs:
        raise InvalidInput("the request has no inputs")
    declared = model.settings.inputs
    if not declared:
        return
    by_name = {tensor.name: tensor for tensor in declared}
    for tensor in request.inputs:
        expected = by_name.get(tensor.name)
        if expected is None:
            raise InvalidInput(
                f"model '{model.name}' has no input '{tensor.name}'; it expects {[t.name for t in declared]}"
            )
        if expected.datatype != tensor.datatype:
            raise InvalidInput(
                f"input '{tensor.name}' of model '{model.name}' must be {expected.datatype}, got {tensor.datatype}"
            )
        if not _shape_fits(expected, tensor.shape):
            raise InvalidInput(
                f"input '{tensor.name}' of model '{model.name}' must have shape {expected.shape}, got {list(tensor.shape)}"
            )


def _shape_fits(expected: TensorMetadata, shape: tuple[int, ...]) -> bool:
    if expected.shape is None:
        return True
    if len(expected.shape) != len(shape):
        return False
    return all(want == -1 or want == got for want, got in zip(expected.shape, shape))


def _select_outputs(model: ModelVersion, request: InferenceRequest, response: InferenceResponse) -> InferenceResponse:
    """Keep only the outputs the request names, in its order; a missing one is an error."""
    if not isinstance(response, InferenceResponse) or not all(
        isinstance(tensor, Tensor) and isinstance(tensor.data, np.ndarray) for tensor in response.outputs
    ):
        raise InferenceError(
            f"model '{model.name}' returned {type(response).__name__}; predict() must return an InferenceResponse "
            "whose outputs are Tensors holding numpy arrays"
        )
    for tensor in response.outputs:
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
