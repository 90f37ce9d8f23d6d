"""Overload and time limits, through a real server: --max-concurrent-requests, Triton's queue
policy (max_queue_size, default_timeout_microseconds), request deadlines (parameters.timeout,
gRPC deadlines), slow clients, cancelled requests, load/unload storms and SIGTERM.

A model here counts its predicts: a line per call in `calls` in its folder, so a test can tell
that a request dropped from a queue never ran.
"""

from __future__ import annotations

import json
import queue
import random
import re
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import joblib
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from sklearn.linear_model import LogisticRegression
from tritonclient.utils import InferenceServerException

from conftest import free_port, running_server, spawn_server, start_server, write_settings

COUNTING_MODEL = '''
import json
import time

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Counting(Runtime):
    """Writes a line to `calls` in its folder (the request's id and its input's values), then
    sleeps for the largest of them."""

    def predict(self, request):
        seconds = request.inputs[0].data.reshape(-1)
        with open(self.settings.folder / "calls", "a") as calls:
            calls.write(json.dumps([request.id, seconds.tolist()]) + "\\n")
        time.sleep(float(seconds.max()))
        return self.response([Tensor("slept", seconds)], request)
'''

LIMIT = 8  # --max-concurrent-requests of the `limited` server; its models have 4 predict slots each
SLOTS = 4


def add_counting_model(repository, name: str, **settings) -> None:
    """On the server's threads (SLOTS predict slots) unless `parallel_workers` says otherwise."""
    write_settings(repository / name, {"implementation": "counting_model.Counting", "parallel_workers": 0, **settings})
    (repository / name / "counting_model.py").write_text(COUNTING_MODEL)


def calls(server, model: str) -> list[tuple[str | None, list[float]]]:
    path = server.repository / model / "calls"
    return [tuple(json.loads(line)) for line in path.read_text().splitlines()] if path.exists() else []


def body(seconds: float, request_id: str | None = None, **parameters) -> dict:
    document = {"inputs": [{"name": "seconds", "datatype": "FP32", "shape": [1], "data": [seconds]}]}
    if request_id:
        document["id"] = request_id
    if parameters:
        document["parameters"] = parameters
    return document


def grpc_seconds(seconds: float) -> list:
    tensor = triton_grpc.InferInput("seconds", [1], "FP32")
    tensor.set_data_from_numpy(np.array([seconds], dtype=np.float32))
    return [tensor]


def metric(server, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


def wait_until(condition, timeout: float = 10, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.05)


def grpc_code(call) -> str:
    try:
        call()
    except InferenceServerException as error:
        return error.status()
    return "OK"


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    repository = tmp_path_factory.mktemp("overload_repo")
    add_counting_model(repository, "counter")
    add_counting_model(repository, "queued", max_queue_size=1)
    add_counting_model(repository, "timed", default_timeout_microseconds=300_000)
    add_counting_model(repository, "batched", max_batch_size=4, max_batch_time=0.05)
    add_counting_model(repository, "bad-queue", max_queue_size="many")
    add_counting_model(repository, "bad-timeout", default_timeout_microseconds=-5)
    add_counting_model(repository, "pooled", parallel_workers=1, max_queue_size=1)  # one slot: its worker
    env = {"FLEETSERVE_MAX_CONCURRENT_REQUESTS": str(LIMIT), "FLEETSERVE_REQUEST_HEAD_TIMEOUT": "1",
           "FLEETSERVE_REQUEST_BODY_TIMEOUT": "1", "FLEETSERVE_SHUTDOWN_GRACE": "5"}
    with running_server(repository, tmp_path_factory.mktemp("overload_logs") / "server.log", env) as server:
        yield server


@pytest.fixture
def http(limited):
    with httpx.Client(base_url=limited.url, timeout=30, limits=httpx.Limits(max_connections=200)) as client:
        yield client


@pytest.fixture
def grpc(limited):
    client = triton_grpc.InferenceServerClient(limited.grpc_address)
    yield client
    client.close()


def test_a_queue_policy_must_be_whole_numbers(http):
    index = {entry["name"]: entry for entry in http.post("/v2/repository/index").json()}
    assert "max_queue_size must be a non-negative integer, got 'many'" in index["bad-queue"]["reason"]
    assert "default_timeout_microseconds must be a non-negative integer, got -5" in index["bad-timeout"]["reason"]


def test_past_the_limit_requests_are_refused_at_once_and_reads_never(limited, http, grpc):
    with ThreadPoolExecutor(LIMIT) as pool:
        holding = [pool.submit(http.post, "/v2/models/counter/infer", json=body(1.5)) for _ in range(LIMIT)]
        wait_until(lambda: metric(limited, "fleetserve_requests_in_flight") == LIMIT, what=f"{LIMIT} requests in flight")
        started = time.monotonic()
        refused = http.post("/v2/models/counter/infer", json=body(0), headers={"x-request-id": "r1"})
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "--max-concurrent-requests" in refused.json()["error"] and refused.headers["x-request-id"] == "r1"
        control = http.post("/v2/repository/index")
        assert control.status_code == 503 and control.headers["retry-after"] == "1", control.text
        assert "error" in control.json()
        assert grpc_code(lambda: grpc.infer("counter", grpc_seconds(0))) == "StatusCode.RESOURCE_EXHAUSTED"
        assert grpc_code(lambda: grpc.get_model_repository_index()) == "StatusCode.RESOURCE_EXHAUSTED"
        streamed: queue.Queue = queue.Queue()
        grpc.start_stream(callback=lambda result, error: streamed.put(error))
        try:
            grpc.async_stream_infer("counter", grpc_seconds(0))
            assert "--max-concurrent-requests" in str(streamed.get(timeout=10))
        finally:
            grpc.stop_stream()
        # Reads are never refused.
        for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/counter", "/v2/models/counter/ready",
                     "/v2/models/counter/stats", "/metrics"):
            assert http.get(path).status_code == 200, path
        assert grpc.is_server_ready() and grpc.is_model_ready("counter")
        assert grpc.get_model_metadata("counter").name == "counter"
        assert [answer.result().status_code for answer in holding] == [200] * LIMIT
    assert metric(limited, "fleetserve_requests_in_flight") == 0
    assert metric(limited, "fleetserve_requests_refused_total") >= 4


