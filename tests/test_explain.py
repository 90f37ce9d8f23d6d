"""Alibi explainers through the running server: anchors over a tabular classifier (by modelRef,
fitted at load, and by pipelineRef, loaded from a saved explainer) and over a text model."""

from __future__ import annotations

import json
import shutil

import joblib
import numpy as np
import pandas as pd
import pytest
import tritonclient.grpc as triton_grpc
from sklearn.ensemble import RandomForestClassifier

from conftest import http_client, running_server, write_settings

FEATURES = ["age", "hours", "education", "sex"]
EDUCATION = ["school", "college", "bachelors", "doctorate"]

TEXT_MODEL = '''
import time

import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Sentiment(Runtime):
    """1 for a text with "good" in it, else 0; "slow" texts take two seconds."""

    def predict(self, request):
        texts = [item.decode() if isinstance(item, bytes) else str(item) for item in request.inputs[0].data.flat]
        if any("slow" in text for text in texts):
            time.sleep(2)
        return self.response([Tensor("label", np.array([int("good" in text) for text in texts]))], request)
'''


def income_data(rows: int = 2000, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "age": rng.integers(18, 80, rows), "hours": rng.integers(10, 70, rows),
        "education": rng.integers(0, 4, rows), "sex": rng.integers(0, 2, rows),
    })
    return frame


def income_label(frame: pd.DataFrame) -> np.ndarray:
    """A high income: older and working long hours, or a doctorate."""
    return (((frame.age > 40) & (frame.hours > 40)) | (frame.education == 3)).to_numpy().astype(int)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("explain-repo")
    frame = income_data()
    model = RandomForestClassifier(n_estimators=20, random_state=0).fit(frame.to_numpy(), income_label(frame))
    write_settings(repo / "income", {"implementation": "sklearn"})
    joblib.dump(model, repo / "income" / "model.joblib")

    explainer = repo / "income-explainer"
    write_settings(explainer, {"implementation": "alibi-explain", "parameters": {"extra": {
        "explainer_type": "anchor_tabular", "model_ref": "income", "training_data": "train.csv",
        "init_parameters": {"categorical_names": {"2": EDUCATION, "3": ["female", "male"]}, "seed": 1},
    }}})
    frame.to_csv(explainer / "train.csv", index=False)

    write_settings(repo / "sentiment", {"implementation": "text_model.Sentiment"})
    (repo / "sentiment" / "text_model.py").write_text(TEXT_MODEL)
    # MLServer's way of naming the target: the URI it would have called.
    write_settings(repo / "sentiment-explainer", {"implementation": "mlserver_alibi_explain.AlibiExplainRuntime",
                                                  "parameters": {"extra": {
        "explainer_type": "anchor_text", "infer_uri": "http://localhost:8080/v2/models/sentiment/infer",
        "timeout": 0.5, "init_parameters": {"seed": 1}}}})
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    with running_server(repo, tmp_path_factory.mktemp("explain-logs") / "server.log") as running:
        yield running


@pytest.fixture
def http(server):
    with http_client(server) as client:
        yield client


def explain(http, model: str, body: dict) -> list[dict]:
    response = http.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    output = response.json()["outputs"][0]
    assert output["name"] == "explanation" and output["datatype"] == "BYTES"
    return [json.loads(item) for item in output["data"]]


def income_row(age: int, hours: int, education: int, sex: int) -> dict:
    return {"inputs": [{"name": "input-0", "datatype": "INT64", "shape": [1, 4], "data": [age, hours, education, sex]}]}


def check_income_anchor(explanation: dict) -> None:
    assert explanation["meta"]["name"] == "AnchorTabular"
    anchor = explanation["data"]["anchor"]
    # Age and hours decide this row (education 1 does not): the anchor must hold both.
    assert any(item.startswith("age") or "< age" in item for item in anchor), anchor
    assert any(item.startswith("hours") or "< hours" in item for item in anchor), anchor
    assert explanation["data"]["precision"] >= 0.9 and 0 < explanation["data"]["coverage"] <= 1


def test_anchor_tabular_fitted_at_load_explains_its_model(http):
    assert http.post("/v2/models/income/infer", json=income_row(60, 60, 1, 0)).json()["outputs"][0]["data"] == [1]
    [explanation] = explain(http, "income-explainer", income_row(60, 60, 1, 0))
    check_income_anchor(explanation)
    [explanation] = explain(http, "income-explainer", income_row(30, 20, 3, 0))
    assert explanation["data"]["anchor"] == ["education = doctorate"]  # categorical names from the settings
    metadata = http.get("/v2/models/income-explainer").json()
    assert metadata["outputs"] == [{"name": "explanation", "datatype": "BYTES", "shape": [-1]}]


