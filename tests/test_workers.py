"""Models with `parallel_workers`: predicts in worker processes, tensors through shared memory."""

from __future__ import annotations

import asyncio
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import IRIS_ROWS, ROOT, outputs_of, running_server, start_server, write_settings, x_body

WORKER_MODEL = '''
import os
import time
from pathlib import Path

import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Spin(Runtime):
    """Pure Python work that holds the GIL; says which process ran it, and when."""

    def load(self):
        if (Path(self.settings.folder) / "cannot-load-again").exists():
            raise OSError("the model's files are gone")

    def predict(self, request):
        x = request.input("x").data
        if x.size and x.flat[0] == -2:  # crash, and leave this model unable to load again
            (Path(self.settings.folder) / "cannot-load-again").write_text("")
            os._exit(4)
        if x.size and x.flat[0] == -1:
            os._exit(3)  # a crash in the middle of a predict
        began = time.time()
        deadline = began + float(x.flat[0]) if x.size else began
        while time.time() < deadline:  # busy, on purpose: a thread could not overlap this
            pass
        outputs = [
            Tensor("double", x * 2),
            Tensor("pid", np.array([os.getpid()], dtype=np.int64)),
            Tensor("interval", np.array([began, time.time()])),
        ]
        if "text" in [t.name for t in request.inputs]:
            texts = request.input("text").data
            outputs.append(Tensor("upper", np.array([t.upper() for t in texts], dtype=object)))
        return self.response(outputs, request)


class AsyncSpin(Spin):
    async def predict(self, request):
        return super().predict(request)


class BrokenInWorker(Runtime):
    def load(self):
        raise OSError("weights missing in the worker")
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = worker_repo(tmp_path_factory.mktemp("workers-repo"), {"spin": ("Spin", 2), "broken": ("BrokenInWorker", 1)})
    shutil.copytree(ROOT / "model_repo" / "iris", repo / "iris", ignore=shutil.ignore_patterns("__pycache__"))
    settings = (repo / "iris" / "model-settings.json").read_text()
    (repo / "iris" / "model-settings.json").write_text(settings.replace('"name": "iris"', '"name": "iris", "parallel_workers": 1'))
    with running_server(repo, tmp_path_factory.mktemp("workers-logs") / "server.log") as running:
        yield running


def worker_repo(repo: Path, models: dict[str, tuple[str, int]]) -> Path:
    """Models of WORKER_MODEL's classes: name -> (class name, parallel_workers)."""
    for name, (class_name, workers) in models.items():
        write_settings(repo / name, {"implementation": f"spin.{class_name}", "parallel_workers": workers})
        (repo / name / "spin.py").write_text(WORKER_MODEL)
    return repo


def children_of(pid: int) -> set[int]:
    """The worker processes of a server (multiprocessing's resource tracker is a child too)."""
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid) and b"spawn_main" in (status.parent / "cmdline").read_bytes():
            found.add(int(status.parent.name))
    return found


def test_predicts_run_in_worker_processes_in_parallel(server):
    async def both():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v2/models/spin/infer", json=x_body(np.array([[0.4]]))) for _ in range(2)))

    answers = [outputs_of(response) for response in asyncio.run(both())]
    pids = {answer["pid"][0] for answer in answers}
    assert len(pids) == 2 and server.process.pid not in pids
    assert pids <= children_of(server.process.pid)
    (first_start, first_end), (second_start, second_end) = (answer["interval"] for answer in answers)
    assert first_start < second_end and second_start < first_end  # the two busy loops overlapped in time


def test_tensors_round_trip_exactly_over_both_doors(server):
    x = np.random.default_rng(3).random((3, 5))
    x[0, 0] = 0  # no busy wait
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = httpclient.InferInput("x", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x)
    text = httpclient.InferInput("text", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"abc", "\u00e9t\u00e9".encode()], dtype=object))
    result = client.infer("spin", [tensor, text], outputs=[httpclient.InferRequestedOutput("double"), httpclient.InferRequestedOutput("upper")])
    np.testing.assert_array_equal(result.as_numpy("double"), x * 2)
    assert result.as_numpy("upper").tolist() == [b"ABC", "\u00e9T\u00e9".encode()]  # bytes.upper: ASCII only
    assert result.get_output("pid") is None  # only what was asked for

    big = np.zeros((1, 600_000))  # 4.8 MB: the shared blocks grow
    big[0, 1:] = np.arange(1, 600_000) * 0.5
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    tensor = grpcclient.InferInput("x", list(big.shape), "FP64")
    tensor.set_data_from_numpy(big)
    doubled = grpc.infer("spin", [tensor], outputs=[grpcclient.InferRequestedOutput("double")]).as_numpy("double")
    np.testing.assert_array_equal(doubled, big * 2)

    # BYTES travel pickled over the worker's socket: messages far past its buffer, both ways, twice.
    texts = np.array([f"text {i}".encode() for i in range(200_000)], dtype=object)
    zero = grpcclient.InferInput("x", [1, 1], "FP64")
    zero.set_data_from_numpy(np.zeros((1, 1)))
    text = grpcclient.InferInput("text", [len(texts)], "BYTES")
    text.set_data_from_numpy(texts)
    for _ in range(2):
        upper = grpc.infer("spin", [zero, text], outputs=[grpcclient.InferRequestedOutput("upper")]).as_numpy("upper")
        assert upper.tolist() == [t.upper() for t in texts]


def test_a_sklearn_model_in_a_worker_answers_like_the_model(server):
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = httpclient.InferInput("input-0", list(IRIS_ROWS.shape), "FP32")
    tensor.set_data_from_numpy(IRIS_ROWS)
    expected = joblib.load(ROOT / "model_repo" / "iris" / "model.joblib").predict(IRIS_ROWS)
    for _ in range(20):
        assert client.infer("iris", [tensor]).as_numpy("predict").tolist() == expected.tolist()


def test_memory_of_the_workers_is_counted(server):
    index = {entry["name"]: entry for entry in httpx.post(f"{server.url}/v2/repository/index").json()}
    assert index["spin"]["measured_memory_bytes"] > 2 * 10 * 1024 * 1024  # two interpreters with numpy
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "weights missing in the worker" in index["broken"]["reason"]


def test_a_crashing_worker_fails_its_request_alone_and_is_replaced(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        crashed = client.post("/v2/models/spin/infer", json=x_body(np.array([[-1.0]])))
        assert crashed.status_code == 500  # the server's fault (a crash), not the request's
        assert "worker process exited (code 3)" in crashed.json()["error"]
        for _ in range(10):  # the other worker serves meanwhile
            assert outputs_of(client.post("/v2/models/spin/infer", json=x_body(np.array([[0.0]]))))["double"] == [0.0]
        assert client.get("/v2/models/spin/ready").status_code == 200
    deadline = asyncio.run(_wait_for_two_workers(server))
    assert deadline, "the crashed worker was not replaced"


async def _wait_for_two_workers(server) -> bool:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        for _ in range(60):
            answers = await asyncio.gather(*(client.post("/v2/models/spin/infer", json=x_body(np.array([[0.2]]))) for _ in range(2)))
            if len({outputs_of(answer)["pid"][0] for answer in answers}) == 2:
                return True
            await asyncio.sleep(0.5)
    return False


def test_unload_and_shutdown_stop_the_workers_and_free_shared_memory(tmp_path):
    repo = worker_repo(tmp_path / "repo", {"spin": ("Spin", 2), "spin-2": ("Spin", 1)})
    server = start_server(repo, tmp_path / "server.log")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for model in ("spin", "spin-2"):
                assert outputs_of(client.post(f"/v2/models/{model}/infer", json=x_body(np.ones((2, 2)))))["double"] == [2.0] * 4
            workers = children_of(server.process.pid)
            assert len(workers) == 3
            blocks = {path for pid in [server.process.pid, *workers] for path in Path("/dev/shm").glob(f"fleetserve-{pid}-*")}
            assert blocks
            with ThreadPoolExecutor(1) as pool:  # unload while a predict runs: the predict finishes first
                running = pool.submit(client.post, "/v2/models/spin/infer", json=x_body(np.array([[0.5]])))
                time.sleep(0.2)
                assert client.post("/v2/repository/models/spin/unload").status_code == 200
                assert outputs_of(running.result())["double"] == [1.0]
            remaining = children_of(server.process.pid)
            assert len(remaining & workers) == 1  # spin-2's worker
    finally:
        assert server.stop() == 0, server.log()
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert not any(path.exists() for path in blocks)


def test_invalid_parallel_workers_is_refused(tmp_path):
    repo = worker_repo(tmp_path / "repo", {"spin": ("Spin", -1)})
    with running_server(repo, tmp_path / "server.log") as server:
        index = httpx.post(f"{server.url}/v2/repository/index").json()
        assert index[0]["state"] == "UNAVAILABLE"
        assert "must not be negative" in index[0]["reason"]


def test_when_no_worker_can_start_again_requests_fail_at_once(tmp_path):
    repo = worker_repo(tmp_path / "repo", {"spin": ("Spin", 1), "async": ("AsyncSpin", 1)})
    with running_server(repo, tmp_path / "server.log") as server, httpx.Client(base_url=server.url, timeout=30) as client:
        index = {entry["name"]: entry for entry in client.post("/v2/repository/index").json()}
        assert index["async"]["state"] == "UNAVAILABLE" and "async ones" in index["async"]["reason"]
        crashed = client.post("/v2/models/spin/infer", json=x_body(np.array([[-2.0]])))
        assert "worker process exited (code 4)" in crashed.json()["error"]
        for _ in range(100):
            answer = client.post("/v2/models/spin/infer", json=x_body(np.array([[0.0]])))
            if "no worker process" in answer.text:
                break
            time.sleep(0.1)
        assert answer.status_code == 503
        assert "has no worker process" in answer.json()["error"] and "the model's files are gone" in answer.json()["error"]


def test_workers_exit_when_the_server_is_killed_and_their_memory_is_reclaimed(tmp_path):
    repo = worker_repo(tmp_path / "repo", {"spin": ("Spin", 1)})
    server = start_server(repo, tmp_path / "server.log")
    httpx.post(f"{server.url}/v2/models/spin/infer", json=x_body(np.ones((1, 1))), timeout=30).raise_for_status()
    workers = children_of(server.process.pid)
    assert workers
    left = list(Path("/dev/shm").glob(f"fleetserve-{server.process.pid}-*"))
    assert left  # the server's input block, which a killed server cannot remove
    server.process.kill()
    server.process.wait()
    for _ in range(100):
        if not any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text() for pid in workers):
            break
        asyncio.run(asyncio.sleep(0.1))
    else:
        pytest.fail(f"worker processes {workers} outlived the server")
    (tmp_path / "empty").mkdir()
    with running_server(tmp_path / "empty", tmp_path / "next.log"):  # the next server cleans up
        assert not any(path.exists() for path in left)


PID_MODEL = '''
import ctypes
import os

