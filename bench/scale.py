"""How one server scales with the models it registers: start-up, memory per model, /metrics.

For each N, builds a repository of N small scikit-learn models (bench/reload.py's: iris's
LogisticRegression, each declaring 1Mi), serves it with --memory-limit 100Mi (about 100 stay
resident, the rest are registered and evicted) and reports: seconds from launch to
/v2/health/ready, the seconds per 1,000 models, RSS and RSS per registered model (above a
one-model server's), one repository index's time, and one /metrics scrape's time and size.
Linear scaling shows as flat per-model figures down the table.

    .venv/bin/python bench/scale.py [--models 1000,2000,4000,10000] [--budget 600]
"""

from __future__ import annotations

import argparse, shutil, signal, sys, tempfile, time
from pathlib import Path

import httpx

from reload import ROOT, build_repository, results_header, rss_mib, servers, start_server, stop


def timed(call) -> tuple[httpx.Response, float]:
    began = time.perf_counter()
    response = call()
    return response, (time.perf_counter() - began) * 1000


def measure(count: int, args, work: Path, baseline_mib: float) -> list[str]:
    repo = work / f"repo-{count}"
    build_repository(repo, count)
    args.overcommit = count  # percent: room to register every model's 1Mi beside a 100Mi limit
    server, url, ready = start_server(repo, args, work / f"server-{count}.log", budget=args.budget)
    try:
        time.sleep(1.5)  # past the server's deferred heap refreeze
        rss = rss_mib(server.pid)
        with httpx.Client(base_url=url, timeout=120) as http:
            index, index_ms = timed(lambda: http.post("/v2/repository/index"))
            states = [entry["state"] for entry in index.json()]
            metrics, scrape_ms = timed(lambda: http.get("/metrics"))
        assert states.count("READY") == count, f"{states.count('READY')} of {count} models READY"
        return [f"{count:,}", f"{ready:.1f}", f"{ready / count * 1000:.2f}", f"{rss:.0f}",
                f"{(rss - baseline_mib) * 1024 / count:.1f}", f"{index_ms:.0f}", f"{scrape_ms:.0f}",
                f"{len(metrics.content) / 2**20:.1f}"]
    finally:
        stop(server)
        shutil.rmtree(repo, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="1000,2000,4000,10000", help="repository sizes, comma-separated")
    parser.add_argument("--limit", default="100Mi", help="the server's --memory-limit")
    parser.add_argument("--budget", type=float, default=600, help="seconds a server may take to be ready")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-scale.md"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # so the servers are stopped below
    work = Path(tempfile.mkdtemp(prefix="fleetserve-scale-"))
    header = ["models", "ready (s)", "s per 1,000", "RSS (MiB)", "RSS per model (KiB)", "index (ms)",
              "/metrics (ms)", "/metrics (MiB)"]
    rows = []
    try:
        build_repository(work / "one", 1)
        args.overcommit = 100
        base, _, _ = start_server(work / "one", args, work / "one.log")
        time.sleep(1.5)
        baseline = rss_mib(base.pid)
        stop(base)
        print(f"baseline: one model, {baseline:.0f} MiB\n" + " | ".join(header), flush=True)
        for count in (int(n) for n in args.models.split(",")):
            rows.append(measure(count, args, work, baseline))
            print(" | ".join(rows[-1]), flush=True)
    finally:
        for server in servers:
            stop(server)
        shutil.rmtree(work, ignore_errors=True)
    lines = [*results_header("Scale benchmark: one server, many registered models", "bench/scale.py"),
             f"- server: `--memory-limit {args.limit} --overcommit-percent N`; RSS per model is above a one-model "
             f"server's {baseline:.0f} MiB\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
