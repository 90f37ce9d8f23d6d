"""The REST API through tritonclient.http (binary by default, and JSON) and httpx."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from conftest import IRIS_ROWS, iris_json


@pytest.fixture
def client(server):
    client = triton_http.InferenceServerClient(server.http_address)
    yield client
    client.close()


def iris_input(rows: np.ndarray = IRIS_ROWS, binary: bool = True) -> triton_http.InferInput:
    tensor = triton_http.InferInput("input-0", list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows, binary_data=binary)
    return tensor


def test_health_and_server_metadata(client, http):
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "fleetserve"
    assert "binary_tensor_data" in metadata["extensions"]
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_and_readiness(client, http):
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", "1")
    metadata = client.get_model_metadata("iris")
    assert metadata["name"] == "iris" and metadata["versions"] == ["1"]
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}]
    assert http.get("/v2/models/iris/versions/1").json() == metadata
    assert http.get("/v2/models/iris/ready").json() == {"name": "iris", "ready": True}
    assert not client.is_model_ready("bad-load")


def test_model_config(client):
    config = client.get_model_config("iris")
    assert config["name"] == "iris"
    assert config["input"] == [{"name": "input-0", "data_type": "TYPE_FP32", "dims": [-1, 4]}]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_sklearn_infer(client, binary):
    output = triton_http.InferRequestedOutput("predict", binary_data=binary)
    result = client.infer("iris", [iris_input(binary=binary)], outputs=[output], request_id="req-7")
    assert result.as_numpy("predict").tolist() == [0, 2]
    response = result.get_response()
    assert response["id"] == "req-7"
    assert response["model_name"] == "iris" and response["model_version"] == "1"
    assert ("binary_data_size" in response["outputs"][0]["parameters"]) is binary


def test_binary_default_without_named_outputs(client):
    """tritonclient asks for binary outputs with `binary_data_output` when it names none."""
    result = client.infer("iris", [iris_input()])
    assert result.as_numpy("predict").tolist() == [0, 2]
    assert "data" not in result.get_response()["outputs"][0]


def test_output_selection(client):
    outputs = [triton_http.InferRequestedOutput("predict_proba"), triton_http.InferRequestedOutput("predict")]
    result = client.infer("iris", [iris_input()], outputs=outputs)
    proba = result.as_numpy("predict_proba")
    assert proba.shape == (2, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert proba.argmax(axis=1).tolist() == result.as_numpy("predict").tolist() == [0, 2]
    assert [o["name"] for o in result.get_response()["outputs"]] == ["predict_proba", "predict"]


def test_predict_fn_default(client):
    tensor = triton_http.InferInput("x", [1, 4], "FP64")
    tensor.set_data_from_numpy(IRIS_ROWS[:1].astype(np.float64))
    proba = client.infer("iris-proba", [tensor]).as_numpy("predict_proba")
    assert proba.shape == (1, 3) and proba.argmax() == 0


def test_regressor_has_no_predict_proba(client):
    tensor = triton_http.InferInput("x", [1, 10], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 10)))
    assert client.infer("diabetes", [tensor]).as_numpy("predict").shape == (1,)
    with pytest.raises(InferenceServerException, match="predict_proba"):
        client.infer("diabetes", [tensor], outputs=[triton_http.InferRequestedOutput("predict_proba")])


@pytest.mark.parametrize("model", ["iris-xgboost", "iris-xgb-bst"])
def test_xgboost_classifier(client, model):
    tensor = triton_http.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(IRIS_ROWS)
    assert client.infer(model, [tensor]).as_numpy("predict").tolist() == [0, 2]
    proba = client.infer(model, [tensor], outputs=[triton_http.InferRequestedOutput("predict_proba")])
    assert proba.as_numpy("predict_proba").shape == (2, 3)


def test_xgboost_regressor(client):
    tensor = triton_http.InferInput("x", [3, 10], "FP64")
    tensor.set_data_from_numpy(np.zeros((3, 10)))
    prediction = client.infer("diabetes-xgb", [tensor]).as_numpy("predict")
    assert prediction.shape == (3,) and np.all(prediction > 0)


def test_custom_model_bytes_round_trip(client):
    text = triton_http.InferInput("text", [3], "BYTES")
    text.set_data_from_numpy(np.array(["hello", "grüße", ""], dtype=object))
    result = client.infer("text-stats", [text])
    assert result.as_numpy("upper").tolist() == [b"HELLO", "GRÜSSE".encode(), b""]
    assert result.as_numpy("length").tolist() == [5, 5, 0]


@pytest.mark.parametrize(
    "datatype, values",
    [
        ("BOOL", [True, False, True]),
        ("INT8", [-128, 0, 127]),
        ("UINT8", [0, 1, 255]),
        ("INT16", [-5, 0, 5]),
        ("UINT16", [0, 65535, 1]),
        ("INT32", [-(2**31), 0, 2**31 - 1]),
        ("UINT32", [0, 2**32 - 1, 7]),
        ("INT64", [-(2**63), 0, 2**63 - 1]),
        ("UINT64", [0, 2**64 - 1, 3]),
        ("FP16", [0.5, -1.25, 2048.0]),
        ("FP32", [1.5, -2.25, 3.0]),
        ("FP64", [1e-300, -2.5, 1e300]),
        ("BYTES", [b"a", b"\x00\xff", b""]),
    ],
)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_datatype_round_trips(client, datatype, values, binary):
    if datatype == "BYTES" and not binary:
        values = [b"a", "é".encode(), b""]  # JSON carries BYTES as text
    dtype = object if datatype == "BYTES" else triton_http.triton_to_np_dtype(datatype)
    array = np.array(values, dtype=dtype).reshape(3, 1)
    tensor = triton_http.InferInput("x", [3, 1], datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    result = client.infer("echo", [tensor], outputs=[triton_http.InferRequestedOutput("output-0", binary_data=binary)])
    echoed = result.as_numpy("output-0")
    assert echoed.shape == (3, 1)
    if datatype == "BYTES" and not binary:
        echoed = np.vectorize(str.encode, otypes=[object])(echoed)  # tritonclient returns JSON text as str
    assert echoed.tolist() == array.tolist()
    assert result.get_response()["outputs"][0]["datatype"] == datatype


def test_versions(client, http):
    """The default version is the highest; each version answers on its own route."""
    tensor = triton_http.InferInput("x", [1, 4], "FP64")
    tensor.set_data_from_numpy(IRIS_ROWS[1:].astype(np.float64))
    classifier = client.infer("versioned", [tensor], model_version="1")
    regressor = client.infer("versioned", [tensor], model_version="2")
    default = client.infer("versioned", [tensor])
    assert classifier.as_numpy("predict").dtype == np.int64
    assert regressor.as_numpy("predict").dtype == np.float64
    assert default.get_response()["model_version"] == "2"
    assert sorted(client.get_model_metadata("versioned")["versions"]) == ["1", "2"]


def test_json_nested_and_flat_data(http):
    nested = http.post("/v2/models/iris/infer", json=iris_json())
    flat = iris_json()
    flat["inputs"][0]["data"] = IRIS_ROWS.ravel().tolist()
    flat_response = http.post("/v2/models/iris/infer", json=flat)
    assert nested.status_code == flat_response.status_code == 200
    assert nested.json()["outputs"][0]["data"] == flat_response.json()["outputs"][0]["data"] == [0, 2]


def test_request_id_and_header_echoed(http):
    response = http.post("/v2/models/iris/infer", json=iris_json(id="abc-1"), headers={"x-request-id": "trace-9"})
    assert response.json()["id"] == "abc-1"
    assert response.headers["x-request-id"] == "trace-9"


def test_pandas_request_codec(http):
    """`content_type: pd` hands the runtime a DataFrame, one column per input."""
    body = {
        "parameters": {"content_type": "pd"},
        "inputs": [
            {"name": name, "datatype": "FP64", "shape": [2], "data": IRIS_ROWS[:, i].tolist()}
            for i, name in enumerate(["sepal_length", "sepal_width", "petal_length", "petal_width"])
        ],
    }
    response = http.post("/v2/models/iris-proba/infer", json=body)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["shape"] == [2, 3] and output["parameters"]["content_type"] == "np"


def test_content_type_round_trips(http):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["abc"], "parameters": {"content_type": "str"}}]}
    outputs = http.post("/v2/models/text-stats/infer", json=body).json()["outputs"]
    assert outputs[0]["parameters"] == {"content_type": "str"} and outputs[0]["data"] == ["ABC"]
    assert outputs[1]["parameters"] == {"content_type": "np"}


def test_statistics(client, http):
    before = client.get_inference_statistics("iris")["model_stats"][0]["inference_stats"]["success"]["count"]
    client.infer("iris", [iris_input()])
    stats = client.get_inference_statistics("iris", "1")["model_stats"][0]
    assert stats["name"] == "iris" and stats["version"] == "1"
    assert stats["inference_stats"]["success"]["count"] == before + 1
    assert stats["inference_stats"]["compute_infer"]["ns"] > 0 and stats["last_inference"] > 0
    everything = http.get("/v2/models/stats").json()["model_stats"]
    assert {"iris", "iris-xgboost", "text-stats"} <= {entry["name"] for entry in everything}
    failing_before = http.get("/v2/models/failing/stats").json()["model_stats"][0]["inference_stats"]["fail"]["count"]
    http.post("/v2/models/failing/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})
    failing = http.get("/v2/models/failing/stats").json()["model_stats"][0]["inference_stats"]["fail"]["count"]
    assert failing == failing_before + 1


def test_metrics_on_both_ports(server, http):
    http.post("/v2/models/iris/infer", json=iris_json())
    import httpx

    for url in (f"{server.url}/metrics", f"http://127.0.0.1:{server.metrics_port}/metrics"):
        text = httpx.get(url).text
        assert 'fleetserve_infer_requests_total{model="iris",outcome="success",version="1"}' in text
        assert 'fleetserve_infer_duration_seconds_bucket{le="0.005",model="iris",version="1"}' in text
        assert "fleetserve_models_loaded " in text
        assert 'fleetserve_model_load_duration_seconds_count{outcome="success"}' in text
        assert 'fleetserve_model_load_duration_seconds_count{outcome="error"}' in text  # bad-load


def test_inference_metrics_agree_with_statistics(server, http):
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(3):
        assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
    wrong_input = {"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    assert http.post("/v2/models/iris/infer", json=wrong_input).status_code == 400
    http.post("/v2/models/failing/infer", json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]})

    samples = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    iris = (("model", "iris"), ("version", "1"))

    def counted(outcome, model=iris):
        return samples.get(("fleetserve_infer_requests_total", tuple(sorted((*model, ("outcome", outcome))))))

    stats = http.get("/v2/models/iris/versions/1/stats").json()["model_stats"][0]["inference_stats"]
    successes = stats["success"]["count"]
    assert successes >= 3 and counted("success") == successes
    assert counted("InvalidInput") >= 1
    assert counted("InferenceError", (("model", "failing"), ("version", ""))) >= 1
    assert samples[("fleetserve_infer_duration_seconds_count", iris)] == successes
    assert samples[("fleetserve_infer_duration_seconds_sum", iris)] == pytest.approx(stats["success"]["ns"] / 1e9)
    buckets = sorted(
        (float(dict(labels)["le"]), value) for (name, labels), value in samples.items()
        if name == "fleetserve_infer_duration_seconds_bucket" and dict(labels)["model"] == "iris"
    )
    assert len(buckets) == 16 and buckets[-1] == (float("inf"), successes)
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)  # cumulative


def test_compressed_request(client):
    for algorithm in ("gzip", "deflate"):
        result = client.infer("iris", [iris_input()], request_compression_algorithm=algorithm)
        assert result.as_numpy("predict").tolist() == [0, 2]


@pytest.mark.parametrize(
    "content_type, data, python_type",
    [
        ("str", ["grüße"], "str"),
        ("base64", ["aGVsbG8="], "bytes"),
        ("datetime", ["2026-11-21T10:30:00"], "datetime"),
        ("np", ["raw"], "bytes"),
    ],
)
def test_tensor_content_types(http, content_type, data, python_type):
    """A runtime sees each input as its content type says, and outputs say how they were encoded."""
    body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": data, "parameters": {"content_type": content_type}}]}
    response = http.post("/v2/models/codec/infer", json=body)
    assert response.status_code == 200, response.text
    value, kind = response.json()["outputs"]
    assert kind["data"] == [python_type]
    assert value["data"] == data
    assert value["parameters"]["content_type"] == content_type


def test_bad_base64_and_datetime(http):
    for content_type, data in (("base64", "not base64!"), ("datetime", "yesterday")):
        body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": [data], "parameters": {"content_type": content_type}}]}
        response = http.post("/v2/models/codec/infer", json=body)
        assert response.status_code == 400 and "'x'" in response.json()["error"]


@pytest.mark.parametrize(
    "how, fragment",
    [
        ("exit", "SystemExit: the model called exit()"),
        ("none", "returned NoneType"),
        ("list", "numpy arrays"),
        ("complex", "complex128 has no V2 datatype"),
    ],
)
def test_misbehaving_model_code_is_contained(http, how, fragment):
    """Whatever a model's own code does (even SystemExit), the client gets an error and the server lives."""
    body = {"inputs": [{"name": how, "datatype": "FP32", "shape": [1], "data": [1]}]}
    response = http.post("/v2/models/misbehaving/infer", json=body)
    assert response.status_code == 400 and fragment in response.json()["error"]
    assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200


