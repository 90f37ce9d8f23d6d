"""The memory manager with the server as a process: more models registered than fit, LRU
eviction, pinning, single-flight reloads, capacity refusals, measured costs, Seldon metrics."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import joblib
import numpy as np
import pytest
from sklearn.dummy import DummyClassifier

from conftest import ROOT, repository_index, running_server, write_settings
from test_lifecycle import SLOW_MODEL, sleep_request

ROW = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}

BIG_LOAD_MODEL = '''
import numpy as np

from fleetserve.runtime.base import Runtime


class BigLoad(Runtime):
    """Declares little memory but keeps 32 MB after loading."""

    def load(self):
        self.weights = np.ones(4 * 1024 * 1024)  # 32 MiB of float64
'''


def constant_model(folder, answer: int) -> None:
    """A classifier that always answers `answer`: which model served a request is in its reply."""
    folder.mkdir(parents=True, exist_ok=True)
    features = np.zeros((2, 4))
    joblib.dump(DummyClassifier(strategy="constant", constant=answer).fit(features, [answer, answer + 100]),
                folder / "model.joblib")


def model_manifest(name: str, folder, memory: str = "8Mi", requirements=("sklearn",)) -> str:
    requirement_lines = "".join(f"\n  - {item}" for item in requirements)
    return f"""apiVersion: mlops.seldon.io/v1alpha1
kind: Model
metadata:
  name: {name}
spec:
  storageUri: "{folder}"
  requirements:{requirement_lines}
  memory: {memory}
"""


def apply(server, text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "apply", "-f", "-", "--url", server.url],
        input=text, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def answer_of(http: httpx.Client, name: str) -> int:
    response = http.post(f"/v2/models/{name}/infer", json=ROW)
    assert response.status_code == 200, response.text
    return response.json()["outputs"][0]["data"][0]


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    text = http.get("/metrics").text
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{key}="{value}"' in line for key, value in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{{{wanted}}} in /metrics")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    for number in range(1, 14):
        constant_model(root / f"m{number:02d}", number)
    slow = root / "slow"
    # In the server process: these tests count the memory each model declares, not a worker's.
    write_settings(slow, {"implementation": "slow_model.Slow", "parallel_workers": 0})
    (slow / "slow_model.py").write_text(SLOW_MODEL)
    big = root / "big"
    write_settings(big, {"implementation": "big_model.BigLoad", "parallel_workers": 0})
    (big / "big_model.py").write_text(BIG_LOAD_MODEL)
    return root


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    """80 MiB for models, 20% overcommit: ten 8 MiB models resident, twelve registered."""
    empty = tmp_path_factory.mktemp("empty_repo")
    env = {"FLEETSERVE_MEMORY_LIMIT": "80Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "20", "FLEETSERVE_EVICTION_WAIT": "1.5",
           "FLEETSERVE_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}
    with running_server(empty, tmp_path_factory.mktemp("memory_logs") / "server.log", env) as server:
        yield server


def test_overcommit_scenario(server, http, models):
    manifests = "---\n".join(model_manifest(f"m{n:02d}", models / f"m{n:02d}") for n in range(1, 12))
    applied = apply(server, manifests)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    entries = repository_index(http)
    assert all(entries[f"m{n:02d}"]["state"] == "READY" for n in range(1, 12))
    assert sum(entry.get("resident", False) for entry in entries.values()) <= 10

    # Every model answers, with its own answer, however often they are evicted and reloaded.
    for _ in range(2):
        for number in range(1, 12):
            assert answer_of(http, f"m{number:02d}") == number
    assert metric(http, "seldon_cache_evict_count", device="cpu") >= 11
    assert metric(http, "seldon_cache_miss_count", device="cpu") >= 11
    assert metric(http, "seldon_server_replica_memory_capacity_bytes_gauge", device="cpu") == 80 * 2**20
    assert metric(http, "seldon_server_replica_memory_capacity_overcommit_bytes_gauge", device="cpu") == 96 * 2**20
    loaded = metric(http, "seldon_loaded_model_memory_bytes_gauge", model_internal="m11_1")
    evicted = metric(http, "seldon_evicted_model_memory_bytes_gauge", model_internal="m01_1")
    assert loaded == 8 * 2**20 and evicted == 8 * 2**20
    assert metric(http, "fleetserve_model_reload_duration_seconds_count") >= 11

    # A twelfth registers (96 MiB with overcommit); a thirteenth is refused, naming the figures.
    assert apply(server, model_manifest("m12", models / "m12")).returncode == 0
    refused = apply(server, model_manifest("m13", models / "m13"))
    assert refused.returncode == 1
    assert "registered models take 96.0 MiB of 96.0 MiB (80.0 MiB limit + 20% overcommit)" in refused.stdout

    # Many concurrent requests across evicted models: every one answered, correctly.
    names = [f"m{n:02d}" for n in range(1, 13)] * 20
    random.Random(7).shuffle(names)
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda name: (name, http.post(f"/v2/models/{name}/infer", json=ROW)), names))
    for name, response in answers:
        assert response.status_code == 200, response.text
        assert response.json()["outputs"][0]["data"] == [int(name[1:])]


def test_first_model_of_a_framework_is_not_charged_for_its_import(http):
    """m01 imported scikit-learn's modules when it loaded; its measured cost must not include them."""
    first, second = (repository_index(http)[name]["measured_memory_bytes"] for name in ("m01", "m02"))
    assert 0 < first < 2**20 and 0 < second < 2**20, (first, second)