def test_a_burst_gets_answers_or_refusals_and_leaves_nothing_counted(limited, http):
    grpc_clients = [triton_grpc.InferenceServerClient(limited.grpc_address) for _ in range(10)]

    def rest() -> tuple[int, float, str | None]:
        started = time.monotonic()
        answer = http.post("/v2/models/counter/infer", json=body(1.5))
        return answer.status_code, time.monotonic() - started, answer.headers.get("retry-after")

    def grpc_call(client) -> tuple[str, float]:
        started = time.monotonic()
        return grpc_code(lambda: client.infer("counter", grpc_seconds(1.5))), time.monotonic() - started

    try:
        with ThreadPoolExecutor(50) as pool:
            rest_answers = [pool.submit(rest) for _ in range(40)]
            grpc_answers = [pool.submit(grpc_call, client) for client in grpc_clients]
            rest_results = [answer.result(timeout=60) for answer in rest_answers]
            grpc_results = [answer.result(timeout=60) for answer in grpc_answers]
    finally:
        for client in grpc_clients:
            client.close()
    assert {status for status, _, _ in rest_results} <= {200, 503}
    assert {code for code, _ in grpc_results} <= {"OK", "StatusCode.RESOURCE_EXHAUSTED"}
    refusals = [took for status, took, retry in rest_results if status == 503 and retry == "1"]
    refusals += [took for code, took in grpc_results if code != "OK"]
    served = sum(status == 200 for status, _, _ in rest_results) + sum(code == "OK" for code, _ in grpc_results)
    assert served >= LIMIT and len(refusals) >= 20, (served, len(refusals))
    assert max(refusals) < 1.0, "a refused request waited instead of being answered at once"
    # Nothing is left counted: a full set of requests is admitted and served.
    wait_until(lambda: metric(limited, "fleetserve_requests_in_flight") == 0, what="no request in flight")
    with ThreadPoolExecutor(LIMIT) as pool:
        answers = [pool.submit(http.post, "/v2/models/counter/infer", json=body(0.2)) for _ in range(LIMIT)]
        assert [answer.result().status_code for answer in answers] == [200] * LIMIT


