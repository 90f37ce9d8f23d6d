"""The server driven by the real `curl` binary, as the README shows it: plain `curl -d` (which
sends application/x-www-form-urlencoded, and must still be read as JSON), request ids, non-ASCII
text, the repository index, errors as `{"error": ...}`, and gzip and binary request bodies."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
from dataclasses import dataclass

import numpy as np
import pytest

from conftest import IRIS_ROWS, ROOT, iris_json

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the curl binary is not installed")

IRIS_CLASSES = [0, 2]  # setosa, virginica for IRIS_ROWS


@dataclass
class CurlResult:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: str
    trace: str  # curl -v's stderr: what curl sent

    def json(self):
        return json.loads(self.body)


def curl(server, path: str, *args: str) -> CurlResult:
    """Run `curl -s -v -D - -w '%{http_code}' URL ARGS...`; the status comes from -w, headers from -D -."""
    completed = subprocess.run(
        ["curl", "-s", "-S", "-v", "--max-time", "30", "-D", "-", "-w", "\n%{http_code}", f"{server.url}{path}", *args],
        capture_output=True, timeout=60,
    )
    stderr = completed.stderr.decode(errors="replace")
    assert completed.returncode == 0, stderr
    out = completed.stdout.decode()
    rest, _, code = out.rpartition("\n")
    head, _, body = rest.partition("\r\n\r\n")
    while head.startswith("HTTP/1.1 100"):  # an interim 100 Continue block, then the real response
        head, _, body = body.partition("\r\n\r\n")
    headers = {}
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return CurlResult(int(code), headers, body, stderr)


def assert_iris_predictions(result: CurlResult) -> None:
    assert result.status == 200, result.body
    document = result.json()
    assert document["model_name"] == "iris"
    [output] = document["outputs"]
    assert output["name"] == "predict"
    assert output["data"] == IRIS_CLASSES


def test_health_live_and_ready(server):
    live = curl(server, "/v2/health/live")
    assert live.status == 200
    assert live.json() == {"live": True}
    ready = curl(server, "/v2/health/ready")
    assert ready.status == 200
    assert ready.json() == {"ready": True}


def test_server_metadata(server):
    result = curl(server, "/v2")
    assert result.status == 200
    assert result.headers["content-type"] == "application/json"
    document = result.json()
    assert document["name"] == "fleetserve"
    assert "binary_tensor_data" in document["extensions"]


def test_plain_curl_d_is_read_as_json(server):
    """`curl -d` labels the body application/x-www-form-urlencoded; the server reads it as JSON anyway."""
    result = curl(server, "/v2/models/iris/infer", "-X", "POST", "-d", json.dumps(iris_json()))
    assert "Content-Type: application/x-www-form-urlencoded" in result.trace
    assert_iris_predictions(result)


def test_readme_example_verbatim(server):
    """The README's first example, body as written there (IRIS_ROWS)."""
    body = """{
  "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [2, 4],
              "data": [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]}]
}"""
    assert (np.array(json.loads(body)["inputs"][0]["data"], dtype=np.float32) == IRIS_ROWS).all()
    assert_iris_predictions(curl(server, "/v2/models/iris/infer", "-X", "POST", "-d", body))


def test_request_id_is_echoed(server):
    result = curl(server, "/v2/models/iris/infer", "-d", json.dumps(iris_json(id="req-1")), "-H", "x-request-id: curl-42")
    assert_iris_predictions(result)
    assert result.headers["x-request-id"] == "curl-42"
    assert result.json()["id"] == "req-1"


def test_request_id_is_echoed_on_errors_too(server):
    result = curl(server, "/v2/models/no-such-model/infer", "-d", json.dumps(iris_json()), "-H", "x-request-id: curl-43")
    assert result.status == 404
    assert result.headers["x-request-id"] == "curl-43"


def test_non_ascii_text(server):
    texts = ["héllo wörld", "日本語のテキスト", "straße"]
    request = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": texts}]}
    result = curl(server, "/v2/models/text-stats/infer", "-d", json.dumps(request, ensure_ascii=False))
    assert result.status == 200, result.body
    outputs = {output["name"]: output for output in result.json()["outputs"]}
    assert outputs["upper"]["data"] == ["HÉLLO WÖRLD", "日本語のテキスト", "STRASSE"]
    assert outputs["length"]["data"] == [11, 8, 6]  # characters, not bytes


