"""Alibi Detect detectors through the running server: a KSDrift detector called directly and as
a pipeline's batched side step, and an IForest outlier detector answering beside the prediction."""

from __future__ import annotations

import concurrent.futures
import shutil
import time

import joblib
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from sklearn.ensemble import RandomForestClassifier

from conftest import http_client, index_without, manifests_applied, repository_index, running_server, write_settings
from test_explain import income_data, income_label
from test_memory import metric

PIPELINE = """
kind: Pipeline
metadata: {name: income-watch}
spec:
  steps:
  - name: income
  - name: income-drift
    batch: {size: 4}
  - name: income-outlier
  output:
    steps: [income, income-outlier]
"""
# An outlier detector applied as a Seldon manifest: its runtime picked by requirements.
OUTLIER_MANIFEST = """
kind: Model
metadata: {{name: income-outlier}}
spec:
  storageUri: {folder}
  requirements: [mlserver, alibi-detect]
"""


SCALE = np.array([80, 70, 3, 1])


def shifted(rows: np.ndarray) -> np.ndarray:
    """Older people working longer hours: a population the model was not trained on."""
    return rows + np.array([25, 20, 0, 0])


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from alibi_detect.cd import CVMDriftOnline, KSDrift, MMDDrift
    from alibi_detect.od import IForest
    from alibi_detect.saving import save_detector

    repo = tmp_path_factory.mktemp("detect-repo")
    frame = income_data()
    rows = frame.to_numpy()
    model = RandomForestClassifier(n_estimators=20, random_state=0).fit(rows, income_label(frame))
    write_settings(repo / "income", {"implementation": "sklearn"})
    joblib.dump(model, repo / "income" / "model.joblib")

    save_detector(KSDrift(rows[:1000].astype(np.float32), p_val=0.05), str(repo / "income-drift"))
    write_settings(repo / "income-drift", {"implementation": "alibi-detect"})
    # MLServer's own batching: rows gathered across requests before a check.
    shutil.copytree(repo / "income-drift", repo / "income-drift-batched")
    write_settings(repo / "income-drift-batched", {"implementation": "mlserver_alibi_detect.AlibiDetectRuntime",
                                                   "parameters": {"extra": {"batch_size": 3}}})

    # The PyTorch backend, no TensorFlow: MMD with a kernel, on scaled rows.
    mmd = MMDDrift((rows[:300] / SCALE).astype(np.float32), backend="pytorch", p_val=0.05, n_permutations=50)
    save_detector(mmd, str(repo / "income-mmd"))
    write_settings(repo / "income-mmd", {"implementation": "alibi-detect"})
    # Forty requests gathered, then a check of seconds (thousands of permutations).
    slow_mmd = MMDDrift((rows[:300] / SCALE).astype(np.float32), backend="pytorch", p_val=0.05, n_permutations=1500)
    save_detector(slow_mmd, str(repo / "income-mmd-slow"))
    write_settings(repo / "income-mmd-slow", {"implementation": "alibi-detect", "parameters": {"extra": {"batch_size": 40}}})

    # An online detector: each row is a time step. Age and hours only.
    online = CVMDriftOnline(rows[:500, :2].astype(np.float32), ert=50, window_sizes=[10], n_bootstraps=500)
    save_detector(online, str(repo / "age-hours-online"))
    write_settings(repo / "age-hours-online", {"implementation": "alibi-detect"})

    outlier = IForest(threshold=0.0)
    np.random.seed(0)  # IForest's isolation forest draws from numpy's global generator
    outlier.fit(rows)
    outlier.infer_threshold(rows, threshold_perc=95)
    folder = tmp_path_factory.mktemp("outlier-detector")
    joblib.dump(outlier, folder / "detector.joblib")  # alibi-detect's saver needs TensorFlow for IForest
    write_settings(folder, {"parameters": {"extra": {"predict_parameters": {"return_instance_score": True}}}})
    return repo, folder


@pytest.fixture(scope="module")
def server(repo, tmp_path_factory):
    repository, outlier_folder = repo
    # Room for the repository's models and one 2500 MiB (declared) model at a time.
    memory = {"FLEETSERVE_MEMORY_LIMIT": "4Gi", "FLEETSERVE_OVERCOMMIT_PERCENT": "200"}
    with running_server(repository, tmp_path_factory.mktemp("detect-logs") / "server.log", memory) as running, \
            http_client(running) as client:
        for manifest in (OUTLIER_MANIFEST.format(folder=outlier_folder), PIPELINE):
            applied = client.post("/v2/manifests", content=manifest)
            assert applied.status_code == 200, applied.text
        yield running