import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Pid(Runtime):
    """Says which process ran it; a negative input crashes it in native code."""

    def predict(self, request):
        if request.inputs[0].data.flat[0] < 0:
            ctypes.string_at(0)  # a segfault, as a bug in a C extension would cause
        return self.response([Tensor("pid", np.array([os.getpid()], dtype=np.int64))], request)
'''


def test_custom_runtimes_run_in_a_worker_by_default_and_a_segfault_harms_no_other_model(tmp_path):
    repo = tmp_path / "repo"
    for name, settings in (("own-process", {}), ("in-server", {"parallel_workers": 0})):
        write_settings(repo / name, {"implementation": "pid.Pid", **settings})
        (repo / name / "pid.py").write_text(PID_MODEL)
    shutil.copytree(ROOT / "model_repo" / "iris", repo / "iris", ignore=shutil.ignore_patterns("__pycache__"))
    with running_server(repo, tmp_path / "server.log") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        def pid_of(model: str) -> int:
            return outputs_of(client.post(f"/v2/models/{model}/infer", json=x_body(np.array([[1.0]]))))["pid"][0]

        assert pid_of("own-process") in children_of(server.process.pid)
        assert pid_of("in-server") == server.process.pid  # "parallel_workers": 0 opts back into the server's threads

        crashed = client.post("/v2/models/own-process/infer", json=x_body(np.array([[-1.0]])))
        assert crashed.status_code == 500  # the server's fault, not the request's
        assert "worker process exited (code -11)" in crashed.json()["error"]
        assert client.get("/v2/health/live").status_code == 200
        assert pid_of("in-server") == server.process.pid
        assert outputs_of(client.post("/v2/models/iris/infer", json={"inputs": [
            {"name": "input-0", "datatype": "FP32", "shape": [2, 4], "data": IRIS_ROWS.tolist()}]}))["predict"] == [0, 2]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # its worker is replaced: the model serves again
            answer = client.post("/v2/models/own-process/infer", json=x_body(np.array([[1.0]])))
            if answer.status_code == 200:
                break
            time.sleep(0.2)
        assert pid_of("own-process") in children_of(server.process.pid)