def test_unexpected_error_answers_500_and_keeps_the_connection(http):
    body = {"inputs": [{"name": "parameters", "datatype": "FP32", "shape": [1], "data": [1]}]}
    response = http.post("/v2/models/misbehaving/infer", json=body, headers={"x-request-id": "r-500"})
    assert response.status_code == 500 and response.json()["error"].startswith("internal error")
    assert response.headers["x-request-id"] == "r-500"
    # The same keep-alive connection serves the next request.
    assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200


def test_transformer_serves_transform(client):
    tensor = triton_http.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(IRIS_ROWS)
    result = client.infer("iris-pca", [tensor])
    assert result.get_response()["outputs"][0]["name"] == "transform"
    assert result.as_numpy("transform").shape == (2, 2)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_big_endian_outputs_are_sent_little_endian(client, binary):
    tensor = triton_http.InferInput("big-endian", [1], "FP32")
    tensor.set_data_from_numpy(np.ones(1, dtype=np.float32), binary_data=binary)
    result = client.infer("misbehaving", [tensor], outputs=[triton_http.InferRequestedOutput("out", binary_data=binary)])
    assert result.as_numpy("out").tolist() == [1.5, -2.5]


def test_models_with_same_module_names_stay_apart(http):
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [0]}]}
    for which in ("a", "b"):
        response = http.post(f"/v2/models/packaged-{which}/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [which]


def test_non_finite_floats_over_json(client):
    """tritonclient's JSON carries NaN and Infinity as Python's json writes them; they come back the same."""
    values = np.array([[np.nan], [np.inf], [-np.inf], [1.5]], dtype=np.float32)
    tensor = triton_http.InferInput("x", [4, 1], "FP32")
    tensor.set_data_from_numpy(values, binary_data=False)
    finite = triton_http.InferInput("y", [2], "INT64")  # an ordinary tensor beside them in the same answer
    finite.set_data_from_numpy(np.array([3, 4]), binary_data=False)
    result = client.infer("echo", [tensor, finite], outputs=[
        triton_http.InferRequestedOutput("output-0", binary_data=False), triton_http.InferRequestedOutput("output-1", binary_data=False)])
    echoed = result.as_numpy("output-0")
    assert np.isnan(echoed[0, 0]) and echoed[1:].ravel().tolist() == [np.inf, -np.inf, 1.5]
    assert result.as_numpy("output-1").tolist() == [3, 4]


@pytest.mark.parametrize("datatype, value", [("FP32", 1e300), ("FP16", 1e6)])
def test_float_overflow_is_refused(http, datatype, value):
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": [1], "data": [value]}]}
    response = http.post("/v2/models/echo/infer", json=body)
    assert response.status_code == 400 and f"out of range for {datatype}" in response.json()["error"]


def test_large_json_body(http):
    """Bodies over 1 MiB are parsed and written off the event loop; the answer is the same."""
    values = np.arange(300_000, dtype=np.float64)
    body = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [300_000], "data": values.tolist()}]}
    response = http.post("/v2/models/echo/infer", json=body)
    assert response.status_code == 200
    assert response.json()["outputs"][0]["data"] == values.tolist()


def test_load_overrides_are_refused(client, server):
    with pytest.raises(InferenceServerException, match="not supported"):
        client.load_model("iris", config='{"max_batch_size": 8}')
    import tritonclient.grpc as triton_grpc

    grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
    with pytest.raises(InferenceServerException, match="not supported"):
        grpc_client.load_model("iris", config='{"max_batch_size": 8}')
    grpc_client.close()
    assert client.is_model_ready("iris")
