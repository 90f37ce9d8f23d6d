"""Where should a runtime's predict run? Threads (the default) or worker processes
(`"parallel_workers": N` in model-settings.json), measured side by side, one run, on every core.

For each model: fleetserve with the model on its threads, then with 1 and 2 worker processes,
alternating, loaded by wrk over REST JSON; the server may use every core, wrk shares them.

    .venv/bin/python bench/execution.py            # about 4 min; writes bench/RESULTS-execution.md
    .venv/bin/python bench/execution.py --quick    # smoke run, under 1 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import compare
from compare import BENCH, ROOT, free_port, group_cpu_seconds, log, machine, machine_busy_seconds, wait_ready

SPIN_MODEL = '''
import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Spin(Runtime):
    """Pure-Python work holding the GIL (about 1 ms), as many custom pre/post-processors do."""

    def predict(self, request):
        x = request.inputs[0].data
        total = 0.0
        for i in range(20_000):
            total += i * 0.5
        return self.response([Tensor("sum", x.sum(axis=1) + total * 0)], request)
'''

TINY_MODEL = '''
from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Tiny(Runtime):
    """A custom model whose predict costs microseconds: what a worker process's hop costs shows whole."""

    def predict(self, request):
        return self.response([Tensor("sum", request.inputs[0].data.sum(axis=1))], request)
'''

MODELS = {
    "iris (sklearn LogisticRegression, 1 row)": ("iris", "input-0", "FP32", [[5.1, 3.5, 1.4, 0.2]]),
    "iris-xgboost (xgboost, 1 row)": ("iris-xgboost", "input-0", "FP32", [[5.1, 3.5, 1.4, 0.2]]),
    "spin (custom model, pure Python, ~1 ms)": ("spin", "x", "FP32", [[1.0, 2.0, 3.0, 4.0]]),
    "tiny (custom model, a numpy sum)": ("tiny", "x", "FP32", [[1.0, 2.0, 3.0, 4.0]]),
}


def write_repo(repo: Path, workers: int) -> None:
    for name in ("iris", "iris-xgboost"):
        shutil.copytree(ROOT / "model_repo" / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name, source in (("spin", SPIN_MODEL), ("tiny", TINY_MODEL)):
        (repo / name).mkdir()
        (repo / name / f"{name}.py").write_text(source)
        (repo / name / "model-settings.json").write_text(json.dumps({"name": name, "implementation": f"{name}.{name.title()}"}))
    for settings_file in repo.glob("*/model-settings.json"):
        settings = json.loads(settings_file.read_text())
        settings["parallel_workers"] = workers
        settings_file.write_text(json.dumps(settings))


def lua_body(model: str, input_name: str, datatype: str, rows: list, folder: Path) -> Path:
    body = json.dumps({"inputs": [{"name": input_name, "datatype": datatype, "shape": [len(rows), len(rows[0])],
                                   "data": [v for row in rows for v in row]}]})
    script = folder / f"{model}.lua"
    script.write_text(
        f'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = {json.dumps(body)}\n'
        + (BENCH / "iris.lua").read_text().split("wrk.body", 1)[1].split("\n", 1)[1]
    )
    return script


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    result = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), url],
                            capture_output=True, text=True, timeout=seconds + 60)
    line = next((l for l in result.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {result.stdout[-500:]} {result.stderr[-500:]}")
    out = json.loads(line[len("WRKJSON "):])
    return {"rps": out["requests"] / (out["duration_us"] / 1e6), "p50_ms": out["p50_us"] / 1000,
            "p99_ms": out["p99_us"] / 1000, "errors": out["status_errors"] + out["socket_errors"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS-execution.md")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 2, 1, 1
        args.out = BENCH / "RESULTS-execution-quick.md"
    compare.ensure_iris()
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fleetserve-execution-"))
    setups = {"threads": 0, "1 worker process": 1, "2 worker processes": 2}
    servers = {}
    try:
        for label, workers in setups.items():
            repo = work / f"repo-{workers}"
            write_repo(repo, workers)
            http = free_port()
            log_file = work / f"server-{workers}.log"
            process = subprocess.Popen(
                [str(compare.FLEETSERVE), "start", str(repo), "--http-port", str(http), "--grpc-port", str(free_port()),
                 "--metrics-port", str(free_port()), "--log-level", "warning"],
                stdout=log_file.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
            compare.started.append(process)
            wait_ready(process, http, [model for model, *_ in MODELS.values()], log_file)
            servers[label] = (process, http)
            log(f"started fleetserve with {label}")
        results: dict[tuple[str, str], list[dict]] = {}
        for title, (model, input_name, datatype, rows) in MODELS.items():
            script = lua_body(model, input_name, datatype, rows, work)
            for round_number in range(args.rounds):
                order = list(servers) if round_number % 2 == 0 else list(reversed(servers))
                for label in order:
                    process, http = servers[label]
                    url = f"http://127.0.0.1:{http}/v2/models/{model}/infer"
                    run_wrk(url, script, args.concurrency, args.warmup)
                    busy, cpu, start = machine_busy_seconds(), group_cpu_seconds(process.pid), time.monotonic()
                    result = run_wrk(url, script, args.concurrency, args.duration)
                    elapsed = time.monotonic() - start
                    result["server_cpu"] = (group_cpu_seconds(process.pid) - cpu) / elapsed
                    result["machine_cpu"] = (machine_busy_seconds() - busy) / elapsed
                    results.setdefault((title, label), []).append(result)
                    log(f"{title} / {label}: {result['rps']:,.0f} req/s")
    finally:
        for process in compare.started:
            compare.stop_server(process)
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        "# Threads or worker processes: where predict runs",
        "",
        f"- date: {time.strftime('%Y-%m-%dT%H:%M:%S%z')}",
        f"- command: `.venv/bin/python bench/{Path(__file__).name}{' --quick' if args.quick else ''}` "
        f"(took {(time.monotonic() - began) / 60:.1f} min)",
        f"- machine: {machine()['cpu']}, nproc {os.cpu_count()}, {machine()['ram']} RAM",
        f"- load: wrk -t1 -c{args.concurrency}, REST JSON, one row; {args.warmup} s warm-up, {args.duration} s measured, "
        f"{args.rounds} round(s), setups alternating; nothing pinned: the server may use every core, wrk shares them",
        "- setups: one fleetserve per setup, same models; `parallel_workers` 0 (threads: the default of framework "
        "runtimes), 1 (the default of custom runtimes), 2 in every model-settings.json",
        "",
        "Cells: req/s · p50 ms · p99 ms (the best round), then server CPU in cores. Ratio: against threads.",
        "",
        "| model | " + " | ".join(setups) + " | " + " | ".join(f"{label} / threads" for label in list(setups)[1:]) + " |",
        "|---|" + "---|" * (2 * len(setups) - 1),
    ]
    for title in MODELS:
        best = {label: max(results[(title, label)], key=lambda r: r["rps"]) for label in setups}
        cells = [f"{r['rps']:,.0f} · {r['p50_ms']:.2f} · {r['p99_ms']:.2f} ({r['server_cpu']:.2f} cores)" for r in best.values()]
        ratios = [f"{best[label]['rps'] / best['threads']['rps']:.2f}x" for label in list(setups)[1:]]
        lines.append(f"| {title} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    errors = sum(r["errors"] for runs in results.values() for r in runs)
    lines += ["", f"Errors in all runs: {errors}.", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
