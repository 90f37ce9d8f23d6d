"""One hop: a request for a model served by a peer goes there as the bytes it came in (JSON or
binary tensors, never decoded here), and the peer's answer comes back as bytes.

The peer is told the request was forwarded (FORWARDED), so it never forwards it again: a peer
that no longer has the model answers 421 Misdirected Request. That, or a peer that cannot be
reached, sends the request once more to another copy (loaded elsewhere if there is none).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fleetserve.errors import ModelUnavailable, describe
from fleetserve.fleet.membership import LEASE_SECONDS
from fleetserve.fleet.models import FleetModels

log = logging.getLogger(__name__)

FORWARDED = "fleetserve-forwarded"  # its value: the replica that forwarded the request
MISDIRECTED = 421
CONNECT_SECONDS = 2.0
# What a hop passes on, either way; the rest are the front door's and the connection's own.
REQUEST_HEADERS = ("content-type", "inference-header-content-length", "x-request-id", "authorization",
                   "seldon-model", "x-seldon-route")
RESPONSE_HEADERS = ("content-type", "inference-header-content-length", "x-seldon-route", "retry-after")


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    replica: str


class Hops:
    def __init__(self, models: FleetModels, scheme: str = "http", ssl=None):
        import aiohttp  # the fleet extra

        self.aiohttp = aiohttp
        self.models = models
        self.scheme = scheme
        self.ssl = ssl
        self.forwarded = 0
        self.retried = 0
        self.seconds = 0.0
        self._session = None

    def _client(self):
        if self._session is None:
            aiohttp = self.aiohttp
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ssl=self.ssl),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_SECONDS), auto_decompress=False)
        return self._session

    async def send(self, name: str, path: str, body: bytes, headers: dict[str, str]) -> Answer | None:
        """The answer of a peer's copy of `name`; None when the copy to use is this replica's own."""
        passed = {key: value for key in REQUEST_HEADERS if (value := headers.get(key)) is not None}
        passed[FORWARDED] = self.models.me
        tried: set[str] = set()
        why = ""
        for attempt in range(2):
            record = await self.models.copy_for(name, exclude=tried)
            replica = record["id"]
            if replica == self.models.me:
                return None
            self.models.forwarded_to[replica] += 1
            started = time.perf_counter()
            try:
                async with self._client().post(f"{self.scheme}://{record['address']}{path}", data=body,
                                               headers=passed) as response:
                    content = await response.read()
                    answer = Answer(response.status, [(key.lower().encode(), value.encode("latin-1"))
                                                      for key, value in response.headers.items()
                                                      if key.lower() in RESPONSE_HEADERS], content, replica)
            except (self.aiohttp.ClientConnectionError, ConnectionError, asyncio.TimeoutError) as error:
                # Whether or not it ran there, an inference has no effect to undo: sending it again is safe.
                self.models.unreachable[replica] = time.monotonic() + LEASE_SECONDS
                why = f"replica {replica} could not be reached ({describe(error)})"
                log.warning("forwarding %s: %s; %s", name, why, "trying another copy" if attempt == 0 else "giving up")
                tried.add(replica)
                continue
            finally:
                self.models.forwarded_to[replica] -= 1
                self.seconds += time.perf_counter() - started
            self.forwarded += 1
            if answer.status != MISDIRECTED:
                if attempt:
                    self.retried += 1
                return answer
            why = f"replica {replica} no longer has it"
            tried.add(replica)
        raise ModelUnavailable(f"model '{name}' could not be reached in the fleet: {why}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