def test_a_measured_cost_that_breaks_the_books_is_refused_and_otherwise_wins(server, http, models):
    """`big` declares 1 MiB and keeps 32 MiB once loaded: with 80 MiB registered, 32 more break the
    96 MiB budget, and the load is undone, with the figures; with room, its measured cost counts."""
    big = model_manifest("big", models / "big", memory="1Mi", requirements=())
    for name in ("m11", "m12"):  # 80 MiB registered
        assert delete(server, model_manifest(name, models / name)).returncode == 0
    refused = apply(server, big)
    assert refused.returncode == 1
    assert re.search(r"model 'big' took 32\.\d MiB once loaded: registered models take 11\d\.\d MiB of 96\.0 MiB "
                     r"\(80\.0 MiB limit \+ 20% overcommit\); it was unloaded", refused.stdout), refused.stdout
    assert repository_index(http)["big"]["state"] == "UNAVAILABLE"
    room = ("m08", "m09", "m10")
    for name in room:  # 56 MiB registered
        assert delete(server, model_manifest(name, models / name)).returncode == 0
    assert apply(server, big).returncode == 0
    entry = repository_index(http)["big"]
    assert entry["declared_memory_bytes"] == 2**20
    assert entry["measured_memory_bytes"] >= 32 * 2**20
    assert "declares 1.0 MiB of memory but loading it took" in server.log()
    assert delete(server, big).returncode == 0
    assert apply(server, "---\n".join(model_manifest(name, models / name) for name in room)).returncode == 0


def delete(server, text: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "delete", "-f", "-", "--url", server.url],
        input=text, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def test_reload_is_single_flight(http):
    """Twenty requests for one evicted model: one reload, and all of them served."""
    victim = min(
        (entry for entry in repository_index(http).values() if entry["state"] == "READY" and not entry["resident"]),
        key=lambda entry: entry["name"],
    )["name"]
    reloads_before = metric(http, "fleetserve_model_reload_duration_seconds_count")
    misses_before = metric(http, "seldon_cache_miss_count", device="cpu")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: answer_of(http, victim), range(20)))
    assert answers == [int(victim[1:])] * 20
    assert metric(http, "fleetserve_model_reload_duration_seconds_count") == reloads_before + 1
    assert metric(http, "seldon_cache_miss_count", device="cpu") == misses_before + 1


