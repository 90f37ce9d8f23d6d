"""fleetserve in MLServer's place: started as KServe's kserve-mlserver ServingRuntime and Seldon's
mlserver ServerConfig start MLServer, with MLServer's variables and settings.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx

from conftest import ROOT, Server, free_port, iris_json, wait_ready


def test_kserve_mlserver_variables_serve_the_model_they_name(tmp_path):
    """KServe's runtime sets the ports, MLSERVER_MODEL_{NAME,URI,IMPLEMENTATION} for the one model
    (its folder holds only the artifact), and the models folder; settings.json there says not to
    load the folder's own models at start."""
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    artifact = tmp_path / "mnt-models"
    artifact.mkdir()
    shutil.copy(ROOT / "model_repo" / "iris" / "model.joblib", artifact / "model.joblib")
    repository = tmp_path / "models"
    shutil.copytree(ROOT / "model_repo" / "iris", repository / "iris")
    (repository / "settings.json").write_text(json.dumps({"load_models_at_startup": False, "debug": False}))
    ports = [free_port() for _ in range(3)]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("FLEETSERVE_", "MLSERVER_"))}
    env.update({"MLSERVER_HTTP_PORT": str(ports[0]), "MLSERVER_GRPC_PORT": str(ports[1]),
                "MLSERVER_METRICS_PORT": str(ports[2]), "MLSERVER_MODELS_DIR": str(repository),
                "MLSERVER_MODEL_NAME": "income", "MLSERVER_MODEL_URI": str(artifact),
                "MLSERVER_MODEL_IMPLEMENTATION": "mlserver_sklearn.SKLearnModel"})
    log_path = tmp_path / "server.log"
    process = subprocess.Popen([sys.executable, "-m", "fleetserve.cli", "start"], stdout=log_path.open("w"),
                               stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    server = wait_ready(Server(process, *ports, repository, log_path))
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            answer = http.post("/v2/models/income/infer", json=iris_json())
            assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [0, 2], answer.text
            index = {entry["name"]: entry for entry in http.post("/v2/repository/index").json()}
            assert index["income"]["state"] == "READY" and index["iris"]["state"] != "READY", index
            assert http.post("/v2/repository/models/iris/load").status_code == 200
            assert http.post("/v2/models/iris/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
        assert httpx.get(f"http://127.0.0.1:{ports[2]}/metrics", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0, server.log()


def test_mlservers_model_docs_show_one_models_routes(http):
    page = http.get("/v2/models/iris/docs")
    assert page.status_code == 200 and "/v2/models/iris/docs/dataplane.json" in page.text
    document = http.get("/v2/models/iris/docs/dataplane.json").json()
    assert "/v2/models/iris/infer" in document["paths"] and "/v2/models/iris/ready" in document["paths"]
    assert not [path for path in document["paths"] if not path.startswith("/v2/models/iris/")
                and path != "/v2/models/iris"]
    assert not [path for path in document["paths"] if "/versions/" in path]
    infer = document["paths"]["/v2/models/iris/infer"]["post"]
    assert not [parameter for parameter in infer.get("parameters", []) if "ModelName" in parameter.get("$ref", "")]
    versioned = http.get("/v2/models/versioned/versions/2/docs/dataplane.json").json()
    assert "/v2/models/versioned/versions/2/infer" in versioned["paths"] and len(versioned["paths"]) > 3
    assert http.get("/v2/models/versioned/versions/2/docs").status_code == 200
    missing = http.get("/v2/models/no-such-model/docs")
    assert missing.status_code == 404 and "not found" in missing.json()["error"]
    assert http.get("/v2/models/versioned/versions/9/docs/dataplane.json").status_code == 404


def test_kserves_own_clients(server):
    """kserve.InferenceRESTClient (V2: JSON, binary, BYTES, an error) and InferenceGRPCClient, from
    the venv `make test` gives them (kserve pins dependencies of its own)."""
    python = ROOT / ".venv" / "kserve" / "bin" / "python"
    assert python.exists(), "KServe's venv is made by `make test` (.venv/kserve)"
    ran = subprocess.run([str(python), str(ROOT / "tests" / "kserve_client.py"), server.url, server.grpc_address],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    answers = json.loads(ran.stdout)
    assert answers["rest_ready"] is True and answers["grpc_ready"] is True
    assert answers["rest_json"] == answers["rest_binary"] == answers["grpc"] == [0, 2]
    assert answers["rest_bytes"]["length"] == [11, 3]
    assert "model 'nowhere' not found" in answers["rest_error"]
    assert answers["grpc_model"] == "iris"
