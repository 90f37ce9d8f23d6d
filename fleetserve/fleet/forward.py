"""One hop: a request for a model served by a peer goes there as it came in (REST: its bytes,
JSON or binary tensors, never decoded here; gRPC: its message), and the peer's answer comes back
as it is.

The peer is told the request was forwarded (FORWARDED), so it never forwards it again: a peer
that no longer has a serving copy answers Misdirected (HTTP 421). That, or a peer that cannot be
reached, sends the request once more to another copy (loaded elsewhere if there is none).
"""

from __future__ import annotations

import asyncio
import logging
import time
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fleetserve import tracing
from fleetserve.errors import Misdirected, ModelUnavailable, Relayed, answered_status, describe
from fleetserve.fleet.membership import LEASE_SECONDS
from fleetserve.fleet.models import FleetModels
from fleetserve.runtime.metrics import LATENCY_BUCKETS_NS, latency_buckets
from fleetserve.types import InferenceRequest, InferenceResponse

log = logging.getLogger(__name__)

FORWARDED = "fleetserve-forwarded"  # its value: the replica that forwarded the request
MISDIRECTED = 421
CONNECT_SECONDS = 2.0
# What a hop passes on, either way; the rest are the front door's and the connection's own.
REQUEST_HEADERS = ("content-type", "inference-header-content-length", "x-request-id", "authorization",
                   "seldon-model", "x-seldon-route")
RESPONSE_HEADERS = ("content-type", "inference-header-content-length", "x-seldon-route", "retry-after")
GRPC_METADATA = ("authorization", "seldon-model", "x-seldon-route", "x-request-id")


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


class _TryAnother(Exception):
    """The copy asked cannot answer; another may."""

    def __init__(self, why: str, unreachable: bool):
        super().__init__(why)
        self.unreachable = unreachable


