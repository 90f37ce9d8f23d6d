"""Pipelines and Experiments with Seldon Core 2's semantics, through the running server: its
samples rebuilt with the custom models of graph_models.py, called with httpx, the CLI and
tritonclient (http and grpc)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import running_server, write_settings

MODELS = {
    "tfsimple1": "AddSub", "tfsimple2": "AddSub", "tfsimple3": "AddSub",
    "conditional": "Conditional", "mul10": "Mul10", "add10": "Add10", "check": "Check",
    "rows": "RowCount", "counter": "Counter", "identity-loop": "Identity", "identity-output": "Identity",
    "refuse": "Refuse", "slow": "Slow", "slow-side": "Slow",
}
ONES = list(range(1, 17))
TFSIMPLE_INPUTS = {"inputs": [
    {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": ONES},
    {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": ONES},
]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("graph-repo")
    source = Path(__file__).with_name("graph_models.py")
    for name, cls in MODELS.items():
        extra = {"seconds": 1} if cls == "Slow" else {}
        write_settings(repo / name, {"implementation": f"graph_models.{cls}", "parameters": {"extra": extra}})
        shutil.copy(source, repo / name / "graph_models.py")
    with running_server(repo, tmp_path_factory.mktemp("graph-logs") / "server.log") as running:
        yield running


def create(http, manifest: str) -> None:
    response = http.post("/v2/pipelines", content=manifest, headers={"Content-Type": "application/yaml"})
    assert response.status_code == 200, response.text


def infer(http, pipeline: str, body: dict) -> httpx.Response:
    return http.post(f"/v2/pipelines/{pipeline}/infer", json=body)


def outputs(response: httpx.Response) -> dict[str, list]:
    assert response.status_code == 200, response.text
    return {tensor["name"]: tensor["data"] for tensor in response.json()["outputs"]}


TFSIMPLES = """
apiVersion: mlops.seldon.io/v1alpha1
kind: Pipeline
metadata:
  name: tfsimples
spec:
  steps:
    - name: tfsimple1
    - name: tfsimple2
      inputs:
      - tfsimple1
      tensorMap:
        tfsimple1.outputs.OUTPUT0: INPUT0
        tfsimple1.outputs.OUTPUT1: INPUT1
  output:
    steps:
    - tfsimple2
"""


def test_chain_with_tensor_map(server, http):
    create(http, TFSIMPLES)
    response = infer(http, "tfsimples", TFSIMPLE_INPUTS)
    # tfsimple1: OUTPUT0 = 2x, OUTPUT1 = 0; tfsimple2 on those: both 2x.
    assert outputs(response) == {"OUTPUT0": [2 * v for v in ONES], "OUTPUT1": [2 * v for v in ONES]}
    assert response.json()["model_name"] == ""
    # The same through the model endpoint with Seldon's header, and over gRPC.
    by_header = http.post("/v2/models/tfsimples/infer", json=TFSIMPLE_INPUTS, headers={"seldon-model": "tfsimples.pipeline"})
    assert outputs(by_header) == outputs(response)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    inputs = [triton_grpc.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.arange(1, 17, dtype=np.int32).reshape(1, 16))
    result = client.infer("tfsimples", inputs, headers={"seldon-model": "tfsimples.pipeline"})
    assert result.as_numpy("OUTPUT0").tolist() == [[2 * v for v in ONES]]
    assert result.get_response().model_name == ""
    http_client_ = triton_http.InferenceServerClient(server.http_address)
    http_inputs = [triton_http.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in http_inputs:
        tensor.set_data_from_numpy(np.arange(1, 17, dtype=np.int32).reshape(1, 16))  # binary by default
    result = http_client_.infer("tfsimples", http_inputs, headers={"seldon-model": "tfsimples.pipeline"})
    assert result.as_numpy("OUTPUT1").tolist() == [[2 * v for v in ONES]]


def test_inner_join_of_two_steps(http):
    create(http, """
kind: Pipeline
metadata: {name: join}
spec:
  steps:
    - name: tfsimple1
    - name: tfsimple2
    - name: tfsimple3
      inputs: [tfsimple1.outputs.OUTPUT0, tfsimple2.outputs.OUTPUT1]
      tensorMap:
        tfsimple1.outputs.OUTPUT0: INPUT0
        tfsimple2.outputs.OUTPUT1: INPUT1
  output:
    steps: [tfsimple3]
