"""fleetserve against MLServer (default and tuned) and a bare Python handler, side by side.

One command, on loopback, the same models and the same load generators for every peer:

    .venv/bin/python bench/compare.py            # about 13 minutes; writes bench/RESULTS.md
    .venv/bin/python bench/compare.py --quick    # about 2 minutes; writes bench/RESULTS-quick.md

Peers: fleetserve (`fleetserve start`), MLServer 1.7.1 with its default settings, MLServer with
the best of a few settings (picked by a short calibration run, or named with --mlserver-best),
and bench/bare.py (uvicorn + orjson, and a grpc.aio twin: the ceiling for a Python server).
Scenarios (--only): rest-json (wrk, one iris row), grpc (bench/grpc_load.py, one iris row),
large (a 1 MB FP32 tensor to a model that returns its sum: REST JSON, REST binary, gRPC) and
multi (100 copies of iris, called round-robin over REST). Every server is pinned to core 1 and
every load generator to core 0 (taskset). Each (scenario, concurrency) is measured for all
peers in turn before the next one, so drifts of the machine hit every peer alike.
See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PYTHON = ROOT / ".venv" / "bin" / "python"
FLEETSERVE = ROOT / ".venv" / "bin" / "fleetserve"
ML_VENV = BENCH / ".venv-mlserver"
ML_PACKAGES = ["mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop<0.22"]  # uvloop 0.22+: see NOTES
SERVER_CORE, CLIENT_CORE = "1", "0"
TICKS = os.sysconf("SC_CLK_TCK")

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]  # class 0
IRIS_JSON = '{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}'
LARGE = 262144  # FP32 elements: 1 MiB

PEERS = {
    "fleetserve": "fleetserve",
    "fleetserve-batched": "fleetserve batched",
    "mlserver-default": "MLServer default",
    "mlserver-best": "MLServer best",
    "bare": "bare",
}
SCENARIOS = ("rest-json", "grpc", "large", "multi", "reload")

# MLServer settings tried for "best": (server settings, model settings). `debug` is True by
# default in MLServer 1.7 and writes an access log line per request.
BATCHING = {"max_batch_size": 32, "max_batch_time": 0.002}
ML_CANDIDATES = {
    "w0": ("parallel_workers=0 (inference in the server process), debug=false", {"parallel_workers": 0, "debug": False}, {}),
    "w1": ("parallel_workers=1, debug=false", {"parallel_workers": 1, "debug": False}, {}),
    "w2": ("parallel_workers=2, debug=false", {"parallel_workers": 2, "debug": False}, {}),
    "w0-batch": ("parallel_workers=0, debug=false, adaptive batching max_batch_size=32 max_batch_time=2 ms",
                 {"parallel_workers": 0, "debug": False}, BATCHING),
    "w2-batch": ("parallel_workers=2, debug=false, adaptive batching max_batch_size=32 max_batch_time=2 ms",
                 {"parallel_workers": 2, "debug": False}, BATCHING),
}
QUICK_BEST = "w0"  # the winner of the full run's calibration (bench/RESULTS.md); --quick skips calibrating

FLEETSERVE_SUM = '''"""Sum of the FP32 input, per row: a model whose answer is small (bench/compare.py)."""
import numpy as np

from fleetserve.codecs import decode_tensor, encode_tensor
from fleetserve.runtime.base import Runtime


class Sum(Runtime):
    def predict(self, request):
        array = decode_tensor(request.inputs[0])
        total = array.reshape(array.shape[0], -1).sum(axis=1, dtype=np.float32)
        return self.response([encode_tensor("sum", total)], request)
'''
MLSERVER_SUM = '''"""Sum of the FP32 input, per row: a model whose answer is small (bench/compare.py)."""
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class Sum(MLModel):
    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        array = NumpyCodec.decode_input(payload.inputs[0])
        total = array.reshape(array.shape[0], -1).sum(axis=1, dtype=np.float32)
        return InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output("sum", total)])
'''


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- processes -------------------------------------------------------------------------------

started: list[subprocess.Popen] = []


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
                members.append(int(entry))
    return members


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) of every live process in a process group."""
    total = 0
    for pid in group_members(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def start_server(command: list[str], cwd: Path, log_file: Path, env: dict | None = None) -> subprocess.Popen:
    """Start a server on the server core, in its own process group (its workers included)."""
    process = subprocess.Popen(["taskset", "-c", SERVER_CORE, *map(str, command)], cwd=cwd, env=env,
                               stdout=log_file.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    started.append(process)
    return process


def stop_server(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after 15 s."""
    pgid = process.pid
    if process.poll() is None or group_members(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (process.poll() is None or group_members(pgid)):
            time.sleep(0.1)
        if group_members(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        pass


def wait_ready(process: subprocess.Popen, port: int, models: list[str], log_file: Path, timeout: float = 300) -> float:
    began = time.monotonic()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
        pending = list(models)
        while time.monotonic() - began < timeout:
            if process.poll() is not None:
                break
            try:
                if http.get("/v2/health/ready").status_code == 200:
                    while pending and http.get(f"/v2/models/{pending[0]}/ready").status_code == 200:
                        pending.pop(0)
                    if not pending:
                        return time.monotonic() - began
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
    raise RuntimeError(f"server on port {port} exited ({process.poll()}) or was not ready in {timeout:.0f} s; "
                       f"{len(pending)} models not ready; log tail:\n{tail}")


# --- setup -----------------------------------------------------------------------------------

def ensure_iris() -> Path:
    artifact = ROOT / "model_repo" / "iris" / "model.joblib"
    if not artifact.exists():
        log("building model_repo/ (model_repo/build.py)")
        subprocess.run([str(PYTHON), str(ROOT / "model_repo" / "build.py")], check=True)
    return artifact


def ensure_mlserver_venv() -> None:
    wanted = "1.7.1 1.7.1"
    probe = [str(ML_VENV / "bin" / "python"), "-c",
             "import importlib.metadata as m; print(m.version('mlserver'), m.version('mlserver-sklearn'))"]
    if (ML_VENV / "bin" / "python").exists():
        found = subprocess.run(probe, capture_output=True, text=True).stdout.strip()
        if found == wanted:
            return
        log(f"{ML_VENV} holds mlserver/mlserver-sklearn {found or '?'}; reinstalling")
    log(f"creating {ML_VENV.relative_to(ROOT)} and installing {' '.join(ML_PACKAGES)} (about 1 min)")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", str(ML_VENV)], check=True)
    subprocess.run([str(ML_VENV / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", *ML_PACKAGES], check=True)


def package_versions(python: Path, names: list[str]) -> dict[str, str]:
    code = ("import importlib.metadata as m, json, sys\n"
            "out = {}\n"
            f"for n in {names!r}:\n"
            "    try: out[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: out[n] = '-'\n"
            "print(json.dumps(out))")
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(result.stdout) if result.returncode == 0 else {}


def write_fleetserve_repo(repo: Path, iris: Path, copies: int, model: dict) -> list[str]:
    settings = {"implementation": "sklearn", "parameters": {"uri": "./model.joblib", "version": "1"},
                "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}], **model}
    names = ["iris", *(f"iris-{i}" for i in range(copies))]
    for name in names:
        (repo / name).mkdir(parents=True)
        shutil.copyfile(iris, repo / name / "model.joblib")
        (repo / name / "model-settings.json").write_text(json.dumps({"name": name, **settings}))
    (repo / "sum").mkdir()
    (repo / "sum" / "model.py").write_text(FLEETSERVE_SUM)
    # On the server's threads, as the bare handler computes inline: this compares the request paths;
    # bench/execution.py measures what a custom model's default worker process costs.
    (repo / "sum" / "model-settings.json").write_text(json.dumps(
        {"name": "sum", "implementation": "model.Sum", "parallel_workers": 0, **model}))
    return [*names, "sum"]


def write_mlserver_repo(repo: Path, iris: Path, copies: int, server: dict, model: dict, ports: tuple[int, int, int],
                        with_sum: bool = True) -> list[str]:
    http, grpc, metrics = ports
    repo.mkdir(parents=True)
    (repo / "settings.json").write_text(json.dumps(
        {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics, **server}))
    names = ["iris", *(f"iris-{i}" for i in range(copies))]
    for name in names:
        (repo / name).mkdir()
        shutil.copyfile(iris, repo / name / "model.joblib")
        (repo / name / "model-settings.json").write_text(json.dumps(
            {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
             "parameters": {"uri": "./model.joblib", "version": "1"}, **model}))
    if with_sum:
        (repo / "sum").mkdir()
        (repo / "sum" / "model.py").write_text(MLSERVER_SUM)
        (repo / "sum" / "model-settings.json").write_text(json.dumps({"name": "sum", "implementation": "model.Sum", **model}))
        names.append("sum")
    return names


@dataclass
class Peer:
    key: str
    http: int
    grpc: int | None
    process: subprocess.Popen | None = None
    log_file: Path | None = None
    ready_s: float = 0.0
    note: str = ""

    @property
    def label(self) -> str:
        return PEERS[self.key]


def launch(peer: Peer, work: Path, iris: Path, copies: int, ml_choice: str | None) -> None:
    """Write the peer's repository and start it; return once every model is ready."""
    peer.log_file = work / f"{peer.key}.log"
    if peer.key.startswith("fleetserve"):
        repo = work / peer.key
        models = write_fleetserve_repo(repo, iris, copies, BATCHING if peer.key == "fleetserve-batched" else {})
        command = [FLEETSERVE, "start", repo, "--host", "127.0.0.1", "--http-port", peer.http,
                   "--grpc-port", peer.grpc, "--metrics-port", free_port()]
        peer.process = start_server(command, work, peer.log_file)
    elif peer.key.startswith("mlserver"):
        repo = work / peer.key
        server, model = ({}, {}) if peer.key == "mlserver-default" else ML_CANDIDATES[ml_choice][1:]
        models = write_mlserver_repo(repo, iris, copies, server, model, (peer.http, peer.grpc, free_port()))
        peer.process = start_server([ML_VENV / "bin" / "mlserver", "start", repo], repo, peer.log_file)
    else:
        models = ["iris"]
        command = [PYTHON, BENCH / "bare.py", "--iris", iris, "--http-port", peer.http, "--grpc-port", peer.grpc,
                   "--copies", copies]
        peer.process = start_server(command, work, peer.log_file)
    peer.ready_s = wait_ready(peer.process, peer.http, models, peer.log_file)


# --- request bodies and checks ---------------------------------------------------------------

def infer_request_bytes(model: str, array: np.ndarray) -> bytes:
    from tritonclient.grpc import service_pb2
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="input-0", datatype="FP32", shape=list(array.shape))
    return service_pb2.ModelInferRequest(model_name=model, inputs=[tensor],
                                         raw_input_contents=[array.astype(np.float32).tobytes()]).SerializeToString()


@dataclass
class Bodies:
    large: np.ndarray
    iris_pb: Path
    large_pb: Path
    large_json: Path
    large_bin: Path
    large_bin_header: int


def make_bodies(work: Path) -> Bodies:
    import tritonclient.http as httpclient
    folder = work / "bodies"
    folder.mkdir()
    # Four decimals keep the JSON body near 2 MB; the float32 values are what every peer sums.
    large = np.round(np.random.default_rng(0).random((1, LARGE)), 4).astype(np.float32)
    (folder / "iris.pb").write_bytes(infer_request_bytes("iris", np.array([IRIS_ROW], np.float32)))
    (folder / "large.pb").write_bytes(infer_request_bytes("sum", large))
    values = ",".join(repr(round(float(v), 4)) for v in large[0])
    (folder / "large.json").write_text(
        '{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,%d],"data":[%s]}]}' % (LARGE, values))
    tensor = httpclient.InferInput("input-0", list(large.shape), "FP32")
    tensor.set_data_from_numpy(large)  # binary_data=True: tritonclient.http's default
    body, header = httpclient.InferenceServerClient.generate_request_body([tensor])
    (folder / "large.bin").write_bytes(body)
    return Bodies(large, folder / "iris.pb", folder / "large.pb", folder / "large.json", folder / "large.bin", header)


def output_values(response: httpx.Response) -> np.ndarray:
    import tritonclient.http as httpclient
    header = response.headers.get("Inference-Header-Content-Length")
    if header is not None:
        result = httpclient.InferenceServerClient.parse_response_body(response.content, header_length=int(header))
        return result.as_numpy(result.get_response()["outputs"][0]["name"]).ravel()
    return np.asarray(response.json()["outputs"][0]["data"]).ravel()


def short(text: str, limit: int = 160) -> str:
    """One line for a table: a traceback's last line, whitespace collapsed, pipes escaped."""
    lines = [l for l in text.strip().splitlines() if l.strip()]
    if any(l.startswith("Traceback") for l in lines):
        lines = lines[-1:]
    flat = " ".join(" ".join(lines).split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def check_rest(url: str, body: bytes, headers: dict, expected: np.ndarray) -> str | None:
    """None if the peer answers `body` with `expected`, else what went wrong."""
    try:
        response = httpx.post(url, content=body, headers=headers, timeout=60)
    except httpx.HTTPError as error:
        return short(f"{type(error).__name__}: {error}")
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {short(response.text)}"
    try:
        values = output_values(response)
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return short(f"unreadable answer ({error}): {response.text}")
    if values.shape != expected.shape or not np.allclose(values, expected, rtol=1e-4):
        return f"answer {values[:4]} != expected {expected[:4]}"
    return None


def check_grpc(port: int, body: bytes, expected: np.ndarray) -> str | None:
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    dtypes = {"FP32": np.float32, "INT64": np.int64, "INT32": np.int32, "FP64": np.float64}
    fields = {"FP32": "fp32_contents", "INT64": "int64_contents", "INT32": "int_contents", "FP64": "fp64_contents"}
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                service_pb2.ModelInferRequest.FromString(body), timeout=60)
    except grpc.RpcError as error:
        return short(f"{error.code().name}: {error.details()}")
    output = reply.outputs[0]
    if reply.raw_output_contents:
        values = np.frombuffer(reply.raw_output_contents[0], dtypes[output.datatype])
    else:
        values = np.asarray(getattr(output.contents, fields[output.datatype]))
    if values.shape != expected.shape or not np.allclose(values, expected, rtol=1e-4):
        return f"answer {values[:4]} != expected {expected[:4]}"
    return None


# --- load ------------------------------------------------------------------------------------

@dataclass
class Case:
    scenario: str
    label: str
    concurrency: list[int]
    peers: list[str]
    kind: str  # "wrk" or "grpc"
    path: str = ""  # wrk: URL path
    script: str = ""  # wrk: Lua script
    script_args: list[str] = field(default_factory=list)
    grpc_body: Path | None = None
    check: object = None  # Peer -> str | None
    skipped: dict[str, str] = field(default_factory=dict)  # peer key -> why not measured


def machine_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all cores; interrupts included)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, script: str, script_args: list[str], connections: int, seconds: int) -> dict:
    command = ["taskset", "-c", CLIENT_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
               "-s", script, url, "--", *script_args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    line = next((l for l in result.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout[-500:]} {result.stderr[-500:]}")
    out = json.loads(line[len("WRKJSON "):])
    return {"rps": out["requests"] / (out["duration_us"] / 1e6), "p50_ms": out["p50_us"] / 1000,
            "p99_ms": out["p99_us"] / 1000, "mean_ms": out["mean_us"] / 1000, "requests": out["requests"],
            "errors": out["status_errors"] + out["socket_errors"]}


def run_grpc(port: int, body: Path, concurrency: int, seconds: int, warmup: int) -> dict:
    command = ["taskset", "-c", CLIENT_CORE, str(PYTHON), str(BENCH / "grpc_load.py"), "--target", f"127.0.0.1:{port}",
               "--request", str(body), "--concurrency", str(concurrency), "--duration", str(seconds), "--warmup", str(warmup)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + warmup + 90)
    if result.returncode != 0:
        raise RuntimeError(f"grpc_load failed ({result.returncode}): {result.stderr[-800:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    return {"rps": out["rps"], "p50_ms": out["p50_us"] / 1000, "p99_ms": out["p99_us"] / 1000,
            "mean_ms": out["mean_us"] / 1000, "requests": out["requests"], "errors": out["errors"],
            "first_error": out["first_error"]}


def measure(case: Case, peer: Peer, concurrency: int, args) -> dict:
    pgid = peer.process.pid
    if case.kind == "wrk":
        url = f"http://127.0.0.1:{peer.http}{case.path}"
        if args.warmup:
            run_wrk(url, case.script, case.script_args, concurrency, args.warmup)
        busy_before = machine_busy_seconds()
        server_before, client_before, began = group_cpu_seconds(pgid), child_cpu(), time.monotonic()
        result = run_wrk(url, case.script, case.script_args, concurrency, args.duration)
        elapsed = time.monotonic() - began
    else:
        # The warm-up runs inside the client process; CPU is counted over the whole run.
        busy_before = machine_busy_seconds()
        server_before, client_before, began = group_cpu_seconds(pgid), child_cpu(), time.monotonic()
        result = run_grpc(peer.grpc, case.grpc_body, concurrency, args.duration, args.warmup)
        elapsed = time.monotonic() - began
    result["server_cpu"] = (group_cpu_seconds(pgid) - server_before) / elapsed
    result["client_cpu"] = (child_cpu() - client_before) / elapsed
    # Everything else: kernel work for loopback traffic, this script, and any foreign load.
    result["other_cpu"] = (machine_busy_seconds() - busy_before) / elapsed - result["server_cpu"] - result["client_cpu"]
    return result


def measure_into(results: dict, case: Case, peer: Peer, concurrency: int, args, info: dict) -> None:
    """One run; the peer's figure for this point is its fastest run over the rounds (foreign load on
    a shared machine only ever slows a run down), and every run's rate is kept for the report."""
    if peer.process.poll() is not None:
        case.skipped[peer.key] = f"server exited ({peer.process.returncode})"
        return
    try:
        result = measure(case, peer, concurrency, args)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        info["notes"].append(f"{peer.label}, {case.label}, c={concurrency}: {short(str(error), 400)}")
        log(f"  {peer.label} failed: {error}")
        return
    log(f"{case.label}, c={concurrency}, {peer.label}: {result['rps']:,.0f} req/s, "
        f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, errors {result['errors']}, "
        f"CPU server {result['server_cpu']:.2f} client {result['client_cpu']:.2f} other {result['other_cpu']:.2f}")
    point = (case.label, concurrency, peer.key)
    best = results.get(point)
    result["runs"] = (best["runs"] if best else []) + [result["rps"]]
    if best is None or result["rps"] > best["rps"]:
        results[point] = result
    else:
        best["runs"] = result["runs"]


def build_cases(args, bodies: Bodies, peers: dict[str, Peer]) -> list[Case]:
    keys = list(peers)
    iris_expected = np.array([0])
    large_expected = np.array([bodies.large.sum(dtype=np.float32)])
    json_headers = {"Content-Type": "application/json"}
    iris_body = IRIS_JSON.encode()
    cases = []
    if "rest-json" in args.only:
        cases.append(Case("rest-json", "iris, REST JSON (wrk)", args.concurrency, keys, "wrk",
                          path="/v2/models/iris/infer", script=str(BENCH / "iris.lua"),
                          check=lambda p: check_rest(f"http://127.0.0.1:{p.http}/v2/models/iris/infer", iris_body,
                                                     json_headers, iris_expected)))
    if "grpc" in args.only:
        cases.append(Case("grpc", "iris, gRPC (Python client)", args.concurrency, keys, "grpc", grpc_body=bodies.iris_pb,
                          check=lambda p: check_grpc(p.grpc, bodies.iris_pb.read_bytes(), iris_expected)))
    if "large" in args.only:
        large_json = bodies.large_json.read_bytes()
        large_bin = bodies.large_bin.read_bytes()
        bin_headers = {"Content-Type": "application/octet-stream",
                       "Inference-Header-Content-Length": str(bodies.large_bin_header)}
        cases.append(Case("large", "1 MB FP32, REST JSON (wrk)", args.large_concurrency, keys, "wrk",
                          path="/v2/models/sum/infer", script=str(BENCH / "body.lua"),
                          script_args=[str(bodies.large_json), "application/json"],
                          check=lambda p: check_rest(f"http://127.0.0.1:{p.http}/v2/models/sum/infer", large_json,
                                                     json_headers, large_expected)))
        cases.append(Case("large", "1 MB FP32, REST binary (wrk)", args.large_concurrency, keys, "wrk",
                          path="/v2/models/sum/infer", script=str(BENCH / "body.lua"),
                          script_args=[str(bodies.large_bin), "application/octet-stream", str(bodies.large_bin_header)],
                          check=lambda p: check_rest(f"http://127.0.0.1:{p.http}/v2/models/sum/infer", large_bin,
                                                     bin_headers, large_expected)))
        cases.append(Case("large", "1 MB FP32, gRPC (Python client)", args.large_concurrency, keys, "grpc",
                          grpc_body=bodies.large_pb,
                          check=lambda p: check_grpc(p.grpc, bodies.large_pb.read_bytes(), large_expected)))
    if "multi" in args.only:
        last = f"iris-{args.models - 1}"
        cases.append(Case("multi", f"{args.models} iris models round-robin, REST JSON (wrk)", args.multi_concurrency,
                          keys, "wrk", path="", script=str(BENCH / "iris.lua"), script_args=[str(args.models), "iris-"],
                          check=lambda p: check_rest(f"http://127.0.0.1:{p.http}/v2/models/{last}/infer", iris_body,
                                                     json_headers, iris_expected)))
    return cases


# --- MLServer calibration --------------------------------------------------------------------

def calibrate(work: Path, iris: Path, args) -> tuple[str, list[str]]:
    """Try each MLServer candidate on REST JSON iris at 1 and 64 connections; best geometric mean wins."""
    lines, best, best_score = [], None, -1.0
    for name, (description, server, model) in ML_CANDIDATES.items():
        repo, http = work / f"calibrate-{name}", free_port()
        write_mlserver_repo(repo, iris, 0, server, model, (http, free_port(), free_port()), with_sum=False)
        process = start_server([ML_VENV / "bin" / "mlserver", "start", repo], repo, repo / "server.log")
        try:
            wait_ready(process, http, ["iris"], repo / "server.log")
            url = f"http://127.0.0.1:{http}/v2/models/iris/infer"
            rates = []
            for connections in (1, 64):
                run_wrk(url, str(BENCH / "iris.lua"), [], connections, 1)
                rates.append(run_wrk(url, str(BENCH / "iris.lua"), [], connections, args.calibrate_seconds)["rps"])
        finally:
            stop_server(process)
        score = math.sqrt(rates[0] * rates[1])
        lines.append(f"| {name} | {description} | {rates[0]:.0f} | {rates[1]:.0f} | {score:.0f} |")
        log(f"  MLServer {name}: c=1 {rates[0]:.0f} req/s, c=64 {rates[1]:.0f} req/s, geometric mean {score:.0f}")
        if score > best_score:
            best, best_score = name, score
    return best, lines


# --- report ----------------------------------------------------------------------------------

def machine() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return {"nproc": str(os.cpu_count()), "ram": f"{int(mem.split()[1]) / 2**20:.1f} GiB", "cpu": model,
            "kernel": platform.release()}


def ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or not b["rps"] or not a["rps"]:
        return "-"
    return f"{a['rps'] / b['rps']:.2f}x (p50 {a['p50_ms'] / b['p50_ms']:.2f}x)"


def cell(result: dict | None, skipped: str | None) -> str:
    if result is None:
        return f"n/a ({skipped.split(':')[0][:40]}, see notes)" if skipped else "-"
    flag = f" ⚠ {result['errors']} errors" if result["errors"] else ""
    return f"{result['rps']:,.0f} · {result['p50_ms']:.2f} · {result['p99_ms']:.2f}{flag}"


def report(args, cases, results, peers, info, elapsed) -> str:
    keys = list(peers)
    lines = [
        "# fleetserve vs MLServer vs a bare handler\n",
        f"- date: {info['date']}",
        f"- command: `{info['command']}` (took {elapsed / 60:.1f} min in all)",
        f"- machine: {info['machine']['cpu']}, nproc {info['machine']['nproc']}, {info['machine']['ram']} RAM, "
        f"Linux {info['machine']['kernel']}",
        f"- pinning: every server (all its processes) on core {SERVER_CORE}, every load generator on core "
        f"{CLIENT_CORE} (`taskset -c`); loopback only",
        f"- versions: {info['versions']}",
        f"- load: {args.warmup} s warm-up, then {args.duration} s measured, per peer and concurrency; peers "
        "alternate within each (scenario, concurrency), in a rotating order; "
        + (f"{args.rounds} rounds of all of it, each peer's fastest run reported (every run's req/s in the CPU "
           "table)" if args.rounds > 1 else "one round"),
        "- REST load: wrk 4.1 (`-t1 -cN`, N connections = concurrency), Lua bodies bench/iris.lua and bench/body.lua",
        "- gRPC load: bench/grpc_load.py, a **Python** client (grpc.aio, one channel, N coroutines, prebuilt "
        "request bytes): it can be the bottleneck, so compare with the bare gRPC twin measured by the same client "
        "(the client CPU column below says how busy it was)",
        f"- fleetserve: `fleetserve start` with default settings; fleetserve batched: the same with adaptive batching "
        f"in every model-settings.json ({BATCHING}, the batching MLServer is calibrated with); MLServer default: "
        f"settings.json with only host and ports; MLServer best: {info['ml_best']}",
        "- bare: bench/bare.py (uvicorn + httptools + uvloop + orjson raw ASGI app, grpc.aio twin; the model is "
        "called on the event loop; no validation): the ceiling for a Python server",
        "- models: iris = the scikit-learn LogisticRegression of model_repo/iris (same joblib for every peer, "
        "output `predict`); sum = a custom model of each server returning the per-row sum of its FP32 input "
        f"(fleetserve: a `Runtime` subclass with a plain `predict`, run on its worker threads; MLServer: an `MLModel`; "
        "bare: inline); 1 MB = a [1, 262144] FP32 tensor (JSON body "
        f"{info['json_mb']:.1f} MB, values with 4 decimals; binary body as tritonclient.http builds it by default)",
        f"- idle CPU of all servers together before the runs: {info['idle']}",
        f"- ready after start (s): {info['ready']}",
        "",
        "Cells: **req/s · p50 ms · p99 ms**. Ratios: fleetserve's throughput over the peer's (above 1: fleetserve "
        "serves more), with the ratio of p50 latencies (below 1: fleetserve answers faster).\n",
        "| scenario | conc. | " + " | ".join(PEERS[k] for k in keys) + " | fleetserve / MLServer default"
        " | fleetserve / MLServer best | fleetserve / bare | fleetserve batched / MLServer best |",
        "|---|---:|" + "---|" * len(keys) + "---|---|---|---|",
    ]
    for case in cases:
        for c in case.concurrency:
            row = {k: results.get((case.label, c, k)) for k in keys}
            cells = [cell(row[k], case.skipped.get(k)) for k in keys]
            fs = row.get("fleetserve")
            lines.append(f"| {case.label} | {c} | " + " | ".join(cells) + " | "
                         + " | ".join(ratio(fs, row.get(k)) for k in ("mlserver-default", "mlserver-best", "bare"))
                         + f" | {ratio(row.get('fleetserve-batched'), row.get('mlserver-best'))} |")
    lines += ["", "## CPU use per run", "",
              "Cores used during the measured run (gRPC: over warm-up and run), from /proc. A server near 1.00 is "
              "the bottleneck; a client near 1.00 means the load generator is. Other: the rest of the machine's busy "
              "time (interrupts for the loopback traffic, this script, anything else running).\n",
              "| scenario | conc. | peer | req/s | runs req/s | mean ms | server CPU | client CPU | other CPU | requests | errors |",
              "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for case in cases:
        for c in case.concurrency:
            for k in keys:
                r = results.get((case.label, c, k))
                if r:
                    error = f"{r['errors']} {r.get('first_error', '')}".strip() if r["errors"] else "0"
                    runs = " / ".join(f"{rps:,.0f}" for rps in r["runs"])
                    lines.append(f"| {case.label} | {c} | {PEERS[k]} | {r['rps']:,.0f} | {runs} | {r['mean_ms']:.2f} | "
                                 f"{r['server_cpu']:.2f} | {r['client_cpu']:.2f} | {r['other_cpu']:.2f} | {r['requests']:,} | {error} |")
    if info["calibration"]:
        lines += ["", "## MLServer calibration (which settings are \"best\")", "",
                  f"REST JSON iris, {args.calibrate_seconds} s per run after 1 s warm-up; the best geometric mean of "
                  "the two rates wins.\n",
                  "| name | settings | req/s c=1 | req/s c=64 | geometric mean |", "|---|---|---:|---:|---:|",
                  *info["calibration"]]
    if info["notes"]:
        lines += ["", "## Notes", "", *[f"- {n}" for n in info["notes"]]]
    if info.get("reload"):
        lines += ["", "## Evicted-model reloads (fleetserve only: the peers have no eviction)", "",
                  "From `bench/reload.py` run by this command (its own document: bench/README.md).", "",
                  *info["reload"]]
    lines.append("")
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    levels = lambda text: [int(x) for x in text.split(",") if x]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SCENARIOS), help=f"scenarios, comma-separated: {','.join(SCENARIOS)}")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"peers, comma-separated: {','.join(PEERS)}")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up seconds before each run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per peer and point, alternating; each peer's fastest run is reported")
    parser.add_argument("--concurrency", type=levels, default=[1, 16, 64], help="rest-json and grpc")
    parser.add_argument("--large-concurrency", type=levels, default=[1, 8])
    parser.add_argument("--multi-concurrency", type=levels, default=[16, 64])
    parser.add_argument("--models", type=int, default=100, help="copies of iris for the multi scenario")
    parser.add_argument("--mlserver-best", default="auto", help=f"auto (calibrate) or one of {','.join(ML_CANDIDATES)}")
    parser.add_argument("--calibrate-seconds", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run (~2 min): 2 s runs after 1 s warm-up, one concurrency per scenario, "
                             f"MLServer best = {QUICK_BEST} without calibrating")
    parser.add_argument("--out", help="default bench/RESULTS.md (bench/RESULTS-quick.md with --quick)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (repositories, server logs)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup, args.rounds = 2, 1, 1
        args.concurrency, args.large_concurrency, args.multi_concurrency = [16], [4], [16]
        if args.mlserver_best == "auto":
            args.mlserver_best = QUICK_BEST
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    for name, allowed, what in ((args.only, SCENARIOS, "scenario"), (args.peers, PEERS, "peer")):
        unknown = set(name) - set(allowed)
        if unknown:
            parser.error(f"unknown {what}: {', '.join(sorted(unknown))}")
    if args.mlserver_best not in ("auto", *ML_CANDIDATES):
        parser.error(f"--mlserver-best: auto or one of {', '.join(ML_CANDIDATES)}")
    args.out = Path(args.out or BENCH / ("RESULTS-quick.md" if args.quick else "RESULTS.md"))
    return args


def main() -> None:
    args = parse_args()
    began = time.monotonic()
    if shutil.which("wrk") is None or shutil.which("taskset") is None:
        sys.exit("needs wrk and taskset on PATH")
    if len(os.sched_getaffinity(0)) < 2:
        sys.exit("needs at least 2 cores (server on core 1, load generator on core 0)")
    if IRIS_JSON not in (BENCH / "iris.lua").read_text():
        sys.exit("bench/iris.lua's body differs from IRIS_JSON in bench/compare.py")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even where SIGINT was inherited as ignored
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below stops the servers
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    iris = ensure_iris()
    if any(p.startswith("mlserver") for p in args.peers):
        ensure_mlserver_venv()
    work = Path(tempfile.mkdtemp(prefix="fleetserve-compare-"))
    copies = args.models if "multi" in args.only else 0
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([".venv/bin/python", "bench/compare.py", *sys.argv[1:]]),
            "machine": machine(), "calibration": [], "notes": [], "ml_best": "-"}
    results: dict = {}
    peers: dict[str, Peer] = {}
    cases: list[Case] = []
    try:
        ml_choice = args.mlserver_best
        if "mlserver-best" in args.peers:
            if ml_choice == "auto":
                log(f"calibrating MLServer settings ({len(ML_CANDIDATES)} candidates)")
                ml_choice, info["calibration"] = calibrate(work, iris, args)
                info["ml_best"] = f"`{ml_choice}`: {ML_CANDIDATES[ml_choice][0]} (won the calibration below)"
            else:
                info["ml_best"] = f"`{ml_choice}`: {ML_CANDIDATES[ml_choice][0]} (chosen with --mlserver-best, not calibrated)"
            log(f"MLServer best: {ml_choice}")
        bodies = make_bodies(work)
        info["json_mb"] = bodies.large_json.stat().st_size / 1e6
        for key in args.peers:  # one at a time, so that start-ups do not compete
            peer = peers[key] = Peer(key, free_port(), free_port())
            log(f"starting {peer.label}")
            launch(peer, work, iris, copies, ml_choice)
            log(f"  {peer.label} ready in {peer.ready_s:.1f} s (http {peer.http}, grpc {peer.grpc})")
        info["ready"] = ", ".join(f"{p.label} {p.ready_s:.1f}" for p in peers.values())
        before = {k: group_cpu_seconds(p.process.pid) for k, p in peers.items()}
        time.sleep(3)
        idle = {k: (group_cpu_seconds(p.process.pid) - before[k]) / 3 for k, p in peers.items()}
        info["idle"] = ", ".join(f"{PEERS[k]} {v * 100:.1f}%" for k, v in idle.items()) + " of a core"

        cases = build_cases(args, bodies, peers)
        for case in cases:
            for key, peer in peers.items():
                problem = case.check(peer)
                if problem:
                    case.skipped[key] = problem
                    info["notes"].append(f"{peer.label} failed the check for \"{case.label}\", so it was not "
                                         f"measured: {problem}")
                    log(f"  check failed: {peer.label}, {case.label}: {problem}")
        log_lines = {k: len(p.log_file.read_text(errors="replace").splitlines()) for k, p in peers.items()}
        total_runs = args.rounds * sum(len(c.concurrency) * (len(c.peers) - len(c.skipped)) for c in cases)
        per_run = args.duration + args.warmup + 1
        log(f"{total_runs} runs of about {per_run} s: about {total_runs * per_run / 60:.1f} min")
        turn = 0
        for _ in range(args.rounds):
            for case in cases:
                for concurrency in case.concurrency:
                    order = [k for k in case.peers if k not in case.skipped]
                    order = order[turn % len(order):] + order[:turn % len(order)] if order else []
                    turn += 1
                    for key in order:
                        measure_into(results, case, peers[key], concurrency, args, info)
        for key, peer in peers.items():
            if peer.process.poll() is not None:
                info["notes"].append(f"{peer.label} exited during the runs ({peer.process.returncode})")
            during = peer.log_file.read_text(errors="replace").splitlines()[log_lines[key]:]
            errors = [l for l in during if "Traceback" in l or "ERROR" in l or "Exception" in l]
            if errors:
                info["notes"].append(f"{peer.label}'s log has {len(errors)} error lines from the runs; the first: "
                                     f"`{short(errors[0], 200)}`")
        for peer in peers.values():  # the reload run needs the core to itself
            stop_server(peer.process)
        if "reload" in args.only:
            log("evicted-model reloads: bench/reload.py")
            out = work / "reload.md"
            subprocess.run([str(PYTHON), str(BENCH / "reload.py"), "--out", str(out)], check=True, timeout=600)
            info["reload"] = [line for line in out.read_text().splitlines() if not line.startswith("# ")]
    finally:
        for peer in peers.values():
            if peer.process is not None:
                stop_server(peer.process)
        for process in started:
            stop_server(process)
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    fs = package_versions(PYTHON, ["fleetserve", "uvicorn", "grpcio", "orjson", "numpy", "scikit-learn", "tritonclient"])
    ml = package_versions(ML_VENV / "bin" / "python", ["mlserver", "mlserver-sklearn", "uvicorn", "uvloop", "grpcio",
                                                      "fastapi", "numpy", "scikit-learn"]) if ML_VENV.exists() else {}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "fleetserve"], cwd=ROOT, capture_output=True, text=True).stdout
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split(" [")[0].strip()
    info["versions"] = (f"fleetserve {fs.get('fleetserve')} at {commit}{' + uncommitted changes in fleetserve/' if dirty else ''}; "
                        f"Python {platform.python_version()}; fleetserve venv: " + ", ".join(f"{k} {v}" for k, v in fs.items() if k != "fleetserve")
                        + "; MLServer venv: " + ", ".join(f"{k} {v}" for k, v in ml.items()) + f"; {wrk_version}")
    elapsed = time.monotonic() - began
    text = report(args, cases, results, peers, info, elapsed)
    args.out.write_text(text)
    print("\n" + text)
    log(f"wrote {args.out} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; the servers were stopped")
