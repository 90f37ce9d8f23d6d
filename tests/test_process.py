"""The server as a process: settings from the environment, ports in use, and how it stops."""

from __future__ import annotations

import queue
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from conftest import Server, free_port, spawn_server, start_server
from test_lifecycle import add_slow_model, sleep_request


@pytest.fixture
def slow_repository(tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    add_slow_model(repository, "slow")
    return repository


def call_in_background(function, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def call():
        try:
            result["value"] = function(*args, **kwargs)
        except Exception as error:
            result["error"] = error

    thread = threading.Thread(target=call)
    thread.start()
    return thread, result


def test_settings_from_environment_and_sigterm_drains(slow_repository, tmp_path):
    """Ports come from FLEETSERVE_* variables; SIGTERM lets the in-flight request finish, then exits 0."""
    server = start_server(slow_repository, tmp_path / "server.log", ports_in_env=True)
    try:
        assert httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").status_code == 200
        caller, result = call_in_background(
            httpx.post, f"{server.url}/v2/models/slow/infer", json=sleep_request(1.5), timeout=30
        )
        time.sleep(0.5)  # the request is now inside the model
        server.process.terminate()
        caller.join(30)
        assert result["value"].status_code == 200
        assert result["value"].json()["outputs"][0]["data"] == [1.5]
        assert server.process.wait(30) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    assert "fleetserve stopped" in server.log()


def test_an_idle_stream_does_not_hold_shutdown(slow_repository, tmp_path):
    """An open ModelStreamInfer stream ends when the server stops, instead of using up the grace period."""
    server = start_server(slow_repository, tmp_path / "server.log", extra_env={"FLEETSERVE_SHUTDOWN_GRACE": "30"})
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        seconds = triton_grpc.InferInput("seconds", [1], "FP32")
        seconds.set_data_from_numpy(np.array([0.0], dtype=np.float32))
        client.async_stream_infer("slow", [seconds])
        result, error = answers.get(timeout=10)
        assert error is None and result.as_numpy("slept").tolist() == [0.0]
        started = time.monotonic()
        assert server.stop(timeout=20) == 0
        assert time.monotonic() - started < 15, "the idle stream held the shutdown"
    finally:
        client.stop_stream()
        client.close()
        if server.process.poll() is None:
            server.process.kill()


def test_a_stuck_predict_does_not_hold_exit_past_the_grace(tmp_path):
    add_slow_model(tmp_path / "repo", "slow", parallel_workers=0)  # a worker thread, which nothing can stop
    server = start_server(tmp_path / "repo", tmp_path / "server.log", extra_env={"FLEETSERVE_SHUTDOWN_GRACE": "1"})
    try:
        caller, _ = call_in_background(httpx.post, f"{server.url}/v2/models/slow/infer", json=sleep_request(20), timeout=30)
        time.sleep(0.5)
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(15)
        assert time.monotonic() - started < 15
        assert "predict(s) still running; exiting anyway" in server.log()
        caller.join(30)
    finally:
        if server.process.poll() is None:
            server.process.kill()


@pytest.mark.parametrize("taken", ["http", "grpc"])
def test_a_port_in_use_fails_the_start(slow_repository, tmp_path, taken):
    first = start_server(slow_repository, tmp_path / "first.log")
    try:
        ports = [free_port(), free_port(), free_port()]
        ports[0 if taken == "http" else 1] = first.http_port if taken == "http" else first.grpc_port
        second: Server = spawn_server(slow_repository, tmp_path / "second.log", ports)
        assert second.process.wait(60) == 1
        if taken == "grpc":
            assert "cannot serve gRPC" in second.log()
        # The first server still owns its ports and answers.
        client = triton_grpc.InferenceServerClient(first.grpc_address)
        assert client.is_model_ready("slow")
        client.close()
    finally:
        assert first.stop() == 0


def test_a_missing_repository_fails_the_start(tmp_path):
    server = spawn_server(tmp_path / "no-such-folder", tmp_path / "server.log", [free_port() for _ in range(3)])
    assert server.process.wait(60) == 1
    assert "cannot read the model repository" in server.log() and "no-such-folder" in server.log()