def rows_body(rows: np.ndarray) -> dict:
    return {"inputs": [{"name": "income", "datatype": "INT64", "shape": list(rows.shape), "data": rows.flatten().tolist()}]}


def fresh_rows(count: int, seed: int) -> np.ndarray:
    """Rows from the training population, not the reference rows themselves."""
    return income_data(count, seed).to_numpy()


def test_a_drift_detector_answers_its_data_and_meta_over_rest_and_grpc(server, http):
    answer = http.post("/v2/models/income-drift/infer", json=rows_body(fresh_rows(60, 1)))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    outputs = {output["name"]: output for output in body["outputs"]}
    assert set(outputs) == {"is_drift", "distance", "p_val", "threshold"}
    assert outputs["is_drift"]["data"] == [0] and outputs["is_drift"]["shape"] == [1]
    assert outputs["p_val"]["shape"] == [4] and min(outputs["p_val"]["data"]) > outputs["threshold"]["data"][0]
    assert body["parameters"]["name"] == "KSDrift" and body["parameters"]["detector_type"] == "drift"
    assert metric(http, "fleetserve_drift_detected", model="income-drift") == 0
    # Its reference rows (16 KB) and little else: alibi-detect's import is not charged to it. Loaded
    # again alone first: at start-up, a load that waited too long for the measurement (others were
    # measured) or that others overlapped has only an estimate until its next load (CI saw 0).
    assert http.post("/v2/repository/models/income-drift/load").status_code == 200
    assert 0 < repository_index(http)["income-drift"]["measured_memory_bytes"] < 8 * 2**20

    client = triton_grpc.InferenceServerClient(server.grpc_address)
    features = triton_grpc.InferInput("income", [60, 4], "INT64")
    features.set_data_from_numpy(shifted(fresh_rows(60, 2)))
    result = client.infer("income-drift", [features])
    assert result.as_numpy("is_drift").tolist() == [1]
    # Age and hours moved, education and sex did not.
    assert (result.as_numpy("p_val") < result.as_numpy("threshold")[0]).tolist() == [True, True, False, False]
    assert result.get_response().parameters["name"].string_param == "KSDrift"
    assert metric(http, "fleetserve_drift_detected", model="income-drift") == 1
    assert metric(http, "fleetserve_drift_checks_total", model="income-drift", outcome="drift") == 1


def test_a_pytorch_backend_detector(http):
    for rows, drift in ((fresh_rows(40, 8), 0), (shifted(fresh_rows(40, 9)), 1)):
        scaled = (rows / SCALE).astype(np.float32)
        answer = http.post("/v2/models/income-mmd/infer", json={"inputs": [
            {"name": "income", "datatype": "FP32", "shape": [40, 4], "data": scaled.flatten().tolist()}]})
        assert answer.status_code == 200, answer.text
        outputs = {output["name"]: output["data"] for output in answer.json()["outputs"]}
        assert outputs["is_drift"] == [drift] and (outputs["p_val"][0] < 0.05) == bool(drift)
        assert answer.json()["parameters"]["backend"] == "pytorch"
    assert metric(http, "fleetserve_drift_detected", model="income-mmd") == 1
    wrong = http.post("/v2/models/income-mmd/infer", json={"inputs": [
        {"name": "income", "datatype": "FP32", "shape": [5, 3], "data": [0.5] * 15}]})
    assert wrong.status_code == 400 and wrong.json()["error"] == "detector 'income-mmd' compares rows of shape [4], got [3]"
    assert http.post("/v2/repository/models/income-mmd/unload").status_code == 200
    assert 'drift_detected{model="income-mmd"}' not in http.get("/metrics").text  # its drift figures go with it


def test_a_batch_check_never_blocks_the_server(server, http):
    """Gathering a request takes microseconds, checking the batch seconds: never on the event loop."""
    rows = (fresh_rows(400, 14) / SCALE).astype(np.float32)

    def send(client, part: np.ndarray):
        return client.post("/v2/models/income-mmd-slow/infer", json={"inputs": [
            {"name": "income", "datatype": "FP32", "shape": list(part.shape), "data": part.flatten().tolist()}]})

    for start in range(0, 390, 10):
        assert send(http, rows[start:start + 10]).json()["outputs"] == []
    with http_client(server) as client, concurrent.futures.ThreadPoolExecutor(1) as pool:
        checking = pool.submit(send, client, rows[390:])
        time.sleep(0.2)  # the check has begun (it takes over a second)
        assert http.get("/v2/health/live").status_code == 200
        assert not checking.done()
        answer = checking.result()
    assert answer.status_code == 200 and {output["name"]: output["data"] for output in answer.json()["outputs"]}["is_drift"] == [0]


