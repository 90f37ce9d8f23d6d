"""Model lifecycle through the repository API, start-up with broken models, and graceful shutdown.

These tests change what is loaded, so they run their own server over their own repository.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from conftest import build_repository, http_client, iris_json, repository_index, running_server, write_settings

SLOW_MODEL = '''
import time

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Slow(Runtime):
    """Sleeps in load() for parameters.extra.load_seconds, and in predict() for its input's value."""

    def load(self):
        time.sleep(float(self.settings.extra.get("load_seconds", 0)))

    def predict(self, request):
        seconds = request.inputs[0].data.reshape(1)
        time.sleep(float(seconds[0]))
        return self.response([Tensor("slept", seconds)], request)
'''


FLAKY_MODEL = '''
from fleetserve.runtime.base import Runtime


class Flaky(Runtime):
    """Fails to load while a file named `break` is in its folder; echoes its input otherwise."""

    def load(self):
        if (self.settings.folder / "break").exists():
            raise RuntimeError("artifact broken")

    def predict(self, request):
        return self.response(request.inputs, request)
'''

CYCLIC_MODEL = '''
import weakref

from fleetserve.runtime.base import Runtime


class Payload:
    pass


def record(path):
    with open(path, "a") as log:
        log.write("collected\\n")


class Cyclic(Runtime):
    """Holds a reference cycle; adds a line to `collected` in its folder when the garbage collector frees it."""

    def load(self):
        self.payload = Payload()
        self.payload.owner = self
        weakref.finalize(self.payload, record, self.settings.folder / "collected")
