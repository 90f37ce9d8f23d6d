"""Adaptive batching and where predicts run (event loop or worker threads), against a server process."""

from __future__ import annotations

import asyncio
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import joblib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from conftest import IRIS_ROWS, ROOT, outputs_of, running_server, write_settings, x_body

PROBE_MODEL = '''
import threading
import time
from pathlib import Path

import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class BatchProbe(Runtime):
    """Per-row sums of `x`; `batch_rows` tells how many rows the predict call saw in all."""

    unloaded = False

    def unload(self):
        self.unloaded = True

    def predict(self, request):
        x = request.input("x").data
        if (x < 0).any():
            raise ValueError("negative values are not allowed")
        if (x == 99).any():
            raise SystemExit("the model called exit()")
        if (x == 7).any():
            time.sleep(0.5)
        if self.unloaded:  # nobody may be waiting for this answer: leave a mark the test can see
            (Path(self.settings.folder) / "predicted-after-unload").write_text("")
        rows = np.full(x.shape[0], x.shape[0], dtype=np.int64)
        return self.response([Tensor("sum", x.sum(axis=1)), Tensor("batch_rows", rows)], request)


class Aggregate(Runtime):
    """One number for the whole input: its outputs cannot be split by rows."""

    def predict(self, request):
        x = request.input("x").data
        return self.response([Tensor("total", np.array([x.sum()]))], request)


class Where(Runtime):
    """Says which thread ran it; x[0, 0] > 0 makes it take that many seconds."""

    def predict(self, request):
        x = request.input("x").data
        if x.size and x.flat[0] > 0:
            time.sleep(float(x.flat[0]))
        name = np.array([threading.current_thread().name.encode()], dtype=object)
        return self.response([Tensor("thread", name)], request)


class Sleepy(Where):
    def predict(self, request):
        time.sleep(0.01)  # waits, holding no CPU: must never run on the event loop
        return super().predict(request)
'''

BATCHING = {"max_batch_size": 8, "max_batch_time": 0.5}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    repo = tmp_path_factory.mktemp("batching-repo")
    for name, implementation, settings in (
        ("probe", "probe.BatchProbe", BATCHING),
        ("aggregate", "probe.Aggregate", BATCHING),
        ("slow", "probe.BatchProbe", {"max_batch_size": 4, "max_batch_time": 0.05}),
        # On the server's threads, where Pace may move them onto the event loop: what these tests watch.
        ("where", "probe.Where", {"parallel_workers": 0}),
        ("sleepy", "probe.Sleepy", {"parallel_workers": 0}),
    ):
        write_settings(repo / name, {"implementation": implementation, **settings})
        (repo / name / "probe.py").write_text(PROBE_MODEL)
    shutil.copytree(ROOT / "model_repo" / "iris", repo / "iris", ignore=shutil.ignore_patterns("__pycache__"))
    settings = (repo / "iris" / "model-settings.json").read_text()
    (repo / "iris" / "model-settings.json").write_text(settings.replace('"name": "iris"', '"name": "iris", "max_batch_size": 16, "max_batch_time": 0.01'))
    with running_server(repo, tmp_path_factory.mktemp("batching-logs") / "server.log") as running:
        yield running