class Hops:
    def __init__(self, models: FleetModels, settings, tls=None, tokens=None):
        import aiohttp  # the fleet extra

        self.aiohttp = aiohttp
        self.models = models
        self.scheme = "https" if tls else "http"
        self.ssl = tls.peer_context() if tls else None
        self.grpc_credentials = tls.peer_grpc_credentials() if tls else None
        self.grpc_options = [("grpc.max_receive_message_length", settings.max_message_size),
                             ("grpc.max_send_message_length", settings.max_message_size)]
        # What this replica's own requests (pipeline steps, experiment candidates) carry to a peer.
        token = tokens.data or tokens.admin if tokens is not None else b""
        self.own_metadata = (("authorization", "Bearer " + token.decode()),) if token else ()
        self.control_headers = {"authorization": "Bearer " + tokens.admin.decode()} if tokens and tokens.admin else {}
        self.forwarded = 0  # answered by a peer (metrics)
        self.retried = 0  # of those, answered by a second copy
        self.seconds = 0.0  # spent waiting for the peers that answered
        self.latency_buckets = [0] * (len(LATENCY_BUCKETS_NS) + 1)
        self._session = None
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # by a peer's gRPC address

    def elsewhere(self, name: str, takeovers, seldon_model: str | None, forwarded: str | None) -> bool:
        """Whether a request for model `name` goes to a peer: the fleet has no serving copy of it
        here (one loading here serves once ready, the fleet's others meanwhile), and neither a
        `seldon-model` header nor an experiment sends it to something else here."""
        if not self.models.elsewhere(name):
            return False
        if ("model", name) in takeovers or (seldon_model and seldon_model != name):
            return False
        if forwarded:  # a peer sent it here: it is never forwarded again
            raise Misdirected(f"model '{name}' is not on replica {self.models.me}")
        return True

    async def send(self, method: str, name: str, path: str, body: bytes, headers) -> Answer | None:
        """A REST request about model `name` (an inference, or a read of its metadata) answered by
        a peer's copy; None when the copy to use is here."""
        passed = {key: value for key in REQUEST_HEADERS if (value := headers.get(key)) is not None}
        passed[FORWARDED] = self.models.me
        if tracing.TRACER is not None:
            passed.update(tracing.headers())

        async def send(record: dict[str, Any]) -> Answer:
            async with self._client().request(method, f"{self.scheme}://{record['address']}{path}", data=body,
                                              headers=passed) as response:
                content = await response.read()
                if response.status == MISDIRECTED:
                    raise _TryAnother(f"replica {record['id']} no longer has it", unreachable=False)
                return Answer(response.status, [(key.lower().encode(), value.encode("latin-1"))
                                                for key, value in response.headers.items()
                                                if key.lower() in RESPONSE_HEADERS], content)

        return await self._hop(name, send)

    async def rpc(self, method: str, name: str, message, metadata, timeout: float | None):
        """A gRPC call about model `name` (ModelInfer, ModelMetadata, ModelConfig) answered by a
        peer's copy; None when the copy to use is here. A peer's own error comes back as the
        grpc.aio.AioRpcError it answered."""
        from tritonclient.grpc import service_pb2_grpc

        passed = [(key, value) for key, value in metadata if key in GRPC_METADATA]
        passed.append((FORWARDED, self.models.me))
        if tracing.TRACER is not None:
            passed += tracing.headers().items()

        async def call(record: dict[str, Any]):
            address = record["grpc"]
            if address not in self._channels:
                channel = (grpc.aio.secure_channel(address, self.grpc_credentials, self.grpc_options)
                           if self.grpc_credentials else grpc.aio.insecure_channel(address, self.grpc_options))
                self._channels[address] = (channel, service_pb2_grpc.GRPCInferenceServiceStub(channel))
            stub = self._channels[address][1]
            try:
                return await getattr(stub, method)(message, metadata=passed, timeout=timeout)
            except grpc.aio.AioRpcError as error:
                status = answered_status(error)
                if status == str(MISDIRECTED):
                    raise _TryAnother(f"replica {record['id']} no longer has it", unreachable=False) from None
                if status is None and error.code() == grpc.StatusCode.UNAVAILABLE:  # no answer: no connection
                    raise _TryAnother(f"replica {record['id']}: {error.details()}", unreachable=True) from None
                return error  # the peer's answer: raised below, once counted

        answer = await self._hop(name, call)
        if isinstance(answer, grpc.aio.AioRpcError):
            raise answer
        return answer

    async def infer_request(self, name: str, request: InferenceRequest) -> InferenceResponse | None:
        """A pipeline step's or an experiment candidate's request, answered by a peer's copy of
        `name` over gRPC; None when the copy to use is here."""
        from fleetserve.server.grpc_service import decode_infer_response, encode_infer_request

        timeout = None if request.deadline is None else max(0.001, request.deadline - time.monotonic())
        try:
            answer = await self.rpc("ModelInfer", name, encode_infer_request(name, request), self.own_metadata, timeout)
        except grpc.aio.AioRpcError as error:
            raise Relayed.of(error) from None
        return None if answer is None else decode_infer_response(answer)

    async def peers_on_me(self) -> tuple[str | None, bool]:
        """What the peers last seen say: one whose table (fed by etcd) no longer lists this replica
        (proof that etcd lives on and ended its lease), if any; and whether one has lost etcd too.
        A peer that does not answer says neither."""
        me = self.models.me

        async def ask(record: dict[str, Any]) -> tuple[str | None, bool]:
            try:
                async with self._client().get(f"{self.scheme}://{record['address']}/v2/fleet", headers=self.control_headers,
                                              timeout=self.aiohttp.ClientTimeout(total=CONNECT_SECONDS)) as response:
                    document = await response.json() if response.status == 200 else {}
            except (self.aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                return None, False
            listed = {replica.get("id") for replica in document.get("replicas") or ()}
            etcd = document.get("etcd")
            return (record["id"] if etcd == "connected" and me not in listed else None), etcd == "unreachable"

        peers = [record for replica, record in self.models.membership.replicas.items() if replica != me]
        answers = await asyncio.gather(*map(ask, peers))
        return next((found for found, _ in answers if found), None), any(gone for _, gone in answers)

    async def _hop(self, name: str, call: Callable[[dict[str, Any]], Awaitable[Any]]):
        tried: set[str] = set()
        why = ""
        for attempt in range(2):
            record = await self.models.copy_for(name, exclude=tried)
            replica = record["id"]
            if replica == self.models.me:
                return None
            self.models.forwarded_to[replica] += 1
            started = time.perf_counter_ns()
            try:
                answer = await self._unless_gone(replica, call(record))
                took = time.perf_counter_ns() - started
            except (_TryAnother, self.aiohttp.ClientConnectionError, ConnectionError, asyncio.TimeoutError) as error:
                # Whether or not it ran there, an inference has no effect to undo: sending it again is safe.
                if getattr(error, "unreachable", True):
                    self.models.unreachable[replica] = time.monotonic() + LEASE_SECONDS
                why = str(error) if isinstance(error, _TryAnother) else f"replica {replica} could not be reached ({describe(error)})"
                log.warning("forwarding %s: %s; %s", name, why, "trying another copy" if attempt == 0 else "giving up")
                tried.add(replica)
                continue
            finally:
                self.models.forwarded_to[replica] -= 1
            self.forwarded += 1
            self.retried += attempt
            self.seconds += took / 1e9
            self.latency_buckets[bisect_left(LATENCY_BUCKETS_NS, took)] += 1
            return answer
        raise ModelUnavailable(f"model '{name}' could not be reached in the fleet: {why}")

    async def _unless_gone(self, replica: str, call: Awaitable[Any]):
        """The call's answer, or ConnectionError once the replica leaves the fleet's table: a
        replica that hangs (SIGSTOP, a partition) is given up on when its lease ends."""
        answer = asyncio.ensure_future(call)
        try:
            await asyncio.wait((answer, self.models.gone(replica)), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the request's own client went away
            answer.cancel()
            raise
        if answer.done():
            return answer.result()
        answer.cancel()
        raise ConnectionError(f"replica {replica} left the fleet while it had the request")

    def _client(self):
        if self._session is None:
            aiohttp = self.aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self.ssl),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_SECONDS), auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        for channel, _ in self._channels.values():
            await channel.close()


