"""Alibi explainers through the running server: anchors over a tabular classifier (by modelRef,
fitted at load, and by pipelineRef, loaded from a saved explainer), over a text model and over an
image model; integrated gradients of TorchScript models."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import time

import joblib
import numpy as np
import pandas as pd
import pytest
import torch
import tritonclient.grpc as triton_grpc
from sklearn.ensemble import RandomForestClassifier

from conftest import http_client, index_without, manifests_applied, repository_index, running_server, write_settings

FEATURES = ["age", "hours", "education", "sex"]
LINEAR_WEIGHTS = [2.0, -1.0, 0.5, 3.0]
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


TEXTURE_MODEL = '''
import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Texture(Runtime):
    """1 for images whose top-left quarter is textured (varies), else 0."""

    def predict(self, request):
        images = request.inputs[0].data
        return self.response([Tensor("textured", (images[:, :8, :8, :].std(axis=(1, 2, 3)) > 0.2).astype(int))], request)
'''

TORCH_MODEL = '''
import torch

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class TorchModel(Runtime):
    """A TorchScript model.pt: its output for FP32 rows."""

    def load(self):
        self.model = torch.jit.load(str(self.settings.artifact_path / "model.pt")).eval()

    def predict(self, request):
        with torch.no_grad():
            output = self.model(torch.as_tensor(request.inputs[0].data, dtype=torch.float32))
        return self.response([Tensor("output", output.numpy())], request)
'''


class IncomeNet(torch.nn.Module):
    """A small classifier on raw income rows (it scales them itself): high income or not."""

    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([80.0, 70.0, 3.0, 1.0]))
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(rows / self.scale), dim=1)


def income_net(frame: pd.DataFrame) -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    net = IncomeNet()
    rows = torch.tensor(frame.to_numpy(), dtype=torch.float32)
    labels = torch.tensor(income_label(frame))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.nll_loss(torch.log(net(rows) + 1e-9), labels).backward()
        optimizer.step()
    return torch.jit.script(net.eval())


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
    # A model that declares FP32 rows: the explainer sends its samples (the CSV's integers) as FP32.
    write_settings(repo / "income-fp32", {"implementation": "sklearn", "inputs": [
        {"name": "features", "datatype": "FP32", "shape": [-1, 4]}]})
    joblib.dump(model, repo / "income-fp32" / "model.joblib")
    shutil.copytree(explainer, repo / "income-fp32-explainer")
    settings = json.loads((explainer / "model-settings.json").read_text())
    settings["parameters"]["extra"]["model_ref"] = "income-fp32"
    write_settings(repo / "income-fp32-explainer", settings)

    write_settings(repo / "sentiment", {"implementation": "text_model.Sentiment"})
    (repo / "sentiment" / "text_model.py").write_text(TEXT_MODEL)
    # MLServer's way of naming the target: the URI it would have called.
    write_settings(repo / "sentiment-explainer", {"implementation": "mlserver_alibi_explain.AlibiExplainRuntime",
                                                  "parameters": {"extra": {
        "explainer_type": "anchor_text", "infer_uri": "http://localhost:8080/v2/models/sentiment/infer",
        "timeout": 0.5, "init_parameters": {"seed": 1}}}})
    write_settings(repo / "texture", {"implementation": "texture_model.Texture"})
    (repo / "texture" / "texture_model.py").write_text(TEXTURE_MODEL)
    write_settings(repo / "texture-explainer", {"implementation": "alibi-explain", "parameters": {"extra": {
        "explainer_type": "anchor_image", "model_ref": "texture", "init_parameters": {
            "image_shape": [16, 16, 3], "segmentation_fn": "slic", "seed": 1,
            # A 4x4 grid of superpixels.
            "segmentation_kwargs": {"n_segments": 16, "compactness": 1000, "sigma": 0.5, "start_label": 0}}}}})

    write_settings(repo / "income-torch", {"implementation": "torch_model.TorchModel"})
    (repo / "income-torch" / "torch_model.py").write_text(TORCH_MODEL)
    income_net(frame).save(str(repo / "income-torch" / "model.pt"))
    # A linear model's integrated gradients are known exactly: weight * (x - baseline).
    write_settings(repo / "linear-torch", {"implementation": "torch_model.TorchModel"})
    (repo / "linear-torch" / "torch_model.py").write_text(TORCH_MODEL)
    linear = torch.nn.Linear(4, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([LINEAR_WEIGHTS]))
        linear.bias.fill_(0.5)
    torch.jit.script(linear).save(str(repo / "linear-torch" / "model.pt"))
    write_settings(repo / "linear-explainer", {"implementation": "alibi-explain", "parameters": {"extra": {
        "explainer_type": "integrated_gradients", "model_ref": "linear-torch",
        "init_parameters": {"method": "riemann_middle", "n_steps": 20}}}})
    return repo


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    with running_server(repo, tmp_path_factory.mktemp("explain-logs") / "server.log") as running:
        yield running


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
    [explanation] = explain(http, "income-fp32-explainer", income_row(60, 60, 1, 0))
    check_income_anchor(explanation)
    metadata = http.get("/v2/models/income-explainer").json()
    assert metadata["outputs"] == [{"name": "explanation", "datatype": "BYTES", "shape": [-1]}]
    # Its memory holds the training data it sampled from, at least.
    assert repository_index(http)["income-explainer"]["measured_memory_bytes"] >= income_data().to_numpy().nbytes


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
    with manifests_applied(http, manifests):
        explanations = explain(http, "income-pipeline-explainer", {"inputs": [
            {"name": "x", "datatype": "INT64", "shape": [2, 4], "data": [60, 60, 1, 0, 65, 55, 0, 1]}]})
        assert len(explanations) == 2  # one per row
        for explanation in explanations:
            check_income_anchor(explanation)
        assert "income-pipeline" in http.get("/v2/pipelines").text


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
    for timeout in ("0", ".inf", ".nan", "soon"):
        endless = missing.replace("modelRef: no-such-model", "modelRef: income") + \
            f"  parameters: [{{name: timeout, value: {timeout}}}]\n"
        refused = http.post("/v2/manifests", content=endless)
        assert refused.status_code == 400 and "timeout must be a positive number of seconds" in refused.json()["error"], refused.text
    # The server and the explainers go on.
    assert explain(http, "sentiment-explainer", {"inputs": [
        {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["good"]}]})[0]["data"]["anchor"] == ["good"]


def test_a_manifest_without_a_ref_explains_what_its_artifact_names(http, repo):
    manifest = f"""
