"""Races in the memory manager, each once a real bug: evictions against requests, reloads and
lifecycle calls whose clients go away, unloads during reloads, concurrent manifest deletes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from conftest import http_client, running_server, write_settings
from test_memory import apply, delete, metric, model_manifest

PROBE_MODEL = '''
import time

import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Probe(Runtime):
    """Loads and unloads as slowly as parameters.extra says; fails a predict its unload overtook."""

    def load(self):
        time.sleep(float(self.settings.extra.get("load_seconds", 0)))
        self.alive = True

    def unload(self):
        time.sleep(float(self.settings.extra.get("unload_seconds", 0)))
        self.alive = False

    def predict(self, request):
        seconds = request.inputs[0].data.reshape(-1)
        time.sleep(float(seconds[0]))
        if not self.alive:
            raise RuntimeError("runtime was unloaded during predict")
        return self.response([Tensor("slept", seconds)], request)
'''


def probe(repository, name: str, memory: str, **extra) -> None:
    # In the server process, so the books hold the declared memory, not a worker's measured RSS.
    write_settings(repository / name, {"implementation": "probe_model.Probe", "memory": memory, "parallel_workers": 0,
                                       "parameters": {"extra": extra}})
    (repository / name / "probe_model.py").write_text(PROBE_MODEL)


def sleeping(seconds: float) -> dict:
    return {"inputs": [{"name": "seconds", "datatype": "FP32", "shape": [1], "data": [seconds]}]}


@pytest.fixture
def repository(tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    return repository


@pytest.fixture
def server(repository, tmp_path):
    """40 MiB for models, 100% overcommit."""
    env = {"FLEETSERVE_MEMORY_LIMIT": "40Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "100", "FLEETSERVE_EVICTION_WAIT": "5",
           "FLEETSERVE_CACHE_DIR": str(tmp_path / "cache"), "FLEETSERVE_SHUTDOWN_GRACE": "2"}
    with running_server(repository, tmp_path / "server.log", env) as server:
        yield server


def resident_bytes(http: httpx.Client) -> int:
    entries = http.post("/v2/repository/index").json()
    return sum(max(e["declared_memory_bytes"], e["measured_memory_bytes"]) for e in entries if e.get("resident"))


def test_an_eviction_never_stops_a_model_a_request_pinned_meanwhile(server, repository):
    """Making room evicts a (slow to unload) and b; a request reaching b during a's unload keeps b."""
    with http_client(server) as http:
        probe(repository, "a", "16Mi", unload_seconds=2)
        probe(repository, "b", "16Mi")
        for name in ("a", "b"):
            assert http.post(f"/v2/repository/models/{name}/load").status_code == 200
            assert http.post(f"/v2/models/{name}/infer", json=sleeping(0)).status_code == 200
        probe(repository, "c", "32Mi")
        with ThreadPoolExecutor(1) as pool:
            loading = pool.submit(http.post, "/v2/repository/models/c/load")
            time.sleep(0.5)  # a is being unloaded now
            answer = http.post("/v2/models/b/infer", json=sleeping(3.0))  # spans b's turn to be evicted
            assert loading.result().status_code == 200
        assert answer.status_code == 200, answer.text
        assert resident_bytes(http) <= 40 * 2**20


def test_a_reload_whose_client_left_finishes_and_is_counted(server, repository):
    with http_client(server) as http:
        probe(repository, "p", "16Mi", load_seconds=2)
        probe(repository, "q", "16Mi")
        probe(repository, "z", "16Mi")
        for name in ("p", "q", "z"):  # p is evicted by z
            assert http.post(f"/v2/repository/models/{name}/load").status_code == 200
        client = triton_grpc.InferenceServerClient(server.grpc_address)
        seconds = triton_grpc.InferInput("seconds", [1], "FP32")
        seconds.set_data_from_numpy(np.zeros(1, dtype=np.float32))
        with pytest.raises(InferenceServerException, match="Deadline"):
            client.infer("p", [seconds], client_timeout=0.5)  # p's reload goes on without its client
        client.close()
        assert http.post("/v2/models/z/infer", json=sleeping(0)).status_code == 200  # p is now least recent
        assert http.post("/v2/models/q/infer", json=sleeping(0)).status_code == 200  # needs room meanwhile
        time.sleep(2.5)
        assert resident_bytes(http) <= 40 * 2**20
        for name in ("p", "q", "z"):
            assert http.post(f"/v2/models/{name}/infer", json=sleeping(0)).status_code == 200
        assert resident_bytes(http) <= 40 * 2**20
        assert "has no attribute 'unload'" not in server.log()