def test_a_busy_model_is_never_evicted_and_loads_wait_then_503(server, http, models):
    """Two slow 40 MiB models busy fill the 80 MiB; loading a third waits, then answers 503."""
    for name in ("m02", "m03", "m04", "m05", "m06", "m07", "m08", "m09", "m10"):
        assert delete(server, model_manifest(name, models / name)).returncode == 0
    manifests = "---\n".join(model_manifest(name, models / "slow", memory="40Mi", requirements=()) for name in ("slow-a", "slow-b"))
    assert apply(server, manifests).returncode == 0
    with ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(http.post, f"/v2/models/{name}/infer", json=sleep_request(6.0)) for name in ("slow-a", "slow-b")]
        time.sleep(0.5)  # both requests are inside their models now
        started = time.monotonic()
        response = http.post("/v2/models/m01/infer", json=ROW)
        waited = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert "is held by models serving requests" in response.json()["error"]
        assert waited >= 1.0
        loading = httpx.post(f"{server.url}/v2/manifests", content=model_manifest("m-new", models / "m13"), timeout=30)
        assert loading.status_code == 503 and "is held by models serving requests" in loading.json()["error"]
        entries = repository_index(http)
        assert entries["slow-a"]["resident"] and entries["slow-b"]["resident"]
        assert all(request.result().status_code == 200 for request in busy)
    # Once they are idle, the same request evicts one of them and is served.
    assert answer_of(http, "m01") == 1


@pytest.mark.parametrize("flag", ["--memory-limit", "--gpu-memory-limit"])
def test_memory_limit_flags_are_validated(tmp_path, flag):
    result = subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", "start", str(tmp_path), flag, "lots"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )
    assert result.returncode != 0 and re.search(f"{flag}: 'lots' is not a memory quantity", result.stderr)


COUNTED_LOAD_MODEL = '''
from pathlib import Path

import numpy as np

from fleetserve.runtime.base import Runtime


class CountedLoad(Runtime):
    """Counts its loads in a file; imports a module that keeps 24 MiB, and keeps 8 MiB itself."""

    def load(self):
        with open(Path(self.settings.folder) / "loads", "a") as loads:
            loads.write("load\\n")
        from . import framework  # noqa: F401
        self.weights = np.ones(1024 * 1024)
'''


def test_a_model_loads_once_and_its_imports_are_not_its_memory(tmp_path):
    """A custom runtime's first load used to run twice (to tell the import from the model): its
    side effects happened twice. Now one load, with what its imports took measured apart."""
    repository = tmp_path / "repo"
    write_settings(repository / "counted", {"implementation": "counted_model.CountedLoad", "parallel_workers": 0})
    (repository / "counted" / "counted_model.py").write_text(COUNTED_LOAD_MODEL)
    (repository / "counted" / "framework.py").write_text("PAYLOAD = bytearray(24 * 1024 * 1024)\n")
    with running_server(repository, tmp_path / "server.log") as server:
        measured = repository_index(httpx.Client(base_url=server.url))["counted"]["measured_memory_bytes"]
    assert (repository / "counted" / "loads").read_text() == "load\n"
    assert 8 * 2**20 <= measured < 16 * 2**20, measured / 2**20


def test_an_undeclared_model_is_estimated_from_its_artifacts_before_it_loads(tmp_path):
    """No `memory` declared: its artifacts' size (times what its runtime kept per artifact byte
    before) is its cost until it is measured, so one that cannot fit is refused before it loads."""
    repository = tmp_path / "repo"
    constant_model(repository / "small", 1)
    write_settings(repository / "small", {"implementation": "sklearn"})
    padded = tmp_path / "padded"
    constant_model(padded, 2)
    with open(padded / "weights.bin", "wb") as weights:  # sparse: 200 MiB of size, no disk
        weights.truncate(200 * 2**20)
    env = {"FLEETSERVE_MEMORY_LIMIT": "64Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "0"}
    with running_server(repository, tmp_path / "server.log", env) as server, httpx.Client(base_url=server.url) as http:
        refused = apply(server, model_manifest("padded", padded, memory="0"))
        assert refused.returncode == 1
        assert re.search(r"model 'padded' needs \d+\.\d (MiB|GiB), estimated from its artifacts, more than the memory "
                         r"limit of 64\.0 MiB", refused.stdout), refused.stdout
        assert "model padded loaded" not in server.log()
        # Declared memory is taken at its word until the load measures it; a reload of a model
        # over half the budget is no overrun, though old and new are both registered meanwhile.
        for _ in range(2):
            applied = apply(server, model_manifest("padded", padded, memory="40Mi"))
            assert applied.returncode == 0, applied.stdout
            assert answer_of(http, "padded") == 2
