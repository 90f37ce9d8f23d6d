"""The REST API as an OpenAPI 3.0 document: served at /v2/docs/dataplane.json (where MLServer
serves its own) and rendered offline by the Swagger UI page at /v2/docs.

Written by hand, not generated: handlers read raw bodies (never pydantic models), so FastAPI
could not describe a single request. What keeps it true:
- its paths and methods are exactly the routes the server answers, path templates spelled as the
  app's own (tests/test_openapi.py walks the app's routes and the fast path's);
- a fuzzer (schemathesis) runs every operation from it against a live server and holds the
  answers to its statuses and schemas.
The document is built once, at import; DOCUMENT_JSON is the bytes the server sends.
"""

from __future__ import annotations

from typing import Any

import orjson

from fleetserve import __version__
from fleetserve.codecs import REQUEST_CONTENT_TYPES, TENSOR_CONTENT_TYPES
from fleetserve.runtime.registry import LOADING, READY, UNAVAILABLE, UNLOADING
from fleetserve.server.security import OPEN, ROUTES
from fleetserve.types import DATATYPES

OPENAPI_VERSION = "3.0.3"  # the bundled Swagger UI (4.x) renders 3.0, not 3.1

# Reasons, by status, that a route gives an error; every error body is {"error": "..."}.
_REASONS = {
    400: "The request is malformed, or does not fit the model; or the model cannot serve it",
    401: "The route needs a token (the server was started with one) and the request sent none",
    403: "The request's token does not open this route",
    404: "No such model, version, pipeline or experiment",
    413: "The body (or what it inflates to) exceeds the server's max message size",
    415: "The body's Content-Type is not one the model's scoring server reads",
    424: "A model the pipeline or experiment needs is not ready",
    500: "An error in the server or in the model's own code",
    503: "The server or the model is not available now (starting, stopping, unavailable, busy)",
    504: "The request's deadline passed before it was served",
}


def _ref(kind: str, name: str) -> dict:
    return {"$ref": f"#/components/{kind}/{name}"}


def _schema(name: str) -> dict:
    return _ref("schemas", name)


def _json(schema: dict, example: Any = None) -> dict:
    media: dict[str, Any] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _operation(summary: str, tag: str, ok: dict, errors: tuple[int, ...] = (), *, description: str = "",
               parameters: list | None = None, body: dict | None = None, ok_headers: dict | None = None) -> dict:
    """One operation: its 200 answer (`ok`: content by media type) and its error statuses (500 is
    always possible: a fault in the server or in a model's code)."""
    answer: dict[str, Any] = {"description": "OK", "content": ok}
    if ok_headers:
        answer["headers"] = ok_headers
    responses: dict[str, Any] = {"200": answer}
    for status in sorted({*errors, 500}):
        responses[str(status)] = _ref("responses", str(status))
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


def _body(content: dict, required: bool = True, description: str = "") -> dict:
    body: dict[str, Any] = {"required": required, "content": content}
    if description:
        body["description"] = description
    return body


# The Swagger UI files the page loads, served by the server itself (no CDN: it works offline).
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}

_NAME = _ref("parameters", "ModelName")
_VERSION = _ref("parameters", "ModelVersion")
_MODEL_BASES = (("/v2/models/{name}", [_NAME]), ("/v2/models/{name}/versions/{version}", [_NAME, _VERSION]))
_PIPELINE = _ref("parameters", "PipelineName")
_EXPERIMENT = _ref("parameters", "ExperimentName")
_ENCODING = _ref("parameters", "ContentEncoding")
_REQUEST_ID = _ref("parameters", "RequestId")
_SELDON_MODEL = _ref("parameters", "SeldonModel")
_SELDON_ROUTE = _ref("parameters", "SeldonRoute")

