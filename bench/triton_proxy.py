"""What the Triton proxy adds: the same model called directly on Triton and through fleetserve.

    .venv/bin/python bench/triton_proxy.py     # about 1 minute; writes bench/RESULTS-triton.md

Starts the tritonserver of the nvidia-pytriton wheel (Python backend, CPU) with an add/sub model,
or uses a running Triton (--triton-grpc/--triton-http, e.g. one with a GPU) and any Triton model
folder (--model-folder); starts fleetserve with --triton-url on it. Then, one request at a time,
alternating rounds of --round requests so both sides see the same machine: Triton gRPC against
fleetserve gRPC, and Triton HTTP (binary tensors) against fleetserve REST binary and REST JSON,
for a small tensor and a 1 MiB one. The proxy's overhead is the difference of the medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import triton_to_np_dtype

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))

from compare import machine  # noqa: E402
from conftest import running_server, write_settings  # noqa: E402
from test_triton import addsub_folder, start_triton  # noqa: E402


def inputs_for(module, metadata, elements: int, binary: bool = True) -> list:
    """Random inputs as the model's metadata describes them, variable dimensions sized to `elements`."""
    rng = np.random.default_rng(0)
    made = []
    for tensor in metadata["inputs"]:
        shape = [elements if dim == -1 else dim for dim in tensor["shape"]]
        data = rng.random(shape).astype(triton_to_np_dtype(tensor["datatype"]))
        wire = module.InferInput(tensor["name"], shape, tensor["datatype"])
        if module is triton_http:
            wire.set_data_from_numpy(data, binary_data=binary)
        else:
            wire.set_data_from_numpy(data)
        made.append(wire)
    return made


def timed(call, count: int) -> list[float]:
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-grpc", help="a running Triton's gRPC address (else one is started here)")
    parser.add_argument("--triton-http", help="the same Triton's HTTP address")
    parser.add_argument("--model-folder", help="a Triton model folder (default: the Python-backend add/sub model)")
    parser.add_argument("--requests", type=int, default=2000, help="per side and case")
    parser.add_argument("--round", type=int, default=100, help="requests per side before switching")
    parser.add_argument("--out", default=str(BENCH / "RESULTS-triton.md"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fleetserve-triton-bench-"))
    started_triton = None
    if args.triton_grpc:
        grpc_url, http_url = args.triton_grpc, args.triton_http
    else:
        (work / "triton").mkdir()
        started_triton = start_triton(work / "triton")
        grpc_url, http_url = started_triton.grpc_url, started_triton.http_url.removeprefix("http://")
    repo = work / "repo"
    if args.model_folder:
        folder = repo / "proxied"
        shutil.copytree(args.model_folder, folder)
        write_settings(folder, {"implementation": "triton"})
    else:
        folder = addsub_folder(repo, "proxied", {"implementation": "triton"})
    rows = []
    try:
        with running_server(repo, work / "server.log", {"FLEETSERVE_TRITON_URL": grpc_url}) as server:
            direct_grpc = triton_grpc.InferenceServerClient(grpc_url)
            direct_http = triton_http.InferenceServerClient(http_url)
            proxy_grpc = triton_grpc.InferenceServerClient(server.grpc_address)
            proxy_http = triton_http.InferenceServerClient(server.http_address)
            metadata = direct_http.get_model_metadata("proxied")
            for label, elements in (("16 FP32", 16), ("1 MiB FP32", 262144)):
                count = args.requests if elements < 1000 else max(200, args.requests // 10)
                grpc_in = inputs_for(triton_grpc, metadata, elements)
                http_in = inputs_for(triton_http, metadata, elements)
                json_in = inputs_for(triton_http, metadata, elements, binary=False)
                cases = {
                    "gRPC": (lambda: direct_grpc.infer("proxied", grpc_in), lambda: proxy_grpc.infer("proxied", grpc_in)),
                    "REST binary": (lambda: direct_http.infer("proxied", http_in), lambda: proxy_http.infer("proxied", http_in)),
                    "REST JSON": (lambda: direct_http.infer("proxied", json_in), lambda: proxy_http.infer("proxied", json_in)),
                }
                for case, (direct, proxied) in cases.items():
                    timed(direct, 50), timed(proxied, 50)  # warm both paths
                    direct_ms, proxied_ms = [], []
                    while len(direct_ms) < count:
                        direct_ms += timed(direct, args.round)
                        proxied_ms += timed(proxied, args.round)
                    rows.append((label, case, len(direct_ms), statistics.median(direct_ms), percentile(direct_ms, 0.99),
                                 statistics.median(proxied_ms), percentile(proxied_ms, 0.99)))
                    print(f"{label:>10} {case:<11} direct p50 {rows[-1][3]:.3f} ms  proxied p50 {rows[-1][5]:.3f} ms", flush=True)
    finally:
        if started_triton is not None:
            started_triton.process.kill()
    lines = [
        "# Triton proxy overhead",
        "",
        f"{datetime.date.today()}, `{' '.join(['.venv/bin/python', 'bench/triton_proxy.py', *sys.argv[1:]])}`; "
        f"machine: {json.dumps(machine())}.",
        f"Model: {args.model_folder or 'Python-backend add/sub (two FP32 inputs, two outputs), Triton on the CPU'}. "
        "One request at a time, milliseconds; direct and proxied alternate every "
        f"{args.round} requests. Overhead = proxied p50 - direct p50.",
        "",
        "| tensor | protocol | requests | Triton p50 | Triton p99 | via fleetserve p50 | via fleetserve p99 | overhead p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, case, count, d50, d99, p50, p99 in rows:
        lines.append(f"| {label} | {case} | {count} | {d50:.3f} | {d99:.3f} | {p50:.3f} | {p99:.3f} | {p50 - d50:+.3f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
