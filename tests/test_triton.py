"""Models proxied to a real Triton server: the `tritonserver` binary of the nvidia-pytriton wheel,
serving a Python-backend add/sub model on the CPU, started here on loopback."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from conftest import free_port, http_client, repository_index, running_server, write_settings
from test_memory import metric
from test_tracing import CALLER_SPAN, Receiver, HttpReceiver, attributes, wait_for_spans

ADDSUB_CONFIG = """
name: "whatever-the-folder-says"
backend: "python"
max_batch_size: 0
input [
  { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "INPUT1", data_type: TYPE_FP32, dims: [ -1 ] }
]
output [
  { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] },
  { name: "OUTPUT1", data_type: TYPE_FP32, dims: [ -1 ] }
]
instance_group [{ kind: KIND_CPU, count: 1 }]
"""

ADDSUB_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            a = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "INPUT1").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUTPUT0", a + b), pb_utils.Tensor("OUTPUT1", a - b)]))
        return responses
'''


@dataclass
class Triton:
    process: subprocess.Popen
    grpc_url: str
    http_url: str
    repository: Path

    def kill(self) -> None:
        """Triton and its Python backend stubs, its process group: a SIGKILL to Triton alone left
        the stubs running after the test."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def start_triton(workdir: Path, ports: tuple[int, int] | None = None, args: tuple[str, ...] = ()) -> Triton:
    """tritonserver from the wheel, in explicit model control mode, with a Python backend
    assembled as the wheel needs it here (its stub, and libpython of the venv's own Python)."""
    package = Path(importlib.util.find_spec("pytriton").submodule_search_locations[0])
    server = package / "tritonserver"
    backend = workdir / "backends" / "python"
    if not backend.is_dir():
        backend.mkdir(parents=True)
        stub = f"python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}/triton_python_backend_stub"
        for file in ("backends/python/libtriton_python.so", "backends/python/triton_python_backend_utils.py", stub):
            shutil.copy(server / file, backend)
        (workdir / "repository").mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # the stub runs this venv's Python
        "LD_LIBRARY_PATH": f"{sysconfig.get_config_var('LIBDIR')}:{package.parent / 'nvidia_pytriton.libs'}",
    }
    http_port, grpc_port = ports or (free_port(), free_port())
    command = [str(server / "bin/tritonserver"), "--model-repository", str(workdir / "repository"),
               "--backend-directory", str(workdir / "backends"), "--model-control-mode", "explicit",
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(free_port()), *args]
    log = workdir / "triton.log"
    process = subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/live", timeout=1).status_code == 200:
                return Triton(process, f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", workdir / "repository")
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"tritonserver did not start:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    running = start_triton(tmp_path_factory.mktemp("triton"))
    yield running
    running.process.terminate()
    running.process.wait(30)


def addsub_folder(parent: Path, name: str, settings: dict | None) -> Path:
    folder = parent / name
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(ADDSUB_CONFIG)
    (folder / "1" / "model.py").write_text(ADDSUB_MODEL)
    if settings is not None:
        write_settings(folder, settings)
    return folder


@pytest.fixture(scope="module")
def server(triton, tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-repo")
    addsub_folder(repo, "addsub", {"implementation": "triton"})
    addsub_folder(repo, "addsub-by-requirement", {"requirements": ["python-backend"]})
    with running_server(repo, tmp_path_factory.mktemp("triton-logs") / "server.log",
                        {"FLEETSERVE_TRITON_URL": triton.grpc_url}) as running:
        yield running


@pytest.fixture
def http(server):
    with http_client(server) as client:
        yield client


def addsub_body(a: list[float], b: list[float]) -> dict:
    return {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [len(a)], "data": a},
                       {"name": "INPUT1", "datatype": "FP32", "shape": [len(b)], "data": b}]}