""")
    # tfsimple3 gets INPUT0 = 2x and INPUT1 = 0.
    assert outputs(infer(http, "join", TFSIMPLE_INPUTS)) == {"OUTPUT0": [2 * v for v in ONES], "OUTPUT1": [2 * v for v in ONES]}


CONDITIONAL = """
kind: Pipeline
metadata: {name: tfsimple-conditional}
spec:
  steps:
  - name: conditional
  - name: mul10
    inputs: [conditional.outputs.OUTPUT0]
    tensorMap: {conditional.outputs.OUTPUT0: INPUT}
  - name: add10
    inputs: [conditional.outputs.OUTPUT1]
    tensorMap: {conditional.outputs.OUTPUT1: INPUT}
  output:
    steps: [mul10, add10]
    stepsJoin: any
"""


def conditional_body(choice: int) -> dict:
    return {"inputs": [
        {"name": "CHOICE", "datatype": "INT32", "shape": [1], "data": [choice]},
        {"name": "INPUT0", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]},
        {"name": "INPUT1", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]},
    ]}


def test_conditional_routing_runs_one_branch(http):
    create(http, CONDITIONAL)
    before = {name: http.get(f"/v2/models/{name}/stats").json()["model_stats"][0]["inference_count"] for name in ("mul10", "add10")}
    assert outputs(infer(http, "tfsimple-conditional", conditional_body(0))) == {"OUTPUT": [10, 20, 30, 40]}
    assert outputs(infer(http, "tfsimple-conditional", conditional_body(1))) == {"OUTPUT": [11, 12, 13, 14]}
    after = {name: http.get(f"/v2/models/{name}/stats").json()["model_stats"][0]["inference_count"] for name in ("mul10", "add10")}
    assert after == {name: count + 1 for name, count in before.items()}  # each branch ran once, not both twice


def test_stepsjoin_inner_without_one_branch_says_so(http):
    create(http, CONDITIONAL.replace("tfsimple-conditional", "conditional-inner").replace("stepsJoin: any", "stepsJoin: inner"))
    response = infer(http, "conditional-inner", conditional_body(0))
    assert response.status_code == 400
    assert "produced no output" in response.json()["error"] and "add10.outputs" in response.json()["error"]


def test_trigger_joins(http):
    create(http, """
kind: Pipeline
metadata: {name: trigger-joins}
spec:
  steps:
  - name: mul10
    inputs: [trigger-joins.inputs.INPUT]
    triggers: [trigger-joins.inputs.ok1, trigger-joins.inputs.ok2]
    triggersJoinType: any
  - name: add10
    inputs: [trigger-joins.inputs.INPUT]
    triggers: [trigger-joins.inputs.ok3]
  output:
    steps: [mul10, add10]
    stepsJoin: any
""")

    def body(trigger: str) -> dict:
        return {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [2], "data": [1, 2]},
                           {"name": trigger, "datatype": "BOOL", "shape": [1], "data": [True]}]}

    assert outputs(infer(http, "trigger-joins", body("ok1"))) == {"OUTPUT": [10, 20]}
    assert outputs(infer(http, "trigger-joins", body("ok2"))) == {"OUTPUT": [10, 20]}
    assert outputs(infer(http, "trigger-joins", body("ok3"))) == {"OUTPUT": [11, 12]}
    sent = http.get("/v2/pipelines/trigger-joins/inspect/add10.inputs").json()["messages"]["add10"][-1]["inputs"]
    assert [tensor["name"] for tensor in sent] == ["INPUT"]  # the trigger tensor is not forwarded
    assert infer(http, "trigger-joins", body("nothing")).status_code == 400


def test_trigger_from_a_step_gates_the_join(http):
    create(http, """
kind: Pipeline
metadata: {name: joincheck}
spec:
  steps:
    - name: tfsimple1
    - name: tfsimple2
    - name: check
      inputs: [tfsimple1.outputs.OUTPUT0]
      tensorMap: {tfsimple1.outputs.OUTPUT0: INPUT}
    - name: tfsimple3
      inputs: [tfsimple1.outputs.OUTPUT0, tfsimple2.outputs.OUTPUT1]
      tensorMap:
        tfsimple1.outputs.OUTPUT0: INPUT0
        tfsimple2.outputs.OUTPUT1: INPUT1
      triggers: [check.outputs.OUTPUT]
  output:
    steps: [tfsimple3]
""")
    assert outputs(infer(http, "joincheck", TFSIMPLE_INPUTS))["OUTPUT0"] == [2 * v for v in ONES]
    # tfsimple3 received the two joined tensors, not the trigger.
    recent = http.get("/v2/pipelines/joincheck/inspect/tfsimple3.inputs").json()["messages"]["tfsimple3"][-1]
    assert [tensor["name"] for tensor in recent["inputs"]] == ["INPUT0", "INPUT1"]
    negative = {"inputs": [dict(tensor, data=[-v for v in ONES]) for tensor in TFSIMPLE_INPUTS["inputs"]]}
    response = infer(http, "joincheck", negative)  # check gives no OUTPUT: tfsimple3 never runs
    assert response.status_code == 400 and "produced no output" in response.json()["error"]


def test_batched_side_step_never_delays_the_answer(server, http):
    create(http, """