'''


def add_model(repository, name: str, module: str, source: str, class_name: str) -> None:
    write_settings(repository / name, {"implementation": f"{module}.{class_name}"})
    (repository / name / f"{module}.py").write_text(source)


def sleep_request(seconds: float) -> dict:
    return {"inputs": [{"name": "seconds", "datatype": "FP32", "shape": [1], "data": [seconds]}]}


def add_slow_model(repository, name: str, load_seconds: float = 0, **settings) -> None:
    write_settings(repository / name, {"implementation": "slow_model.Slow", "parameters": {"extra": {"load_seconds": load_seconds}},
                                       **settings})
    (repository / name / "slow_model.py").write_text(SLOW_MODEL)


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory):
    repository = build_repository(tmp_path_factory.mktemp("lifecycle_repo"))
    add_slow_model(repository, "slow")
    add_model(repository, "flaky", "flaky_model", FLAKY_MODEL, "Flaky")
    add_model(repository, "cyclic", "cyclic_model", CYCLIC_MODEL, "Cyclic")
    # Settings that are valid JSON but wrong in shape: each must fail alone, never the whole start.
    write_settings(repository / "bad-parameters", {"inputs": [{"name": "x", "parameters": 5}]})
    write_settings(repository / "scalar-shape", {"inputs": [{"name": "x", "shape": 3}]})
    write_settings(repository / "inputs-not-list", {"inputs": 5})
    write_settings(repository / "typo-datatype", {"inputs": [{"name": "x", "datatype": "FLOAT32", "shape": [-1]}]})
    write_settings(repository / "no-shared" / "1", {"implementation": "sklearn"})
    (repository / "no-shared" / "2").mkdir()
    write_settings(repository / "same-version" / "1", {"implementation": "sklearn", "parameters": {"version": "1"}})
    write_settings(repository / "same-version" / "2", {"implementation": "sklearn", "parameters": {"version": "1"}})
    write_settings(repository / "path-version", {"implementation": "sklearn", "parameters": {"version": "../../etc"}})
    with running_server(repository, tmp_path_factory.mktemp("lifecycle_logs") / "server.log") as server:
        yield server


@pytest.fixture
def http(lifecycle_server):
    with http_client(lifecycle_server) as client:
        yield client


def test_broken_models_are_unavailable_with_reasons(lifecycle_server, http):
    index = repository_index(http)
    assert index["iris"]["state"] == "READY"
    assert index["bad-json"]["state"] == "UNAVAILABLE" and "not valid JSON" in index["bad-json"]["reason"]
    assert index["bad-load"]["state"] == "UNAVAILABLE" and "weights file is corrupt" in index["bad-load"]["reason"]
    needs_gpu = index["needs-gpu"]["reason"]
    assert "['sklearn', 'tensorrt']" in needs_gpu and "'xgboost'" in needs_gpu  # both lists named
    assert "weights file is corrupt" in lifecycle_server.log()
    assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("bad-parameters", "'parameters' must be an object"),
        ("scalar-shape", "shape must be a list of integers"),
        ("inputs-not-list", "'inputs' must be a list"),
        ("typo-datatype", "unknown datatype 'FLOAT32'"),
        ("no-shared", "no model-settings.json in it or in"),
        ("same-version", "1/ and 2/ both declare version 1"),
        ("path-version", "invalid version '../../etc'"),
    ],
)
def test_wrong_settings_fail_alone(http, name, fragment):
    entry = repository_index(http)[name]
    assert entry["state"] == "UNAVAILABLE" and fragment in entry["reason"], entry


def test_index_ready_filter_and_empty_body(http):
    everything = http.post("/v2/repository/index", content=b"").json()
    ready = http.post("/v2/repository/index", json={"ready": True}).json()
    assert {entry["state"] for entry in ready} == {"READY"}
    assert len(ready) < len(everything)


def test_unload_then_load_over_http(http):
    assert http.post("/v2/repository/models/iris/unload").status_code == 200
    assert repository_index(http)["iris"].items() >= {"name": "iris", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}.items()
    refused = http.post("/v2/models/iris/infer", json=iris_json())
    assert refused.status_code == 503 and "unloaded" in refused.json()["error"]
    assert http.get("/v2/models/iris/ready").status_code == 503
    assert http.post("/v2/repository/models/iris/unload").status_code == 404

    assert http.post("/v2/repository/models/iris/load").status_code == 200
    assert repository_index(http)["iris"]["state"] == "READY"
    assert http.post("/v2/models/iris/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]


def test_unload_then_load_over_grpc(lifecycle_server):
    client = triton_grpc.InferenceServerClient(lifecycle_server.grpc_address)
    client.unload_model("iris-xgboost")
    assert not client.is_model_ready("iris-xgboost")
    client.load_model("iris-xgboost")
    assert client.is_model_ready("iris-xgboost")
    client.close()


def test_load_a_folder_added_after_start(lifecycle_server, http):
    shutil.copytree(lifecycle_server.repository / "iris", lifecycle_server.repository / "iris-late")
    (lifecycle_server.repository / "iris-late" / "model-settings.json").write_text(
        (lifecycle_server.repository / "iris" / "model-settings.json").read_text().replace('"iris"', '"iris-late"')
    )
    assert repository_index(http)["iris-late"] == {"name": "iris-late", "state": "UNAVAILABLE", "reason": "not loaded"}
    assert http.post("/v2/repository/models/iris-late/load").status_code == 200
    assert http.post("/v2/models/iris-late/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]


def test_load_errors(http):
    missing = http.post("/v2/repository/models/nowhere/load")
    assert missing.status_code == 404 and "nowhere" in missing.json()["error"]
    bad_name = http.post("/v2/repository/models/..%2Fetc/load")
    assert bad_name.status_code in (400, 404) and "error" in bad_name.json()
    broken = http.post("/v2/repository/models/bad-load/load")
    assert broken.status_code == 400 and "corrupt" in broken.json()["error"]


def test_loading_state_is_visible(lifecycle_server, http):
    add_slow_model(lifecycle_server.repository, "slow-load", load_seconds=1.5)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(http.post, "/v2/repository/models/slow-load/load")
        states = set()
        while not loading.done():
            states.add(repository_index(http).get("slow-load", {}).get("state"))
        assert loading.result().status_code == 200
    assert "LOADING" in states
    assert repository_index(http)["slow-load"]["state"] == "READY"


def test_unload_waits_for_in_flight_requests(http):
    """A model is never unloaded under a request: UNLOADING is visible, the request completes."""
    with ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(http.post, "/v2/models/slow/infer", json=sleep_request(1.5))
        time.sleep(0.3)  # the request is now inside the model
        unloading = pool.submit(http.post, "/v2/repository/models/slow/unload")
        states = set()
        while not unloading.done():
            states.add(repository_index(http)["slow"]["state"])
        assert in_flight.result().status_code == 200
        assert unloading.result().status_code == 200
    assert "UNLOADING" in states
    assert http.post("/v2/repository/models/slow/load").status_code == 200


def test_slow_model_does_not_stall_others(http):
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(http.post, "/v2/models/slow/infer", json=sleep_request(2.0))
        for _ in range(5):
            assert http.post("/v2/models/iris/infer", json=iris_json()).status_code == 200
        assert not slow.done(), "fast requests waited for the slow model"
        assert slow.result().status_code == 200


def test_failed_reload_keeps_the_serving_version(lifecycle_server, http):
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [7]}]}
    assert http.post("/v2/models/flaky/infer", json=body).status_code == 200
    marker = lifecycle_server.repository / "flaky" / "break"
    marker.touch()
    try:
        refused = http.post("/v2/repository/models/flaky/load")
        assert refused.status_code == 400
        assert "artifact broken" in refused.json()["error"] and "go on serving" in refused.json()["error"]
        assert repository_index(http)["flaky"]["state"] == "READY"
        assert http.post("/v2/models/flaky/infer", json=body).json()["outputs"][0]["data"] == [7]
    finally:
        marker.unlink()
    assert http.post("/v2/repository/models/flaky/load").status_code == 200


def test_unload_during_first_load_waits_for_it(lifecycle_server, http):
    add_slow_model(lifecycle_server.repository, "slow-first", load_seconds=1.0)
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(http.post, "/v2/repository/models/slow-first/load")
        while repository_index(http).get("slow-first", {}).get("state") != "LOADING":
            assert not loading.done()
        unloaded = http.post("/v2/repository/models/slow-first/unload")
        assert loading.result().status_code == 200
    assert unloaded.status_code == 200, unloaded.text
    assert repository_index(http)["slow-first"]["reason"] == "unloaded"


def test_one_busy_model_cannot_take_every_worker(http):
    """More slow requests at once than a model may run together still leave threads for others."""
    with ThreadPoolExecutor(10) as pool:
        slow = [pool.submit(http.post, "/v2/models/slow/infer", json=sleep_request(1.5)) for _ in range(10)]
        time.sleep(0.3)  # the slow requests now hold their worker threads
        echo = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [1]}]}
        assert http.post("/v2/models/echo/infer", json=echo).status_code == 200
        assert not any(request.done() for request in slow), "the echo request waited for the slow model"
        assert all(request.result().status_code == 200 for request in slow)


def test_cancelled_request_keeps_the_model_pinned(lifecycle_server, http):
    """A gRPC deadline cancels the call, not the predict running on its worker: unload waits for it."""
    client = triton_grpc.InferenceServerClient(lifecycle_server.grpc_address)
    seconds = triton_grpc.InferInput("seconds", [1], "FP32")
    seconds.set_data_from_numpy(np.array([2.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="Deadline"):
        client.infer("slow", [seconds], client_timeout=0.5)
    client.close()
    with ThreadPoolExecutor(1) as pool:
        started = time.monotonic()
        unloading = pool.submit(http.post, "/v2/repository/models/slow/unload")
        states = set()
        while not unloading.done():
            states.add(repository_index(http)["slow"]["state"])
        assert unloading.result().status_code == 200
    assert "UNLOADING" in states and time.monotonic() - started > 0.5
    assert http.post("/v2/repository/models/slow/load").status_code == 200


def test_unload_frees_reference_cycles(lifecycle_server, http):
    marker = lifecycle_server.repository / "cyclic" / "collected"
    before = len(marker.read_text().splitlines()) if marker.exists() else 0  # the measured load's warm-up copy
    assert http.post("/v2/repository/models/cyclic/unload").status_code == 200
    deadline = time.monotonic() + 10  # the heap is refrozen (and collected) a quiet second later
    while time.monotonic() < deadline and (len(marker.read_text().splitlines()) if marker.exists() else 0) == before:
        time.sleep(0.1)
    after = len(marker.read_text().splitlines()) if marker.exists() else 0
    assert after == before + 1, "the unloaded model's reference cycle was never collected"


EDITABLE_MODEL = '''
from fleetserve.codecs import encode_tensor
from fleetserve.runtime.base import Runtime