def test_proxied_model_over_rest_json_binary_and_grpc(server, http):
    for name in ("addsub", "addsub-by-requirement"):
        response = http.post(f"/v2/models/{name}/infer", json=addsub_body([1, 2, 3], [1, 1, 1]))
        assert response.status_code == 200, response.text
        assert {o["name"]: o["data"] for o in response.json()["outputs"]} == {"OUTPUT0": [2, 3, 4], "OUTPUT1": [0, 1, 2]}
        assert response.json()["model_name"] == name
    a, b = np.array([1.5, 2.5], dtype=np.float32), np.array([0.5, 0.5], dtype=np.float32)
    rest = triton_http.InferenceServerClient(server.http_address)
    inputs = [triton_http.InferInput("INPUT0", [2], "FP32"), triton_http.InferInput("INPUT1", [2], "FP32")]
    inputs[0].set_data_from_numpy(a)  # binary tensor data
    inputs[1].set_data_from_numpy(b)
    result = rest.infer("addsub", inputs, outputs=[triton_http.InferRequestedOutput("OUTPUT1")])
    assert result.as_numpy("OUTPUT1").tolist() == [1.0, 2.0] and result.as_numpy("OUTPUT0") is None
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
    grpc_inputs = [triton_grpc.InferInput("INPUT0", [2], "FP32"), triton_grpc.InferInput("INPUT1", [2], "FP32")]
    grpc_inputs[0].set_data_from_numpy(a)
    grpc_inputs[1].set_data_from_numpy(b)
    assert grpc_client.infer("addsub", grpc_inputs).as_numpy("OUTPUT0").tolist() == [2.0, 3.0]
    metadata = http.get("/v2/models/addsub").json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [("INPUT0", "FP32", [-1]), ("INPUT1", "FP32", [-1])]


def test_metadata_and_versions_are_tritons(server, http):
    """What Triton answers for the model, versions and platform included; its versions can be
    addressed (REST and gRPC), and one it does not have is 404 as Triton says it."""
    for name in ("addsub", "addsub-by-requirement"):
        metadata = http.get(f"/v2/models/{name}").json()
        assert metadata["versions"] == ["1"] and metadata["platform"] == "python", metadata
        assert http.get(f"/v2/models/{name}/versions/1").json() == metadata
        assert http.get(f"/v2/models/{name}/versions/1/ready").status_code == 200
        answer = http.post(f"/v2/models/{name}/versions/1/infer", json=addsub_body([1, 2], [1, 1]))
        assert answer.status_code == 200, answer.text
        assert answer.json()["model_version"] == "1" and answer.json()["outputs"][0]["data"] == [2, 3]
        assert http.post(f"/v2/models/{name}/infer", json=addsub_body([1], [1])).json()["model_version"] == "1"
        missing = http.post(f"/v2/models/{name}/versions/7/infer", json=addsub_body([1], [1]))
        assert missing.status_code == 404 and "version '7'" in missing.json()["error"], missing.text
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    assert client.get_model_metadata("addsub", "1", as_json=True)["versions"] == ["1"]
    assert client.get_model_metadata("addsub", as_json=True)["platform"] == "python"
    assert client.is_model_ready("addsub", "1")
    inputs = [triton_grpc.InferInput("INPUT0", [1], "FP32"), triton_grpc.InferInput("INPUT1", [1], "FP32")]
    for tensor in inputs:
        tensor.set_data_from_numpy(np.array([2.0], dtype=np.float32))
    result = client.infer("addsub", inputs, model_version="1")
    assert result.as_numpy("OUTPUT0").tolist() == [4.0] and result.get_response().model_version == "1"
    # Seldon's call series count them under the version Triton ran.
    assert metric(http, "seldon_model_infer_total", model="addsub", model_internal="addsub_1", method_type="rest",
                  code="200") >= 2
    assert metric(http, "seldon_model_infer_total", model="addsub", model_internal="addsub_1", method_type="grpc",
                  code="OK") >= 1


def test_bad_input_keeps_its_meaning(http):
    response = http.post("/v2/models/addsub/infer", json={"inputs": [
        {"name": "INPUT0", "datatype": "FP32", "shape": [2], "data": [1, 2]}]})
    assert response.status_code == 400 and "Triton" in response.json()["error"]
    assert http.post("/v2/models/addsub/infer", json=addsub_body([1], [1])).status_code == 200


def test_unload_and_load_forward_to_triton(triton, http):
    triton_rest = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    assert triton_rest.is_model_ready("addsub")
    assert http.post("/v2/repository/models/addsub/unload").status_code == 200
    assert not triton_rest.is_model_ready("addsub")
    assert http.post("/v2/repository/models/addsub/load").status_code == 200
    assert triton_rest.is_model_ready("addsub")
    assert http.post("/v2/models/addsub/infer", json=addsub_body([2], [1])).json()["outputs"][0]["data"] == [3]