kind: Pipeline
metadata: {name: with-drift}
spec:
  steps:
    - name: tfsimple1
    - name: rows
      inputs: [tfsimple1.outputs.OUTPUT0]
      batch: {size: 3}
  output:
    steps: [tfsimple1]
""")
    counted = lambda: http.get("/v2/models/rows/stats").json()["model_stats"][0]["inference_count"]  # noqa: E731
    before = counted()
    for n in range(1, 7):
        assert outputs(infer(http, "with-drift", {**TFSIMPLE_INPUTS, "id": f"r{n}"}))["OUTPUT0"] == [2 * v for v in ONES]
    deadline = time.monotonic() + 5
    while counted() < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == before + 2  # one run per three requests, on their three rows
    runs = http.get("/v2/pipelines/with-drift/inspect/rows.outputs.rows").json()["messages"]["rows"]
    assert [(run["id"], run["outputs"][0]["data"]) for run in runs] == [("r3", [3]), ("r6", [3])]


def test_cycle_bounded_by_max_step_revisits(http):
    counter = """
kind: Pipeline
metadata: {name: NAME}
spec:
  allowCycles: true
  maxStepRevisits: REVISITS
  steps:
  - name: counter
    inputsJoinType: any
    inputs: [NAME.inputs, identity-loop.outputs]
  - name: identity-output
    inputs: [counter.outputs.count]
    triggers: [counter.outputs.stop]
  - name: identity-loop
    inputs: [counter.outputs.count]
    triggers: [counter.outputs.continue]
  output:
    steps: [identity-output]
"""
    body = {"inputs": [{"name": "count", "datatype": "INT64", "shape": [1], "data": [0]}]}
    create(http, counter.replace("NAME", "loop").replace("REVISITS", "5"))
    assert outputs(infer(http, "loop", body)) == {"count": [3]}  # the counter ran three times
    create(http, counter.replace("NAME", "runaway").replace("REVISITS", "1"))
    response = infer(http, "runaway", body)
    assert response.status_code == 400 and "maxStepRevisits is 1" in response.json()["error"]
    refused = http.post("/v2/pipelines", content=counter.replace("NAME", "no-cycles").replace("REVISITS", "0")
                           .replace("allowCycles: true", "allowCycles: false"))
    assert refused.status_code == 400 and "form a cycle" in refused.json()["error"]


def test_outer_join_takes_what_came(http):
    create(http, """
kind: Pipeline
metadata: {name: outer}
spec:
  steps:
    - name: conditional
    - name: identity-output
      inputs: [conditional.outputs.OUTPUT0, conditional.outputs.OUTPUT1]
      inputsJoinType: outer
  output:
    steps: [identity-output]
""")
    assert outputs(infer(http, "outer", conditional_body(0))) == {"OUTPUT0": [1, 2, 3, 4]}
    assert outputs(infer(http, "outer", conditional_body(1))) == {"OUTPUT1": [1, 2, 3, 4]}


def test_outer_join_window_does_not_wait_for_a_slow_source(http):
    create(http, """
kind: Pipeline
metadata: {name: outer-window}
spec:
  steps:
    - name: identity-loop
    - name: slow
    - name: identity-output
      inputs: [identity-loop.outputs.INPUT, slow.outputs.INPUT]
      tensorMap: {identity-loop.outputs.INPUT: FAST, slow.outputs.INPUT: SLOW}
      inputsJoinType: outer
      joinWindowMs: 100
  output:
    steps: [identity-output]
""")
    started = time.monotonic()
    answer = outputs(infer(http, "outer-window", {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1], "data": [7]}]}))
    assert answer == {"FAST": [7]} and time.monotonic() - started < 0.9  # slow sleeps 1 s


def test_steps_off_the_output_path_run_after_the_answer(http):
    create(http, """
kind: Pipeline
metadata: {name: side-slow}
spec:
  steps:
    - name: tfsimple1
    - name: slow-side
      inputs: [tfsimple1.outputs.OUTPUT0]
  output:
    steps: [tfsimple1]
