"""Reload latency of evicted models and server RSS under the memory manager.

Builds a repository of N small sklearn models (LogisticRegression on iris, each declaring 1Mi),
serves it with room for about a tenth of them, then sends one request at a time to models
chosen so that every request finds its model evicted (LRU + round-robin). Compares with
requests to one resident model, reads the server's reload histogram, and samples the server's
RSS. Also starts a server on an empty repository for a baseline RSS. See bench/README.md.

    .venv/bin/python bench/reload.py [--models 1000] [--limit 100Mi] [--requests 1000]
"""

from __future__ import annotations

import argparse, datetime, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

import httpx, joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
FLEETSERVE = ROOT / ".venv" / "bin" / "fleetserve"
ROW = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
SETTINGS = ('{"implementation": "sklearn", "memory": "1Mi", "parameters": {"uri": "./model.joblib"},'
            ' "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}]}')
PAGE = os.sysconf("SC_PAGE_SIZE")
servers: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def build_repository(root: Path, count: int) -> None:
    root.mkdir()
    iris = load_iris()
    model_file = root / "_model.joblib"
    joblib.dump(LogisticRegression(max_iter=500).fit(iris.data, iris.target), model_file)
    for i in range(count):
        folder = root / f"m{i:04d}"
        folder.mkdir()
        shutil.copyfile(model_file, folder / "model.joblib")
        (folder / "model-settings.json").write_text(SETTINGS)
    model_file.unlink()