def test_lifecycle_calls_whose_client_left_still_complete(server, repository):
    probe(repository, "slow-load", "8Mi", load_seconds=1.5)
    client = triton_grpc.InferenceServerClient(server.grpc_address)
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.load_model("slow-load", client_timeout=0.5)
    with http_client(server) as http:
        deadline = time.monotonic() + 10
        while not client.is_model_ready("slow-load") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.is_model_ready("slow-load")
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(http.post, "/v2/models/slow-load/infer", json=sleeping(1.5))
            time.sleep(0.3)
            with pytest.raises(InferenceServerException, match="Deadline"):
                client.unload_model("slow-load", client_timeout=0.5)
            assert busy.result().status_code == 200
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            entry = next(e for e in http.post("/v2/repository/index").json() if e["name"] == "slow-load")
            if entry["state"] == "UNAVAILABLE":
                break
            time.sleep(0.1)
        assert entry["state"] == "UNAVAILABLE" and entry["reason"] == "unloaded"
        assert metric(http, "fleetserve_models_loaded") == 0
    client.close()


def test_an_unload_during_a_reload_leaves_the_books_right(server, repository):
    """v waits for room (a and b busy) when it is unloaded: it must not end up counted as resident."""
    with http_client(server) as http:
        for name in ("a", "b", "v"):
            probe(repository, name, "16Mi" if name != "v" else "24Mi")
            assert http.post(f"/v2/repository/models/{name}/load").status_code == 200
        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(http.post, f"/v2/models/{name}/infer", json=sleeping(4.0)) for name in ("a", "b")]
            time.sleep(0.5)
            waiting = pool.submit(http.post, "/v2/models/v/infer", json=sleeping(0))
            time.sleep(0.3)
            assert http.post("/v2/repository/models/v/unload").status_code == 200
            assert all(request.result().status_code == 200 for request in busy)
            assert waiting.result().status_code in (400, 503)
        entry = next(e for e in http.post("/v2/repository/index").json() if e["name"] == "v")
        assert entry["state"] == "UNAVAILABLE" and not entry["resident"]
        evictions = metric(http, "seldon_cache_evict_count", device="cpu")
        for _ in range(2):  # a and b fit together: no more evictions between them
            for name in ("a", "b"):
                assert http.post(f"/v2/models/{name}/infer", json=sleeping(0)).status_code == 200
        assert metric(http, "seldon_cache_evict_count", device="cpu") <= evictions + 1


def test_concurrent_deletes_of_one_manifest(server, repository):
    probe(repository, "u", "8Mi")
    manifest = model_manifest("u", repository / "u", requirements=())
    assert apply(server, manifest).returncode == 0
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(httpx.request(
        "DELETE", f"{server.url}/v2/manifests", content=manifest, timeout=30))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(response.status_code for response in results) in ([200, 200], [200, 404])
    assert all("error" in response.json() for response in results if response.status_code != 200)
    assert delete(server, manifest).returncode == 1  # gone: a clean 404


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("kind: Model\nmetadata: {name: m}\nspec: {storageUri: /x, memory: 1e400}\n", "too large a memory quantity"),
        ("[" * 5000, "nesting depth exceeds the limit of 100"),  # refused before the parser recurses
    ],
)
def test_hostile_manifests(server, text, fragment):
    response = httpx.post(f"{server.url}/v2/manifests", content=text, timeout=30)
    assert response.status_code == 400 and fragment in response.json()["error"]


def test_a_partial_multi_document_apply_says_what_was_applied(server, repository):
    probe(repository, "first", "8Mi")
    text = model_manifest("first", repository / "first", requirements=()) + "---\n" + model_manifest(
        "second", repository / "missing-folder", requirements=()) + "---\n" + model_manifest(
        "third", repository / "first", requirements=())
    response = httpx.post(f"{server.url}/v2/manifests", content=text, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"].startswith("['first'] applied; then ")
    assert response.json()["error"].endswith("; not applied: ['third']")
