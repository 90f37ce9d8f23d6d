"""The gRPC API through tritonclient.grpc, a raw stub for typed contents, and grpc.health.v1."""

from __future__ import annotations

import json
import queue

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import IRIS_ROWS, MAX_MESSAGE_SIZE


@pytest.fixture
def client(server):
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    yield client
    client.close()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def iris_input() -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput("input-0", list(IRIS_ROWS.shape), "FP32")
    tensor.set_data_from_numpy(IRIS_ROWS)
    return tensor


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata().name == "fleetserve"
    assert client.is_model_ready("iris") and client.is_model_ready("iris", "1")
    assert not client.is_model_ready("bad-load") and not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata("iris", as_json=True)
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": ["-1", "4"]}]
    config = client.get_model_config("iris", as_json=True)["config"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"


def test_standard_health_service(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_infer_raw_contents(client):
    outputs = [triton_grpc.InferRequestedOutput("predict"), triton_grpc.InferRequestedOutput("predict_proba")]
    result = client.infer("iris", [iris_input()], outputs=outputs, request_id="g-1")
    assert result.as_numpy("predict").tolist() == [0, 2]
    assert result.as_numpy("predict_proba").shape == (2, 3)
    response = result.get_response()
    assert response.id == "g-1" and response.model_version == "1"
    assert len(response.raw_output_contents) == 2


def test_infer_typed_contents(stub):
    """Typed contents (no raw bytes) are accepted; outputs still come back as raw contents."""
    request = service_pb2.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="input-0", datatype="FP32", shape=[2, 4])
    tensor.contents.fp32_contents.extend(IRIS_ROWS.ravel().tolist())
    response = stub.ModelInfer(request)
    assert np.frombuffer(response.raw_output_contents[0], dtype="<i8").tolist() == [0, 2]

    request = service_pb2.ModelInferRequest(model_name="text-stats")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[2])
    tensor.contents.bytes_contents.extend([b"ab", b"xyz"])
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["upper", "length"]
    assert np.frombuffer(response.raw_output_contents[1], dtype="<i8").tolist() == [2, 3]


def test_bytes_and_custom_model(client):
    text = triton_grpc.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array(["fleet", "sérve"], dtype=object))
    result = client.infer("text-stats", [text])
    assert result.as_numpy("upper").tolist() == [b"FLEET", "SÉRVE".encode()]
    assert result.as_numpy("length").tolist() == [5, 5]


def test_structured_response_parameters_are_json_text(client, http):
    tensor = triton_grpc.InferInput("structured", [1], "FP32")
    tensor.set_data_from_numpy(np.ones(1, dtype=np.float32))
    parameters = client.infer("misbehaving", [tensor]).get_response().parameters
    assert json.loads(parameters["window"].string_param) == {"sizes": [10, 20], "online": True}
    body = {"inputs": [{"name": "structured", "datatype": "FP32", "shape": [1], "data": [1]}]}
    assert http.post("/v2/models/misbehaving/infer", json=body).json()["parameters"]["window"]["sizes"] == [10, 20]


def test_message_larger_than_4_mib(client):
    """Message limits are raised well above gRPC's 4 MiB default, both ways."""
    array = np.arange(6 * 1024 * 1024 // 4, dtype=np.float32).reshape(1, -1)
    assert 4 * 1024 * 1024 < array.nbytes < MAX_MESSAGE_SIZE
    tensor = triton_grpc.InferInput("x", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    echoed = client.infer("echo", [tensor]).as_numpy("output-0")
    np.testing.assert_array_equal(echoed, array)


def test_stream_infer(client):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for index in range(3):
            client.async_stream_infer("iris", [iris_input()], request_id=f"s-{index}")
        client.async_stream_infer("no-such-model", [iris_input()], request_id="s-bad")
        client.async_stream_infer("iris", [iris_input()], request_id="s-after")
        received = [results.get(timeout=10) for _ in range(5)]
    finally:
        client.stop_stream()
    good = [result for result, error in received if error is None]
    errors = [error for result, error in received if error is not None]
    assert sorted(result.get_response().id for result in good) == ["s-0", "s-1", "s-2", "s-after"]
    assert all(result.as_numpy("predict").tolist() == [0, 2] for result in good)
    assert len(errors) == 1 and "no-such-model" in str(errors[0])


def test_statistics_and_index(client):
    client.infer("iris", [iris_input()])
    stats = client.get_inference_statistics("iris", as_json=True)["model_stats"][0]
    assert stats["name"] == "iris" and int(stats["inference_stats"]["success"]["count"]) >= 1
    index = {entry.name: entry for entry in client.get_model_repository_index().models}
    assert index["iris"].state == "READY"
    assert index["bad-load"].state == "UNAVAILABLE" and "corrupt" in index["bad-load"].reason


def test_errors_carry_grpc_codes(client):
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("no-such-model", [iris_input()])
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    bad = iris_input()
    bad.set_shape([3, 4])  # 8 values sent for a [3, 4] shape
    with pytest.raises(InferenceServerException) as mismatch:
        client.infer("iris", [bad])
    assert mismatch.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert client.infer("iris", [iris_input()]).as_numpy("predict").tolist() == [0, 2]