""")
    counted = lambda: http.get("/v2/models/slow-side/stats").json()["model_stats"][0]["inference_count"]  # noqa: E731
    before = counted()
    started = time.monotonic()
    assert outputs(infer(http, "side-slow", TFSIMPLE_INPUTS))["OUTPUT0"] == [2 * v for v in ONES]
    assert time.monotonic() - started < 0.9  # slow sleeps 1 s, after the answer
    deadline = time.monotonic() + 5
    while counted() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == before + 1


def test_reading_a_step_inputs_and_outputs_in_source_order(http):
    manifest = {"kind": "Pipeline", "metadata": {"name": "reads-inputs"}, "spec": {
        "steps": [{"name": "tfsimple1"},
                  {"name": "identity-output", "inputs": ["tfsimple1.inputs.INPUT1", "tfsimple1.outputs.OUTPUT0"]}],
        "output": {"steps": ["identity-output"]}}}
    create(http, json.dumps(manifest))  # JSON is YAML
    answer = infer(http, "reads-inputs", TFSIMPLE_INPUTS).json()["outputs"]
    assert [(tensor["name"], tensor["data"]) for tensor in answer] == [("INPUT1", ONES), ("OUTPUT0", [2 * v for v in ONES])]


def test_side_step_outer_join_runs_with_what_came(http):
    create(http, """
kind: Pipeline
metadata: {name: side-outer}
spec:
  steps:
    - name: conditional
    - name: identity-loop
      inputs: [conditional.outputs.OUTPUT0, conditional.outputs.OUTPUT1]
      inputsJoinType: outer
  output:
    steps: [conditional]
""")
    assert outputs(infer(http, "side-outer", {**conditional_body(1), "id": "side"})) == {"OUTPUT1": [1, 2, 3, 4]}
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        seen = http.get("/v2/pipelines/side-outer/inspect/identity-loop.outputs").json()["messages"]
        if seen:
            break
        time.sleep(0.05)
    assert [(m["id"], [t["name"] for t in m["outputs"]]) for m in seen["identity-loop"]] == [("side", ["OUTPUT1"])]


def test_output_tensor_map_and_pipeline_input_echo(http):
    create(http, """
kind: Pipeline
metadata: {name: echoes}
spec:
  steps: [{name: tfsimple1}]
  output:
    steps: [echoes.inputs.INPUT0, tfsimple1.outputs.OUTPUT1]
    tensorMap: {echoes.inputs.INPUT0: ECHO, tfsimple1.outputs.OUTPUT1: ZERO}
""")
    for n in range(12):
        answer = outputs(infer(http, "echoes", {**TFSIMPLE_INPUTS, "id": f"e{n}"}))
        assert answer == {"ECHO": ONES, "ZERO": [0] * 16}
    kept = http.get("/v2/pipelines/echoes/inspect/echoes", params={"limit": 2}).json()["messages"]["echoes"]
    assert [message["id"] for message in kept] == ["e10", "e11"]
    assert len(http.get("/v2/pipelines/echoes/inspect").json()["messages"]["tfsimple1"]) == 10  # the last ten


def test_chained_outer_joins_fire_upstream_first(http):
    create(http, """
kind: Pipeline
metadata: {name: chained-outer}
spec:
  steps:
    - name: conditional
    - name: identity-loop
      inputs: [conditional.outputs.OUTPUT0, conditional.outputs.OUTPUT1]
      tensorMap: {conditional.outputs.OUTPUT1: FROM_LOOP}
      inputsJoinType: outer
    - name: identity-output
      inputs: [conditional.outputs.OUTPUT0, identity-loop.outputs.FROM_LOOP]
      inputsJoinType: outer
  output:
    steps: [identity-output]
""")
    # CHOICE 1: only OUTPUT1 comes; identity-loop must run before identity-output takes what it has.
    assert outputs(infer(http, "chained-outer", conditional_body(1))) == {"FROM_LOOP": [1, 2, 3, 4]}


def test_tensors_joined_under_one_name_are_refused(http):
    create(http, """
kind: Pipeline
metadata: {name: same-names}
spec:
  steps:
    - name: tfsimple1
    - name: tfsimple2
    - name: tfsimple3
      inputs: [tfsimple1, tfsimple2]
  output:
    steps: [tfsimple3]
""")
    response = infer(http, "same-names", TFSIMPLE_INPUTS)
    assert response.status_code == 400
    assert response.json()["error"] == ("tfsimple3 : the joined tensors name ['OUTPUT0', 'OUTPUT1'] more than once; "
                                        "rename them with tensorMap")


def test_a_caller_that_gives_up_leaves_the_pipeline_serving(server, http):
    create(http, """
kind: Pipeline
metadata: {name: slow-answer}
spec:
  steps: [{name: slow}]
  output: {steps: [slow]}
