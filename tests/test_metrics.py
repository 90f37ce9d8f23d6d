"""The series dashboards and autoscalers of Seldon Core 2 and Triton already read, counted from
real requests (REST and gRPC, successes and errors, a pipeline), and /metrics as promtool lints it."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from conftest import ECHO_MODEL, ROOT, http_client, iris_json, running_server, write_settings

PIPELINE = """
apiVersion: mlops.seldon.io/v1alpha1
kind: Pipeline
metadata:
  name: flowers
spec:
  steps:
    - name: iris
  output:
    steps: [iris]
"""

# Seldon's and Triton's names, which promtool objects to (counters without _total, names ending in
# _count or _gauge, units abbreviated): kept, since their dashboards and autoscaling rules query them.
HISTORIC_NAMES = ("seldon_", "nv_inference_")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repo")
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "model_repo" / "build.py")], check=True)
    shutil.copytree(ROOT / "model_repo" / "iris", repository / "iris")
    with running_server(repository, tmp_path_factory.mktemp("logs") / "server.log") as running:
        yield running


@pytest.fixture
def http(server):
    with http_client(server) as client:
        yield client


def samples(http) -> dict[tuple[str, frozenset], float]:
    """Every sample on /metrics, by name and labels."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(http.get("/metrics").text) for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


SERVER = {"server": "fleetserve", "server_replica": "0"}