def test_without_a_backend_the_load_says_why(tmp_path):
    repo = tmp_path / "repo"
    addsub_folder(repo, "needs-triton", {"implementation": "triton"})
    addsub_folder(repo, "needs-tensorrt", {"requirements": ["tensorrt"]})
    with running_server(repo, tmp_path / "server.log") as server, http_client(server) as client:
        index = repository_index(client)
    assert "start it with --triton-url" in index["needs-triton"]["reason"]
    assert "start the server with --triton-url" in index["needs-tensorrt"]["reason"]


def test_shared_repository_folder(triton, tmp_path):
    repo = tmp_path / "repo"
    addsub_folder(repo, "addsub-shared", {"implementation": "triton"})
    env = {"FLEETSERVE_TRITON_URL": triton.grpc_url, "FLEETSERVE_TRITON_REPOSITORY": str(triton.repository)}
    with running_server(repo, tmp_path / "server.log", env) as server, http_client(server) as client:
        assert (triton.repository / "addsub-shared" / "1" / "model.py").is_file()
        assert 'name: "addsub-shared"' in (triton.repository / "addsub-shared" / "config.pbtxt").read_text()
        response = client.post("/v2/models/addsub-shared/infer", json=addsub_body([5], [2]))
        assert response.json()["outputs"][1]["data"] == [3]
        assert client.post("/v2/repository/models/addsub-shared/unload").status_code == 200
        assert not (triton.repository / "addsub-shared").exists()


def test_backend_killed_and_restarted(tmp_path):
    workdir = tmp_path / "triton"
    workdir.mkdir()
    backend = start_triton(workdir)
    ports = (int(backend.http_url.rsplit(":", 1)[1]), int(backend.grpc_url.rsplit(":", 1)[1]))
    repo = tmp_path / "repo"
    addsub_folder(repo, "addsub", {"implementation": "triton"})
    try:
        with running_server(repo, tmp_path / "server.log", {"FLEETSERVE_TRITON_URL": backend.grpc_url}) as server, \
                http_client(server) as client:
            assert client.post("/v2/models/addsub/infer", json=addsub_body([1], [1])).status_code == 200
            backend.kill()
            down = client.post("/v2/models/addsub/infer", json=addsub_body([1], [1]))
            assert down.status_code == 503 and "Triton backend is unavailable" in down.json()["error"]
            assert client.get("/v2/health/live").status_code == 200  # the server itself is fine
            not_ready = client.get("/v2/models/addsub/ready")
            assert not_ready.status_code == 503 and "not ready in its backend" in not_ready.json()["error"]
            assert not triton_grpc.InferenceServerClient(server.grpc_address).is_model_ready("addsub")
            backend = start_triton(workdir, ports)  # a new Triton that has never heard of the model
            deadline = time.monotonic() + 10
            while (answer := client.post("/v2/models/addsub/infer", json=addsub_body([4], [1]))).status_code != 200:
                assert answer.status_code == 503 and time.monotonic() < deadline, answer.text
                time.sleep(0.2)
            assert answer.json()["outputs"][0]["data"] == [5]  # loaded into the new Triton by itself
            assert client.get("/v2/models/addsub/ready").status_code == 200
    finally:
        backend.kill()


def test_pipeline_and_experiment_over_proxied_models(http):
    pipeline = """
kind: Pipeline
metadata: {name: triton-chain}
spec:
  steps:
    - name: addsub
    - name: addsub-by-requirement
      inputs: [addsub]
      tensorMap: {addsub.outputs.OUTPUT0: INPUT0, addsub.outputs.OUTPUT1: INPUT1}
  output: {steps: [addsub-by-requirement]}
---
kind: Experiment
metadata: {name: triton-split}
spec:
  candidates: [{name: addsub, weight: 1}, {name: addsub-by-requirement, weight: 1}]
"""
    assert http.post("/v2/manifests", content=pipeline).status_code == 200
    answer = http.post("/v2/pipelines/triton-chain/infer", json=addsub_body([3, 4], [1, 1])).json()
    assert {o["name"]: o["data"] for o in answer["outputs"]} == {"OUTPUT0": [6, 8], "OUTPUT1": [2, 2]}  # (a+b)+(a-b), ...
    chosen = {http.post("/v2/models/x/infer", json=addsub_body([1], [1]), headers={"seldon-model": "triton-split.experiment"})
              .json()["model_name"] for _ in range(30)}
    assert chosen == {"addsub", "addsub-by-requirement"}
    assert http.request("DELETE", "/v2/manifests", content=pipeline).status_code == 200