""")
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    tensor = triton_grpc.InferInput("INPUT", [1], "FP32")
    tensor.set_data_from_numpy(np.array([1], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("slow-answer", [tensor], headers={"seldon-model": "slow-answer.pipeline"}, client_timeout=0.2)
    deadline = time.monotonic() + 5
    # The server drops the request at its deadline, or gRPC cancels it there first.
    metrics = [f'fleetserve_pipeline_requests_total{{outcome="{outcome}",pipeline="slow-answer"}} 1.0'
               for outcome in ("Cancelled", "DeadlineExceeded")]
    while not any(metric in http.get("/metrics").text for metric in metrics) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(metric in http.get("/metrics").text for metric in metrics)
    body = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1], "data": [2]}]}
    assert outputs(infer(http, "slow-answer", body)) == {"INPUT": [2]}


def test_pipeline_with_curl(server, http):
    create(http, TFSIMPLES.replace("name: tfsimples", "name: curled"))
    result = subprocess.run(["curl", "-s", "-X", "POST", f"{server.url}/v2/models/curled/infer",
                             "-H", "seldon-model: curled.pipeline", "-d", json.dumps(TFSIMPLE_INPUTS)],
                            capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["outputs"][0]["data"] == [2 * v for v in ONES]


def test_failing_step_answers_400_with_its_name(http):
    create(http, """
kind: Pipeline
metadata: {name: refusing}
spec:
  steps:
    - name: tfsimple1
    - name: refuse
      inputs: [tfsimple1]
  output:
    steps: [refuse]
""")
    response = infer(http, "refusing", TFSIMPLE_INPUTS)
    assert response.status_code == 400
    assert response.json() == {"error": "refuse : this step refuses every request"}
    metrics = http.get("/metrics").text
    assert 'fleetserve_pipeline_step_errors_total{pipeline="refusing",step="refuse"} 1.0' in metrics


def test_pipeline_before_its_models_becomes_ready_with_them(server, http, tmp_path):
    create(http, """
kind: Pipeline
metadata: {name: waits}
spec:
  steps: [{name: late-model}]
  output: {steps: [late-model]}