def test_a_full_model_queue_refuses_at_once(limited, http, grpc):
    """4 slots, max_queue_size 1: a sixth request waits for nothing and gets 503."""
    with ThreadPoolExecutor(SLOTS + 1) as pool:
        admitted = [pool.submit(http.post, "/v2/models/queued/infer", json=body(1.0)) for _ in range(SLOTS + 1)]
        wait_until(lambda: metric(limited, "fleetserve_requests_in_flight") == SLOTS + 1, what="the queue filling")
        time.sleep(0.1)  # the last one is now waiting for a slot
        started = time.monotonic()
        refused = http.post("/v2/models/queued/infer", json=body(0))
        assert time.monotonic() - started < 0.8
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "exceeds its maximum queue size" in refused.json()["error"]
        assert grpc_code(lambda: grpc.infer("queued", grpc_seconds(0))) == "StatusCode.RESOURCE_EXHAUSTED"
        assert [answer.result().status_code for answer in admitted] == [200] * (SLOTS + 1)
    stats = http.get("/v2/models/queued/stats").json()["model_stats"][0]["inference_stats"]
    assert stats["fail"]["count"] >= 2


def test_deadlines_shorter_than_the_queue_wait_drop_the_work(limited, http, grpc):
    """parameters.timeout (REST, tritonclient's `timeout`) and a gRPC deadline: 504 /
    DEADLINE_EXCEEDED, and the predict never ran; the slots are free after."""
    with ThreadPoolExecutor(SLOTS) as pool:
        holding = [pool.submit(http.post, "/v2/models/counter/infer", json=body(1.5, f"hold-{i}")) for i in range(SLOTS)]
        wait_until(lambda: len([c for c in calls(limited, "counter") if str(c[0]).startswith("hold-")]) == SLOTS,
                   what="every slot taken")
        started = time.monotonic()
        late = http.post("/v2/models/counter/infer", json=body(0, "late-rest", timeout=200_000))
        assert 0.15 < time.monotonic() - started < 1.2
        assert late.status_code == 504 and "Deadline Exceeded" in late.json()["error"], late.text
        assert grpc_code(lambda: grpc.infer("counter", grpc_seconds(0), request_id="late-grpc", client_timeout=0.3)) \
            == "StatusCode.DEADLINE_EXCEEDED"
        assert grpc_code(lambda: grpc.infer("counter", grpc_seconds(0), request_id="late-param", timeout=200_000)) \
            == "StatusCode.DEADLINE_EXCEEDED"
        assert [answer.result().status_code for answer in holding] == [200] * SLOTS
    time.sleep(0.2)
    ran = {request_id for request_id, _ in calls(limited, "counter")}
    assert not ran & {"late-rest", "late-grpc", "late-param"}, "a request dropped at its deadline was computed"
    with ThreadPoolExecutor(SLOTS) as pool:
        answers = [pool.submit(http.post, "/v2/models/counter/infer", json=body(0.5, timeout=3_000_000)) for _ in range(SLOTS)]
        assert [answer.result().status_code for answer in answers] == [200] * SLOTS
    # A deadline long enough changes nothing; a bad one is the client's error.
    assert http.post("/v2/models/counter/infer", json=body(0, timeout=0)).status_code == 200
    for bad in (-1, "soon", 1.5, True):
        refused = http.post("/v2/models/counter/infer", json=body(0, timeout=bad))
        assert refused.status_code == 400 and "parameters.timeout" in refused.json()["error"], bad


def test_a_worker_process_model_queues_by_the_same_policy(limited, http):
    """A model in a worker process has one slot per worker: requests wait for it in the data plane,
    where max_queue_size refuses and deadlines drop them before the worker sees them."""
    with ThreadPoolExecutor(2) as pool:
        holding = pool.submit(http.post, "/v2/models/pooled/infer", json=body(1.5, "hold"))
        wait_until(lambda: [c[0] for c in calls(limited, "pooled")] == ["hold"], what="the worker busy")
        waiting = pool.submit(http.post, "/v2/models/pooled/infer", json=body(0, "waiting"))
        wait_until(lambda: metric(limited, "fleetserve_requests_in_flight") == 2, what="one request queued")
        full = http.post("/v2/models/pooled/infer", json=body(0, "refused"))
        assert full.status_code == 503 and "exceeds its maximum queue size" in full.json()["error"]
        assert [holding.result().status_code, waiting.result().status_code] == [200, 200]
    with ThreadPoolExecutor(1) as pool:
        holding = pool.submit(http.post, "/v2/models/pooled/infer", json=body(1.0, "hold-again"))
        wait_until(lambda: "hold-again" in [c[0] for c in calls(limited, "pooled")], what="the worker busy")
        late = http.post("/v2/models/pooled/infer", json=body(0, "late", timeout=200_000))
        assert late.status_code == 504, late.text
        assert holding.result().status_code == 200
    time.sleep(0.2)
    assert "late" not in [c[0] for c in calls(limited, "pooled")], "a request dropped at its deadline reached the worker"
    assert http.post("/v2/models/pooled/infer", json=body(0)).status_code == 200  # the slot is free