_EMPTY_OBJECT = _json({"type": "object", "additionalProperties": False, "maxProperties": 0})
_IRIS_REQUEST = {
    "id": "request-1",
    "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [2, 4], "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}],
}
_IRIS_RESPONSE = {
    "model_name": "iris", "model_version": "1", "id": "request-1",
    "outputs": [{"name": "predict", "datatype": "INT64", "shape": [2], "data": [0, 2], "parameters": {"content_type": "np"}}],
}
_MANIFEST_YAML = """apiVersion: mlops.seldon.io/v1alpha1
kind: Pipeline
metadata:
  name: iris-pipeline
spec:
  steps:
    - name: iris
  output:
    steps: [iris]
"""


def _per_model(suffix: str, operation_for) -> dict[str, dict]:
    """The same route with and without a version: /v2/models/{name}SUFFIX and .../versions/{version}SUFFIX."""
    return {
        f"/v2/models/{{name}}{suffix}": operation_for([_NAME]),
        f"/v2/models/{{name}}/versions/{{version}}{suffix}": operation_for([_NAME, _VERSION]),
    }


def _infer(parameters: list, headers: list, errors: tuple[int, ...] = ()) -> dict:
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {"post": _operation(
        "Inference", "inference",
        {**_json(_schema("InferenceResponse"), _IRIS_RESPONSE), **binary},
        (400, 404, 413, 503, 504, *errors),
        description=(
            "Open Inference Protocol inference, JSON or with Triton's binary tensor data extension: "
            "with an `Inference-Header-Content-Length` header, the body is that many bytes of JSON "
            "followed by the inputs' raw bytes (`parameters.binary_data_size` each), whatever the "
            "Content-Type. Outputs asked for with `binary_data` come back the same way."
        ),
        parameters=[*parameters, _ref("parameters", "InferenceHeaderContentLength"), _ENCODING, _REQUEST_ID, *headers],
        body=_body({**_json(_schema("InferenceRequest"), _IRIS_REQUEST), **binary}),
        ok_headers={
            "Inference-Header-Content-Length": {"description": "The length of the JSON before binary outputs",
                                                "schema": {"type": "integer"}},
            "x-seldon-route": {"description": "The experiment candidate that answered: send it back to stick to it",
                               "schema": {"type": "string"}},
        },
    )}


def _model_routes() -> dict[str, dict]:
    unavailable = (400, 404, 503)
    paths: dict[str, dict] = {
        "/v2/models/stats": {"get": _operation("Statistics of every model", "models", _json(_schema("ModelStatistics")))},
    }
    paths |= _per_model("/stats", lambda p: {"get": _operation(
        "Model statistics", "models", _json(_schema("ModelStatistics")), unavailable, parameters=p)})
    paths |= _per_model("", lambda p: {"get": _operation(
        "Model metadata", "metadata", _json(_schema("MetadataModelResponse")), unavailable, parameters=p)})
    paths |= _per_model("/ready", lambda p: {"get": _operation(
        "Model ready", "health", _json(_schema("ModelReadyResponse")), unavailable, parameters=p,
        description="200 when the model (version) can serve; an error otherwise.")})
    paths |= _per_model("/config", lambda p: {"get": _operation(
        "Model configuration (Triton's form)", "models", _json(_schema("ModelConfig")), unavailable, parameters=p)})
    paths |= _per_model("/infer", lambda p: _infer(p, [_SELDON_MODEL, _SELDON_ROUTE]))
    paths |= _per_model("/invocations", lambda p: {"post": _operation(
        "MLflow scoring", "mlflow", {"application/json": {"schema": {}}}, (400, 404, 413, 415, 503),
        description="What `mlflow models serve` answers at /invocations, for an MLflow model.",
        parameters=[*p, _ENCODING],
        body=_body({
            **_json({"type": "object", "description": "dataframe_split, dataframe_records, instances or inputs"},
                    {"dataframe_split": {"columns": ["a", "b"], "data": [[1, 2]]}}),
            "text/csv": {"schema": {"type": "string"}},
        }))})
    paths |= _per_model("/ping", lambda p: {"get": _operation(
        "MLflow ping", "mlflow", {"text/plain": {"schema": {"type": "string"}}}, unavailable, parameters=p,
        description="200 (a newline) when the MLflow model can serve.")})
    return paths


