"""Bad input, case by case: every malformed or misdirected request is answered with the status
the error table gives it and a JSON body `{"error": "<clear message>"}`, over REST (JSON and the
binary tensor data extension) and gRPC, and the server goes on serving good requests after each."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import IRIS_ROWS, MAX_MESSAGE_SIZE, iris_json
from fleetserve.errors import STATUS, InferenceError, ModelUnavailable

MIB = 1024 * 1024
IRIS_CLASSES = [0, 2]  # setosa, virginica for IRIS_ROWS


def assert_iris_serves(http) -> None:
    """The server still answers a good request, with the right predictions."""
    response = http.post("/v2/models/iris/infer", json=iris_json())
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["name"] == "predict"
    assert output["data"] == IRIS_CLASSES


def assert_error(response, status: int, fragment: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body  # "error", never FastAPI's "detail"
    assert isinstance(body["error"], str)
    assert fragment in body["error"], body["error"]
    return body["error"]


# Request builders.


def tensor(name: str, datatype: str, shape: list, data: Any = None, **parameters) -> dict:
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if data is not None:
        entry["data"] = data
    if parameters:
        entry["parameters"] = parameters
    return entry


def iris_input(**changes) -> dict:
    """Iris's one good input row, with some fields changed (a None field is left out)."""
    entry = {**tensor("input-0", "FP32", [1, 4], IRIS_ROWS[0].tolist()), **changes}
    return {key: value for key, value in entry.items() if value is not None}


def binary_body(inputs: list[dict], blob: bytes, header_length: int | str | None = None) -> tuple[bytes, dict]:
    """A body in the binary tensor data extension: the JSON header, then the raw tensor bytes."""
    header = json.dumps({"inputs": inputs}).encode()
    length = len(header) if header_length is None else header_length
    return header + blob, {"Inference-Header-Content-Length": str(length)}