def test_a_pipeline_passes_the_deadline_to_its_steps(limited, http):
    created = http.post("/v2/pipelines", content="""
kind: Pipeline
metadata: {name: counted}
spec:
  steps: [{name: counter}]
  output: {steps: [counter]}
""")
    assert created.status_code == 200, created.text
    try:
        with ThreadPoolExecutor(SLOTS) as pool:
            holding = [pool.submit(http.post, "/v2/models/counter/infer", json=body(1.0, f"p-hold-{i}")) for i in range(SLOTS)]
            wait_until(lambda: len([c for c in calls(limited, "counter") if str(c[0]).startswith("p-hold-")]) == SLOTS,
                       what="every slot taken")
            late = http.post("/v2/pipelines/counted/infer", json=body(0.01, "p-late", timeout=200_000))
            assert late.status_code == 504 and "Deadline Exceeded" in late.json()["error"], late.text
            assert [answer.result().status_code for answer in holding] == [200] * SLOTS
        time.sleep(0.2)
        assert not [values for _, values in calls(limited, "counter") if 0.01 in [round(v, 3) for v in values]]
        assert http.post("/v2/pipelines/counted/infer", json=body(0.01, timeout=5_000_000)).status_code == 200
    finally:
        http.delete("/v2/pipelines/counted")


def test_a_model_default_timeout_answers_504_and_frees_the_slot(limited, http):
    """default_timeout_microseconds 300 ms: a running predict's caller gets 504 at its deadline
    (the predict runs to its end); one still waiting for a slot never runs."""
    with ThreadPoolExecutor(SLOTS + 1) as pool:
        started = time.monotonic()
        running = [pool.submit(http.post, "/v2/models/timed/infer", json=body(1.0, f"run-{i}")) for i in range(SLOTS)]
        wait_until(lambda: len(calls(limited, "timed")) >= SLOTS, what="every slot taken")
        waiting = http.post("/v2/models/timed/infer", json=body(0, "waiting"))
        assert waiting.status_code == 504, waiting.text
        assert all(answer.result().status_code == 504 for answer in running)
        assert time.monotonic() - started < 0.95, "the callers waited for the predicts instead of their deadline"
    time.sleep(1.0)  # the running predicts end and give their slots back
    assert [request_id for request_id, _ in calls(limited, "timed")].count("waiting") == 0
    assert http.post("/v2/models/timed/infer", json=body(0.05, "after")).status_code == 200
    assert http.post("/v2/models/timed/infer", json=body(0, "own", timeout=5_000_000)).status_code == 200


def test_a_batch_whose_members_all_expired_never_runs(limited, http):
    with ThreadPoolExecutor(SLOTS + 3) as pool:
        holding = []
        for i in range(SLOTS):  # one at a time, so that each is a batch of its own
            holding.append(pool.submit(http.post, "/v2/models/batched/infer", json=body(1.5, f"hold-{i}")))
            wait_until(lambda: len(calls(limited, "batched")) > i, what=f"hold-{i} running")
        late = [pool.submit(http.post, "/v2/models/batched/infer", json=body(0.01, f"late-{i}", timeout=300_000))
                for i in range(3)]
        assert [answer.result().status_code for answer in late] == [504] * 3
        assert [answer.result().status_code for answer in holding] == [200] * SLOTS
    time.sleep(0.3)
    assert not [values for _, values in calls(limited, "batched") if 0.01 in [round(v, 3) for v in values]]
    assert http.post("/v2/models/batched/infer", json=body(0.01)).status_code == 200


