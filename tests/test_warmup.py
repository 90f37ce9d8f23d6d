"""Warm-up requests (model-settings.json `warmup`, Triton's model_warmup idea): answered after
every load, a reload after eviction included, before the model takes traffic, and not counted
as traffic."""

from __future__ import annotations

import httpx
import pytest

from conftest import http_client, repository_index, running_server, write_settings

COUNTING_MODEL = '''
from pathlib import Path

from fleetserve.runtime.base import Runtime


class Counting(Runtime):
    """Writes a line per predict into calls.log in its folder: the warm-ups' and the requests'."""

    def load(self):
        self.calls = Path(self.settings.folder) / "calls.log"

    def predict(self, request):
        data = request.inputs[0].data
        with self.calls.open("a") as calls:
            calls.write(f"{data.tolist()}\\n")
        if data.tolist() == [[666.0]]:
            raise ValueError("the devil's number")
        return self.response(request.inputs, request)
'''


def model(folder, warmup, memory: str = "30Mi") -> None:
    write_settings(folder, {"implementation": "model.Counting", "parallel_workers": 0, "memory": memory,
                            "warmup": warmup})
    (folder / "model.py").write_text(COUNTING_MODEL)


def sample(value: float, **extra) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [value]}], **extra}


def calls(folder) -> list[str]:
    return (folder / "calls.log").read_text().splitlines() if (folder / "calls.log").exists() else []


def test_warmup_runs_after_each_load_and_reload_before_traffic(tmp_path):
    repository = tmp_path / "repo"
    model(repository / "warm", [sample(1.0, count=2), sample(2.0)])
    model(repository / "other", [])
    model(repository / "cursed", [sample(666.0)])
    model(repository / "malformed", [{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1]}]}])
    # Room for one of the 30 MiB models at a time: each request for the other evicts the one there.
    env = {"FLEETSERVE_MEMORY_LIMIT": "50Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "200"}
    with running_server(repository, tmp_path / "server.log", env) as server, http_client(server) as http:
        assert calls(repository / "warm") == ["[[1.0]]", "[[1.0]]", "[[2.0]]"]  # before it was ready
        # Each request for the other evicts "warm" (which of the two loaded last at start varies), so
        # each request for "warm" finds it evicted: reloaded, warmed up again, then answered.
        for name in ("other", "warm", "other", "warm"):
            answer = http.post(f"/v2/models/{name}/infer", json=sample(5.0))
            assert answer.status_code == 200, answer.text
        warmups = ["[[1.0]]", "[[1.0]]", "[[2.0]]"]
        assert calls(repository / "warm") == [*warmups, *warmups, "[[5.0]]", *warmups, "[[5.0]]"]
        assert server.log().count("model warm warmed up with 3 request(s)") == 3
        stats = http.get("/v2/models/warm/stats").json()["model_stats"][0]
        assert stats["inference_count"] == 2  # the requests, not the warm-ups
        index = repository_index(http)
        assert index["cursed"]["state"] == "UNAVAILABLE"
        assert "warmup request 1 of 1 failed" in index["cursed"]["reason"] and "devil" in index["cursed"]["reason"]
        assert index["malformed"]["state"] == "UNAVAILABLE" and "warmup sample 1" in index["malformed"]["reason"]
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_malformed_warmups_are_refused_with_their_reason(tmp_path):
    from fleetserve.errors import ModelLoadError
    from fleetserve.settings import ModelSettings

    tensor = {"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}
    for warmup, reason in (({"inputs": []}, "must be a list of V2 requests"), ([{"inputs": []}], "needs 'inputs'"),
                           ([{"inputs": [{**tensor, "name": 7}]}], "needs 'inputs'"),
                           ([{"inputs": [tensor], "parameters": [1]}], "'parameters' must be an object"),
                           ([{"inputs": [tensor], "count": 0}], "'count' must be an integer"),
                           ([{"inputs": [{**tensor, "datatype": "FP99"}]}], "warmup sample 1")):
        with pytest.raises(ModelLoadError, match=reason):
            ModelSettings.parse({"implementation": "sklearn", "warmup": warmup}, tmp_path, "m")
