"""Seldon Core 2 `kind: Model` manifests through `fleetserve apply/delete` and /v2/manifests,
capabilities, and reloading a model while it serves."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from conftest import http_client, running_server
from test_memory import ROW, apply, constant_model, delete, model_manifest


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("manifest_artifacts")
    for answer in (1, 2):
        constant_model(root / f"answer-{answer}", answer)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Capabilities replaced by sklearn only, plus an extra `gpu`."""
    repository = tmp_path_factory.mktemp("manifest_repo")
    env = {"FLEETSERVE_CAPABILITIES": "sklearn,python", "FLEETSERVE_EXTRA_CAPABILITIES": "gpu",
           "FLEETSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with running_server(repository, tmp_path_factory.mktemp("manifest_logs") / "server.log", env) as server:
        yield server


def test_multi_document_apply_and_delete(server, http, artifacts):
    text = "---\n".join(model_manifest(f"a{n}", artifacts / f"answer-{n}") for n in (1, 2))
    applied = apply(server, text)
    assert applied.returncode == 0, applied.stdout
    assert json.loads(applied.stdout) == {"applied": [{"kind": "Model", "name": "a1"}, {"kind": "Model", "name": "a2"}]}
    assert [http.post(f"/v2/models/a{n}/infer", json=ROW).json()["outputs"][0]["data"] for n in (1, 2)] == [[1], [2]]
    deleted = delete(server, text)
    assert deleted.returncode == 0 and json.loads(deleted.stdout)["deleted"][1] == {"kind": "Model", "name": "a2"}
    assert http.post("/v2/models/a1/infer", json=ROW).status_code == 404  # deleted: gone


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("kind: Server\nmetadata: {name: p}\n", "unsupported kind 'Server'"),
        ("kind: Pipeline\nmetadata: {name: p}\n", "pipeline 'p': spec must be a mapping"),
        ("kind: Model\nspec: {storageUri: /x}\n", "needs metadata.name"),
        ("kind: Model\nmetadata: {name: ../x}\nspec: {storageUri: /x}\n", "invalid model name"),
        ("kind: Model\nmetadata: {name: m}\nspec: {requirements: [sklearn]}\n", "spec.storageUri must be a non-empty string"),
        ("kind: Model\nmetadata: {name: m}\nspec: {storageUri: /x, memory: lots}\n", "spec.memory: 'lots' is not a memory quantity"),
        ("kind: Model\nmetadata: {name: m}\nspec: {storageUri: /x, requirements: sklearn}\n", "spec.requirements must be a list"),
        ("kind: Model\nmetadata: {name: m\n", "invalid YAML"),
        ("- just\n- a list\n", "a manifest must be a mapping"),
        ("", "no manifests found"),
    ],
)
def test_invalid_manifests_are_refused_clearly(server, http, text, fragment):
    result = apply(server, text)
    assert result.returncode == 1
    assert fragment in json.loads(result.stdout)["error"]
    response = httpx.post(f"{server.url}/v2/manifests", content=text)
    assert response.status_code == 400 and fragment in response.json()["error"]


def test_delete_of_an_unknown_manifest(server, artifacts):
    result = delete(server, model_manifest("never-applied", artifacts / "answer-1"))
    assert result.returncode == 1 and "no model 'never-applied'" in json.loads(result.stdout)["error"]


def test_capabilities_replace_and_extend(server, http, artifacts):
    gpu = apply(server, model_manifest("needs-gpu", artifacts / "answer-1", requirements=("sklearn", "gpu")))
    assert gpu.returncode == 0, gpu.stdout
    refused = apply(server, model_manifest("needs-xgboost", artifacts / "answer-1", requirements=("xgboost",)))
    assert refused.returncode == 1
    error = json.loads(refused.stdout)["error"]
    assert "requires ['xgboost'] but this server provides ['sklearn', 'python', 'gpu']" in error