def _repository_routes() -> dict[str, dict]:
    return {
        "/v2/repository/index": {"post": _operation(
            "Repository index", "repository", _json(_schema("RepositoryIndex")), (400, 413),
            description="Every model the server knows or the repository holds, with its state.",
            parameters=[_ENCODING],
            body=_body(_json(_schema("RepositoryIndexRequest"), {"ready": True}), required=False))},
        "/v2/repository/models/{name}/load": {"post": _operation(
            "Load or reload a model", "repository", _EMPTY_OBJECT, (400, 404, 413, 503),
            description="Loads the model from the repository folder; a loaded one is reloaded.",
            parameters=[_NAME, _ENCODING],
            body=_body(_json(_schema("RepositoryLoadRequest")), required=False))},
        "/v2/repository/models/{name}/unload": {"post": _operation(
            "Unload a model", "repository", _EMPTY_OBJECT, (400, 404), parameters=[_NAME])},
    }


def _manifest_body(description: str) -> dict:
    return _body({
        "application/yaml": {"schema": {"type": "string"}, "example": _MANIFEST_YAML},
        **_json(_schema("Manifest")),
    }, description=description)


def _graph_routes(kind: str, status_schema: str) -> dict[str, dict]:
    """Pipelines and experiments share one API: create, list, status, ready, delete."""
    path, tag, name = f"/v2/{kind}s", f"{kind}s", _PIPELINE if kind == "pipeline" else _EXPERIMENT
    return {
        path: {
            "post": _operation(
                f"Create or replace {kind}s", tag, _json(_schema("Applied")), (400, 404, 413, 503),
                parameters=[_ENCODING],
                body=_manifest_body(f"`kind: {kind.capitalize()}` manifests (YAML, or JSON), several documents allowed")),
            "get": _operation(f"List {kind}s", tag, _json({"type": "array", "items": _schema(status_schema)})),
        },
        f"{path}/{{name}}": {
            "get": _operation(f"A {kind}'s status and manifest", tag, _json(_schema(status_schema)), (404,),
                              parameters=[name]),
            "delete": _operation(f"Delete a {kind}", tag, _EMPTY_OBJECT, (404,), parameters=[name]),
        },
        f"{path}/{{name}}/ready": {"get": _operation(
            f"{kind.capitalize()} ready", tag, _json(_schema("ModelReadyResponse")), (404, 424), parameters=[name])},
    }


def _pipeline_extras() -> dict[str, dict]:
    limit = {"name": "limit", "in": "query", "required": False, "description": "At most this many messages per step",
             "schema": {"type": "integer", "minimum": 1}}
    target = {"name": "target", "in": "path", "required": True, "example": "iris.outputs",
              "description": "STEP, STEP.inputs|outputs or STEP.inputs|outputs.TENSOR", "schema": {"type": "string"}}
    inspect = lambda parameters: {"get": _operation(  # noqa: E731
        "A pipeline's last messages", "pipelines", _json(_schema("PipelineMessages")), (400, 404),
        parameters=parameters)}
    return {
        "/v2/pipelines/{name}/infer": _infer([_PIPELINE], [_SELDON_ROUTE], (424,)),
        "/v2/pipelines/{name}/inspect": inspect([_PIPELINE, limit]),
        "/v2/pipelines/{name}/inspect/{target}": inspect([_PIPELINE, target, limit]),
    }