""")
    ready = http.get("/v2/pipelines/waits/ready")
    assert ready.status_code == 424 and "late-model" in ready.json()["error"]
    assert infer(http, "waits", TFSIMPLE_INPUTS).status_code == 424
    assert http.get("/v2/pipelines/nobody/ready").status_code == 404
    folder = tmp_path / "late-model"
    write_settings(folder, {"implementation": "graph_models.AddSub"})
    shutil.copy(Path(__file__).with_name("graph_models.py"), folder / "graph_models.py")
    manifest = f"kind: Model\nmetadata: {{name: late-model}}\nspec: {{storageUri: '{folder}'}}\n"
    assert http.post("/v2/manifests", content=manifest).status_code == 200
    assert http.get("/v2/pipelines/waits/ready").status_code == 200
    assert outputs(infer(http, "waits", TFSIMPLE_INPUTS))["OUTPUT1"] == [0] * 16
    listed = {entry["name"]: entry for entry in http.get("/v2/pipelines").json()}
    assert listed["waits"]["ready"] is True and listed["waits"]["steps"] == ["late-model"]
    assert http.delete("/v2/pipelines/waits").status_code == 200
    assert http.get("/v2/pipelines/waits").status_code == 404


@pytest.mark.parametrize("spec, fragment", [
    ("steps: [{name: Bad_Name}]", "invalid step name 'Bad_Name'"),
    ("steps: [{name: checked}]", "a step cannot have the pipeline's name"),
    ("steps: [{name: a, inputs: [nowhere.outputs]}]", "'nowhere.outputs' refers to 'nowhere'"),
    ("steps: [{name: a, inputs: ['']}]", "empty reference"),
    ("steps: [{name: a, triggers: ['']}]", "empty reference"),
    ("steps: [{name: a, inputs: [a.sideways]}]", "'inputs' or 'outputs', not 'sideways'"),
    ("steps: [{name: a, inputsJoinType: sometimes}]", "inputsJoinType must be one of"),
    ("steps: [{name: a}, {name: a}]", "step 'a' appears twice"),
    ("steps: [{name: a, input: [b]}]", "unknown field(s) ['input']"),
    ("steps: []", "spec.steps must be a non-empty list"),
    ("steps: [{name: a, inputs: [b]}, {name: b, inputs: [a]}]", "form a cycle"),
    ("steps: [{name: a}]\noutput: {steps: [b]}", "'b' refers to 'b'"),
    ("steps: [{name: a}, {name: b, inputs: [a, a.outputs]}]", "lists ['a.outputs'] more than once"),
    ("steps: [{name: a}, {name: b, inputs: [a.]}]", "'a.' ends with '.'"),
    ("steps: [{name: a}, {name: b, inputs: [a], tensorMap: {checked.inputs.X: Y}}]", "renames a tensor it does not read"),
    ("steps: [{name: a, batch: {size: 3, windowMs: 50}}]\noutput: {steps: [a]}", "but the output needs it"),
    ("steps: [{name: a, 1: x, foo: y}]", "unknown field(s) ['1', 'foo']"),
    ("steps: [{name: a}]\ndataflow: &d {again: *d}", "expands (through aliases)"),  # without end
    ("steps: [{name: a, batch: {size: 3, rolling: true}}]", "batch.rolling is not supported"),
    ("steps: [{name: a}]\ninput: {externalInputs: [other.outputs]}", "spec.input (reading other pipelines' data)"),
])
def test_invalid_pipelines_are_refused_clearly(http, spec, fragment):
    assert_refused(http, "Pipeline", spec, fragment)
    assert http.get("/v2/pipelines/checked").status_code == 404


def assert_refused(http, kind: str, spec: str, fragment: str) -> None:
    """A manifest named `checked` with this spec (YAML lines) is refused with `fragment` in the reason."""
    manifest = f"kind: {kind}\nmetadata: {{name: checked}}\nspec:\n" + "".join(f"  {line}\n" for line in spec.splitlines())
    response = http.post(f"/v2/{kind.lower()}s", content=manifest)
    assert response.status_code == 400 and fragment in response.json()["error"], response.text


def test_invalid_pipeline_name(http):
    response = http.post("/v2/pipelines", content="kind: Pipeline\nmetadata: {name: Not-Valid}\nspec: {steps: [{name: a}]}\n")
    assert response.status_code == 400 and "invalid pipeline name 'Not-Valid'" in response.json()["error"]


def test_apply_and_inspect_from_the_cli(server, http, tmp_path):
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(TFSIMPLES.replace("name: tfsimples", "name: cli-chain"))
    command = [sys.executable, "-m", "fleetserve.cli"]
    url = ["--url", server.url]
    applied = subprocess.run([*command, "apply", "-f", str(manifest), *url], capture_output=True, text=True)
    assert applied.returncode == 0 and json.loads(applied.stdout) == {"applied": [{"kind": "Pipeline", "name": "cli-chain"}]}
    assert outputs(http.post("/v2/pipelines/cli-chain/infer", json={**TFSIMPLE_INPUTS, "id": "abc"}))
    inspected = subprocess.run([*command, "pipeline", "inspect", "cli-chain.tfsimple1.outputs.OUTPUT1", *url],
                               capture_output=True, text=True)
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    assert "abc" in inspected.stdout and "OUTPUT1" in inspected.stdout and "OUTPUT0" not in inspected.stdout
    whole = http.get("/v2/pipelines/cli-chain/inspect").json()["messages"]
    assert whole["cli-chain"][-1]["id"] == "abc" and whole["cli-chain"][-1]["outputs"][0]["name"] == "OUTPUT0"
    assert http.get("/v2/pipelines/cli-chain/inspect/nowhere").status_code == 404
    metrics = http.get("/metrics").text
    assert 'fleetserve_pipeline_requests_total{outcome="success",pipeline="cli-chain"} 1.0' in metrics
    assert 'fleetserve_pipeline_duration_seconds_count{pipeline="cli-chain"} 1.0' in metrics
    deleted = subprocess.run([*command, "delete", "-f", str(manifest), *url], capture_output=True, text=True)
    assert deleted.returncode == 0 and http.get("/v2/pipelines/cli-chain").status_code == 404


# --- experiments ------------------------------------------------------------------------------

def experiment(http, manifest: str) -> None:
    response = http.post("/v2/experiments", content=manifest)
    assert response.status_code == 200, response.text


def called(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["model_name"]


def test_weighted_split_is_measured_over_many_requests(server, http):
    experiment(http, """
kind: Experiment
metadata: {name: split}
spec:
  candidates:
  - {name: tfsimple1, weight: 80}
  - {name: tfsimple2, weight: 20}
