"""Front-door limits: how many requests the server takes at once, by when a request must be
answered, and how long a client may take to send one.

Invariants:
- Past `--max-concurrent-requests` requests in flight (REST and gRPC together, inference and
  control), a request is refused at once: 503 with Retry-After, gRPC RESOURCE_EXHAUSTED. Reads
  (health, readiness, metadata, statistics, /metrics) are never counted, so never refused.
- A counted request leaves the count however it ends (answered, failed, cancelled): the doors
  count in try/finally, on the event loop, so a plain integer is the whole mechanism. A REST
  inference is counted once its body has arrived (it may be refused before): a client trickling
  a body holds a connection, never a place.
- A request's deadline (`time.monotonic()`) comes from Triton's `timeout` parameter
  (microseconds) and the gRPC deadline, whichever is sooner; the model never sees the parameter.
  The data plane enforces it (runtime/dataplane.py).
- A connection whose request head, or body, has not fully arrived within its limit is closed, so
  clients that trickle bytes (Slowloris) cannot hold the server's connections. Uvicorn has no such
  timeout: its protocol class is extended here and one sweep a second checks every connection.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fleetserve.errors import InvalidInput, Overloaded
from fleetserve.types import InferenceRequest

log = logging.getLogger(__name__)

# What REST adds to an Overloaded answer: clients and proxies back off a second, then retry.
RETRY_AFTER = (b"retry-after", b"1")


class Admission:
    """Requests in flight at the front doors, against `limit` (0: none)."""

    __slots__ = ("limit", "in_flight", "refused")

    def __init__(self, limit: int):
        self.limit = limit if limit > 0 else sys.maxsize
        self.in_flight = 0
        self.refused = 0

    def refusal(self) -> Overloaded:
        self.refused += 1
        return Overloaded(
            f"the server is at its limit of {self.limit} requests in flight (--max-concurrent-requests); retry shortly"
        )


def apply_deadline(request: InferenceRequest, remaining: float | None = None) -> None:
    """Set the request's deadline from its `timeout` parameter (microseconds; 0: none), which is
    taken out of its parameters, and from `remaining` seconds (a gRPC deadline): the sooner wins."""
    now = time.monotonic()
    deadline = None if remaining is None else now + remaining
    timeout = request.parameters.pop("timeout", None)
    if timeout is not None:
        if type(timeout) is not int or timeout < 0:
            raise InvalidInput(f"parameters.timeout must be a whole number of microseconds (0: none), got {timeout!r}")
        if timeout and (deadline is None or now + timeout / 1e6 < deadline):
            deadline = now + timeout / 1e6
    request.deadline = deadline


class StalledRequestGuard:
    """Closes connections whose request head or body arrives too slowly.

    `protocol` is uvicorn's httptools protocol, noting when the current request's head (from
    connecting, or from its first byte) and body (from the end of its head) began to arrive;
    `run()` closes, once a second, the connections past their limit. An idle keep-alive
    connection is uvicorn's to time out. Per request this costs three timestamps, no timers.
    """

    def __init__(self, head_timeout: float, body_timeout: float):
        self.head_timeout = head_timeout if head_timeout > 0 else float("inf")
        self.body_timeout = body_timeout if body_timeout > 0 else float("inf")
        self.connections: set[_GuardedProtocol] = set()
        self.closed = 0
        self.protocol = type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"guard": self})

    @property
    def enabled(self) -> bool:
        return min(self.head_timeout, self.body_timeout) < float("inf")

    async def run(self) -> None:
        interval = min(1.0, self.head_timeout / 4, self.body_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        now = time.monotonic()
        stalled = [protocol for protocol in self.connections
                   if protocol.receiving_since is not None and now - protocol.receiving_since > protocol.receiving_limit]
        for protocol in stalled:
            protocol.close_stalled()
        if stalled:
            self.closed += len(stalled)
            log.warning("closed %d connection(s) that took too long to send a request (head limit %gs, body limit %gs)",
                        len(stalled), self.head_timeout, self.body_timeout)


_TIMEOUT_BODY = b'{"error": "the request took too long to arrive"}'
_REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


# Uvicorn's own callbacks, called directly: super() would cost three times what the guard adds.
_begin, _headers_complete, _complete = (
    HttpToolsProtocol.on_message_begin, HttpToolsProtocol.on_headers_complete, HttpToolsProtocol.on_message_complete)
_now = time.monotonic


class _GuardedProtocol(HttpToolsProtocol):
    guard: StalledRequestGuard
    receiving_since: float | None = None  # when the part of the request now arriving began to
    receiving_limit: float = 0.0  # and how long it may take

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.guard.connections.add(self)
        self.receiving_since, self.receiving_limit = _now(), self.guard.head_timeout

    def connection_lost(self, exc) -> None:
        self.guard.connections.discard(self)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        _begin(self)
        self.receiving_since, self.receiving_limit = _now(), self.guard.head_timeout

    def on_headers_complete(self) -> None:
        _headers_complete(self)
        self.receiving_since, self.receiving_limit = _now(), self.guard.body_timeout

    def on_message_complete(self) -> None:
        _complete(self)
        self.receiving_since = None

    def close_stalled(self) -> None:
        self.receiving_since = None
        if self.transport.is_closing():
            return
        # With no response under way (a head still arriving), the client may still read why;
        # otherwise the app's request sees the client gone, and its answer goes nowhere.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


class LimitsCollector:
    """fleetserve_requests_in_flight, fleetserve_requests_refused_total and
    fleetserve_stalled_connections_closed_total, read at scrape time."""

    def __init__(self, admission: Admission, guard: StalledRequestGuard):
        self.admission = admission
        self.guard = guard

    def collect(self):
        yield GaugeMetricFamily("fleetserve_requests_in_flight",
                                "Requests in flight at the front doors (what --max-concurrent-requests bounds).",
                                value=self.admission.in_flight)
        yield CounterMetricFamily("fleetserve_requests_refused",
                                  "Requests refused at once because --max-concurrent-requests were in flight.",
                                  value=self.admission.refused)
        yield CounterMetricFamily("fleetserve_stalled_connections_closed",
                                  "Connections closed because a request's head or body arrived too slowly.",
                                  value=self.guard.closed)
