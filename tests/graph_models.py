"""Models for the pipeline and experiment tests: Seldon Core 2's samples (tfsimple, conditional,
mul10/add10, a counter loop) as custom Python runtimes. Each test model folder gets a copy."""

import asyncio

import numpy as np

from fleetserve.errors import InvalidInput
from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class AddSub(Runtime):
    """Triton's `simple`: INT32 INPUT0, INPUT1 [1, 16] -> OUTPUT0 = a + b, OUTPUT1 = a - b."""

    def predict(self, request):
        a, b = request.input("INPUT0").data, request.input("INPUT1").data
        return self.response([Tensor("OUTPUT0", a + b), Tensor("OUTPUT1", a - b)], request)


class Conditional(Runtime):
    """CHOICE 0 answers OUTPUT0 = INPUT0; anything else OUTPUT1 = INPUT1."""

    def predict(self, request):
        if int(request.input("CHOICE").data.ravel()[0]) == 0:
            return self.response([Tensor("OUTPUT0", request.input("INPUT0").data)], request)
        return self.response([Tensor("OUTPUT1", request.input("INPUT1").data)], request)


class Mul10(Runtime):
    def predict(self, request):
        return self.response([Tensor("OUTPUT", request.input("INPUT").data * 10)], request)


class Add10(Runtime):
    def predict(self, request):
        return self.response([Tensor("OUTPUT", request.input("INPUT").data + 10)], request)


class Check(Runtime):
    """OUTPUT (a trigger) only when every value of INPUT is positive; otherwise no tensor at all."""

    def predict(self, request):
        data = request.input("INPUT").data
        return self.response([Tensor("OUTPUT", np.array([1], dtype=np.int32))] if (data > 0).all() else [], request)


class RowCount(Runtime):
    """A drift-detector stand-in: how many rows it was given at once, and their mean."""

    def predict(self, request):
        data = request.inputs[0].data
        rows = np.array([data.shape[0]], dtype=np.int64)
        return self.response([Tensor("rows", rows), Tensor("mean", np.array([data.mean()]))], request)


class Counter(Runtime):
    """Adds one to `count`; says `continue` below `limit` (default 3) and `stop` at it."""

    def predict(self, request):
        count = request.input("count").data + 1
        limit = int(self.settings.extra.get("limit", 3))
        flag = "stop" if int(count.ravel()[0]) >= limit else "continue"
        return self.response([Tensor("count", count), Tensor(flag, np.array([1], dtype=np.int32))], request)


class Identity(Runtime):
    def predict(self, request):
        return self.response([Tensor(t.name, t.data) for t in request.inputs], request)


class Refuse(Runtime):
    def predict(self, request):
        raise InvalidInput("this step refuses every request")


class Slow(Runtime):
    """Identity after `extra.seconds` (default 1) of sleep: a step that takes its time."""

    async def predict(self, request):
        await asyncio.sleep(float(self.settings.extra.get("seconds", 1)))
        return self.response([Tensor(t.name, t.data) for t in request.inputs], request)