kind: Model
metadata: {{name: income-explainer-copy}}
spec:
  storageUri: {repo / 'income-explainer'}
  explainer: {{type: anchor_tabular}}
"""
    with manifests_applied(http, manifest):
        check_income_anchor(explain(http, "income-explainer-copy", income_row(60, 60, 1, 0))[0])


def test_without_alibi_the_load_names_the_extra(repo, tmp_path):
    index = index_without("alibi", [repo / "sentiment", repo / "sentiment-explainer"], tmp_path)
    assert index["sentiment"]["state"] == "READY"
    assert index["sentiment-explainer"]["state"] == "UNAVAILABLE"
    assert "pip install 'fleetserve[alibi-explain]'" in index["sentiment-explainer"]["reason"]


def test_integrated_gradients_of_a_torch_model_by_model_ref(http, tmp_path):
    write_settings(tmp_path / "ig", {"parameters": {"extra": {"init_parameters": {"n_steps": 64}}}})
    manifest = f"""
kind: Model
metadata: {{name: income-ig}}
spec:
  storageUri: {tmp_path / 'ig'}
  explainer: {{type: integrated_gradients, modelRef: income-torch}}
"""
    with manifests_applied(http, manifest):
        rows = [[60, 60, 1, 0], [25, 15, 0, 1]]
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": sum(rows, [])}]}
        served = np.array(http.post("/v2/models/income-torch/infer", json=body).json()["outputs"][0]["data"]).reshape(2, 2)
        [explanation] = explain(http, "income-ig", body)  # one explanation for the batch, as alibi answers
        assert explanation["meta"]["name"] == "IntegratedGradients"
        assert explanation["meta"]["params"]["n_steps"] == 64
        data = explanation["data"]
        assert np.allclose(data["predictions"], served, atol=1e-6)  # the white box is the served model
        assert data["target"] == served.argmax(1).tolist() == [1, 0]  # each row's predicted class by default
        attributions = np.array(data["attributions"][0])
        assert attributions.shape == (2, 4)
        # Completeness: a row's attributions add up to its output's move from the all-zeros baseline.
        zeros = http.post("/v2/models/income-torch/infer", json={"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]}).json()["outputs"][0]["data"]
        moved = [served[0, 1] - zeros[1], served[1, 0] - zeros[0]]
        assert np.allclose(attributions.sum(1), moved, atol=0.02), (attributions.sum(1), moved)
        assert np.abs(data["deltas"]).max() < 0.02
        # The older, long-hours row is high income for its age and hours.
        assert set(np.argsort(-attributions[0])[:2]) == {0, 1}
        [other] = explain(http, "income-ig", {**body, "parameters": {"explain_parameters": {"target": 0}}})
        assert other["data"]["target"] == [0, 0]
        assert np.allclose(np.array(other["data"]["attributions"][0]), -attributions * [[1], [-1]], atol=1e-3)


def test_integrated_gradients_of_a_linear_model_are_exact(server, http):
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    rows = triton_grpc.InferInput("x", [2, 4], "FP32")
    rows.set_data_from_numpy(np.array([[1, 2, 3, 4], [0, -1, 2, 1]], dtype=np.float32))
    parameters = {"explain_parameters": json.dumps({"baselines": [1, 1, 1, 1]})}
    answer = client.infer("linear-explainer", [rows], parameters=parameters).as_numpy("explanation")
    explanation = json.loads(answer[0])
    expected = np.array(LINEAR_WEIGHTS) * (np.array([[1, 2, 3, 4], [0, -1, 2, 1]]) - 1)
    assert np.allclose(explanation["data"]["attributions"][0], expected, atol=1e-5)
    assert explanation["data"]["target"] is None  # one output: nothing to choose
    assert explanation["meta"]["params"]["method"] == "riemann_middle"
    assert repository_index(http)["linear-explainer"]["measured_memory_bytes"] == 4 * 4 + 4  # its model's weights and bias

    wrong = http.post("/v2/models/linear-explainer/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]})
    assert wrong.status_code == 400 and "the model cannot take inputs of shape [1, 3]" in wrong.json()["error"], wrong.text
    target = http.post("/v2/models/linear-explainer/infer", json={
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}],
        "parameters": {"explain_parameters": {"target": 3}}})
    assert target.status_code == 400 and "target must be an output index below 1" in target.json()["error"], target.text


def test_anchor_image_finds_the_superpixels_that_decide(http):
    image = np.full((16, 16, 3), 0.5, dtype=np.float32)
    image[:8:2, :8] = 1.0  # stripes in the top-left quarter
    image[1:8:2, :8] = 0.0
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 16, 16, 3], "data": image.flatten().tolist()}],
            "parameters": {"explain_parameters": {"threshold": 0.95, "p_sample": 0.5}}}
    [explanation] = explain(http, "texture-explainer", body)
    assert explanation["meta"]["name"] == "AnchorImage" and explanation["data"]["precision"] >= 0.95
    anchor = np.array(explanation["data"]["anchor"])
    assert anchor.shape == (16, 16, 3)
    rows, columns, _ = np.nonzero(anchor)
    # The anchor keeps superpixels of the striped quarter (its grid cells reach row and column 8), nothing else.
    assert len(rows) and rows.max() <= 8 and columns.max() <= 8


def test_waiting_explanations_hold_no_shared_thread(server, http, repo):
    """Explanations wait their turn on the event loop and run on the explainer's own thread: more of
    them than the loop's shared pool has threads (6 on two cores) leave it free for /metrics."""
    manifest = f"""
kind: Model
metadata: {{name: patient-explainer}}
spec:
  storageUri: {repo / 'sentiment-explainer'}
  parameters: [{{name: timeout, value: 1}}]
"""
    slow = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a slow good film"]}]}

    def one(_) -> int:
        with http_client(server) as client:
            return client.post("/v2/models/patient-explainer/infer", json=slow).status_code

    with manifests_applied(http, manifest), concurrent.futures.ThreadPoolExecutor(7) as pool:
        explaining = [pool.submit(one, n) for n in range(7)]
        time.sleep(0.3)  # all sent; the first times out after a second
        assert http.get("/metrics").status_code == 200
        assert not any(request.done() for request in explaining)
        assert [request.result() for request in explaining] == [504] * 7


def test_concurrent_explanations_keep_to_their_own_instance(server):
    """alibi's anchor explainers keep the instance they explain on themselves: requests take turns."""
    rows = [income_row(60, 60, 1, 0), income_row(30, 20, 3, 0)] * 3

    def one(body: dict) -> dict:
        with http_client(server) as client:
            return explain(client, "income-explainer", body)[0]

    with concurrent.futures.ThreadPoolExecutor(len(rows)) as pool:
        explanations = list(pool.map(one, rows))
    for body, explanation in zip(rows, explanations):
        if body["inputs"][0]["data"][2] == 3:
            assert explanation["data"]["anchor"] == ["education = doctorate"]
        else:
            check_income_anchor(explanation)
        assert explanation["data"]["raw"]["instance"] == body["inputs"][0]["data"]