def test_seldon_and_triton_series_count_each_door_and_code(server, http):
    assert http.post("/v2/pipelines", content=PIPELINE, headers={"Content-Type": "application/yaml"}).status_code == 200
    before = samples(http)
    for _ in range(3):
        assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
    wrong = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    assert http.post("/v2/models/iris/infer", json=wrong).status_code == 400
    assert http.post("/v2/models/no-such-model/infer", json=iris_json()).status_code == 404
    assert http.post("/v2/models/iris/versions/99/infer", json=iris_json()).status_code == 404
    assert http.post("/v2/pipelines/flowers/infer", json=iris_json()).status_code == 200
    with grpcclient.InferenceServerClient(server.grpc_address) as client:
        tensor = grpcclient.InferInput("input-0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        client.infer("iris", [tensor])
        bad = grpcclient.InferInput("input-0", [1, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        with pytest.raises(InferenceServerException):
            client.infer("iris", [bad])
    after = samples(http)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    iris = {**SERVER, "model": "iris", "model_internal": "iris_1"}
    # Seldon's agent series: by door and code, the code as Seldon writes it (HTTP status, Go's gRPC name).
    assert added("seldon_model_infer_total", **iris, method_type="rest", code="200") == 3
    assert added("seldon_model_infer_total", **iris, method_type="rest", code="400") == 1
    assert added("seldon_model_infer_total", **iris, method_type="grpc", code="OK") == 1
    assert added("seldon_model_infer_total", **iris, method_type="grpc", code="InvalidArgument") == 1
    assert added("seldon_model_infer_seconds_total", **iris, method_type="rest", code="200") > 0
    # The pipeline's step is the model's call too (it ran here), and the pipeline has its own.
    assert added("seldon_pipeline_infer_total", **SERVER, pipeline="flowers", method_type="rest", code="200") == 1
    assert added("seldon_model_aggregate_infer_total", **SERVER, method_type="rest") == 4
    assert added("seldon_model_aggregate_infer_total", **SERVER, method_type="grpc") == 2
    assert added("seldon_model_aggregate_infer_seconds_total", **SERVER, method_type="grpc") > 0
    # A made-up name or version adds no series.
    assert not [key for key in after if ("model", "no-such-model") in key[1] or ("model_internal", "iris_99") in key[1]]
    assert value(after, "seldon_loaded_model_gauge", **SERVER, model_internal="iris_1") == 1

    # Triton's series for the same model (a CPU model: version 1, as Triton names it).
    triton = {"model": "iris", "version": "1"}
    assert added("nv_inference_request_success", **triton) == 3 + 1 + 1  # REST, the pipeline's step, gRPC
    assert added("nv_inference_request_failure", **triton) == 2
    assert added("nv_inference_count", **triton) == added("nv_inference_exec_count", **triton) == 5
    assert added("nv_inference_request_duration_us", **triton) >= added("nv_inference_compute_infer_duration_us", **triton) > 0
    assert ("nv_inference_queue_duration_us", frozenset(triton.items())) in after
    assert value(after, "nv_inference_pending_request_count", **triton) == 0


def test_calls_routed_by_seldon_model_count_what_they_reached(server, http):
    """`seldon-model` and an experiment's choice decide the series, not the path's model."""
    assert http.post("/v2/pipelines", content=PIPELINE, headers={"Content-Type": "application/yaml"}).status_code == 200
    experiment = "kind: Experiment\nmetadata: {name: trial}\nspec:\n  resourceType: pipeline\n  candidates:\n  - {name: flowers, weight: 1}\n"
    assert http.post("/v2/experiments", content=experiment, headers={"Content-Type": "application/yaml"}).status_code == 200
    before = samples(http)
    assert http.post("/v2/models/iris/infer", json=iris_json(), headers={"seldon-model": "flowers.pipeline"}).status_code == 200
    chosen = http.post("/v2/models/iris/infer", json=iris_json(), headers={"seldon-model": "trial.experiment"})
    assert chosen.status_code == 200 and chosen.headers["x-seldon-route"] == ":flowers.pipeline:"
    assert http.post("/v2/models/iris/infer", json=iris_json(), headers={"seldon-model": "nothing.experiment"}).status_code == 404
    with grpcclient.InferenceServerClient(server.grpc_address) as client:
        tensor = grpcclient.InferInput("input-0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        client.infer("iris", [tensor], headers={"seldon-model": "flowers.pipeline"})
        client.infer("anything", [tensor], headers={"seldon-model": "iris"})
    after = samples(http)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    flowers = {**SERVER, "pipeline": "flowers"}
    assert added("seldon_pipeline_infer_total", **flowers, method_type="rest", code="200") == 2
    assert added("seldon_pipeline_infer_total", **flowers, method_type="grpc", code="OK") == 1
    iris = {**SERVER, "model": "iris", "model_internal": "iris_1"}
    assert added("seldon_model_infer_total", **iris, method_type="rest", code="200") == 0
    assert added("seldon_model_infer_total", **iris, method_type="rest", code="404") == 0
    assert added("seldon_model_infer_total", **iris, method_type="grpc", code="OK") == 1  # the header's model


def test_a_failed_candidate_counts_under_it_and_one_version_is_one_series(server, http):
    model = {"kind": "Model", "metadata": {"name": "iris-b"}, "spec": {"storageUri": str(server.repository / "iris")}}
    assert http.post("/v2/manifests", json=model, timeout=60).status_code == 200
    experiment = "kind: Experiment\nmetadata: {name: ab}\nspec:\n  candidates:\n  - {name: iris-b, weight: 1}\n"
    assert http.post("/v2/experiments", content=experiment, headers={"Content-Type": "application/yaml"}).status_code == 200
    wrong = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
    before = samples(http)
    assert http.post("/v2/models/iris/infer", json=wrong, headers={"seldon-model": "ab.experiment"}).status_code == 400
    assert http.post("/v2/models/iris/infer", json=wrong).status_code == 400
    assert http.post("/v2/models/iris/versions/1/infer", json=wrong).status_code == 400
    text = http.get("/metrics").text
    after = samples(http)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    iris_b = {**SERVER, "model": "iris-b", "model_internal": "iris-b_1", "method_type": "rest", "code": "400"}
    assert added("seldon_model_infer_total", **iris_b) == 1  # the candidate that failed, not the path's model
    # With and without its version, a call to iris is one series (Prometheus refuses two alike).
    assert added("seldon_model_infer_total", **{**SERVER, "model": "iris", "model_internal": "iris_1",
                                                "method_type": "rest", "code": "400"}) == 2
    listed = [(sample.name, tuple(sorted(sample.labels.items())))
              for family in text_string_to_metric_families(text) for sample in family.samples]
    assert len(listed) == len(set(listed))


def test_an_answer_that_fails_after_the_choice_counts_under_the_candidate_and_a_deleted_models_series_go(server, http):
    echo = server.repository.parent / "echo-source"
    write_settings(echo, {"implementation": "echo_model.Echo"})
    (echo / "echo_model.py").write_text(ECHO_MODEL)
    model = {"kind": "Model", "metadata": {"name": "echo"}, "spec": {"storageUri": str(echo)}}
    assert http.post("/v2/manifests", json=model, timeout=60).status_code == 200
    experiment = "kind: Experiment\nmetadata: {name: echoes}\nspec:\n  candidates:\n  - {name: echo, weight: 1}\n"
    assert http.post("/v2/experiments", content=experiment, headers={"Content-Type": "application/yaml"}).status_code == 200
    # Bytes that are not UTF-8, echoed back and asked for as JSON: the answer fails after the choice.
    header = json.dumps({"inputs": [{"name": "a", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 6}}]}).encode()
    body = header + struct.pack("<I", 2) + b"\xff\xfe"
    before = samples(http)
    answer = http.post("/v2/models/iris/infer", content=body, headers={
        "Inference-Header-Content-Length": str(len(header)), "seldon-model": "echoes.experiment"})
    assert answer.status_code == 400 and "not UTF-8" in answer.json()["error"], answer.text
    assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
    counted = samples(http)
    echo_400 = {**SERVER, "model": "echo", "model_internal": "echo_1", "method_type": "rest", "code": "400"}
    iris_200 = {**SERVER, "model": "iris", "model_internal": "iris_1", "method_type": "rest", "code": "200"}
    assert value(counted, "seldon_model_infer_total", **echo_400) - value(before, "seldon_model_infer_total", **echo_400) == 1

    # Deleted, the model's series go; the others keep counting from where they were.
    assert http.delete("/v2/experiments/echoes").status_code == 200
    assert http.request("DELETE", "/v2/manifests", json=model, timeout=60).status_code == 200
    assert not [key for key in samples(http) if ("model", "echo") in key[1]]
    assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
    assert value(samples(http), "seldon_model_infer_total", **iris_200) == value(counted, "seldon_model_infer_total", **iris_200) + 1


def test_loads_and_unloads_are_counted_as_seldon_counts_them(http):
    before = samples(http)
    assert http.post("/v2/repository/models/iris/unload").status_code == 200
    unloaded = samples(http)
    assert value(unloaded, "seldon_unload_model_counter", **SERVER) == value(before, "seldon_unload_model_counter", **SERVER) + 1
    assert ("seldon_model_infer_total", frozenset({**SERVER, "model": "iris", "model_internal": "iris_1",
                                                   "method_type": "rest", "code": "200"}.items())) in unloaded
    assert http.post("/v2/repository/models/iris/load").status_code == 200
    loaded = samples(http)
    assert value(loaded, "seldon_load_model_counter", **SERVER) == value(before, "seldon_load_model_counter", **SERVER) + 1
    assert value(loaded, "seldon_loaded_model_gauge", **SERVER, model_internal="iris_1") == 1


def test_promtool_finds_nothing_but_seldons_and_tritons_historic_names(http):
    promtool = Path(ROOT / ".venv" / "bin" / "promtool")
    assert promtool.exists(), "promtool is fetched by `make test` (Debian's prometheus package, unpacked)"
    assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
    checked = subprocess.run([str(promtool), "check", "metrics"], input=http.get("/metrics").text,
                             capture_output=True, text=True, timeout=60)
    problems = [line for line in (checked.stdout + checked.stderr).splitlines()
                if line.strip() and not line.startswith(HISTORIC_NAMES)]
    assert not problems, problems


def test_the_grafana_dashboards_queries_are_promql_promtool_accepts(tmp_path):
    """Each query as a recording rule (Grafana's $__rate_interval as 5m), checked by promtool; that
    each names only series the server exports is checked on a fleet's /metrics (test_fleet.py)."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "fleetserve.json").read_text())
    queries = [target["expr"].replace("$__rate_interval", "5m") for panel in dashboard["panels"]
               for target in panel["targets"]]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{number}", "expr": query} for number, query in enumerate(queries)]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    checked = subprocess.run([str(ROOT / ".venv" / "bin" / "promtool"), "check", "rules", str(tmp_path / "rules.yml")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and f"{len(queries)} rules found" in checked.stdout, checked.stdout + checked.stderr