""")
    assert http.get("/v2/experiments/split/ready").status_code == 200
    answers = [http.post("/v2/models/split/infer", json=TFSIMPLE_INPUTS, headers={"seldon-model": "split.experiment"})
               for _ in range(1000)]
    chosen = [called(response) for response in answers]
    assert {response.headers["x-seldon-route"] for response in answers} == {":tfsimple1:", ":tfsimple2:"}
    assert all(response.headers["x-seldon-route"] == f":{name}:" for response, name in zip(answers, chosen))
    share = chosen.count("tfsimple1") / len(chosen)
    assert 0.75 <= share <= 0.85, share  # 80% give or take four standard deviations
    status = http.get("/v2/experiments/split").json()
    assert status["requests"] == {"tfsimple1": chosen.count("tfsimple1"), "tfsimple2": chosen.count("tfsimple2")}
    assert 'fleetserve_experiment_requests_total{experiment="split",target="tfsimple2"}' in http.get("/metrics").text

    # gRPC: the route comes back as a header (initial metadata).
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        message = service_pb2.ModelInferRequest(model_name="split", inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=name, datatype="INT32", shape=[1, 16], contents=service_pb2.InferTensorContents(int_contents=ONES))
            for name in ("INPUT0", "INPUT1")])
        reply, call = stub.ModelInfer.with_call(message, metadata=(("seldon-model", "split.experiment"),))
        assert dict(call.initial_metadata())["x-seldon-route"] == f":{reply.model_name}:"

    # Sticky: a route sent back is kept, whatever the weights say.
    route = next(r.headers["x-seldon-route"] for r in answers if r.headers["x-seldon-route"] == ":tfsimple2:")
    sticky = {called(http.post("/v2/models/split/infer", json=TFSIMPLE_INPUTS,
                               headers={"seldon-model": "split.experiment", "x-seldon-route": route})) for _ in range(50)}
    assert sticky == {"tfsimple2"}
    assert http.delete("/v2/experiments/split").status_code == 200
    gone = http.post("/v2/models/split/infer", json=TFSIMPLE_INPUTS, headers={"seldon-model": "split.experiment"})
    assert gone.status_code == 404 and "experiment 'split' not found" in gone.json()["error"]


def test_default_takes_over_the_model_endpoint_until_removed(server, http):
    experiment(http, """
kind: Experiment
metadata: {name: takeover}
spec:
  default: tfsimple1
  candidates:
  - {modelName: tfsimple1, weight: 50}
  - {modelName: tfsimple2, weight: 50}
""")
    during = [http.post("/v2/models/tfsimple1/infer", json=TFSIMPLE_INPUTS) for _ in range(60)]
    assert {called(response) for response in during} == {"tfsimple1", "tfsimple2"}
    assert all("x-seldon-route" in response.headers for response in during)
    # gRPC callers of the model are split the same way.
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    inputs = [triton_grpc.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.arange(1, 17, dtype=np.int32).reshape(1, 16))
    assert {client.infer("tfsimple1", inputs).get_response().model_name for _ in range(40)} == {"tfsimple1", "tfsimple2"}
    assert http.delete("/v2/experiments/takeover").status_code == 200
    after = [http.post("/v2/models/tfsimple1/infer", json=TFSIMPLE_INPUTS) for _ in range(30)]
    assert {called(response) for response in after} == {"tfsimple1"}
    assert not any("x-seldon-route" in response.headers for response in after)


def test_mirror_gets_a_copy_whose_answer_is_never_returned(http):
    experiment(http, """
kind: Experiment
metadata: {name: mirrored}
spec:
  candidates:
  - {name: add10, weight: 100}
  mirror: {name: mul10, percent: 100}
""")
    counted = lambda: http.get("/v2/models/mul10/stats").json()["model_stats"][0]["inference_count"]  # noqa: E731
    before = counted()
    body = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [2], "data": [1, 2]}]}
    answers = [http.post("/v2/models/x/infer", json=body, headers={"seldon-model": "mirrored.experiment"}) for _ in range(20)]
    assert {called(response) for response in answers} == {"add10"}
    assert all(outputs(response) == {"OUTPUT": [11, 12]} for response in answers)
    deadline = time.monotonic() + 5
    while counted() < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == before + 20
    assert http.delete("/v2/experiments/mirrored").status_code == 200


def test_a_slow_mirror_never_delays_the_caller(http):
    experiment(http, """
kind: Experiment
metadata: {name: slow-mirror}
spec:
  candidates: [{name: add10, weight: 1}]
  mirror: {name: slow, percent: 100}
""")
    body = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1], "data": [1]}]}
    started = time.monotonic()
    for _ in range(5):
        response = http.post("/v2/models/x/infer", json=body, headers={"seldon-model": "slow-mirror.experiment"})
        assert outputs(response) == {"OUTPUT": [11]}
    assert time.monotonic() - started < 0.9  # five copies to a mirror that takes 1 s each
    assert http.get("/v2/experiments/slow-mirror").json()["requests"] == {"add10": 5, "mirror:slow": 5}
    assert http.delete("/v2/experiments/slow-mirror").status_code == 200


def test_pipeline_experiment_with_a_default_pipeline(http):
    for name, step in (("pipeline-add10", "add10"), ("pipeline-mul10", "mul10")):
        create(http, f"kind: Pipeline\nmetadata: {{name: {name}}}\nspec:\n  steps: [{{name: {step}}}]\n  output: {{steps: [{step}]}}\n")
    experiment(http, """
kind: Experiment
metadata: {name: addmul10}
spec:
  default: pipeline-add10
  resourceType: pipeline
  candidates:
  - {name: pipeline-add10, weight: 50}
  - {name: pipeline-mul10, weight: 50}