def bytes_elements(*items: bytes) -> bytes:
    """BYTES in binary form: each element a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


IRIS_ROW_BYTES = IRIS_ROWS[:1].tobytes()  # 16 bytes: one row of FP32[1, 4]


def gzip_bomb() -> bytes:
    """About 1 MiB of gzip that inflates to 1 GiB: 16 members of 64 MiB of zeros."""
    return gzip.compress(bytes(64 * MIB), compresslevel=9) * 16


def oversized_chunks():
    """A body past the limit, sent chunked (no Content-Length), so the server must count as it reads."""
    for _ in range(MAX_MESSAGE_SIZE // MIB + 1):
        yield bytes(MIB)


@dataclass
class Case:
    path: str
    status: int
    fragment: str
    json: Any = None
    content: bytes | Callable[[], Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"

    def send(self, http, request_id: str):
        headers = {**self.headers, "x-request-id": request_id}
        content = self.content() if callable(self.content) else self.content
        if self.json is not None:
            return http.request(self.method, self.path, json=self.json, headers=headers)
        return http.request(self.method, self.path, content=content, headers=headers)


def case(id: str, path: str, status: int, fragment: str, **kwargs) -> Any:
    return pytest.param(Case(path, status, fragment, **kwargs), id=id)


def binary_case(id: str, path: str, fragment: str, inputs: list[dict], blob: bytes, header_length=None) -> Any:
    content, headers = binary_body(inputs, blob, header_length)
    return case(id, path, 400, fragment, content=content, headers=headers)


IRIS = "/v2/models/iris/infer"
ECHO = "/v2/models/echo/infer"
TEXT = "/v2/models/text-stats/infer"
DIABETES_ROW = [0.01] * 10

REST_CASES = [
    # The body as a whole.
    case("malformed-json", IRIS, 400, "malformed JSON", content=b'{"inputs": [{"name": '),
    case("body-not-an-object", IRIS, 400, "must be a JSON object", content=b"[1, 2, 3]"),
    case("missing-inputs", IRIS, 400, "needs 'inputs'", json={}),
    case("inputs-not-a-list", IRIS, 400, "needs 'inputs'", json={"inputs": iris_input()}),
    case("empty-inputs", IRIS, 400, "no inputs", json={"inputs": []}),
    case("input-not-an-object", IRIS, 400, "must be an object with a 'name'", json={"inputs": [42]}),
    case("input-without-data", IRIS, 400, "neither 'data' nor binary_data_size",
         json={"inputs": [tensor("input-0", "FP32", [1, 4])]}),
    case("invalid-utf8-in-json", IRIS, 400, "malformed JSON", content=b'{"inputs": [], "id": "\xff\xfe"}'),
    case("outputs-not-a-list", IRIS, 400, "'outputs' must be a list", json=iris_json(outputs=5)),
    case("parameters-not-an-object", IRIS, 400, "'parameters' must be an object", json=iris_json(parameters=[1])),
    # One tensor's data against its datatype and shape.
    case("count-not-matching-shape", IRIS, 400, "shape [1, 4] needs 4 elements, data has 3",
         json={"inputs": [iris_input(data=[5.1, 3.5, 1.4])]}),
    case("ragged-nested-data", IRIS, 400, "ragged",
         json={"inputs": [iris_input(shape=[2, 4], data=[[5.1, 3.5, 1.4, 0.2], [6.7, 3.0]])]}),
    case("unknown-datatype", IRIS, 400, "unknown datatype 'FP8'", json={"inputs": [iris_input(datatype="FP8")]}),
    case("negative-shape", IRIS, 400, "shape must be a list of non-negative integers",
         json={"inputs": [iris_input(shape=[-1, 4])]}),
    case("shape-too-large-for-numpy", ECHO, 400, "too large",
         json={"inputs": [tensor("a", "INT32", [0, 2**62, 2**62], [])]}),
    case("strings-for-numbers", IRIS, 400, "FP32 data must be numbers, got 'a'",
         json={"inputs": [iris_input(data=["a", "b", "c", "d"])]}),
    case("booleans-for-fp32", IRIS, 400, "FP32 data must be numbers, got True",
         json={"inputs": [iris_input(data=[True, False, True, False])]}),
    case("float-for-int32", ECHO, 400, "INT32 data must be integers, got 1.5",
         json={"inputs": [tensor("a", "INT32", [2], [1.5, 2])]}),
    case("int8-out-of-range", ECHO, 400, "out of range for INT8", json={"inputs": [tensor("a", "INT8", [2], [1, 300])]}),
    case("uint8-negative", ECHO, 400, "out of range for UINT8", json={"inputs": [tensor("a", "UINT8", [1], [-1])]}),
    case("uint8-too-big", ECHO, 400, "out of range for UINT8", json={"inputs": [tensor("a", "UINT8", [1], [256])]}),
    case("number-for-bytes", ECHO, 400, "BYTES data must be strings", json={"inputs": [tensor("a", "BYTES", [1], [7])]}),
    # The tensor against the model's declared inputs.
    case("wrong-tensor-name", IRIS, 400, "has no input 'features'; it expects ['input-0']",
         json={"inputs": [iris_input(name="features")]}),
    case("wrong-datatype-for-model", IRIS, 400, "must be FP32, got FP64", json={"inputs": [iris_input(datatype="FP64")]}),
    case("wrong-shape-for-model", IRIS, 400, "must have shape [-1, 4], got [4]", json={"inputs": [iris_input(shape=[4])]}),
    # The binary tensor data extension.
    binary_case("binary-truncated", IRIS, "binary data is truncated",
                [iris_input(data=None, parameters={"binary_data_size": 16})], IRIS_ROW_BYTES[:8]),
    binary_case("binary-size-not-matching-shape", IRIS, "needs 16 bytes, got 12",
                [iris_input(data=None, parameters={"binary_data_size": 12})], IRIS_ROW_BYTES[:12]),
    binary_case("binary-bytes-left-over", IRIS, "4 bytes of binary data are left over",
                [iris_input(data=None, parameters={"binary_data_size": 16})], IRIS_ROW_BYTES + b"\0\0\0\0"),
    binary_case("header-length-past-the-body", IRIS, "outside the body",
                [iris_input(data=None, parameters={"binary_data_size": 16})], IRIS_ROW_BYTES, header_length=10_000),
    binary_case("header-length-not-an-integer", IRIS, "must be an integer, got '12abc'",
                [iris_input(data=None, parameters={"binary_data_size": 16})], IRIS_ROW_BYTES, header_length="12abc"),
    case("binary-size-without-header", IRIS, 400, "no Inference-Header-Content-Length",
         json={"inputs": [iris_input(data=None, parameters={"binary_data_size": 16})]}),
    binary_case("bytes-length-prefix-past-the-end", TEXT, "claims 100 bytes past the end",
                [tensor("text", "BYTES", [1], binary_data_size=7)], struct.pack("<I", 100) + b"abc"),
    binary_case("bytes-shape-larger-than-the-data", ECHO, "BYTES data is truncated",
                [tensor("a", "BYTES", [10**12], binary_data_size=5)], bytes_elements(b"x")),
    binary_case("invalid-utf8-where-text-is-needed", TEXT, "invalid UTF-8",
                [tensor("text", "BYTES", [1], binary_data_size=6)], bytes_elements(b"\xff\xfe")),
    binary_case("non-utf8-output-asked-as-json", ECHO, "not UTF-8 text; ask for it as binary data",
                [tensor("a", "BYTES", [1], binary_data_size=6)], bytes_elements(b"\xff\xfe")),
    # Size and encoding of the body.
    case("oversized-body", IRIS, 413, "exceeds the limit of 16777216 bytes",
         content=lambda: bytes(MAX_MESSAGE_SIZE + 1024)),
    case("oversized-chunked-body", IRIS, 413, "exceeds the limit of 16777216 bytes", content=oversized_chunks),
    case("gzip-bomb", IRIS, 413, "inflated request body exceeds the limit", content=gzip_bomb,
         headers={"Content-Encoding": "gzip"}),
    case("unsupported-content-encoding", IRIS, 400, "unsupported Content-Encoding 'br'",
         content=json.dumps(iris_json()).encode(), headers={"Content-Encoding": "br"}),
    case("invalid-gzip", IRIS, 400, "not valid gzip", content=b"this is not gzip", headers={"Content-Encoding": "gzip"}),
    case("truncated-gzip", IRIS, 400, "not valid gzip",
         content=gzip.compress(json.dumps(iris_json()).encode())[:-12], headers={"Content-Encoding": "gzip"}),
    case("invalid-deflate", IRIS, 400, "not valid deflate", content=b"not deflate", headers={"Content-Encoding": "deflate"}),
    # Models, versions and routes.
    case("unknown-model", "/v2/models/no-such-model/infer", 404, "model 'no-such-model' not found", json=iris_json()),
    case("unknown-version", "/v2/models/versioned/versions/7/infer", 404, "model 'versioned' has no version '7'",
         json=iris_json()),
    # A model that failed to load is unavailable: 503, the server's state rather than the request's fault.
    case("model-failed-to-load", "/v2/models/bad-load/infer", 503, "weights file is corrupt", json=iris_json()),
    case("model-with-broken-settings", "/v2/models/bad-json/infer", 503, "not valid JSON", json=iris_json()),
    case("model-needing-missing-capability", "/v2/models/needs-gpu/infer", 503, "tensorrt", json=iris_json()),
    case("unknown-route", "/v2/no/such/route", 404, "Not Found", method="GET"),
    case("wrong-method", IRIS, 405, "Method Not Allowed", method="DELETE"),
    case("predict-proba-from-a-regressor", "/v2/models/diabetes/infer", 400, "has no output 'predict_proba'",
         json={"inputs": [tensor("x", "FP64", [1, 10], DIABETES_ROW)], "outputs": [{"name": "predict_proba"}]}),
    case("unknown-output-of-sklearn-model", IRIS, 400, "has no output 'scores'",
         json=iris_json(outputs=[{"name": "scores"}])),
    case("unknown-output-of-custom-model", TEXT, 400, "has no output 'scores'; it produced ['upper', 'length']",
         json={"inputs": [tensor("text", "BYTES", [1], ["hello"])], "outputs": [{"name": "scores"}]}),
    case("model-predict-raises", "/v2/models/failing/infer", STATUS[InferenceError][0],
         "RuntimeError: this model always fails", json={"inputs": [tensor("x", "FP64", [1], [1.0])]}),
]


@pytest.mark.parametrize("bad", REST_CASES)
def test_rest_bad_input_is_refused_with_a_json_error(http, bad: Case, request):
    request_id = f"bad-{request.node.callspec.id}"
    response = bad.send(http, request_id)
    assert_error(response, bad.status, bad.fragment)
    assert response.headers.get("x-request-id") == request_id
    assert_iris_serves(http)


def test_error_body_is_json_even_with_a_binary_request(http):
    """A binary request that fails still gets a JSON error, not a binary reply."""
    content, headers = binary_body([iris_input(data=None, parameters={"binary_data_size": 16})], IRIS_ROW_BYTES[:4])
    response = http.post(IRIS, content=content, headers=headers)
    assert_error(response, 400, "truncated")
    assert "inference-header-content-length" not in response.headers
    assert_iris_serves(http)


# gRPC.


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def triton(server):
    client = grpcclient.InferenceServerClient(url=server.grpc_address)
    yield client
    client.close()


def assert_grpc_iris_serves(triton) -> None:
    features = grpcclient.InferInput("input-0", list(IRIS_ROWS.shape), "FP32")
    features.set_data_from_numpy(IRIS_ROWS)
    result = triton.infer("iris", [features])
    assert result.as_numpy("predict").tolist() == IRIS_CLASSES


def iris_grpc_input() -> grpcclient.InferInput:
    features = grpcclient.InferInput("input-0", [1, 4], "FP32")
    features.set_data_from_numpy(IRIS_ROWS[:1])
    return features


def test_grpc_unknown_model_is_not_found(triton, http):
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("no-such-model", [iris_grpc_input()])
    assert raised.value.status() == "StatusCode.NOT_FOUND"
    assert "model 'no-such-model' not found" in raised.value.message()
    assert_grpc_iris_serves(triton)
    assert_iris_serves(http)


def test_grpc_count_not_matching_shape_is_invalid_argument(triton, http):
    features = iris_grpc_input()
    features.set_shape([1, 3])  # 16 bytes of raw contents for a 12-byte shape
    with pytest.raises(InferenceServerException) as raised:
        triton.infer("iris", [features])
    assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "shape [1, 3] of FP32 needs 12 bytes, got 16" in raised.value.message()
    assert_grpc_iris_serves(triton)
    assert_iris_serves(http)


def infer_input(name: str, datatype: str, shape: list[int], **contents) -> service_pb2.ModelInferRequest.InferInputTensor:
    entry = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field_name, values in contents.items():
        getattr(entry.contents, field_name).extend(values)
    return entry


RAW_ROW = IRIS_ROWS[:1].tobytes()

GRPC_CASES = [
    pytest.param(
        service_pb2.ModelInferRequest(
            model_name="echo",
            inputs=[infer_input("a", "FP32", [1, 4]), infer_input("b", "FP32", [1, 4])],
            raw_input_contents=[RAW_ROW],
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "1 raw_input_contents for 2 inputs", id="raw-contents-count-not-matching-inputs",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(
            model_name="iris", inputs=[infer_input("input-0", "FP32", [1, 4], fp32_contents=[5.1, 3.5, 1.4])]
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "shape [1, 4] needs 4 elements, data has 3", id="typed-contents-count-not-matching-shape",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(
            model_name="echo", inputs=[infer_input("a", "BYTES", [10**12])], raw_input_contents=[bytes_elements(b"x")]
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "BYTES data is truncated", id="bytes-shape-larger-than-the-data",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(model_name="echo", inputs=[infer_input("a", "FP16", [1])]),
        grpc.StatusCode.INVALID_ARGUMENT, "FP16 can only be sent in raw_input_contents", id="fp16-as-typed-contents",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(
            model_name="iris", inputs=[infer_input("input-0", "FP64", [1, 4], fp64_contents=IRIS_ROWS[0].tolist())]
        ),
        grpc.StatusCode.INVALID_ARGUMENT, "must be FP32, got FP64", id="wrong-datatype-for-model",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(
            model_name="versioned", model_version="7", inputs=[infer_input("input-0", "FP32", [1, 4])],
            raw_input_contents=[RAW_ROW],
        ),
        grpc.StatusCode.NOT_FOUND, "has no version '7'", id="unknown-version",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(
            model_name="bad-load", inputs=[infer_input("input-0", "FP32", [1, 4])], raw_input_contents=[RAW_ROW]
        ),
        STATUS[ModelUnavailable][1], "corrupt",
        id="model-failed-to-load",
    ),
    pytest.param(
        service_pb2.ModelInferRequest(model_name="failing", inputs=[infer_input("x", "FP64", [1], fp64_contents=[1.0])]),
        STATUS[InferenceError][1], "this model always fails", id="model-predict-raises",
    ),
]


@pytest.mark.parametrize(("message", "code", "fragment"), GRPC_CASES)
def test_grpc_bad_request_is_refused_with_its_status(stub, triton, http, message, code, fragment):
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(message, timeout=30)
    assert raised.value.code() == code, raised.value.details()
    assert fragment in raised.value.details()
    assert_grpc_iris_serves(triton)
    assert_iris_serves(http)