def _other_routes() -> dict[str, dict]:
    return {
        "/v2/health/live": {"get": _operation("Server live", "health", _json(_schema("LiveResponse")))},
        "/v2/health/ready": {"get": _operation(
            "Server ready", "health", _json(_schema("ReadyResponse")), (503,),
            description="200 once every model in the repository has been tried; 503 while starting or stopping.")},
        "/v2": {"get": _operation("Server metadata", "metadata", _json(_schema("MetadataServerResponse")))},
        "/v2/manifests": {
            "post": _operation("Apply Seldon Core 2 manifests", "manifests", _json(_schema("Applied")),
                               (400, 404, 413, 503), parameters=[_ENCODING],
                               body=_manifest_body("`kind: Model | Pipeline | Experiment` manifests (YAML or JSON)")),
            "delete": _operation("Delete what manifests name", "manifests", _json(_schema("Deleted")),
                                 (400, 404, 413), parameters=[_ENCODING],
                                 body=_manifest_body("The manifests to delete (only kind and metadata.name are read)")),
        },
        "/v2/fleet": {"get": _operation(
            "The fleet's replicas", "fleet", _json({"type": "object", "properties": {
                "fleet": {"type": "string"}, "replica": {"type": "string", "description": "This replica's id"},
                "etcd": {"type": "string", "enum": ["connected", "unreachable"]},
                "replicas": {"type": "array", "items": {"type": "object"}}}}), (404,),
            description="Every replica as this one last saw it in etcd (address, capabilities, memory, models, "
                        "requests in flight, state); 404 for a server started without --etcd.")},
        "/v2/fleet/models/{name}": {"get": _operation(
            "A model across the fleet", "fleet", _json({"type": "object", "properties": {
                "name": {"type": "string"}, "manifest": {"type": "boolean"},
                "cost_bytes": {"type": "integer", "nullable": True}, "loading": {"type": "object", "nullable": True},
                "copies": {"type": "array", "items": {"type": "object"}}}}), (404,), parameters=[_NAME],
            description="Its copies (replica, address, state, requests in flight) and why each was placed where "
                        "it is: the candidates and their figures when it was placed.")},
        "/metrics": {"get": _operation(
            "Prometheus metrics", "metrics", {"text/plain": {"schema": {"type": "string"}}},
            description="Also served alone on the metrics port.")},
        "/v2/docs": {"get": _operation("This document, rendered (Swagger UI)", "documentation",
                                       {"text/html": {"schema": {"type": "string"}}})},
        "/v2/docs/dataplane.json": {"get": _operation("This document", "documentation", _json({"type": "object"}))},
        **{f"/v2/docs/{asset}": {"get": _operation(f"Swagger UI's {asset}", "documentation",
                                                  {media_type: {"schema": {"type": "string"}}})}
           for asset, media_type in DOCS_ASSETS.items()},
        # MLServer's per-model documentation: this document's routes of one model, rendered.
        **{f"{base}/docs": {"get": _operation("The model's routes, rendered (Swagger UI)", "documentation",
                                               {"text/html": {"schema": {"type": "string"}}}, (404,), parameters=given)}
           for base, given in _MODEL_BASES},
        **{f"{base}/docs/dataplane.json": {"get": _operation(
            "The model's routes: this document's, for its name (and version)", "documentation",
            _json({"type": "object"}), (404,), parameters=given)} for base, given in _MODEL_BASES},
    }


def model_document(name: str, version: str | None) -> dict:
    """The document's routes under /v2/models/{name}[/versions/{version}], for this model."""
    base = "/v2/models/{name}" + ("/versions/{version}" if version else "")
    concrete = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
    fixed = {_NAME["$ref"], _VERSION["$ref"] if version else None}
    paths = {}
    for path, item in DOCUMENT["paths"].items():
        rest = path[len(base):]
        if not path.startswith(base) or (not version and rest.startswith("/versions")) or "/docs" in rest:
            continue
        paths[concrete + rest] = {method: {**operation, "parameters": [
            parameter for parameter in operation.get("parameters", ()) if parameter.get("$ref") not in fixed]}
            for method, operation in item.items()}
    title = f"fleetserve: model {name}" + (f", version {version}" if version else "")
    return {**DOCUMENT, "info": {**DOCUMENT["info"], "title": title}, "paths": paths}