""")
    body = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1], "data": [1]}]}
    answers = [infer(http, "pipeline-add10", body) for _ in range(60)]
    assert {outputs(response)["OUTPUT"][0] for response in answers} == {11, 10}
    assert {response.headers["x-seldon-route"] for response in answers} == {":pipeline-add10.pipeline:", ":pipeline-mul10.pipeline:"}
    by_header = http.post("/v2/models/any/infer", json=body, headers={"seldon-model": "addmul10.experiment",
                                                                        "x-seldon-route": ":pipeline-mul10.pipeline:"})
    assert outputs(by_header) == {"OUTPUT": [10]} and by_header.json()["model_name"] == ""
    assert http.delete("/v2/experiments/addmul10").status_code == 200
    assert {outputs(infer(http, "pipeline-add10", body))["OUTPUT"][0] for _ in range(20)} == {11}


@pytest.mark.parametrize("spec, fragment", [
    ("candidates: [{name: tfsimple1, weight: 1}]\ndefault: tfsimple2", "default 'tfsimple2' must be one of the candidates"),
    ("candidates: [{name: tfsimple1, weight: 1}, {name: tfsimple1, weight: 2}]", "candidate 'tfsimple1' appears twice"),
    ("candidates: []", "candidates must be a non-empty list"),
    ("candidates: [{name: tfsimple1}]", "needs a weight"),
    ("candidates: [{name: tfsimple1, weight: 0}]", "weights add up to 0"),
    ("candidates: [{name: tfsimple1, weight: 1}]\nresourceType: server", "resourceType must be one of"),
    ("candidates: [{name: tfsimple1, weight: 1}]\nmirror: {name: tfsimple2, percent: 150}", "mirror.percent"),
    ("candidates: [{name: ../etc, weight: 1}]", "candidate '../etc' is not a valid model name"),
    ("candidates: [{name: Upper, weight: 1}]\nresourceType: pipeline", "candidate 'Upper' is not a valid pipeline name"),
])
def test_invalid_experiments_are_refused_clearly(http, spec, fragment):
    assert_refused(http, "Experiment", spec, fragment)


def test_sticky_routes_match_whole_names():
    from fleetserve.graph.experiment import experiment_from_manifest

    chosen = experiment_from_manifest({"kind": "Experiment", "metadata": {"name": "e"}, "spec": {
        "candidates": [{"name": "a", "weight": 1}, {"name": "a_b", "weight": 1}]}})
    assert {chosen.choose(":a_b:") for _ in range(20)} == {"a_b"}
    assert {chosen.choose(":a_1:") for _ in range(20)} == {"a"}  # Seldon's name_version entry
    assert {chosen.choose(":x::a:") for _ in range(20)} == {"a"}


def test_experiment_manifest_is_shown_back_as_json(http):
    manifest = ("kind: Experiment\nmetadata: {name: shown, annotations: {blob: !!binary aGVsbG8=}}\n"
                "spec: {candidates: [{name: tfsimple1, weight: 1}]}\n")
    experiment(http, manifest)
    shown = http.get("/v2/experiments/shown")
    assert shown.status_code == 200 and shown.json()["manifest"]["metadata"]["annotations"]["blob"] == "b'hello'"
    assert http.delete("/v2/experiments/shown").status_code == 200


def test_one_experiment_per_default(http):
    first = "kind: Experiment\nmetadata: {name: NAME}\nspec:\n  default: tfsimple3\n  candidates: [{name: tfsimple3, weight: 1}]\n"
    experiment(http, first.replace("NAME", "first"))
    second = http.post("/v2/experiments", content=first.replace("NAME", "second"))
    assert second.status_code == 400 and "already the default of experiment 'first'" in second.json()["error"]
    # Checked before anything of a multi-document apply is applied.
    both = first.replace("NAME", "third") + "---\n" + first.replace("NAME", "fourth")
    refused = http.post("/v2/manifests", content=both.replace("tfsimple3", "tfsimple2"))
    assert refused.status_code == 400 and "already the default of experiment 'third'" in refused.json()["error"]
    assert http.get("/v2/experiments/third").status_code == 404
    assert http.delete("/v2/experiments/first").status_code == 200
    not_ready = "kind: Experiment\nmetadata: {name: waiting}\nspec:\n  candidates: [{name: not-there, weight: 1}]\n"
    experiment(http, not_ready)
    assert http.get("/v2/experiments/waiting/ready").status_code == 424
    response = http.post("/v2/models/x/infer", json=TFSIMPLE_INPUTS, headers={"seldon-model": "waiting.experiment"})
    assert response.status_code == 424 and "not-there" in response.json()["error"]