def test_slow_clients_are_cut_off_and_do_not_delay_others(limited, http):
    """200 clients trickling a request head or body, a byte at a time: a good request is
    answered promptly, and every slow one is disconnected soon after the 1 s limit."""
    slow = []
    opened = time.monotonic()
    try:
        for i in range(200):
            connection = socket.create_connection(("127.0.0.1", limited.http_port))
            if i % 2:
                connection.sendall(b"POST /v2/models/counter/infer HTTP/1.1\r\nHost: x\r\n")
            else:
                connection.sendall(b"POST /v2/models/counter/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 200\r\n\r\n{")
            connection.setblocking(False)
            slow.append(connection)
        started = time.monotonic()
        assert http.post("/v2/models/counter/infer", json=body(0)).status_code == 200
        assert time.monotonic() - started < 2.0
        cut_off: dict[int, bytes] = {}
        first_cut = None
        deadline = time.monotonic() + 6
        while len(cut_off) < len(slow) and time.monotonic() < deadline:
            for index, connection in enumerate(slow):
                if index in cut_off:
                    continue
                try:
                    connection.send(b"x")
                    cut_off[index] = connection.recv(4096)
                except BlockingIOError:
                    pass
                except OSError:  # reset by the server
                    cut_off[index] = b""
                if index in cut_off and first_cut is None:
                    first_cut = time.monotonic()
            time.sleep(0.2)
        assert len(cut_off) == len(slow), f"{len(slow) - len(cut_off)} slow clients still connected"
        assert first_cut - opened > 0.95, "a slow client was cut off before its limit"
        heads = [answer for index, answer in cut_off.items() if index % 2]
        assert all(answer == b"" or answer.startswith(b"HTTP/1.1 408") for answer in heads)
    finally:
        for connection in slow:
            connection.close()
    assert metric(limited, "fleetserve_stalled_connections_closed_total") >= 200
    assert metric(limited, "fleetserve_requests_in_flight") == 0


