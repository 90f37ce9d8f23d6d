"""Reload latency of evicted models, and server RSS, under fleetserve's memory manager.

Builds a repository of N small sklearn models (LogisticRegression on iris, each declaring 1Mi),
serves it on loopback with room for about a tenth of them, then sends one request at a time,
round-robin, so that every request finds its model evicted. Compares with requests to one
resident model, reads the server's reload histogram and samples the server's RSS (with two
baselines: a server with no models, and one with a single sklearn model). See bench/README.md.

    .venv/bin/python bench/reload.py [--models 1000] [--limit 100Mi] [--requests 1000]
"""

from __future__ import annotations

import argparse, datetime, os, re, shutil, signal, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

import httpx, joblib
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
ROW = {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4], "data": [5.1, 3.5, 1.4, 0.2]}]}
SETTINGS = ('{"implementation": "sklearn", "memory": "1Mi", "parameters": {"uri": "./model.joblib"},'
            ' "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}]}')
RELOAD = "fleetserve_model_reload_duration_seconds"
servers: list[subprocess.Popen] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    line = next(l for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def build_repository(root: Path, count: int) -> None:
    root.mkdir()
    iris = load_iris()
    joblib.dump(LogisticRegression(max_iter=500).fit(iris.data, iris.target), root / "model.joblib")
    for i in range(count):
        (root / f"m{i:04d}").mkdir()
        shutil.copyfile(root / "model.joblib", root / f"m{i:04d}" / "model.joblib")
        (root / f"m{i:04d}" / "model-settings.json").write_text(SETTINGS)
    (root / "model.joblib").unlink()


def start_server(repo: Path, args, log: Path, budget: float = 180) -> tuple[subprocess.Popen, str, float]:
    """Start fleetserve on loopback; return it, its URL and the seconds until /v2/health/ready."""
    port = free_port()
    command = [str(ROOT / ".venv" / "bin" / "fleetserve"), "start", str(repo), "--host", "127.0.0.1",
               "--http-port", str(port), "--grpc-port", str(free_port()), "--metrics-port", str(free_port()),
               "--memory-limit", args.limit, "--overcommit-percent", str(args.overcommit), "--log-level", "warning"]
    started = time.perf_counter()
    servers.append(server := subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT))
    while time.perf_counter() - started < budget and server.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200:
                return server, f"http://127.0.0.1:{port}", time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.05)
    sys.exit(f"server exited ({server.poll()}) or was not ready in {budget:g} s; log:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p = [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.5, 0.9, 0.99)]
    return f"{p[0]:.2f} / {p[1]:.2f} / {p[2]:.2f} (n={len(ordered)})"


def reload_histogram(text: str) -> dict[str, float]:
    """The reload histogram: {"le" bound: cumulative count, "sum": s, "count": n}."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        sample = re.match(RELOAD + r"_(bucket|sum|count)(?:\{(.*)\})? (\S+)$", line)
        if sample:
            kind, labels, value = sample.groups()
            key = re.search(r'le="([^"]+)"', labels).group(1) if kind == "bucket" else kind
            totals[key] = totals.get(key, 0) + float(value)
    return totals


def counter(text: str, name: str) -> float:
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if re.match(name + r"[{ ]", l))


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


def measure(args, work: Path, report) -> None:
    build_repository(work / "repo", args.models)
    (work / "empty").mkdir()
    shutil.copytree(work / "repo" / "m0000", work / "one" / "m0000")
    for label, repo in (("no models", "empty"), ("1 model (sklearn imported)", "one")):
        base, _, ready = start_server(work / repo, args, work / f"{repo}.log")
        time.sleep(1.5)  # past the server's deferred heap refreeze
        report(f"baseline RSS, {label}", f"{rss_mib(base.pid):.0f} MiB (ready in {ready:.1f} s)")
        stop(base)
    server, url, ready = start_server(work / "repo", args, work / "server.log")
    report(f"start-up to ready, {args.models} models", f"{ready:.1f} s")
    time.sleep(1.5)
    http = httpx.Client(base_url=url, timeout=60)
    index = http.post("/v2/repository/index").json()
    resident = [e["name"] for e in index if e["resident"]]
    measured = [e["measured_memory_bytes"] / 1024 for e in index] or [0]
    report("models READY / resident", f"{sum(e['state'] == 'READY' for e in index)} / {len(resident)}")
    report("measured memory per model, median / max", f"{statistics.median(measured):.0f} / {max(measured):.0f} KiB")
    report("RSS after all registered (peak so far)", f"{rss_mib(server.pid):.0f} MiB ({rss_mib(server.pid, 'VmHWM'):.0f})")
    hot = resident[-1]
    report("resident model, client ms p50/p90/p99", percentiles(timed_requests(http, [hot] * 300, 30)[20:]))

    # Evicted models first, the hot one last: each miss evicts the least recently used resident
    # model, and 100 resident out of 1,000 in a round-robin means every request misses.
    cycle = [e["name"] for e in index if not e["resident"]] + [n for n in resident if n != hot] + [hot]
    before = http.get("/metrics").text
    peak, done = [0.0], threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_mib(server.pid))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    misses = timed_requests(http, [cycle[i % len(cycle)] for i in range(args.requests)], args.budget)
    done.set()
    sampler.join()
    began = time.perf_counter()
    after = http.get("/metrics").text
    scrape_ms = (time.perf_counter() - began) * 1000
    counted = counter(after, "seldon_cache_miss_count") - counter(before, "seldon_cache_miss_count")
    report("miss requests sent / counted by the server", f"{len(misses)} / {counted:.0f}")
    report("miss request, client ms p50/p90/p99", percentiles(misses))
    old, new = reload_histogram(before), reload_histogram(after)
    delta = {key: value - old.get(key, 0) for key, value in new.items()}
    reloads = delta.get("count", 0)
    bounds = sorted((float(k), v) for k, v in delta.items() if k not in ("sum", "count"))
    # Bucket quantiles are upper bounds: the lowest bucket is 5 ms. The mean is exact.
    quantile = lambda q: next(f"<= {b * 1000:g}" for b, v in bounds if v >= q * reloads)
    if reloads:
        report("server reload ms: mean; p50, p99 from buckets",
               f"{delta['sum'] / reloads * 1000:.2f}; {quantile(.5)}, {quantile(.99)} (n={reloads:.0f})")
    report("RSS during miss loop (sampled peak) / after",
           f"{peak[0]:.0f} / {rss_mib(server.pid):.0f} MiB (limit: {args.limit} of models)")
    report("/metrics scrape after the loop", f"{scrape_ms:.0f} ms, {len(after) // 1024} KiB")
    met = reloads and max((v for b, v in bounds if b <= 0.02), default=0) >= reloads / 2
    report("goal: server reload p50 <= 20 ms", "met" if met else "NOT met")
    http.close()


def results_header(title: str, script: str) -> list[str]:
    """A results file's title, then the date, machine, commit and command that made it."""
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return [f"# {title}\n", f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
            f"- machine: nproc {len(os.sched_getaffinity(0))}, {ram:.1f} GiB RAM, Python {sys.version.split()[0]}",
            f"- commit: {commit.strip()} (plus uncommitted changes, if any)",
            f"- command: `{' '.join(['.venv/bin/python', script, *sys.argv[1:]])}`"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--limit", default="100Mi", help="the server's --memory-limit")
    parser.add_argument("--overcommit", type=int, default=1000, help="the server's --overcommit-percent")
    parser.add_argument("--requests", type=int, default=1000, help="miss requests at most")
    parser.add_argument("--budget", type=float, default=90, help="seconds the miss loop may take at most")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-reload.md"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers are stopped below
    work, rows = Path(tempfile.mkdtemp(prefix="fleetserve-bench-")), []
    report = lambda key, value: (rows.append((key, value)), print(f"{key:<46} {value}", flush=True))
    try:
        measure(args, work, report)
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
    lines = [*results_header("Reload benchmark", "bench/reload.py"), "",
             "| measure | value |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
