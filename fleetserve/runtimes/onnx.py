"""ONNX models run by onnxruntime on the CPU.

Input and output names, datatypes and shapes come from the graph (dynamic dimensions as -1).
Session options come from `parameters.extra`: `intra_op_num_threads`, `inter_op_num_threads`,
`execution_mode` (sequential, parallel), `graph_optimization_level` (disable, basic, extended,
all) and `allow_spinning`. Spinning is off by default: idle intra-op threads that spin take CPU
from every other model the server hosts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from fleetserve import codecs
from fleetserve.codecs.numpy import as_bytes
from fleetserve.errors import InvalidInput, ModelLoadError
from fleetserve.runtime.base import Runtime
from fleetserve.settings import TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse

_DATATYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32", "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32", "tensor(int64)": "INT64",
    "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}
_EXECUTION_MODES = {"sequential": onnxruntime.ExecutionMode.ORT_SEQUENTIAL, "parallel": onnxruntime.ExecutionMode.ORT_PARALLEL}
_OPTIMIZATION_LEVELS = {
    "disable": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
SESSION_OPTIONS = ("intra_op_num_threads", "inter_op_num_threads", "execution_mode", "graph_optimization_level", "allow_spinning")


class OnnxRuntime(Runtime):

    def load(self) -> None:
        path = self.artifact(("model.onnx",), (".onnx",))
        options = session_options(self.name, self.settings.extra)
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own kinds (InvalidProtobuf, NoSuchFile, Fail, ...) say why
            raise ModelLoadError(f"model '{self.name}': onnxruntime cannot load {path.name}: {error}") from None
        self.own_inputs = [_metadata(node) for node in self.session.get_inputs()]
        self.own_outputs = [_metadata(node) for node in self.session.get_outputs()]
        self.input_types = {tensor.name: tensor.datatype for tensor in self.own_inputs}
        self.output_names = [tensor.name for tensor in self.own_outputs]

    def unload(self) -> None:
        self.session = None

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        feeds = {}
        for tensor in request.inputs:
            expected = self.input_types.get(tensor.name)
            if expected is None:
                raise InvalidInput(f"model '{self.name}' has no input '{tensor.name}'; its graph takes {list(self.input_types)}")
            if tensor.datatype != expected:
                raise InvalidInput(f"input '{tensor.name}' of model '{self.name}' must be {expected}, got {tensor.datatype}")
            feeds[tensor.name] = _text(tensor.data) if expected == "BYTES" else tensor.data
        missing = [name for name in self.input_types if name not in feeds]
        if missing:
            raise InvalidInput(f"model '{self.name}' needs inputs {missing} as well")
        names = [output.name for output in request.outputs] or self.output_names
        unknown = [name for name in names if name not in self.output_names]
        if unknown:
            raise InvalidInput(f"model '{self.name}' has no output {unknown[0]!r}; its graph gives {self.output_names}")
        try:
            values = self.session.run(names, feeds)
        except InvalidArgument as error:  # shapes or values the graph refuses
            raise InvalidInput(f"model '{self.name}': {error}") from None
        return self.response([codecs.encode_tensor(name, _tensor_value(value)) for name, value in zip(names, values)], request)


def session_options(model: str, extra: dict[str, Any]) -> onnxruntime.SessionOptions:
    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in extra.items():
        if key in ("intra_op_num_threads", "inter_op_num_threads"):
            if type(value) is not int or value < 0:
                raise ModelLoadError(f"model '{model}': parameters.extra.{key} must be a non-negative integer (0: one per core)")
            setattr(options, key, value)
        elif key == "execution_mode":
            options.execution_mode = _choice(model, key, value, _EXECUTION_MODES)
        elif key == "graph_optimization_level":
            options.graph_optimization_level = _choice(model, key, value, _OPTIMIZATION_LEVELS)
        elif key == "allow_spinning":
            if not isinstance(value, bool):
                raise ModelLoadError(f"model '{model}': parameters.extra.allow_spinning must be true or false")
            options.add_session_config_entry("session.intra_op.allow_spinning", str(int(value)))
        else:
            raise ModelLoadError(f"model '{model}': unknown parameters.extra.{key} for an ONNX model; known: {list(SESSION_OPTIONS)}")
    return options


def _choice(model: str, key: str, value: Any, choices: dict) -> Any:
    if value not in choices:
        raise ModelLoadError(f"model '{model}': parameters.extra.{key} must be one of {list(choices)}, got {value!r}")
    return choices[value]


def _metadata(node) -> TensorMetadata:
    # Symbolic ("batch") and unknown (None) dimensions are dynamic; sequences and maps (a
    # classifier's ZipMap output) have no tensor shape and are answered as JSON text.
    shape = [dim if isinstance(dim, int) else -1 for dim in node.shape] if node.type in _DATATYPES else [-1]
    return TensorMetadata(name=node.name, datatype=_DATATYPES.get(node.type, "BYTES"), shape=shape)


def _text(array: np.ndarray) -> np.ndarray:
    """BYTES elements as str, which onnxruntime's string tensors hold."""
    texts = np.empty(array.size, dtype=object)
    try:
        texts[:] = [as_bytes(item).decode() for item in array.flat]
    except UnicodeDecodeError as error:
        raise InvalidInput(f"a string input holds invalid UTF-8: {error}") from None
    return texts.reshape(array.shape)


def _tensor_value(value: Any) -> Any:
    """Tensors as they are; each element of a sequence (of maps, or of tensors) as JSON text."""
    if isinstance(value, np.ndarray):
        return value
    return [codecs.json_text(item) for item in value]

