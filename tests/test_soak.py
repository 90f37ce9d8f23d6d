"""A bounded soak: inference over more models than fit, while others are deleted and re-applied.
Every answer must be right; a model being churned may answer a clear error, never a wrong class."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import pytest

from conftest import http_client, running_server
from test_memory import ROW, apply, constant_model, delete, metric, model_manifest

STABLE = [f"s{n}" for n in range(1, 7)]
CHURNED = ["c7", "c8"]
SECONDS = 10


@pytest.fixture
def server(tmp_path):
    """40 MiB for models: five of the eight 8 MiB models fit at once."""
    env = {"FLEETSERVE_MEMORY_LIMIT": "40Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "100",
           "FLEETSERVE_CACHE_DIR": str(tmp_path / "cache")}
    repository = tmp_path / "repo"
    repository.mkdir()
    with running_server(repository, tmp_path / "server.log", env) as server:
        yield server


def test_soak(server, tmp_path):
    manifests = {}
    for name in STABLE + CHURNED:
        constant_model(tmp_path / name, int(name[1:]))
        manifests[name] = model_manifest(name, tmp_path / name)
    assert apply(server, "---\n".join(manifests.values())).returncode == 0

    deadline = time.monotonic() + SECONDS
    outcomes: Counter = Counter()
    wrong: list = []

    def infer(seed: int) -> None:
        rng = random.Random(seed)
        with http_client(server) as http:
            while time.monotonic() < deadline:
                name = rng.choice(STABLE + CHURNED)
                response = http.post(f"/v2/models/{name}/infer", json=ROW)
                if response.status_code == 200:
                    answer = response.json()["outputs"][0]["data"]
                    outcomes["ok"] += 1
                    if answer != [int(name[1:])]:
                        wrong.append((name, answer))
                elif name in CHURNED and response.status_code in (503, 404) and "error" in response.json():
                    outcomes["churned away"] += 1
                else:
                    wrong.append((name, response.status_code, response.text))

    def churn() -> None:
        while time.monotonic() < deadline:
            for name in CHURNED:
                assert delete(server, manifests[name]).returncode == 0
                assert apply(server, manifests[name]).returncode == 0
                outcomes["churns"] += 1

    with http_client(server) as http:
        evictions_before = metric(http, "seldon_cache_evict_count", device="cpu")
    threads = [threading.Thread(target=infer, args=(seed,)) for seed in range(6)] + [threading.Thread(target=churn)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 60)
    assert not wrong, wrong[:5]
    assert outcomes["ok"] > 200 and outcomes["churns"] >= 2, outcomes
    with http_client(server) as http:
        assert metric(http, "seldon_cache_evict_count", device="cpu") > evictions_before
        for name in STABLE + CHURNED:  # all still there and right afterwards
            assert http.post(f"/v2/models/{name}/infer", json=ROW).json()["outputs"][0]["data"] == [int(name[1:])]