def test_detectors_go_on_after_an_eviction(http, repo):
    """An online detector's time step and the requests a batch_size detector has gathered outlive evictions."""
    big = """
kind: Model
metadata: {{name: {name}}}
spec:
  storageUri: {folder}
  requirements: [{requirement}]
  memory: 2500Mi
"""
    manifests = "---".join([
        big.format(name="watched-online", folder=repo[0] / "age-hours-online", requirement="alibi-detect"),
        big.format(name="watched-batched", folder=repo[0] / "income-drift-batched", requirement="alibi-detect"),
        big.format(name="big-income", folder=repo[0] / "income", requirement="sklearn")])
    rows = fresh_rows(10, 11)[:, :2].astype(np.float32)
    shifted_rows = shifted(fresh_rows(30, 13))

    def steps(part: np.ndarray) -> list[int]:
        answer = http.post("/v2/models/watched-online/infer", json={"inputs": [
            {"name": "age-hours", "datatype": "FP32", "shape": list(part.shape), "data": part.flatten().tolist()}]})
        assert answer.status_code == 200, answer.text
        return {output["name"]: output["data"] for output in answer.json()["outputs"]}["time"]

    def gather(part: np.ndarray) -> dict:
        answer = http.post("/v2/models/watched-batched/infer", json=rows_body(part))
        assert answer.status_code == 200, answer.text
        return {output["name"]: output["data"] for output in answer.json()["outputs"]}

    with manifests_applied(http, manifests):
        assert gather(shifted_rows[:10]) == {} and gather(shifted_rows[10:20]) == {}  # two of three requests
        assert steps(rows[:5]) == [1, 2, 3, 4, 5]
        assert http.post("/v2/models/big-income/infer", json=rows_body(fresh_rows(2, 12))).status_code == 200
        resident = repository_index(http)
        assert not resident["watched-online"]["resident"] and not resident["watched-batched"]["resident"]
        assert gather(shifted_rows[20:])["is_drift"] == [1]  # the third request completes the batch
        assert steps(rows[5:]) == [6, 7, 8, 9, 10]  # reloaded, its state restored


def test_mlserver_batch_size_gathers_requests_before_a_check(http):
    rows = shifted(fresh_rows(30, 3))
    for part in range(2):  # two requests of three: no check yet
        waiting = http.post("/v2/models/income-drift-batched/infer", json=rows_body(rows[part * 10:(part + 1) * 10]))
        assert waiting.status_code == 200 and waiting.json()["outputs"] == []
    wrong = http.post("/v2/models/income-drift-batched/infer", json=rows_body(np.ones((5, 3), dtype=int)))
    assert wrong.status_code == 400 and "compares rows of shape [4], got [3]" in wrong.json()["error"]
    last = http.post("/v2/models/income-drift-batched/infer", json=rows_body(rows[20:]))
    assert last.status_code == 200, last.text
    assert {output["name"]: output["data"] for output in last.json()["outputs"]}["is_drift"] == [1]
    # A reload while it serves: the new detector completes the batch the old one gathered.
    assert http.post("/v2/models/income-drift-batched/infer", json=rows_body(rows[:10])).json()["outputs"] == []
    assert http.post("/v2/repository/models/income-drift-batched/load").status_code == 200
    assert http.post("/v2/models/income-drift-batched/infer", json=rows_body(rows[10:20])).json()["outputs"] == []
    last = http.post("/v2/models/income-drift-batched/infer", json=rows_body(rows[20:]))
    assert {output["name"]: output["data"] for output in last.json()["outputs"]}["is_drift"] == [1]


def test_an_online_detector_takes_rows_as_time_steps(http):
    rows = shifted(fresh_rows(30, 10))[:, :2]
    answer = http.post("/v2/models/age-hours-online/infer", json={"inputs": [
        {"name": "age-hours", "datatype": "FP32", "shape": [30, 2], "data": rows.flatten().tolist()}]})
    assert answer.status_code == 200, answer.text
    outputs = {output["name"]: output for output in answer.json()["outputs"]}
    assert outputs["time"]["data"] == list(range(1, 31))  # one answer per row
    drift = outputs["is_drift"]["data"]
    assert len(drift) == 30 and drift[0] == 0 and drift[-1] == 1  # detected once the window holds shifted rows
    # A reload while it serves goes on from the time step it had reached.
    assert http.post("/v2/repository/models/age-hours-online/load").status_code == 200
    answer = http.post("/v2/models/age-hours-online/infer", json={"inputs": [
        {"name": "age-hours", "datatype": "FP32", "shape": [2, 2], "data": rows[:2].flatten().tolist()}]})
    assert {output["name"]: output["data"] for output in answer.json()["outputs"]}["time"] == [31, 32]


