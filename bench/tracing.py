"""What OpenTelemetry tracing costs a request: fleetserve with tracing off and on, side by side.

    .venv/bin/python bench/tracing.py      # about 1.5 min; writes bench/RESULTS-tracing.md

An OTLP gRPC sink in this process (it counts the spans it gets, nothing else) stands in for a
collector. Two `fleetserve start model_repo` servers on core 1: one with no OTEL_* variable (off),
one with OTEL_EXPORTER_OTLP_ENDPOINT at the sink and OTEL_EXPORTER_OTLP_PROTOCOL=grpc (on; the
default sampler samples every request). wrk on core 0 (`-t1 -c16`, bench/iris.lua, one iris row
over REST JSON) loads them in turn: off, on, on, off, off, on, ... (--pairs pairs). The sink runs
on core 0 too, with the load, so that receiving spans does not take the server's core.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (BENCH, CLIENT_CORE, FLEETSERVE, ROOT, ensure_iris, free_port, group_cpu_seconds, log,  # noqa: E402
                     machine, machine_busy_seconds, run_wrk, start_server, stop_server, wait_ready)

CONNECTIONS, WARMUP = 16, 1


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver that counts spans, by name."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.names: collections.Counter[str] = collections.Counter()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.names.update(span.name for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def total(self) -> int:
        with self.lock:
            return sum(self.names.values())

    def settle(self, quiet: float = 6.0, limit: float = 60.0) -> int:
        """The count once no span came for `quiet` s (the exporter sends what it holds every 5 s)."""
        began, count, since = time.monotonic(), self.total(), time.monotonic()
        while time.monotonic() - since < quiet and time.monotonic() - began < limit:
            time.sleep(0.25)
            if self.total() != count:
                count, since = self.total(), time.monotonic()
        return count


def start(name: str, env: dict, work: Path):
    http = free_port()
    log_file = work / f"{name}.log"
    command = [FLEETSERVE, "start", ROOT / "model_repo", "--http-port", http, "--grpc-port", free_port(),
               "--metrics-port", free_port()]
    process = start_server(command, ROOT, log_file, env=env)
    log(f"{name}: ready in {wait_ready(process, http, ['iris'], log_file):.1f} s (http {http})")
    return process, http, log_file


def run(process, http: int, sink: Sink | None, seconds: int) -> dict:
    """Warm-up and measured wrk runs; spans counted over both, per request answered in both."""
    url, script = f"http://127.0.0.1:{http}/v2/models/iris/infer", str(BENCH / "iris.lua")
    spans_before = sink.settle() if sink else 0
    warm = run_wrk(url, script, [], CONNECTIONS, WARMUP)
    busy, server, began = machine_busy_seconds(), group_cpu_seconds(process.pid), time.monotonic()
    result = run_wrk(url, script, [], CONNECTIONS, seconds)
    elapsed = time.monotonic() - began
    result["server_cpu"] = (group_cpu_seconds(process.pid) - server) / elapsed
    result["other_cpu"] = (machine_busy_seconds() - busy) / elapsed - result["server_cpu"]  # wrk, sink, the rest
    if sink:
        result["spans"] = (sink.settle() - spans_before) / (warm["requests"] + result["requests"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5, help="measured seconds per run (after 1 s warm-up)")
    parser.add_argument("--pairs", type=int, default=3, help="off/on pairs, alternating in order")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS-tracing.md", help="the markdown report")
    args = parser.parse_args()
    os.sched_setaffinity(0, {int(CLIENT_CORE)})  # the sink, with the load generator
    ensure_iris()

    sink = Sink()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, receiver)
    sink_port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()

    work = Path(tempfile.mkdtemp(prefix="fleetserve-tracing-"))  # the servers' logs
    off_env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "MLSERVER_TRACING_SERVER"}
    on_env = {**off_env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
              "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    servers, runs = {}, []
    try:
        servers["off"] = start("off", off_env, work)
        servers["on"] = start("on", on_env, work)
        order = [mode for pair in range(args.pairs) for mode in (("off", "on") if pair % 2 == 0 else ("on", "off"))]
        for number, mode in enumerate(order):
            process, http, _ = servers[mode]
            result = run(process, http, sink if mode == "on" else None, args.duration)
            result.update(mode=mode, pair=number // 2 + 1)
            runs.append(result)
            log(f"pair {result['pair']} {mode}: {result['rps']:,.0f} req/s, p50 {result['p50_ms']:.2f} ms, "
                f"p99 {result['p99_ms']:.2f} ms, errors {result['errors']}, server CPU {result['server_cpu']:.2f}, "
                f"other {result['other_cpu']:.2f}" + (f", {result['spans']:.2f} spans/request" if mode == "on" else ""))
        dropped = [line for line in servers["on"][2].read_text(errors="replace").splitlines() if "dropped" in line.lower()]
    finally:
        for process, _, _ in servers.values():
            stop_server(process)
        receiver.stop(0)
        shutil.rmtree(work, ignore_errors=True)
    report(args, runs, sink, dropped)


def report(args, runs: list[dict], sink: Sink, dropped: list[str]) -> None:
    info = machine()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "fleetserve"], cwd=ROOT, capture_output=True, text=True).stdout
    lines = ["# Tracing off and on: what a traced request costs\n",
             f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
             f"- command: `{' '.join(['.venv/bin/python', 'bench/tracing.py', *sys.argv[1:]])}`",
             f"- machine: {info['cpu']}, nproc {info['nproc']}, {info['ram']} RAM, Linux {info['kernel']}",
             f"- fleetserve at {commit}{' + uncommitted changes in fleetserve/' if dirty else ''}: `fleetserve start "
             "model_repo` on core 1, off (no OTEL_* variable) and on (OTEL_EXPORTER_OTLP_ENDPOINT at an in-process "
             "OTLP gRPC sink, OTEL_EXPORTER_OTLP_PROTOCOL=grpc, every request sampled)",
             f"- load: wrk `-t1 -c{CONNECTIONS}` on core 0 (the sink too), POST /v2/models/iris/infer (bench/iris.lua), "
             f"{WARMUP} s warm-up then {args.duration} s measured per run, off and on alternating in pairs",
             "- other CPU: the machine's busy time besides the server's (wrk, the sink, interrupts, anything else running)",
             "", "| pair | tracing | req/s | p50 ms | p99 ms | errors | server CPU | other CPU | spans / request |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        spans = f"{r['spans']:.2f}" if "spans" in r else "-"
        lines.append(f"| {r['pair']} | {r['mode']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['errors']} | {r['server_cpu']:.2f} | {r['other_cpu']:.2f} | {spans} |")
    ratios = []
    lines += ["", "| pair | off req/s | on req/s | on / off | p50 on / off |", "|---:|---:|---:|---:|---:|"]
    for pair in sorted({r["pair"] for r in runs}):
        off, on = (next(r for r in runs if r["pair"] == pair and r["mode"] == m) for m in ("off", "on"))
        ratios.append(on["rps"] / off["rps"])
        lines.append(f"| {pair} | {off['rps']:,.0f} | {on['rps']:,.0f} | {ratios[-1]:.2f} | "
                     f"{on['p50_ms'] / off['p50_ms']:.2f} |")
    spans = [r["spans"] for r in runs if "spans" in r]
    lines += ["", f"Mean on / off throughput: **{statistics.mean(ratios):.2f}**; spans received per request: "
              f"{', '.join(f'{s:.2f}' for s in spans)} (by name, all runs: {dict(sink.names.most_common())}; wrk "
              f"counts answered requests only, and the up to {CONNECTIONS} in flight when a run stops are traced too).",
              f"Lines of the traced server's log that mention dropped spans: {len(dropped)}"
              + (f"; the first: `{dropped[0][:200]}`" if dropped else "") + ".", ""]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
