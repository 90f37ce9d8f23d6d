"""Open Inference Protocol request/response types.

Tensors hold numpy arrays: the front doors decode wire data once into these, runtimes work on
arrays, and the front doors encode once on the way out. BYTES tensors are object arrays of
`bytes`.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleetserve.errors import InferenceError, InvalidInput

# V2 datatype -> numpy dtype (little-endian, as the wire requires). BYTES is variable length.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype("object"),
}
DATATYPES = frozenset(NUMPY_DTYPES)
_LARGEST_ITEMSIZE = max(dtype.itemsize for dtype in NUMPY_DTYPES.values())
_MAX_BYTES = int(np.iinfo(np.intp).max)
MAX_DIMS = 32  # numpy 1.x's limit on an array's dimensions (numpy 2 raised it to 64)
_DATATYPE_OF_DTYPE = {dtype: name for name, dtype in NUMPY_DTYPES.items() if name != "BYTES"}
WIRE_DTYPES = frozenset(NUMPY_DTYPES.values())  # arrays of these need no conversion to go out


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype for a numpy array (strings and objects become BYTES)."""
    return datatype_of_dtype(array.dtype)


def datatype_of_dtype(dtype: np.dtype) -> str:
    if dtype.kind in "OSU":
        return "BYTES"
    found = _DATATYPE_OF_DTYPE.get(dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype)
    if found is None:
        raise InferenceError(f"numpy dtype {dtype} has no V2 datatype; convert the output to one that has")
    return found


def check_datatype(datatype: str, tensor: str) -> np.dtype:
    try:
        return NUMPY_DTYPES[datatype]
    except (KeyError, TypeError):
        raise InvalidInput(
            f"tensor '{tensor}': unknown datatype '{datatype}'; expected one of {sorted(DATATYPES)}"
        ) from None


def check_shape(shape: Any, tensor: str) -> tuple[int, ...]:
    if not isinstance(shape, (list, tuple)):
        _bad_shape(shape, tensor)
    if len(shape) > MAX_DIMS:
        raise InvalidInput(f"tensor '{tensor}': shape has {len(shape)} dimensions; at most {MAX_DIMS} are supported")
    nonzero_product = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:  # bool is not int here, as it must not be
            _bad_shape(shape, tensor)
        if dim:
            nonzero_product *= dim
    # numpy refuses (ValueError) any shape whose nonzero dimensions, times the item size, overflow intp.
    if nonzero_product * _LARGEST_ITEMSIZE > _MAX_BYTES:
        raise InvalidInput(f"tensor '{tensor}': shape {list(shape)} is too large for any array")
    return tuple(shape)


MAX_NESTING = 100  # how deeply a JSON or YAML body may nest (Triton's limit); the top-level value is depth 1


def check_nesting(value: Any, language: str = "JSON", depth: int = 1, budget: int | None = None) -> None:
    """Refuse a parsed document (a list or dict, sitting at `depth`) nested deeper than MAX_NESTING.

    With a budget, also refuse one holding more values than that: YAML aliases let a few lines
    share one value many times over, a document that expands to billions of values.
    """
    stack = [(value, depth)]
    seen = 0
    while stack:
        value, depth = stack.pop()
        if depth > MAX_NESTING:
            raise InvalidInput(f"{language} nesting depth exceeds the limit of {MAX_NESTING}")
        children = value.values() if type(value) is dict else value
        for child in children:
            if type(child) is list or type(child) is dict:
                stack.append((child, depth + 1))
        if budget is not None:
            seen += len(children)
            if seen > budget:
                raise InvalidInput(f"{language} document expands (through aliases) to more than {budget} values")


def _bad_shape(shape: Any, tensor: str):
    raise InvalidInput(f"tensor '{tensor}': shape must be a list of non-negative integers, got {reprlib.repr(shape)}")


@dataclass(slots=True)
class Tensor:
    """One named tensor, request input or response output. Its shape and datatype are the
    array's own, so they can never disagree with the data."""

    name: str
    data: np.ndarray
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def datatype(self) -> str:
        return datatype_of(self.data)

    @property
    def content_type(self) -> str | None:
        return self.parameters.get("content_type")


@dataclass(slots=True)
class RequestedOutput:
    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class InferenceRequest:
    inputs: list[Tensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[RequestedOutput] = field(default_factory=list)
    # time.monotonic() by which the answer is due (Triton's `timeout` parameter, a gRPC
    # deadline); None: no deadline. Set by the front doors, kept by pipeline steps.
    deadline: float | None = None
    # The version the client named, where the model's backend keeps versions of its own (Triton's).
    model_version: str | None = None

    def input(self, name: str) -> Tensor:
        for tensor in self.inputs:
            if tensor.name == name:
                return tensor
        raise InvalidInput(f"no input named '{name}'; the request has {[t.name for t in self.inputs]}")

    @property
    def content_type(self) -> str | None:
        return self.parameters.get("content_type")

    def model_parameters(self) -> dict[str, Any]:
        """The request's parameters without the protocol's own: what a framework takes as
        arguments (MLflow params, pipeline call arguments)."""
        return {key: value for key, value in self.parameters.items() if key not in _PROTOCOL_PARAMETERS}


_PROTOCOL_PARAMETERS = frozenset({"content_type", "headers", "binary_data_output"})


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    outputs: list[Tensor]
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