def test_reapplying_swaps_the_model_without_failing_requests(server, http, artifacts):
    """Requests keep flowing while the model is reloaded with new artifacts; none fails."""
    assert apply(server, model_manifest("swapped", artifacts / "answer-1")).returncode == 0
    answers: list = []
    stop = threading.Event()

    def keep_asking():
        with http_client(server) as client:
            while not stop.is_set():
                response = client.post("/v2/models/swapped/infer", json=ROW)
                answers.append(response.json()["outputs"][0]["data"][0] if response.status_code == 200 else response.text)

    callers = [threading.Thread(target=keep_asking) for _ in range(4)]
    for caller in callers:
        caller.start()
    try:
        assert apply(server, model_manifest("swapped", artifacts / "answer-2")).returncode == 0
        deadline = time.monotonic() + 10
        while answers.count(2) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        for caller in callers:
            caller.join()
    assert set(answers) == {1, 2}, [answer for answer in answers if answer not in (1, 2)][:3]
    assert answers.index(2) > 0 and answers[-1] == 2


def test_applied_manifests_come_back_after_a_restart(tmp_path, artifacts):
    """--state-dir: models, a pipeline and an experiment applied before a restart serve after it;
    what was deleted stays gone, and leaves no entry behind; one that cannot load at start is kept."""
    state, repository = tmp_path / "state", tmp_path / "repo"
    repository.mkdir()
    answer_3 = tmp_path / "answer-3"
    constant_model(answer_3, 3)
    graphs = """kind: Pipeline
metadata: {name: p}
spec:
  steps: [{name: a1}]
  output: {steps: [a1]}
---
kind: Experiment
metadata: {name: split}
spec:
  candidates: [{name: a1, weight: 50}, {name: a3, weight: 50}]
"""
    models = "---\n".join([model_manifest("a1", artifacts / "answer-1"), model_manifest("a2", artifacts / "answer-2"),
                           model_manifest("a3", answer_3)])
    start = lambda name: running_server(repository, tmp_path / f"{name}.log", args=("--state-dir", str(state)))
    with start("first") as server, http_client(server) as http:
        assert http.post("/v2/manifests", content=models + "---\n" + graphs).status_code == 200
        assert http.request("DELETE", "/v2/manifests", content=model_manifest("a2", artifacts / "answer-2")).status_code == 200
        assert "a2" not in {entry["name"] for entry in http.post("/v2/repository/index").json()}
    shutil.rmtree(answer_3)  # a3 cannot load at the next start

    with start("second") as server, http_client(server) as http:
        assert http.post("/v2/models/a1/infer", json=ROW).json()["outputs"][0]["data"] == [1]
        assert http.post("/v2/pipelines/p/infer", json=ROW).json()["outputs"][0]["data"] == [1]
        assert http.get("/v2/experiments/split").status_code == 200
        index = {entry["name"]: entry for entry in http.post("/v2/repository/index").json()}
        assert index["a1"]["state"] == "READY" and "a2" not in index
        assert index["a3"]["state"] == "UNAVAILABLE" and "answer-3" in index["a3"]["reason"], index["a3"]
    constant_model(answer_3, 3)  # the kept manifest applies again once its artifacts are back
    (state / "manifests" / "model" / "broken.json").write_text("{not json")  # an edited file: skipped, logged
    (state / "manifests" / "pipeline" / "wrong.json").write_text('["a list"]')

    with start("third") as server, http_client(server) as http:
        assert http.post("/v2/models/a3/infer", json=ROW).json()["outputs"][0]["data"] == [3]
        assert http.get("/v2/experiments/split/ready").status_code == 200
        http.request("DELETE", "/v2/pipelines/p")
        assert "cannot read the applied manifest" in server.log() and "is no Pipeline manifest" in server.log()
    assert sorted(path.name for path in (state / "manifests").rglob("*.json")) == [
        "a1.json", "a3.json", "broken.json", "split.json", "wrong.json"]