def test_a_ready_probe_loads_the_model_into_a_triton_that_lost_it(triton, server, http):
    triton_rest = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    triton_rest.unload_model("addsub-by-requirement")  # as if Triton had restarted without it
    deadline = time.monotonic() + 10
    while triton_rest.is_model_ready("addsub-by-requirement"):  # Triton unloads in the background
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert http.get("/v2/models/addsub-by-requirement/ready").status_code == 200
    assert triton_rest.is_model_ready("addsub-by-requirement")


def test_config_and_statistics_come_from_triton(server, http):
    config = http.get("/v2/models/addsub/config").json()
    assert config["name"] == "addsub" and config["backend"] == "python"  # Triton's, not fleetserve's own
    assert config["input"][0]["dims"] == [-1]
    before = http.get("/v2/models/addsub/stats").json()["model_stats"][0]["inference_count"]
    for _ in range(3):
        assert http.post("/v2/models/addsub/infer", json=addsub_body([1], [1])).status_code == 200
    stats = triton_http.InferenceServerClient(server.http_address).get_inference_statistics("addsub")["model_stats"][0]
    assert stats["inference_count"] == before + 3 and stats["inference_stats"]["compute_infer"]["count"] >= 3
    grpc_config = triton_grpc.InferenceServerClient(server.grpc_address).get_model_config("addsub").config
    assert grpc_config.backend == "python" and list(grpc_config.input[0].dims) == [-1]


def assert_in_triton(triton: Triton, names: list[str], expected: set[str]) -> None:
    """Which of `names` Triton holds, once its unloads (which finish in the background) are done."""
    client = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    deadline = time.monotonic() + 10
    while (ready := {name for name in names if client.is_model_ready(name)}) != expected:
        assert time.monotonic() < deadline, (ready, expected)
        time.sleep(0.05)