def drift_checks(http, outcome: str) -> float:
    try:
        return metric(http, "fleetserve_drift_checks_total", model="income-drift", outcome=outcome)
    except AssertionError:  # no check with this outcome yet
        return 0


def wait_for_checks(http, outcome: str, count: float) -> None:
    deadline = time.monotonic() + 30
    while drift_checks(http, outcome) < count:
        assert time.monotonic() < deadline, f"drift check {outcome} #{count} did not run"
        time.sleep(0.1)


def test_drift_as_a_batched_side_step_flips_when_the_inputs_shift(server, http):
    before = {outcome: drift_checks(http, outcome) for outcome in ("drift", "no_drift")}
    rows = fresh_rows(40, 5)
    for part in range(4):  # batch.size 4: the fourth request completes the batch of 40 rows
        answer = http.post("/v2/pipelines/income-watch/infer", json=rows_body(rows[part * 10:(part + 1) * 10]))
        assert answer.status_code == 200, answer.text
        names = {output["name"] for output in answer.json()["outputs"]}
        assert names == {"predict", "is_outlier", "instance_score"}  # the side step's outputs never reach the client
    wait_for_checks(http, "no_drift", before["no_drift"] + 1)
    assert metric(http, "fleetserve_drift_detected", model="income-drift") == 0

    rows = shifted(fresh_rows(40, 6))
    for part in range(3):
        answer = http.post("/v2/pipelines/income-watch/infer", json=rows_body(rows[part * 10:(part + 1) * 10]))
        assert answer.status_code == 200, answer.text  # answered although the detector's batch is not full
    time.sleep(0.3)
    assert drift_checks(http, "drift") == before["drift"]
    http.post("/v2/pipelines/income-watch/infer", json=rows_body(rows[30:]))
    wait_for_checks(http, "drift", before["drift"] + 1)
    assert metric(http, "fleetserve_drift_detected", model="income-drift") == 1
    latest = http.get("/v2/pipelines/income-watch/inspect/income-drift.outputs").json()["messages"]["income-drift"][-1]
    outputs = {tensor["name"]: tensor for tensor in latest["outputs"]}
    assert outputs["is_drift"]["data"] == [1] and outputs["p_val"]["shape"] == [4]


def test_an_outlier_detector_answers_beside_the_prediction(server):
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    features = triton_grpc.InferInput("income", [3, 4], "INT64")
    features.set_data_from_numpy(np.array([[45, 40, 1, 0], [30, 20, 3, 1], [500, 400, 1, 0]]))
    result = client.infer("income-watch", [features], headers={"seldon-model": "income-watch.pipeline"})
    assert result.as_numpy("predict").tolist() == [0, 1, 1]
    assert result.as_numpy("is_outlier").tolist() == [0, 0, 1]
    scores = result.as_numpy("instance_score")
    assert scores.shape == (3,) and scores[2] > max(scores[:2])


def test_detector_errors_are_clear(http):
    text = http.post("/v2/models/income-drift/infer", json={"inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [1], "data": ["hello"]}]})
    assert text.status_code == 400 and "send a numeric tensor" in text.json()["error"]
    narrow = http.post("/v2/models/income-drift/infer", json=rows_body(np.ones((10, 2), dtype=int)))
    assert narrow.status_code == 400, narrow.text
    assert narrow.json()["error"] == "detector 'income-drift' compares rows of shape [4], got [2]"
    empty = http.post("/v2/models/age-hours-online/infer", json={"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [0, 2], "data": []}]})
    assert empty.status_code == 400 and "send at least one" in empty.json()["error"]
    assert http.post("/v2/models/income-drift/infer", json=rows_body(fresh_rows(30, 7))).status_code == 200


def test_without_alibi_detect_the_load_names_the_extra(repo, tmp_path):
    index = index_without("alibi_detect", [repo[0] / "income", repo[0] / "income-drift"], tmp_path)
    assert index["income"]["state"] == "READY"
    assert index["income-drift"]["state"] == "UNAVAILABLE"
    assert "pip install 'fleetserve[alibi-detect]'" in index["income-drift"]["reason"]