def test_repository_index(server):
    result = curl(server, "/v2/repository/index", "-X", "POST", "-d", "{}")
    assert result.status == 200, result.body
    entries = result.json()
    by_name = {entry["name"]: entry for entry in entries}
    assert by_name["iris"]["state"] == "READY"
    assert by_name["bad-load"]["state"] == "UNAVAILABLE"
    assert "corrupt" in by_name["bad-load"]["reason"]
    versions = sorted(entry["version"] for entry in entries if entry["name"] == "versioned")
    assert versions == ["1", "2"]

    ready = curl(server, "/v2/repository/index", "-X", "POST", "-d", '{"ready": true}').json()
    assert {entry["state"] for entry in ready} == {"READY"}
    assert "iris" in {entry["name"] for entry in ready}
    assert "bad-load" not in {entry["name"] for entry in ready}


@pytest.mark.parametrize(
    ("path", "args", "status", "fragment"),
    [
        pytest.param("/v2/models/no-such-model/infer", ["-d", json.dumps(iris_json())], 404, "not found", id="unknown-model"),
        pytest.param("/v2/models/iris/infer", ["-d", '{"inputs": ['], 400, "malformed JSON", id="malformed-json"),
        pytest.param("/v2/models/iris/infer", ["-X", "DELETE"], 405, "Method Not Allowed", id="wrong-method"),
        pytest.param("/v2/no/such/route", [], 404, "Not Found", id="unknown-route"),
    ],
)
def test_errors_are_json(server, path, args, status, fragment):
    result = curl(server, path, *args)
    assert result.status == status, result.body
    assert result.headers["content-type"] == "application/json"
    body = result.json()
    assert list(body) == ["error"]
    assert fragment in body["error"]


def test_gzip_request_body(server, tmp_path):
    body = tmp_path / "request.json.gz"
    body.write_bytes(gzip.compress(json.dumps(iris_json()).encode()))
    result = curl(
        server, "/v2/models/iris/infer", "--data-binary", f"@{body}",
        "-H", "Content-Encoding: gzip", "-H", "Content-Type: application/json",
    )
    assert_iris_predictions(result)


def test_binary_tensor_request_body(server, tmp_path):
    """The binary tensor data extension by hand: a JSON header, then the raw FP32 rows."""
    header = json.dumps({
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(IRIS_ROWS.shape),
                    "parameters": {"binary_data_size": IRIS_ROWS.nbytes}}],
    }).encode()
    body = tmp_path / "request.bin"
    body.write_bytes(header + IRIS_ROWS.tobytes())
    result = curl(
        server, "/v2/models/iris/infer", "--data-binary", f"@{body}",
        "-H", f"Inference-Header-Content-Length: {len(header)}", "-H", "Content-Type: application/octet-stream",
    )
    assert_iris_predictions(result)


def test_manifest_apply_and_delete(server, tmp_path):
    """The README's manifest commands with curl: a Model manifest over a local artifact folder."""
    manifest = tmp_path / "iris.yaml"
    manifest.write_text("""apiVersion: mlops.seldon.io/v1alpha1
kind: Model
metadata:
  name: iris-from-manifest
spec:
  storageUri: "./model_repo/iris"
  requirements: [sklearn]
""")  # as the README writes it: relative to where the server runs (here, the checkout)
    applied = curl(server, "/v2/manifests", "-X", "POST", "--data-binary", f"@{manifest}")
    assert applied.status == 200 and applied.json() == {"applied": [{"kind": "Model", "name": "iris-from-manifest"}]}
    body = json.dumps(iris_json())
    answered = curl(server, "/v2/models/iris-from-manifest/infer", "-d", body)
    assert answered.status == 200 and answered.json()["outputs"][0]["data"] == IRIS_CLASSES
    deleted = curl(server, "/v2/manifests", "-X", "DELETE", "--data-binary", f"@{manifest}")
    assert deleted.status == 200 and deleted.json() == {"deleted": [{"kind": "Model", "name": "iris-from-manifest"}]}
    assert curl(server, "/v2/models/iris-from-manifest/infer", "-d", body).status == 404  # deleted: gone
    assert (ROOT / "model_repo" / "iris" / "model.joblib").exists()  # local artifacts are never deleted