def test_cancelled_requests_leak_no_slot_and_no_count(limited, http):
    """500 requests given up at random points (client timeouts, sockets closed mid-body or
    mid-answer, gRPC deadlines and cancels); then every slot and every place is free again."""
    grpc_client = triton_grpc.InferenceServerClient(limited.grpc_address)
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def note(outcome: str) -> None:
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    def give_up(seed: int) -> None:
        chance = random.Random(seed)
        model = chance.choice(("counter", "queued", "batched"))
        seconds, patience = chance.uniform(0, 0.2), chance.uniform(0.005, 0.15)
        way = chance.randrange(5)
        try:
            if way == 0:
                httpx.post(f"{limited.url}/v2/models/{model}/infer", json=body(seconds), timeout=patience, verify=False)
                note("rest answered")
            elif way in (1, 2):  # the whole request or half its body, then gone
                payload = json.dumps(body(seconds)).encode()
                head = f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(payload)}\r\n\r\n"
                with socket.create_connection(("127.0.0.1", limited.http_port)) as connection:
                    connection.sendall(head.encode() + (payload if way == 1 else payload[: len(payload) // 2]))
                    time.sleep(patience)
                note("socket closed")
            elif way == 3:
                grpc_client.infer(model, grpc_seconds(seconds), client_timeout=patience)
                note("grpc answered")
            else:
                call = grpc_client.async_infer(model, grpc_seconds(seconds), callback=lambda result, error: None)
                time.sleep(patience)
                call.cancel()
                note("grpc cancelled")
        except (httpx.TimeoutException, InferenceServerException):
            note("given up")

    try:
        with ThreadPoolExecutor(LIMIT) as pool:
            list(pool.map(give_up, range(500), timeout=120))
    finally:
        grpc_client.close()
    assert outcomes.get("given up", 0) > 50, outcomes
    wait_until(lambda: metric(limited, "fleetserve_requests_in_flight") == 0, what="no request in flight")
    time.sleep(0.5)  # the last abandoned predicts end
    # All slots of `queued` and its one queue place, and every place of the server: all admitted.
    with ThreadPoolExecutor(LIMIT) as pool:
        answers = [pool.submit(http.post, "/v2/models/queued/infer", json=body(1.0)) for _ in range(SLOTS + 1)]
        answers += [pool.submit(http.post, "/v2/models/counter/infer", json=body(1.0)) for _ in range(LIMIT - SLOTS - 1)]
        assert [answer.result().status_code for answer in answers] == [200] * LIMIT
    assert http.get("/v2/health/ready").status_code == 200


STORM_ERRORS = ("not loaded", "is unloading", "is loading", "is unavailable", "was unloaded", "is unavailable: unloaded")


def test_load_unload_storm_while_others_infer(tmp_path):
    """32 threads load and unload one model while 4 others infer on it (Triton's L0_lifecycle
    stress): every answer is a success or a clear error, and the server ends live, ready and able
    to serve the model."""
    repository = tmp_path / "repo"
    add_counting_model(repository, "storm")
    with running_server(repository, tmp_path / "server.log", {"FLEETSERVE_SHUTDOWN_GRACE": "2"}) as server:
        stop = time.monotonic() + 12
        unexpected: list[str] = []
        counts = {"load": 0, "unload": 0, "infer": 0, "infer-ok": 0}
        lock = threading.Lock()

        def check(kind: str, answer: httpx.Response) -> None:
            with lock:
                counts[kind] += 1
                if answer.status_code == 200:
                    counts["infer-ok"] += kind == "infer"
                    return
                error = answer.json().get("error", "")
                if not (answer.status_code in (400, 404, 503) and any(phrase in error for phrase in STORM_ERRORS)):
                    unexpected.append(f"{kind}: {answer.status_code} {answer.text}")

        def lifecycle(_: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for _ in range(8):
                    if time.monotonic() > stop:
                        return
                    check("load", client.post("/v2/repository/models/storm/load"))
                    check("unload", client.post("/v2/repository/models/storm/unload"))

        def infer(_: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while time.monotonic() < stop:
                    check("infer", client.post("/v2/models/storm/infer", json=body(0.01)))

        with ThreadPoolExecutor(36) as pool:
            work = [pool.submit(lifecycle, i) for i in range(32)] + [pool.submit(infer, i) for i in range(4)]
            for done in work:
                done.result(timeout=90)
        assert not unexpected, unexpected[:5]
        assert counts["load"] >= 32 and counts["infer"] >= 20, counts
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/v2/health/live").status_code == 200
            assert client.get("/v2/health/ready").status_code == 200
            assert client.post("/v2/repository/models/storm/load").status_code == 200
            assert client.post("/v2/models/storm/infer", json=body(0)).status_code == 200


def test_sigterm_answers_every_request_in_flight_within_the_grace(tmp_path):
    repository = tmp_path / "repo"
    add_counting_model(repository, "counter")
    server = start_server(repository, tmp_path / "server.log", {"FLEETSERVE_SHUTDOWN_GRACE": "10"})
    grpc_client = triton_grpc.InferenceServerClient(server.grpc_address)
    try:
        with ThreadPoolExecutor(8) as pool:
            rest = [pool.submit(httpx.post, f"{server.url}/v2/models/counter/infer", json=body(1.5, f"r{i}"), timeout=30)
                    for i in range(6)]
            grpc_calls = [pool.submit(grpc_client.infer, "counter", grpc_seconds(1.5)) for _ in range(2)]
            # All eight in the server (a request not yet connected at SIGTERM would be refused, as it must).
            wait_until(lambda: metric(server, "fleetserve_requests_in_flight") == 8, what="the eight requests in flight")
            started = time.monotonic()
            server.process.terminate()
            assert [answer.result(timeout=30).status_code for answer in rest] == [200] * 6
            assert [answer.result(timeout=30).as_numpy("slept").tolist() for answer in grpc_calls] == [[1.5]] * 2
            assert server.process.wait(15) == 0
            assert time.monotonic() - started < 10
    finally:
        grpc_client.close()
        if server.process.poll() is None:
            server.process.kill()
    assert "still running" not in server.log()


def test_sigterm_during_start_up_drops_the_loads_not_begun(tmp_path):
    """1,000 models loading: SIGTERM ends the start-up within the grace, without loading the rest."""
    repository = tmp_path / "repo"
    features = np.random.default_rng(0).normal(size=(40, 4))
    first = repository / "model-0000"
    write_settings(first, {"implementation": "sklearn"})
    joblib.dump(LogisticRegression().fit(features, features[:, 0] > 0), first / "model.joblib")
    for index in range(1, 1000):
        shutil.copytree(first, repository / f"model-{index:04d}")
    grace = 5
    server = spawn_server(repository, tmp_path / "server.log", [free_port() for _ in range(3)],
                          {"FLEETSERVE_SHUTDOWN_GRACE": str(grace)})
    try:
        wait_until(lambda: server.log().count(" loaded in ") >= 20 or server.process.poll() is not None,
                   timeout=60, what="the first loads")
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(30)
        took = time.monotonic() - started
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.log()
    assert took < grace, f"exit took {took:.1f}s"
    assert server.process.returncode == 0, log[-2000:]
    assert log.count(" loaded in ") < 1000 and "ready:" not in log