_PARAMETERS = {
    "ModelName": {"name": "name", "in": "path", "required": True, "description": "The model's name",
                  "schema": {"type": "string"}, "example": "iris"},
    "ModelVersion": {"name": "version", "in": "path", "required": True, "description": "A version of the model",
                     "schema": {"type": "string"}, "example": "1"},
    "PipelineName": {"name": "name", "in": "path", "required": True, "description": "The pipeline's name",
                     "schema": {"type": "string"}, "example": "iris-pipeline"},
    "ExperimentName": {"name": "name", "in": "path", "required": True, "description": "The experiment's name",
                       "schema": {"type": "string"}, "example": "iris-experiment"},
    "ContentEncoding": {"name": "Content-Encoding", "in": "header", "required": False,
                        "description": "The body is compressed (gzip members may be concatenated)",
                        "schema": {"type": "string", "enum": ["gzip", "deflate", "identity", ""]}},
    "RequestId": {"name": "x-request-id", "in": "header", "required": False,
                  "description": "Echoed in the answer's headers", "schema": {"type": "string"}},
    "InferenceHeaderContentLength": {
        "name": "Inference-Header-Content-Length", "in": "header", "required": False,
        "description": "Binary tensor data extension: the length of the JSON that starts the body",
        "schema": {"type": "integer", "minimum": 0}},
    "SeldonModel": {"name": "seldon-model", "in": "header", "required": False,
                    "description": "Route to NAME (a model), NAME.pipeline or NAME.experiment instead",
                    "schema": {"type": "string"}},
    "SeldonRoute": {"name": "x-seldon-route", "in": "header", "required": False,
                    "description": "An experiment's earlier answer's route: the same candidate answers",
                    "schema": {"type": "string"}},
}

_PARAMETERS_OBJECT = {"type": "object", "additionalProperties": True,
                      "description": "Free-form parameters; the V2 ones are documented by the protocol"}
_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_DATATYPE = {"type": "string", "enum": sorted(DATATYPES)}
_TENSOR_ELEMENT = {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}]}