def start_server(repo: Path, limit: str, overcommit: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    """Start fleetserve on loopback; return it, its URL and the seconds until /v2/health/ready."""
    port = free_port()
    command = [str(FLEETSERVE), "start", str(repo), "--host", "127.0.0.1", "--http-port", str(port),
               "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
               "--memory-limit", limit, "--overcommit-percent", str(overcommit), "--log-level", "warning"]
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    servers.append(server)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < 180:
        if server.poll() is not None:
            sys.exit(f"server exited with {server.returncode}; log:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return server, url, time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    sys.exit(f"server not ready after 180 s; log:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return pick(0.5), pick(0.9), pick(0.99)


def reload_histogram(text: str) -> tuple[dict[float, float], float, float]:
    """fleetserve_model_reload_duration_seconds summed over models: cumulative buckets, sum, count."""
    buckets: dict[float, float] = {}
    total = count = 0.0
    for line in text.splitlines():
        if not line.startswith("fleetserve_model_reload_duration_seconds"):
            continue
        value = float(line.rsplit(" ", 1)[1])
        if line.startswith("fleetserve_model_reload_duration_seconds_bucket"):
            bound = float(re.search(r'le="([^"]+)"', line).group(1))
            buckets[bound] = buckets.get(bound, 0) + value
        elif line.startswith("fleetserve_model_reload_duration_seconds_sum"):
            total += value
        elif line.startswith("fleetserve_model_reload_duration_seconds_count"):
            count += value
    return buckets, total, count


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding q."""
    bounds = sorted(buckets)
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(buckets[bound] - below, 1e-9)
        lower, below = bound, buckets[bound]
    return float("nan")


def counter(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name + "{") or l.startswith(name + " "))


def timed_requests(http: httpx.Client, names: list[str], budget: float) -> list[float]:
    latencies, deadline = [], time.perf_counter() + budget
    for name in names:
        began = time.perf_counter()
        response = http.post(f"/v2/models/{name}/infer", json=ROW)
        latencies.append((time.perf_counter() - began) * 1000)
        assert response.status_code == 200, f"{name}: {response.status_code} {response.text}"
        if time.perf_counter() > deadline:
            break
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--limit", default="100Mi", help="--memory-limit of the server")
    parser.add_argument("--overcommit", type=int, default=1000, help="--overcommit-percent of the server")
    parser.add_argument("--requests", type=int, default=1000, help="miss requests at most")
    parser.add_argument("--budget", type=float, default=90, help="seconds the miss loop may take at most")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-reload.md"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fleetserve-bench-"))
    rows: list[tuple[str, str]] = []
    report = lambda key, value: (rows.append((key, value)), print(f"{key:<44} {value}", flush=True))
    try:
        began = time.perf_counter()
        build_repository(work / "repo", args.models)
        print(f"built {args.models} models in {time.perf_counter() - began:.1f} s", flush=True)
        (work / "empty").mkdir()
        (work / "one").mkdir()
        shutil.copytree(work / "repo" / "m0000", work / "one" / "m0000")
        for label, repo in (("no models", "empty"), ("1 model (sklearn imported)", "one")):
            base, _, base_ready = start_server(work / repo, args.limit, args.overcommit, work / f"{repo}.log")
            time.sleep(1.5)  # past the deferred heap refreeze
            report(f"baseline RSS, {label}", f"{rss_mib(base.pid):.0f} MiB (ready in {base_ready:.1f} s)")
            stop(base)
        server, url, ready = start_server(work / "repo", args.limit, args.overcommit, work / "server.log")
        report(f"start-up to ready, {args.models} models", f"{ready:.1f} s")
        time.sleep(1.5)
        http = httpx.Client(base_url=url, timeout=60)
        index = http.post("/v2/repository/index").json()
        resident = [e["name"] for e in index if e["resident"]]
        ready_count = sum(e["state"] == "READY" for e in index)
        measured = [e["measured_memory_bytes"] / 1024 for e in index if e["measured_memory_bytes"]]
        report("models READY / resident", f"{ready_count} / {len(resident)}")
        if measured:
            report("measured memory per model (median, max)", f"{statistics.median(measured):.0f} KiB, {max(measured):.0f} KiB")
        report("RSS after all registered (peak during start)",
               f"{rss_mib(server.pid):.0f} MiB ({rss_mib(server.pid, 'VmHWM'):.0f} MiB)")

        hits = timed_requests(http, [resident[-1]] * 300, 30)
        p50, p90, p99 = percentiles(hits[20:])  # first requests warm the connection and the model
        report("resident model, client ms p50/p90/p99", f"{p50:.2f} / {p90:.2f} / {p99:.2f} (n={len(hits) - 20})")

        # Evicted models first, then the resident ones (least recently used first): each request
        # evicts the oldest resident model, so the round-robin misses every time.
        resident_set = set(resident)
        evicted = [e["name"] for e in index if e["state"] == "READY" and e["name"] not in resident_set]
        cycle = evicted + [name for name in resident if name != resident[-1]] + [resident[-1]]
        order = [cycle[i % len(cycle)] for i in range(args.requests)]
        before = http.get("/metrics").text
        peak = [0.0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.1):
                peak[0] = max(peak[0], rss_mib(server.pid))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        misses = timed_requests(http, order, args.budget)
        sampling.set()
        sampler.join()
        after = http.get("/metrics").text
        p50, p90, p99 = percentiles(misses)
        counted = counter(after, "seldon_cache_miss_count") - counter(before, "seldon_cache_miss_count")
        report("miss requests sent / counted by the server", f"{len(misses)} / {counted:.0f}")
        report("miss request, client ms p50/p90/p99", f"{p50:.2f} / {p90:.2f} / {p99:.2f}")
        buckets, total, count = reload_histogram(after)
        b0, t0, c0 = reload_histogram(before)
        buckets = {bound: value - b0.get(bound, 0) for bound, value in buckets.items()}
        reloads = count - c0
        if reloads:
            # The lowest bucket is 5 ms: quantiles below it are interpolated, the mean is exact.
            report("server reload ms mean; p50/p99 from buckets",
                   f"{(total - t0) / reloads * 1000:.2f}; {bucket_quantile(buckets, .5) * 1000:.1f} / "
                   f"{bucket_quantile(buckets, .99) * 1000:.1f} (n={reloads:.0f})")
            report("server reloads <= 5 ms / <= 20 ms",
                   f"{buckets[0.005] / reloads:.1%} / {buckets[0.02] / reloads:.1%}")
        report("RSS during miss loop (peak sampled) / after",
               f"{peak[0]:.0f} MiB / {rss_mib(server.pid):.0f} MiB (limit {args.limit} of models)")
        report("goal: reload p50 <= 20 ms", "met" if reloads and buckets[0.02] >= reloads / 2 else "NOT met")
        http.close()
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
    write_results(Path(args.out), rows)


def write_results(path: Path, rows: list[tuple[str, str]]) -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30
    command = " ".join([".venv/bin/python", "bench/reload.py", *sys.argv[1:]])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [f"# Reload benchmark\n", f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {ram:.1f} GiB RAM, "
             f"Python {sys.version.split()[0]}", f"- commit: {commit} (working tree may differ)",
             f"- command: `{command}`\n", "| measure | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