async def post_all(server, model: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        return await asyncio.gather(*(client.post(f"/v2/models/{model}/infer", json=body) for body in bodies))


def metric(server, name: str, model: str, version: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    found = re.search(rf'^{name}{{model="{model}",version="{version}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_concurrent_requests_merge_into_one_predict_and_split_back_exactly(server):
    rng = np.random.default_rng(7)
    row_counts = [1, 2, 3, 1, 4, 2, 1, 3]  # eight requests: a full batch, sent at once
    inputs = [rng.random((rows, 5)) for rows in row_counts]
    batches_before = metric(server, "fleetserve_batch_size_count", "probe")
    responses = asyncio.run(post_all(server, "probe", [x_body(x, id=f"r{i}") for i, x in enumerate(inputs)]))
    for i, (x, response) in enumerate(zip(inputs, responses)):
        outputs = outputs_of(response)
        assert response.json()["id"] == f"r{i}"
        np.testing.assert_allclose(outputs["sum"], x.sum(axis=1), rtol=1e-12)
        assert outputs["batch_rows"] == [sum(row_counts)] * len(x)  # computed in one call with all the others
    assert metric(server, "fleetserve_batch_size_count", "probe") == batches_before + 1
    assert metric(server, "fleetserve_batch_size_sum", "probe") >= 8


def test_a_lone_request_waits_at_most_max_batch_time(server):
    response = httpx.post(f"{server.url}/v2/models/probe/infer", json=x_body(np.ones((2, 3))), timeout=30)
    assert outputs_of(response) == {"sum": [3.0, 3.0], "batch_rows": [2, 2]}
    assert response.elapsed.total_seconds() < 5


def test_requested_outputs_are_honoured_and_only_like_requests_merge(server):
    x = np.arange(6, dtype=float).reshape(2, 3)
    bodies = [x_body(x, outputs=[{"name": "sum"}]) for _ in range(3)]
    bodies += [x_body(x, outputs=[{"name": "batch_rows"}]) for _ in range(3)]
    bodies += [x_body(np.ones((1, 4)))]  # another row width: its own batch
    responses = asyncio.run(post_all(server, "probe", bodies))
    for response in responses[:3]:
        assert outputs_of(response) == {"sum": [3.0, 12.0]}
    for response in responses[3:6]:
        assert outputs_of(response) == {"batch_rows": [6, 6]}  # merged with the two like it, not with the others
    assert outputs_of(responses[6]) == {"sum": [4.0], "batch_rows": [1]}


def test_one_bad_request_fails_alone(server):
    good = [np.full((2, 2), float(i)) for i in range(7)]
    bad = np.array([[1.0, -1.0]])
    responses = asyncio.run(post_all(server, "probe", [x_body(x) for x in good[:3]] + [x_body(bad)] + [x_body(x) for x in good[3:]]))
    assert responses[3].status_code == 400
    assert "negative values are not allowed" in responses[3].json()["error"]
    for x, response in zip(good, responses[:3] + responses[4:]):
        assert outputs_of(response)["sum"] == x.sum(axis=1).tolist()


def test_a_model_that_exits_fails_its_requests_not_the_server(server):
    bodies = [x_body(np.array([[99.0]]))] + [x_body(np.array([[1.0, 2.0]])) for _ in range(3)]
    responses = asyncio.run(post_all(server, "probe", bodies))
    assert responses[0].status_code == 400 and "the model called exit()" in responses[0].json()["error"]
    assert [outputs_of(response)["sum"] for response in responses[1:]] == [[3.0]] * 3
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200


def test_a_batch_whose_callers_gave_up_keeps_its_model_loaded(server):
    async def give_up():
        async with httpx.AsyncClient(base_url=server.url, timeout=0.1) as client:
            return await asyncio.gather(*(client.post("/v2/models/slow/infer", json=x_body(np.array([[7.0]])))
                                          for _ in range(3)), return_exceptions=True)

    assert all(isinstance(outcome, httpx.TimeoutException) for outcome in asyncio.run(give_up()))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.post("/v2/repository/models/slow/unload").status_code == 200  # waits for the batch
        assert not (server.repository / "slow" / "predicted-after-unload").exists()
        assert client.post("/v2/repository/models/slow/load").status_code == 200
        assert outputs_of(client.post("/v2/models/slow/infer", json=x_body(np.array([[1.0]])))) == {"sum": [1.0], "batch_rows": [1]}


def test_outputs_that_cannot_be_split_are_computed_per_request(server):
    inputs = [np.full((i + 1, 2), float(i)) for i in range(8)]
    responses = asyncio.run(post_all(server, "aggregate", [x_body(x) for x in inputs]))
    for x, response in zip(inputs, responses):
        assert outputs_of(response) == {"total": [x.sum()]}


def test_a_sklearn_model_batches_over_both_doors(server):
    """Sixteen callers at once, half over HTTP and half over gRPC, each with its own rows."""
    host = server.url.removeprefix("http://")

    def call(i: int):
        rows = IRIS_ROWS[i % len(IRIS_ROWS) :][:1 + i % 2]
        if i % 2:
            client, module = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}"), grpcclient
        else:
            client, module = httpclient.InferenceServerClient(host), httpclient
        tensor = module.InferInput("input-0", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        return rows, client.infer("iris", [tensor]).as_numpy("predict")

    batches_before = metric(server, "fleetserve_batch_size_count", "iris", "1")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(64)))
    model = joblib.load(ROOT / "model_repo" / "iris" / "model.joblib")
    for rows, predicted in answers:
        assert predicted.tolist() == model.predict(rows).tolist()
    assert metric(server, "fleetserve_batch_size_count", "iris", "1") - batches_before < 64  # some merged


def thread_of(server, model: str, x: np.ndarray) -> str:
    response = httpx.post(f"{server.url}/v2/models/{model}/infer", json=x_body(x), timeout=30)
    return outputs_of(response)["thread"][0]


def test_a_fast_model_moves_onto_the_event_loop_and_a_slow_call_sends_it_back(server):
    small = np.zeros((1, 2))
    first = [thread_of(server, "where", small) for _ in range(80)]
    assert first[0].startswith("fleetserve-worker")
    assert first[-1] == "MainThread"  # the thread hop saved once it proved fast
    assert thread_of(server, "where", np.zeros((100, 2))).startswith("fleetserve-worker")  # a larger input than proven
    assert thread_of(server, "where", np.full((1, 2), 0.05)) == "MainThread"  # slow, once: on the loop ...
    assert thread_of(server, "where", small).startswith("fleetserve-worker")  # ... and not again


def test_a_model_that_waits_never_runs_on_the_event_loop(server):
    assert all(thread_of(server, "sleepy", np.zeros((1, 1))).startswith("fleetserve-worker") for _ in range(50))


def test_inline_predicts_can_be_turned_off(tmp_path):
    write_settings(tmp_path / "repo" / "where", {"implementation": "probe.Where", "parallel_workers": 0})
    (tmp_path / "repo" / "where" / "probe.py").write_text(PROBE_MODEL)
    with running_server(tmp_path / "repo", tmp_path / "server.log", {"FLEETSERVE_INLINE_PREDICT_US": "0"}) as off:
        assert all(thread_of(off, "where", np.zeros((1, 2))).startswith("fleetserve-worker") for _ in range(50))