def test_anchor_tabular_over_a_pipeline_from_a_saved_explainer(http, repo, tmp_path):
    from alibi.explainers import AnchorTabular
    from alibi.saving import save_explainer

    frame = income_data()
    local = joblib.load(repo / "income" / "model.joblib")
    saved = AnchorTabular(local.predict, FEATURES, categorical_names={2: EDUCATION, 3: ["female", "male"]}, seed=1)
    saved.fit(frame.to_numpy())
    save_explainer(saved, str(tmp_path / "saved-explainer"))
    manifests = f"""
kind: Pipeline
metadata: {{name: income-pipeline}}
spec:
  steps: [{{name: income}}]
  output: {{steps: [income]}}
---
kind: Model
metadata: {{name: income-pipeline-explainer}}
spec:
  storageUri: {tmp_path / 'saved-explainer'}
  explainer: {{type: anchor_tabular, pipelineRef: income-pipeline}}
"""
    applied = http.post("/v2/manifests", content=manifests)
    assert applied.status_code == 200, applied.text
    try:
        explanations = explain(http, "income-pipeline-explainer", {"inputs": [
            {"name": "x", "datatype": "INT64", "shape": [2, 4], "data": [60, 60, 1, 0, 65, 55, 0, 1]}]})
        assert len(explanations) == 2  # one per row
        for explanation in explanations:
            check_income_anchor(explanation)
        assert "income-pipeline" in http.get("/v2/pipelines").text
    finally:
        http.request("DELETE", "/v2/manifests", content=manifests)


def test_anchor_text_over_grpc_and_rest(server, http):
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["this movie is good and fun"]}]}
    [explanation] = explain(http, "sentiment-explainer", body)
    assert explanation["meta"]["name"] == "AnchorText" and explanation["data"]["anchor"] == ["good"]
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    text = triton_grpc.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"a good day"], dtype=object))
    answer = client.infer("sentiment-explainer", [text]).as_numpy("explanation")
    assert json.loads(answer[0])["data"]["anchor"] == ["good"]


def test_explainer_errors_are_clear(http, repo):
    numbers = http.post("/v2/models/sentiment-explainer/infer", json=income_row(1, 2, 3, 0))
    assert numbers.status_code == 400 and "explains text" in numbers.json()["error"]
    slow = http.post("/v2/models/sentiment-explainer/infer", json={"inputs": [
        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a slow good film"]}]})
    assert slow.status_code == 504 and "did not answer within 0.5s" in slow.json()["error"], slow.text
    both = """
kind: Model
metadata: {name: confused-explainer}
spec:
  storageUri: /nowhere
  explainer: {type: anchor_tabular, modelRef: income, pipelineRef: income-pipeline}
"""
    refused = http.post("/v2/manifests", content=both)
    assert refused.status_code == 400 and "only one of modelRef and pipelineRef" in refused.json()["error"]
    missing = both.replace("modelRef: income, pipelineRef: income-pipeline", "modelRef: no-such-model")
    missing = missing.replace("/nowhere", str(repo / "income-explainer"))
    refused = http.post("/v2/manifests", content=missing)
    assert refused.status_code == 400, refused.text
    assert "cannot use its model 'no-such-model': model 'no-such-model' not found" in refused.json()["error"]
    # The server and the explainers go on.
    assert explain(http, "sentiment-explainer", {"inputs": [
        {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["good"]}]})[0]["data"]["anchor"] == ["good"]


def test_without_alibi_the_load_names_the_extra(repo, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "alibi.py").write_text("raise ImportError(\"No module named 'alibi'\")\n")  # as if not installed
    small = tmp_path / "repo"
    for name in ("sentiment", "sentiment-explainer"):
        shutil.copytree(repo / name, small / name)
    with running_server(small, tmp_path / "server.log", {"PYTHONPATH": str(blocked)}) as server, \
            http_client(server) as client:
        index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
        assert index["sentiment"]["state"] == "READY"
        assert index["sentiment-explainer"]["state"] == "UNAVAILABLE"
        assert "pip install 'fleetserve[alibi-explain]'" in index["sentiment-explainer"]["reason"]
