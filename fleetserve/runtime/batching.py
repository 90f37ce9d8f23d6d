"""Adaptive batching: concurrent requests to one model merged into one predict.

Enabled per model by MLServer's settings: `max_batch_size` (requests per batch, > 1) and
`max_batch_time` (seconds the first request of a batch waits for others, > 0). Requests merge
only when their inputs line up (same names, datatypes, parameters and shape past the first
dimension) and they ask for the same outputs; inputs are concatenated along the first
dimension, and every output is split back by the same row counts.

A batch that fails is retried one request at a time, so one bad request fails alone. A model
whose outputs do not split by rows (one aggregate for the whole input) is answered request by
request from then on. A batch waits for a predict slot no later than the last of its members'
deadlines (none if a member has none); a queue policy's refusal or expiry answers every member.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
import orjson

from fleetserve.errors import DeadlineExceeded, InferenceError, Overloaded
from fleetserve.runtime import metrics
from fleetserve.types import InferenceRequest, InferenceResponse, Tensor

log = logging.getLogger(__name__)

# The data plane's predict of a request or a batch (its deadline, how many requests it holds):
# the answer, and when the model began computing it.
Predict = Callable[[InferenceRequest, float | None, int], Awaitable[tuple[InferenceResponse, int]]]


@dataclass(eq=False)
class _Waiting:
    request: InferenceRequest
    answer: asyncio.Future
    rows: int
    deadline: float | None
    queued: int = field(default_factory=time.perf_counter_ns)


class AdaptiveBatcher:
    def __init__(self, model, predict: Predict, max_size: int, max_time: float):
        self.model = model  # the ModelVersion: a batch pins it while it runs
        self.predict = predict
        self.max_size = max_size
        self.max_time = max_time
        self.splittable = True  # False once the model's outputs proved not to split by rows
        self.pending: dict[tuple, list[_Waiting]] = {}
        self.timers: dict[tuple, asyncio.TimerHandle] = {}
        self.running: set[asyncio.Task] = set()
        labels = (model.name, model.version or "")
        self.batch_size = metrics.BATCH_SIZE.labels(*labels)
        self.queue_time = metrics.BATCH_QUEUE_TIME.labels(*labels)

    async def submit(self, request: InferenceRequest, deadline: float | None = None) -> tuple[InferenceResponse, int]:
        key = _merge_key(request) if self.splittable else None
        if key is None:  # scalars have no batch dimension: alone, at once (the caller's deadline cancels it)
            return await self.predict(request, None, 1)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(request, loop.create_future(), request.inputs[0].data.shape[0], deadline)
        group = self.pending.setdefault(key, [])
        group.append(waiting)
        if len(group) >= self.max_size:
            self._flush(key)
        elif len(group) == 1:
            self.timers[key] = loop.call_later(self.max_time, self._flush, key)
        return await waiting.answer  # a cancelled caller's request is dropped from the batch, or its answer ignored

    def _flush(self, key: tuple) -> None:
        timer = self.timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        batch = [waiting for waiting in self.pending.pop(key, []) if not waiting.answer.done()]
        if batch:
            self.model.in_flight += 1  # the batch outlives callers that give up: it keeps the model loaded
            # Many requests' batch: no one request's context (log fields, trace) is its own.
            task = asyncio.create_task(self._run(batch), context=contextvars.Context())
            self.running.add(task)  # the loop holds tasks weakly
            task.add_done_callback(self._ran)

    def _ran(self, task: asyncio.Task) -> None:
        self.running.discard(task)
        self.model.in_flight -= 1

    async def _run(self, batch: list[_Waiting]) -> None:
        """Never raises: every outcome, cancellation included, goes to the callers' answers."""
        started = time.perf_counter_ns()
        for waiting in batch:
            self.queue_time.observe((started - waiting.queued) / 1e9)
        self.batch_size.observe(len(batch))
        try:
            if len(batch) > 1:
                deadlines = [waiting.deadline for waiting in batch]
                deadline = None if None in deadlines else max(deadlines)
                merged, began = await self.predict(_merge([waiting.request for waiting in batch]), deadline, len(batch))
                try:
                    parts = _split(merged, batch[0].request, [waiting.rows for waiting in batch])
                except InferenceError as error:
                    self.splittable = False
                    log.warning("model %s: adaptive batching turned off: %s", self.model.name, error.message)
                    raise
                for waiting, part in zip(batch, parts):
                    _answer(waiting, result=(part, began))
                return
        except (asyncio.CancelledError, Overloaded, DeadlineExceeded) as error:  # shutting down, or the queue's word
            for waiting in batch:
                _answer(waiting, error=error)
            return
        except BaseException:
            pass  # which request broke the batch is unknown: each runs alone, so only the bad one fails
        await asyncio.gather(*(self._run_alone(waiting) for waiting in batch if not waiting.answer.done()))

    async def _run_alone(self, waiting: _Waiting) -> None:
        try:
            _answer(waiting, result=await self.predict(waiting.request, waiting.deadline, 1))
        except BaseException as error:  # the data plane reports it as the caller's own failure
            _answer(waiting, error=error)


def _answer(waiting: _Waiting, result=None, error: BaseException | None = None) -> None:
    if waiting.answer.done():  # its caller gave up
        return
    if error is None:
        waiting.answer.set_result(result)
    elif isinstance(error, asyncio.CancelledError):
        waiting.answer.cancel()
    else:
        waiting.answer.set_exception(error)


def _merge_key(request: InferenceRequest) -> tuple | None:
    """Requests with equal keys can be concatenated; None when this one cannot be batched."""
    inputs = []
    rows = None
    for tensor in request.inputs:
        shape = tensor.data.shape
        if not shape or (rows is not None and shape[0] != rows):
            return None
        rows = shape[0]
        inputs.append((tensor.name, tensor.data.dtype.str, shape[1:], _frozen(tensor.parameters)))
    outputs = tuple((output.name, _frozen(output.parameters)) for output in request.outputs)
    return tuple(inputs), outputs, _frozen(request.parameters)


def _frozen(parameters: dict) -> bytes:
    return orjson.dumps(parameters, option=orjson.OPT_SORT_KEYS) if parameters else b""


def _merge(requests: list[InferenceRequest]) -> InferenceRequest:
    first = requests[0]
    inputs = [
        Tensor(tensor.name, np.concatenate([request.inputs[i].data for request in requests]), tensor.parameters)
        for i, tensor in enumerate(first.inputs)
    ]
    return InferenceRequest(inputs=inputs, parameters=first.parameters, outputs=first.outputs)


def _split(merged: InferenceResponse, request: InferenceRequest, rows: list[int]) -> list[InferenceResponse]:
    total = sum(rows)
    if request.outputs:  # outputs nobody asked for need not split
        wanted = {output.name for output in request.outputs}
        merged.outputs = [tensor for tensor in merged.outputs if tensor.name in wanted]
    for tensor in merged.outputs:
        if not tensor.data.shape or tensor.data.shape[0] != total:
            raise InferenceError(
                f"output '{tensor.name}' has shape {list(tensor.data.shape)} for a batch of {total} rows; "
                "adaptive batching needs one output row per input row"
            )
    bounds = np.cumsum(rows)[:-1]
    pieces = [np.split(tensor.data, bounds) for tensor in merged.outputs]
    return [
        InferenceResponse(
            model_name=merged.model_name,
            model_version=merged.model_version,
            parameters=dict(merged.parameters),
            outputs=[Tensor(tensor.name, parts[i], dict(tensor.parameters)) for tensor, parts in zip(merged.outputs, pieces)],
        )
        for i in range(len(rows))
    ]
