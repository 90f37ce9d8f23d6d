"""A replica's place in the fleet: its record in etcd, bound to a lease, and the table of its peers,
fed by a watch (no request reads etcd).

Keys: `fleetserve/<fleet>/replicas/<replica id>` -> the replica's JSON record. This process keeps
its lease alive; a replica that dies leaves every table when its lease runs out (LEASE_SECONDS),
one that stops (SIGTERM) at once. With etcd unreachable the replica keeps serving and keeps
trying; the table it last saw stays.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Callable
from urllib.parse import urlsplit

import orjson

from fleetserve.errors import describe
from fleetserve.settings import ServerSettings

log = logging.getLogger(__name__)

LEASE_SECONDS = 5
PUBLISH_EVERY = 1.0  # seconds between checks of this replica's record (written only when it changed)


def etcd_endpoints(setting: str) -> list[tuple[str, int]]:
    """--etcd http://HOST:PORT[,...] as (host, port) pairs; one that is none stops the start."""
    endpoints = []
    for url in (item.strip() for item in setting.split(",") if item.strip()):
        try:
            parts = urlsplit(url if "://" in url else f"http://{url}")
            endpoint = (parts.hostname, parts.port or 2379)
        except ValueError:  # a port that is no number
            endpoint = (None, 0)
        if parts.scheme != "http" or not endpoint[0]:
            raise SystemExit(f"--etcd: {url!r} is not http://HOST:PORT")
        endpoints.append(endpoint)
    return endpoints


def advertised_host(settings: ServerSettings) -> str:
    """The address peers reach this replica at: --advertise-host, else --host, else (binding all
    addresses) this host's own."""
    if settings.advertise_host:
        return settings.advertise_host
    if settings.host not in ("0.0.0.0", "::", ""):
        return settings.host
    return socket.gethostbyname(socket.gethostname())


class Membership:
    def __init__(self, settings: ServerSettings, record: Callable[[], dict[str, Any]]):
        import aetcd  # the fleet extra: missing, the server says so at start

        self._client = aetcd.Client
        self.endpoints = etcd_endpoints(settings.etcd)
        self.fleet = settings.fleet
        self.replica_id = settings.replica_id or socket.gethostname()
        self.host = advertised_host(settings)  # resolved once: the record is written every second
        self.prefix = f"fleetserve/{self.fleet}/replicas/".encode()
        self.key = self.prefix + self.replica_id.encode()
        self.record = record  # this replica's record as it is now
        self.replicas: dict[str, dict[str, Any]] = {}
        self.connected = False
        self._task: asyncio.Task | None = None
        self._lease = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Leave the fleet at once: the record goes with the lease."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            except Exception as error:  # etcd gone: the lease runs out by itself
                log.warning("could not leave the fleet at once (%s); peers forget this replica within %ds",
                            error, LEASE_SECONDS)

    def document(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "replica": self.replica_id, "etcd": "connected" if self.connected else "unreachable",
                "replicas": [self.replicas[name] for name in sorted(self.replicas)]}

    async def _run(self) -> None:
        attempt = 0
        while True:
            host, port = self.endpoints[attempt % len(self.endpoints)]
            attempt += 1
            try:
                async with self._client(host, port, timeout=LEASE_SECONDS) as client:
                    await self._serve(client)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.connected or attempt == 1:
                    log.warning("no etcd at %s:%d (%s): serving on, retrying", host, port, describe(error))
                self.connected = False
                await asyncio.sleep(1.0)

    async def _serve(self, client) -> None:
        self._lease = await client.lease(LEASE_SECONDS)
        published = self._encoded()
        await client.put(self.key, published, lease=self._lease)
        listing = await client.get_prefix(self.prefix)
        self.replicas = {}
        for kv in listing.kvs:
            self._put(kv)
        watch = await client.watch_prefix(self.prefix, start_revision=listing.header.revision + 1)
        if not self.connected:
            log.info("replica %s joined fleet %s (%d replicas)", self.replica_id, self.fleet, len(self.replicas))
        self.connected = True
        follow = asyncio.create_task(self._follow(watch))
        try:
            while not follow.done():
                await asyncio.wait([follow], timeout=PUBLISH_EVERY)
                if (await self._lease.refresh()).TTL <= 0:  # stalled past it: the record is gone
                    raise ConnectionError("the lease ran out")
                current = self._encoded()
                if current != published:
                    await client.put(self.key, current, lease=self._lease)
                    published = current
            follow.result()
        finally:
            follow.cancel()

    async def _follow(self, watch) -> None:
        async for event in watch:
            if event.kind == "PUT":
                self._put(event.kv)
            else:
                self.replicas.pop(self._name(event.kv.key), None)
        raise ConnectionError("the etcd watch ended")

    def _put(self, kv) -> None:
        try:
            self.replicas[self._name(kv.key)] = orjson.loads(kv.value)
        except orjson.JSONDecodeError:
            log.warning("a fleet record that is not JSON, skipped: %r", kv.key)

    def _encoded(self) -> bytes:
        return orjson.dumps({"id": self.replica_id, **self.record(), "state": "ready"})  # draining: issue 16's next step

    def _name(self, key: bytes) -> str:
        return key[len(self.prefix):].decode()