class FleetCollector:
    """fleetserve_fleet_* series, read at scrape time: what this replica sees of the fleet and
    did for it. Summed over replicas they are the fleet's (loads per model, placements)."""

    def __init__(self, hops: Hops):
        self.hops = hops
        self.models = hops.models

    def collect(self):
        membership = self.models.membership
        yield GaugeMetricFamily("fleetserve_fleet_replicas", "Replicas this one sees in the fleet, itself included.",
                                value=len(membership.replicas))
        yield GaugeMetricFamily("fleetserve_fleet_etcd_connected", "1 while this replica is connected to etcd.",
                                value=int(membership.connected))
        yield CounterMetricFamily("fleetserve_fleet_forwarded_requests",
                                  "Requests this replica sent one hop to a peer's copy, answered.", value=self.hops.forwarded)
        yield CounterMetricFamily("fleetserve_fleet_forward_retries",
                                  "Forwarded requests answered by a second copy (the first unreachable or without it).",
                                  value=self.hops.retried)
        hop = HistogramMetricFamily("fleetserve_fleet_hop_duration_seconds",
                                    "Time from sending a request to a peer to its answer.")
        hop.add_metric([], latency_buckets(list(self.hops.latency_buckets)), self.hops.seconds)
        yield hop
        yield CounterMetricFamily("fleetserve_fleet_placements",
                                  "Copies this replica placed (claims it won), on itself or a peer.",
                                  value=self.models.placements)
        loads = CounterMetricFamily("fleetserve_fleet_loads", "Fleet copies this replica loaded, by model and outcome.",
                                    labels=["model", "outcome"])
        for (model, outcome), count in list(self.models.loads.items()):
            loads.add_metric([model, outcome], count)
        yield loads
