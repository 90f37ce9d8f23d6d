"""What the REST token check (server/security.py) adds to a request, in process: the wrapped
ASGI app against the bare one, over an app that does nothing, so only the check is measured.

    .venv/bin/python bench/auth_check.py      # a few seconds; prints microseconds per request
"""

from __future__ import annotations

import asyncio
import time

from fleetserve.server.routes import infer_target
from fleetserve.server.security import Tokens, protect_rest

ADMIN, DATA = b"a" * 32, b"d" * 32
# What wrk or a client library sends, plus the token.
HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"content-type", b"application/json"),
           (b"content-length", b"118")]
CASES = [
    ("infer, data token set and sent", Tokens(ADMIN, DATA), "POST", "/v2/models/iris/infer", DATA),
    ("infer, admin token only (inference open)", Tokens(ADMIN), "POST", "/v2/models/iris/infer", None),
    ("model ready (open), data token set", Tokens(ADMIN, DATA), "GET", "/v2/models/iris/ready", None),
    ("load (control), admin token sent", Tokens(ADMIN, DATA), "POST", "/v2/repository/models/iris/load", ADMIN),
]
ROUNDS, CALLS = 5, 100_000


async def nothing(scope, receive, send) -> None:
    return None


async def per_call_ns(app, scope: dict) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter_ns()
        for _ in range(CALLS):
            await app(scope, None, None)
        best = min(best, (time.perf_counter_ns() - start) / CALLS)
    return best


async def main() -> None:
    print(f"{'case':<44} {'bare':>8} {'checked':>8} {'added':>8}  (ns per request, best of {ROUNDS} x {CALLS:,})")
    for name, tokens, method, path, sent in CASES:
        headers = HEADERS + ([(b"authorization", b"Bearer " + sent)] if sent else [])
        scope = {"type": "http", "method": method, "path": path, "headers": headers}
        guarded = protect_rest(nothing, [], tokens)
        bare, checked = await per_call_ns(nothing, scope), await per_call_ns(guarded, scope)
        print(f"{name:<44} {bare:>8.0f} {checked:>8.0f} {checked - bare:>8.0f}")
    # A yardstick from the same run (machines differ, and a busy one is slower): the path split
    # the fast path itself makes on every inference.
    start = time.perf_counter_ns()
    for _ in range(CALLS):
        infer_target("/v2/models/iris/infer")
    print(f"for scale: the fast path's own infer_target() split costs {(time.perf_counter_ns() - start) / CALLS:.0f} ns")
    assert protect_rest(nothing, [], Tokens()) is nothing  # no token: nothing is installed


if __name__ == "__main__":
    asyncio.run(main())