VALUE = "{value}"


class Editable(Runtime):
    def predict(self, request):
        return self.response([encode_tensor("value", [VALUE])], request)
'''


def test_reload_picks_up_edited_code(lifecycle_server, http):
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1], "data": [0]}]}
    for value in ("first", "second"):
        add_model(lifecycle_server.repository, "editable", "editable_model", EDITABLE_MODEL.format(value=value), "Editable")
        assert http.post("/v2/repository/models/editable/load").status_code == 200
        assert http.post("/v2/models/editable/infer", json=body).json()["outputs"][0]["data"] == [value]


TIMED_LOAD_MODEL = '''
import time

from fleetserve.runtime.base import Runtime


class TimedLoad(Runtime):
    """Takes a second to load, and writes when each load ran to `spans` in its folder."""

    def load(self):
        started = time.time()
        time.sleep(1.0)
        with open(self.settings.folder / "spans", "a") as spans:
            spans.write(f"{started} {time.time()}\\n")
'''


def test_loads_of_different_models_run_concurrently(lifecycle_server, http):
    for name in ("timed-a", "timed-b"):
        add_model(lifecycle_server.repository, name, "timed_model", TIMED_LOAD_MODEL, "TimedLoad")
    with ThreadPoolExecutor(2) as pool:
        loads = [pool.submit(http.post, f"/v2/repository/models/{name}/load") for name in ("timed-a", "timed-b")]
        assert [load.result().status_code for load in loads] == [200, 200]
    spans = {
        name: [tuple(map(float, line.split())) for line in (lifecycle_server.repository / name / "spans").read_text().splitlines()]
        for name in ("timed-a", "timed-b")
    }
    overlapping = any(a_start < b_end and b_start < a_end for a_start, a_end in spans["timed-a"] for b_start, b_end in spans["timed-b"])
    assert overlapping, spans