_SCHEMAS = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Parameters": _PARAMETERS_OBJECT,
    "RequestParameters": {**_PARAMETERS_OBJECT, "properties": {
        "content_type": {"type": "string", "enum": list(REQUEST_CONTENT_TYPES),
                         "description": "How the runtime sees the inputs: arrays, text, or one DataFrame"},
        "binary_data_output": {"type": "boolean", "description": "Every output as binary data"},
        "timeout": {"type": "integer", "minimum": 0,
                    "description": "Microseconds the request may take (Triton's); past it, 504 and work not yet "
                                   "begun is dropped"},
    }},
    "InputParameters": {**_PARAMETERS_OBJECT, "properties": {
        "content_type": {"type": "string", "enum": list(TENSOR_CONTENT_TYPES)},
        "binary_data_size": {"type": "integer", "minimum": 0,
                             "description": "This input's bytes follow the JSON (binary tensor data extension)"},
    }},
    "OutputParameters": {**_PARAMETERS_OBJECT, "properties": {
        "binary_data": {"type": "boolean", "description": "This output as binary data"},
    }},
    "TensorData": {
        "description": "Row-major values, flat or nested as the shape; BYTES as text, BOOL as true/false",
        "type": "array",
        "items": {"anyOf": [_TENSOR_ELEMENT, {"type": "array", "items": {}}]},
    },
    "RequestInput": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"}, "shape": _SHAPE, "datatype": _DATATYPE,
            "parameters": _schema("InputParameters"), "data": _schema("TensorData"),
        },
        "description": "`data`, or `parameters.binary_data_size` with the binary extension",
    },
    "RequestOutput": {
        "type": "object", "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _schema("OutputParameters")},
    },
    "InferenceRequest": {
        "type": "object", "required": ["inputs"],
        "properties": {
            "id": {"type": "string"}, "parameters": _schema("RequestParameters"),
            "inputs": {"type": "array", "items": _schema("RequestInput")},
            "outputs": {"type": "array", "items": _schema("RequestOutput")},
        },
    },
    "ResponseOutput": {
        "type": "object", "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"}, "shape": _SHAPE, "datatype": _DATATYPE,
            "parameters": _schema("Parameters"), "data": _schema("TensorData"),
        },
    },
    "InferenceResponse": {
        "type": "object", "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": _schema("Parameters"), "outputs": {"type": "array", "items": _schema("ResponseOutput")},
        },
    },
    "MetadataTensor": {
        "type": "object", "required": ["name", "datatype"],
        "properties": {
            "name": {"type": "string"}, "datatype": _DATATYPE,
            "shape": {"type": "array", "items": {"type": "integer"}, "nullable": True,
                      "description": "-1 for a dimension of any size; null when not declared"},
            "parameters": _schema("Parameters"),
        },
    },
    "MetadataModelResponse": {
        "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _schema("MetadataTensor")},
            "outputs": {"type": "array", "items": _schema("MetadataTensor")},
        },
    },
    "MetadataServerResponse": {
        "type": "object", "required": ["name", "version", "extensions"],
        "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                       "extensions": {"type": "array", "items": {"type": "string"}}},
    },
    "LiveResponse": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "ReadyResponse": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReadyResponse": {"type": "object", "required": ["name", "ready"],
                           "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}},
    "ModelConfig": {
        "type": "object", "required": ["name"], "additionalProperties": True,
        "description": "Triton's model configuration: Triton's own for a model it serves",
        "properties": {
            "name": {"type": "string"}, "platform": {"type": "string"}, "backend": {"type": "string"},
            "max_batch_size": {"type": "integer"},
            "input": {"type": "array", "items": {"type": "object"}},
            "output": {"type": "array", "items": {"type": "object"}},
        },
    },
    "ModelStatistics": {
        "type": "object", "required": ["model_stats"],
        "properties": {"model_stats": {"type": "array", "items": {
            "type": "object", "required": ["name", "version"], "additionalProperties": True,
            "description": "Triton's statistics of one model version",
            "properties": {
                "name": {"type": "string"}, "version": {"type": "string"},
                "last_inference": {"type": "integer"}, "inference_count": {"type": "integer"},
                "execution_count": {"type": "integer"}, "inference_stats": {"type": "object"},
                "batch_stats": {"type": "array", "items": {"type": "object"}},
            },
        }}},
    },
    "RepositoryIndexRequest": {"type": "object", "properties": {
        "ready": {"type": "boolean", "description": "Only the models ready to serve"}}},
    "RepositoryIndex": {"type": "array", "items": {
        "type": "object", "required": ["name", "state"],
        "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "state": {"type": "string", "enum": [READY, LOADING, UNLOADING, UNAVAILABLE]},
            "reason": {"type": "string", "nullable": True}, "device": {"type": "string"},
            "resident": {"type": "boolean"},
            "declared_memory_bytes": {"type": "integer"}, "measured_memory_bytes": {"type": "integer"},
        },
    }},
    "RepositoryLoadRequest": {"type": "object", "properties": {"parameters": {
        **_PARAMETERS_OBJECT,
        "description": "Triton's `config` and `file:` overrides are refused: edit model-settings.json instead",
    }}},
    "Manifest": {
        "type": "object", "required": ["kind", "metadata"],
        "description": "A Seldon Core 2 manifest",
        "properties": {
            "apiVersion": {"type": "string", "example": "mlops.seldon.io/v1alpha1"},
            "kind": {"type": "string", "enum": ["Model", "Pipeline", "Experiment"]},
            "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}},
            "spec": {"type": "object"},
        },
    },
    "Applied": {"type": "object", "required": ["applied"],
                "properties": {"applied": {"type": "array", "items": _schema("ManifestRef")}}},
    "Deleted": {"type": "object", "required": ["deleted"],
                "properties": {"deleted": {"type": "array", "items": _schema("ManifestRef")}}},
    "ManifestRef": {"type": "object", "required": ["kind", "name"],
                    "properties": {"kind": {"type": "string"}, "name": {"type": "string"}}},
    "PipelineStatus": {
        "type": "object", "required": ["name", "ready", "steps", "output"],
        "properties": {
            "name": {"type": "string"}, "ready": {"type": "boolean"}, "reason": {"type": "string"},
            "steps": {"type": "array", "items": {"type": "string"}, "description": "The models it runs"},
            "output": {"type": "array", "items": {"type": "string"}},
            "manifest": {"type": "object", "description": "Only for a single pipeline"},
        },
    },
    "ExperimentStatus": {
        "type": "object", "required": ["name", "ready", "resourceType", "candidates"],
        "properties": {
            "name": {"type": "string"}, "ready": {"type": "boolean"}, "reason": {"type": "string"},
            "resourceType": {"type": "string", "enum": ["model", "pipeline"]},
            "default": {"type": "string", "nullable": True},
            "candidates": {"type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string"}, "weight": {"type": "number"}, "share": {"type": "number"}}}},
            "mirror": {"type": "object", "nullable": True, "properties": {
                "name": {"type": "string"}, "percent": {"type": "number"}}},
            "requests": {"type": "object", "additionalProperties": {"type": "integer"},
                         "description": "Requests routed to each candidate"},
            "manifest": {"type": "object", "description": "Only for a single experiment"},
        },
    },
    "PipelineMessages": {
        "type": "object", "required": ["pipeline", "messages"],
        "properties": {
            "pipeline": {"type": "string"},
            "messages": {"type": "object", "description": "By step (the pipeline's own under its name), newest last",
                         "additionalProperties": {"type": "array", "items": {"type": "object"}}},
        },
    },
}


