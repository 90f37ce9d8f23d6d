"""A small gRPC load generator for bench/compare.py (there is no ghz here).

Sends one prebuilt, serialized `inference.ModelInferRequest` (a file) as ModelInfer calls from
N concurrent coroutines over one grpc.aio channel, for a warm-up and then a measured period,
and prints one JSON line: requests completed in the measured period, req/s, p50/p99/mean
latency in microseconds and the number of failed calls (with the first error). Requests and
responses travel as bytes (no protobuf work in the client per call), so the client costs as
little as Python allows; it is still a Python client and can be the bottleneck: compare
against the bare twin (bench/bare.py) measured with the same client.

    .venv/bin/python bench/grpc_load.py --target 127.0.0.1:8081 --request FILE --concurrency 16 --duration 10 --warmup 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def run(args) -> dict:
    body = open(args.request, "rb").read()
    options = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(METHOD)  # no serializers: bytes in, bytes out
        await asyncio.wait_for(channel.channel_ready(), 10)
        began = time.perf_counter()
        measure_from, stop_at = began + args.warmup, began + args.warmup + args.duration
        latencies: list[float] = []
        failures = [0, ""]

        async def loop() -> None:
            while True:
                start = time.perf_counter()
                if start >= stop_at:
                    return
                try:
                    await call(body, timeout=60)
                except grpc.aio.AioRpcError as error:
                    failures[0] += 1
                    failures[1] = failures[1] or f"{error.code().name}: {error.details()}"
                    continue
                end = time.perf_counter()
                if start >= measure_from and end <= stop_at:
                    latencies.append(end - start)

        await asyncio.gather(*(loop() for _ in range(args.concurrency)))
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6 if latencies else 0.0
    return {"requests": len(latencies), "rps": len(latencies) / args.duration, "p50_us": pick(0.5), "p99_us": pick(0.99),
            "mean_us": sum(latencies) / len(latencies) * 1e6 if latencies else 0.0,
            "errors": failures[0], "first_error": failures[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--request", required=True, help="file holding a serialized ModelInferRequest")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