def test_gpu_models_are_evicted_from_triton_and_reloaded_on_demand(triton, tmp_path):
    repo = tmp_path / "repo"
    names = ["gpu-a", "gpu-b", "gpu-c"]
    for name in names:
        addsub_folder(repo, name, {"implementation": "triton", "memory": "40Mi"})
    # Three 40 MiB GPU models fit no CPU books of 50 MiB: each device is counted on its own.
    env = {"FLEETSERVE_TRITON_URL": triton.grpc_url, "FLEETSERVE_GPU_MEMORY_LIMIT": "100Mi",
           "FLEETSERVE_MEMORY_LIMIT": "50Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "30"}
    with running_server(repo, tmp_path / "server.log", env) as server, http_client(server) as client:
        index = repository_index(client)
        assert all(index[name]["state"] == "READY" and index[name]["device"] == "gpu" for name in names)
        assert sum(index[name]["resident"] for name in names) == 2
        assert_in_triton(triton, names, {name for name in names if index[name]["resident"]})
        for turn, name in enumerate(names * 2):  # each request makes room for its model by unloading the least recently used
            if turn == 3:  # from the second round on, every request finds its model evicted
                evictions = metric(client, "seldon_cache_evict_count", device="gpu")
                misses = metric(client, "seldon_cache_miss_count", device="gpu")
            answer = client.post(f"/v2/models/{name}/infer", json=addsub_body([5], [3]))
            assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [8], answer.text
            index = repository_index(client)
            assert index[name]["resident"] and sum(index[n]["resident"] for n in names) == 2
            assert_in_triton(triton, names, {n for n in names if index[n]["resident"]})
        # Least recently used goes first, unless its reload took far longer than another's
        # (memory.DeviceMemory.victims): under load a Triton reload can, and that one stays. So the
        # second round has up to 3 misses, each making room by one eviction.
        reloads = metric(client, "seldon_cache_miss_count", device="gpu") - misses
        assert 1 <= reloads <= 3 and metric(client, "seldon_cache_evict_count", device="gpu") == evictions + reloads
        assert metric(client, "seldon_cache_evict_count", device="cpu") == 0
        assert metric(client, "seldon_server_replica_memory_capacity_bytes_gauge", device="gpu") == 100 * 2**20
        assert metric(client, "seldon_server_replica_memory_capacity_bytes_gauge", device="cpu") == 50 * 2**20
        assert metric(client, "seldon_loaded_model_memory_bytes_gauge", device="gpu", model_internal=f"{name}_1") == 40 * 2**20
        assert metric(client, "fleetserve_model_memory_bytes", model=name, device="gpu", kind="declared") == 40 * 2**20
        # Measured: the files' size (the Python backend reports no GPU memory).
        measured = metric(client, "fleetserve_model_memory_bytes", model=name, device="gpu", kind="measured")
        assert measured == sum(path.stat().st_size for path in (repo / name).rglob("*") if path.is_file())

        # A manifest whose artifact says "triton" is counted where it lives, and refused like any GPU model.
        folder = addsub_folder(tmp_path, "artifact", {"implementation": "triton"})
        manifest = f"kind: Model\nmetadata: {{name: gpu-d}}\nspec: {{storageUri: '{folder}', memory: 40Mi}}\n"
        refused = client.post("/v2/manifests", content=manifest)
        assert refused.status_code == 400
        assert "registered GPU models take 120.0 MiB of 130.0 MiB (100.0 MiB limit + 30% overcommit)" in refused.json()["error"]
        too_big = manifest.replace("gpu-d", "gpu-e").replace("40Mi", "101Mi")
        assert "more than the GPU memory limit of 100.0 MiB" in client.post("/v2/manifests", content=too_big).json()["error"]
        assert client.post("/v2/repository/models/gpu-a/unload").status_code == 200
        assert client.post("/v2/manifests", content=manifest).status_code == 200
        index = repository_index(client)
        assert index["gpu-d"]["device"] == "gpu" and index["gpu-d"]["state"] == "READY"
        assert client.post("/v2/models/gpu-d/infer", json=addsub_body([1], [1])).json()["outputs"][0]["data"] == [2]


def test_a_trace_goes_on_into_triton(tmp_path):
    """fleetserve's span for the proxied model is the parent of Triton's own (Triton in
    OpenTelemetry mode, which exports over OTLP/HTTP to a receiver here; fleetserve over gRPC).

    Triton 2.51 now and then starts a new trace for a gRPC call that carries a valid traceparent
    (up to one call in 8 under load here, reproduced with tritonclient alone), so five traced calls
    are made and Triton must continue at least one of them."""
    triton_receiver = ThreadingHTTPServer(("127.0.0.1", 0), HttpReceiver)
    triton_receiver.lock, triton_receiver.paths, triton_receiver.spans = threading.Lock(), [], []
    threading.Thread(target=triton_receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    ours, collector = Receiver(), grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(ours, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    traced = start_triton(tmp_path / "triton", args=(
        "--trace-config", "mode=opentelemetry", "--trace-config", "rate=1", "--trace-config", "level=TIMESTAMPS",
        "--trace-config", f"opentelemetry,url=127.0.0.1:{triton_receiver.server_address[1]}/v1/traces",
        "--trace-config", "opentelemetry,bsp_schedule_delay=100"))
    repo = tmp_path / "repo"
    addsub_folder(repo, "addsub", {"implementation": "triton"})
    env = {"FLEETSERVE_TRITON_URL": traced.grpc_url, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    trace_ids = [f"3333333333333333333333333333333{call}" for call in range(5)]
    try:
        with running_server(repo, tmp_path / "server.log", env) as server, http_client(server) as client:
            for trace_id in trace_ids:
                answer = client.post("/v2/models/addsub/infer", json=addsub_body([1], [2]),
                                     headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
                assert answer.status_code == 200, answer.text
            model_spans = {trace_id: span for trace_id in trace_ids
                           for span in wait_for_spans(ours, trace_id, 4) if span.name == "addsub"}
            deadline = time.monotonic() + 20
            while len(theirs := list(triton_receiver.spans)) < 3 * len(trace_ids):  # InferRequest, addsub, compute
                assert time.monotonic() < deadline, (triton_receiver.paths, traced.process.poll(),
                                                     [(span.name, span.trace_id.hex()) for span in theirs])
                time.sleep(0.1)
        continued = [span for span in theirs if span.trace_id.hex() in model_spans
                     and span.parent_span_id == model_spans[span.trace_id.hex()].span_id]
        assert continued, [(span.name, span.trace_id.hex(), span.parent_span_id.hex()) for span in theirs]
        assert {span.name for span in continued} == {"InferRequest"}
        assert all(attributes(span)["model_name"] == "addsub" for span in model_spans.values())
    finally:
        traced.process.terminate()
        traced.process.wait(30)
        collector.stop(0)
        triton_receiver.shutdown()
        triton_receiver.server_close()
