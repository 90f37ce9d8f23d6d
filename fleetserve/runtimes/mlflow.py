"""MLflow models (`mlflow.pyfunc`), served over V2 and over MLflow's own scoring protocol.

The model's signature becomes its V2 metadata (boolean BOOL, integer INT32, long INT64, float
FP32, double FP64, string and binary BYTES). A request reaches `predict` as the signature
expects it: a DataFrame for a column signature (one input per column, or one 2-D tensor whose
columns are the signature's), a dict of arrays for named tensors, the array itself for a single
tensor. Request parameters other than V2's own become MLflow params when the model declares
params. Outputs: one per DataFrame column or dict key, else one named `output-1` (MLServer's
name), unless the signature names it.

`POST /v2/models/{name}/invocations` (JSON or CSV) and `GET /v2/models/{name}/ping` answer as
`mlflow models serve` does, for each MLflow model.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import mlflow.models.model
import mlflow.pyfunc
import numpy as np
import orjson
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from mlflow.types import ColSpec, DataType, Schema, TensorSpec

from fleetserve import codecs
from fleetserve.errors import FleetError, InvalidInput, ModelLoadError
from fleetserve.runtime.base import Runtime
from fleetserve.settings import TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse, Tensor, datatype_of_dtype

JSON = "application/json"
_DATATYPES = {
    DataType.boolean: "BOOL",
    DataType.integer: "INT32",
    DataType.long: "INT64",
    DataType.float: "FP32",
    DataType.double: "FP64",
    DataType.string: "BYTES",
    DataType.binary: "BYTES",
}
DEFAULT_OUTPUT = "output-1"
# Models from code hand their model over through a module global: one load at a time.
_loading = threading.Lock()


class MLflowRuntime(Runtime):

    def load(self) -> None:
        folder = self.settings.artifact_path
        if folder.is_file():  # the uri names the MLmodel file
            folder = folder.parent
        if not (folder / "MLmodel").is_file():
            raise ModelLoadError(f"model '{self.name}': {folder} has no MLmodel file; point the uri at an MLflow model folder")
        with _loading:
            modules = set(sys.modules)
            try:
                self.model = mlflow.pyfunc.load_model(str(folder))
            except MlflowException as error:
                raise ModelLoadError(f"model '{self.name}': MLflow cannot load {folder}: {error.message}") from None
            finally:
                # A models-from-code model stays in MLflow's global and its code module in
                # sys.modules: through them an unloaded model would never be freed.
                mlflow.models.model.__mlflow_model__ = None
                for name in set(sys.modules) - modules:
                    if name.startswith("code_model_"):
                        del sys.modules[name]
        metadata = self.model.metadata
        self.input_schema: Schema | None = metadata.get_input_schema()
        self.output_schema: Schema | None = metadata.get_output_schema()
        self.takes_params = metadata.get_params_schema() is not None
        self.own_inputs = _metadata(self.input_schema, "input")
        self.own_outputs = _metadata(self.output_schema, "output")

    def unload(self) -> None:
        self.model = None

    def predict(self, request: InferenceRequest) -> InferenceResponse:
        data = self._model_input(request)
        params = request.model_parameters()
        try:
            result = self.model.predict(data, params=params or None) if self.takes_params else self.model.predict(data)
        except MlflowException as error:  # the signature refused the input or the params
            raise InvalidInput(f"model '{self.name}': {error.message}") from None
        return self.response(self._outputs(result), request)

    def _model_input(self, request: InferenceRequest) -> Any:
        schema = self.input_schema
        if request.content_type == "pd" or (schema is not None and not schema.is_tensor_spec()):
            return self._dataframe(request)
        if schema is not None and schema.has_input_names():
            return {tensor.name: _value(tensor) for tensor in request.inputs}
        if len(request.inputs) == 1:
            return _value(request.inputs[0])
        return self._dataframe(request)

    def _dataframe(self, request: InferenceRequest) -> pd.DataFrame:
        """One column per input; a single 2-D input is the table itself, columns named by the signature."""
        columns = self.input_schema.input_names() if self.input_schema is not None and self.input_schema.has_input_names() else []
        if len(request.inputs) == 1 and request.inputs[0].data.ndim == 2 and len(columns) == request.inputs[0].data.shape[1] > 1:
            return pd.DataFrame(request.inputs[0].data, columns=columns)
        return codecs.to_dataframe(request)

    def _outputs(self, result: Any) -> list[Tensor]:
        if isinstance(result, pd.DataFrame):
            return [_tensor(str(column), result[column]) for column in result.columns]
        if isinstance(result, dict):
            return [_tensor(str(key), value) for key, value in result.items()]
        names = [tensor.name for tensor in self.own_outputs]
        return [_tensor(names[0] if len(names) == 1 else DEFAULT_OUTPUT, result)]

    def invocations(self, body: bytes, content_type: str) -> tuple[int, str | bytes, str]:
        """MLflow's scoring protocol: (status, body, content type) as `mlflow models serve` answers,
        but every error is JSON with this server's `error` key (MLflow's own keys kept beside it)."""
        try:
            answer = scoring_server.invocations(body, content_type, self.model, self.input_schema)
        except MlflowException as error:  # refused input: MLflow's server answers these as JSON errors
            # `error` as every route answers, and the fields MLflow's own server sends, less its stack trace.
            document = {"error": error.message, "error_code": error.error_code, "message": error.message}
            return error.get_http_status_code(), orjson.dumps(document), "application/json"
        if answer.status >= 400 and answer.mimetype != "application/json":  # MLflow's 415s are plain text
            return answer.status, orjson.dumps({"error": answer.response.strip()}), "application/json"
        return answer.status, answer.response, answer.mimetype


def _tensor(name: str, value: Any) -> Tensor:
    """An output from whatever a pyfunc returns: arrays and Series as they are, text as BYTES, a
    lone value as one element, and dicts or ragged lists as one JSON text per element."""
    if isinstance(value, (np.ndarray, pd.Series)):
        return codecs.encode_tensor(name, value)
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        value = [value]
    if all(isinstance(item, (str, bytes)) for item in value):
        return codecs.encode_tensor(name, value)
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        array = None
    if array is None or array.dtype == object:
        return codecs.encode_tensor(name, [codecs.json_text(item) for item in value], "str")
    return codecs.encode_tensor(name, array)


def _value(tensor: Tensor) -> Any:
    """An input as the model sees it: text for BYTES, the array otherwise."""
    if tensor.data.dtype.kind == "O":
        return np.array(codecs.decode_tensor(tensor, "str"), dtype=object).reshape(tensor.data.shape)
    return tensor.data


def _metadata(schema: Schema | None, kind: str) -> list[TensorMetadata]:
    if schema is None:
        return []
    tensors = []
    for index, spec in enumerate(schema.inputs, start=1):
        name = spec.name or (DEFAULT_OUTPUT if kind == "output" and len(schema.inputs) == 1 else f"{kind}-{index}")
        if isinstance(spec, TensorSpec):
            try:
                datatype = datatype_of_dtype(np.dtype(spec.type))
            except FleetError:  # a dtype V2 has no name for (datetime64, ...): it travels as text
                datatype = "BYTES"
            shape = list(spec.shape)
        elif isinstance(spec, ColSpec):
            # Datetimes, arrays, objects and maps travel as text.
            datatype = _DATATYPES.get(spec.type, "BYTES") if isinstance(spec.type, DataType) else "BYTES"
            shape = [-1]
        else:
            datatype, shape = "BYTES", [-1]
        tensors.append(TensorMetadata(name=name, datatype=datatype, shape=shape))
    return tensors
