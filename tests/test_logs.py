"""The server's logs as a log pipeline reads them: JSON lines, the access log, and nothing twice."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import orjson
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import ROOT, http_client, iris_json, running_server

TOKEN = "s3cret-data-token"


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repo")
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    shutil.copytree(ROOT / "model_repo" / "iris", repository / "iris")
    return repository


def json_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_carry_the_request_and_the_access_log_has_one_line_a_request(repository, tmp_path):
    log_path = tmp_path / "server.log"
    args = ("--log-format", "json", "--access-log")
    with running_server(repository, log_path, {"FLEETSERVE_DATA_TOKEN": TOKEN}, args=args) as server, \
            http_client(server) as http:
        token = {"Authorization": f"Bearer {TOKEN}"}
        assert http.post("/v2/models/iris/infer", json=iris_json(), headers={**token, "x-request-id": "r-1"}).status_code == 200
        rest = httpclient.InferenceServerClient(server.http_address)
        nan = httpclient.InferInput("input-0", [1, 4], "FP32")
        nan.set_data_from_numpy(np.full((1, 4), np.nan, dtype=np.float32))  # binary: sklearn refuses it, and says so
        with pytest.raises(InferenceServerException, match="NaN"):
            rest.infer("iris", [nan], model_version="1", headers={**token, "x-request-id": "r-2"})
        assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 401  # no token
        for _ in range(3):
            assert http.get("/v2/health/ready").status_code == 200
        token = {"authorization": f"Bearer {TOKEN}"}  # gRPC metadata keys are lower case
        with grpcclient.InferenceServerClient(server.grpc_address) as client:
            tensor = grpcclient.InferInput("input-0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
            client.infer("iris", [tensor], headers={**token, "x-request-id": "g-1"})
            with pytest.raises(InferenceServerException):
                client.infer("nowhere", [tensor], headers=token)
        body_size = len(http.post("/v2/models/iris/infer", json=iris_json(), headers=token).content)
    lines = json_lines(log_path.read_text())  # every line, uvicorn's and the start's included, is JSON
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    access = [line for line in lines if line["logger"] == "fleetserve.access"]
    # (the readiness probes before the server was ready answered 503: those are logged)
    first, second, refused = [line for line in access if line.get("path", "").endswith("/infer")][:3]
    assert first["method"] == "POST" and first["path"] == "/v2/models/iris/infer" and first["status"] == 200
    assert first["model"] == "iris" and first["request_id"] == "r-1" and first["client"].startswith("127.0.0.1:")
    assert first["bytes_in"] > 0 and first["bytes_out"] > 0 and first["ms"] > 0
    assert second["status"] == 400 and second["version"] == "1" and second["request_id"] == "r-2"
    assert refused["status"] == 401
    assert not [line for line in access if line.get("path", "").startswith("/v2/health") and line["status"] == 200]
    rpcs = [line for line in access if "rpc" in line]
    assert [(line["rpc"].rpartition("/")[2], line["status"], line.get("model")) for line in rpcs] == [
        ("ModelInfer", "OK", "iris"), ("ModelInfer", "NOT_FOUND", "nowhere")]
    assert rpcs[0]["request_id"] == "g-1" and rpcs[0]["bytes_in"] > 0 and rpcs[0]["bytes_out"] > 0
    assert access[-1]["bytes_out"] == body_size
    # A line the model's failure wrote while serving the request carries it.
    [warning] = [line for line in lines if line["logger"] == "fleetserve.runtime.dataplane"]
    assert warning["model"] == "iris" and warning["version"] == "1" and warning["request_id"] == "r-2"
    assert TOKEN not in log_path.read_text()


def test_text_logs_by_default_without_access_lines_and_uvicorn_said_once(repository, tmp_path):
    log_path = tmp_path / "server.log"
    with running_server(repository, log_path) as server, http_client(server) as http:
        assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
    text = log_path.read_text()
    assert "fleetserve.access" not in text
    assert not text.lstrip().startswith("{")
    said = [line.split(" ", 2)[2] for line in text.splitlines()]  # without the time
    assert len(said) == len(set(said)), text  # nothing twice (uvicorn serves two ports)
    assert said.count("INFO fleetserve: ready: 1 model version(s) loaded") == 1


def test_text_access_lines_name_the_request_in_key_value_pairs(repository, tmp_path):
    log_path = tmp_path / "server.log"
    with running_server(repository, log_path, {"FLEETSERVE_DATA_TOKEN": TOKEN}, args=("--access-log",)) as server, \
            http_client(server) as http:
        token = {"authorization": f"Bearer {TOKEN}"}
        assert http.post("/v2/models/iris/infer", json=iris_json(), headers={**token, "x-request-id": "r-9"}).status_code == 200
        with grpcclient.InferenceServerClient(server.grpc_address) as client:
            tensor = grpcclient.InferInput("input-0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
            client.infer("iris", [tensor], headers={**token, "x-request-id": "g-9"})
    access = [line.split(" fleetserve.access: ", 1)[1] for line in log_path.read_text().splitlines()
              if " fleetserve.access: " in line]
    rest = next(line for line in access if line.startswith("POST /v2/models/iris/infer 200 "))
    fields = dict(pair.split("=", 1) for pair in rest.split(" ")[3:])
    assert fields["model"] == "iris" and fields["request_id"] == "r-9" and fields["client"].startswith("127.0.0.1:")
    assert int(fields["bytes_in"]) > 0 and int(fields["bytes_out"]) > 0 and float(fields["ms"]) > 0
    rpc = next(line for line in access if line.startswith("RPC /inference.GRPCInferenceService/ModelInfer OK "))
    assert "model=iris" in rpc.split() and "request_id=g-9" in rpc.split()
    assert TOKEN not in log_path.read_text()