def _build() -> dict:
    paths = {**_other_routes(), **_model_routes(), **_repository_routes(),
             **_graph_routes("pipeline", "PipelineStatus"), **_pipeline_extras(),
             **_graph_routes("experiment", "ExperimentStatus")}
    _add_front_door_answers(paths)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "fleetserve",
            "version": __version__,
            "description": (
                "The Open Inference Protocol (KServe V2) REST API, with Triton's extensions (binary tensor "
                "data, repository, statistics, configuration), Seldon Core 2 manifests, pipelines and "
                "experiments, and MLflow's scoring protocol. Every error answers `{\"error\": \"...\"}`."
            ),
        },
        "tags": [{"name": tag} for tag in (
            "health", "metadata", "inference", "models", "repository", "manifests", "pipelines", "experiments",
            "mlflow", "metrics", "documentation")],
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": _SCHEMAS,
            "parameters": _PARAMETERS,
            "responses": {str(status): {"description": reason, "content": _json(_schema("Error"))}
                          for status, reason in _REASONS.items()},
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "Only where the server was started with --admin-token (repository routes) or "
                               "--data-token (inference); the admin token opens inference too."}},
        },
    }


def _add_front_door_answers(paths: dict[str, dict]) -> None:
    """Routes that a token may close (security.ROUTES: every documented route is classified there)
    take a bearer token, when the server has one, and answer 401 and 403. Every request but a read
    counts against --max-concurrent-requests: past it, 503."""
    for path, item in paths.items():
        for method, operation in item.items():
            if method != "get":
                operation["responses"]["503"] = _ref("responses", "503")
            if ROUTES[(method.upper(), path)] is not OPEN:
                operation["security"] = [{"bearer": []}, {}]  # {}: no token, where the server has none
                operation["responses"] |= {str(status): _ref("responses", str(status)) for status in (401, 403)}


DOCUMENT = _build()
DOCUMENT_JSON = orjson.dumps(DOCUMENT)


def operations(document: dict = DOCUMENT) -> set[tuple[str, str]]:
    """(METHOD, path template) of every operation the document describes."""
    return {(method.upper(), path) for path, item in document["paths"].items() for method in item}
