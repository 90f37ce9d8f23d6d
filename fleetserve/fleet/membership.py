"""A replica's place in the fleet: its record in etcd, bound to a lease, and the tables of the
fleet's keys, fed by one watch (no request reads etcd).

Keys, under `fleetserve/<fleet>/`:
- `replicas/<id>`: each replica's JSON record, bound to its lease. This process keeps its lease
  alive; a replica that dies leaves every table when its lease runs out (LEASE_SECONDS), one that
  stops (SIGTERM) at once.
- `manifests/<Kind>/<name>`, `loads/<model>`, `placements/<model>/<id>`, `costs/<model>`: the fleet's models
  (fleet/models.py says what they mean).

With etcd unreachable the replica keeps serving and keeps trying; the tables it last saw stay.
Cut off past its lease while etcd lives on (a peer's table, fed by etcd, no longer lists it), the
replica is fenced: not ready, so clients are sent elsewhere, until it joins again, or until a
peer shows etcd gone for it too. With etcd down for every replica no peer can show that the
lease ended, and every replica serves on. A peer that does not answer proves nothing either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

import orjson

from fleetserve.errors import describe
from fleetserve.settings import ServerSettings

log = logging.getLogger(__name__)

LEASE_SECONDS = 5
PUBLISH_EVERY = 1.0  # seconds between checks of this replica's record (written only when it changed)
FENCE_CHECK_EVERY = 1.0  # seconds between asking peers, while cut off past the lease, whether it ended
SECTIONS = ("replicas", "manifests", "loads", "placements", "costs")

# A change to one key: (section, name within it, the new value or None when deleted).
Listener = Callable[[str, str, "dict[str, Any] | None"], None]


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

        self._client_type = aetcd.Client
        self.transactions = aetcd.transactions
        self.endpoints = etcd_endpoints(settings.etcd)
        self.fleet = settings.fleet
        self.replica_id = settings.replica_id or socket.gethostname()
        self.host = advertised_host(settings)  # resolved once: the record is checked every second
        self.prefix = f"fleetserve/{self.fleet}/".encode()
        self.key = self.key_of("replicas", self.replica_id)
        self.record = record  # this replica's record as it is now
        self.state = "ready"
        self.tables: dict[str, dict[str, dict[str, Any]]] = {section: {} for section in SECTIONS}
        self.listeners: list[Listener] = []
        self.client = None  # while connected
        self.lease_id = 0
        self.connected = False
        self.fenced = ""  # why this replica is fenced; empty while it is not
        # What the peers say (forward.Hops.peers_on_me): the one whose table, fed by etcd, no longer
        # lists this replica, if one does, and whether one has lost etcd too. Set by the server.
        self.witness: Callable[[], Awaitable[tuple[str | None, bool]]] | None = None
        self.fence_changed: Callable[[], Awaitable[None]] | None = None
        self._last_contact = 0.0  # loop time etcd last renewed this replica's lease
        self._changed = asyncio.Event()  # replaced after every change: waiters hold the one they saw
        self._publish_soon = asyncio.Event()
        self._writing = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self._lease = None

    @property
    def replicas(self) -> dict[str, dict[str, Any]]:
        return self.tables["replicas"]

    def key_of(self, section: str, name: str) -> bytes:
        return self.prefix + f"{section}/{name}".encode()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._fence_while_cut_off())]

    async def stop(self) -> None:
        """Leave the fleet at once: the record goes with the lease."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.revoke(), 2.0)
            except Exception as error:  # etcd gone: the lease runs out by itself
                log.warning("could not leave the fleet at once (%s); peers forget this replica within %ds",
                            error, LEASE_SECONDS)

    def document(self) -> dict[str, Any]:
        return {"fleet": self.fleet, "replica": self.replica_id, "etcd": "connected" if self.connected else "unreachable",
                "fenced": self.fenced or None, "replicas": [self.replicas[name] for name in sorted(self.replicas)]}

    async def joined(self, within: float) -> bool:
        """Whether this replica is connected to etcd, waiting `within` seconds for it at most."""
        deadline = asyncio.get_running_loop().time() + within
        while not self.connected and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await self.changed(left)
        return self.connected

    async def changed(self, timeout: float) -> None:
        """Wait for the next change to any table (or the timeout); check what you wait for
        first, then call this, so a change between the two is not missed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def publish_soon(self) -> None:
        """This replica's record changed in a way peers should see before the next check."""
        self._publish_soon.set()

    async def publish(self) -> bool:
        """Write this replica's record now; False when etcd is not there to take it."""
        client = self.client
        if client is None:
            return False
        async with self._writing:  # one writer: an older record never lands after a newer one
            await client.put(self.key, self._encoded(), lease=self._lease)
        return True

    async def _run(self) -> None:
        attempt = 0
        while True:
            host, port = self.endpoints[attempt % len(self.endpoints)]
            attempt += 1
            try:
                async with self._client_type(host, port, timeout=LEASE_SECONDS) as client:
                    await self._serve(client)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.connected or attempt == 1:
                    log.warning("no etcd at %s:%d (%s): serving on, retrying", host, port, describe(error))
                self.connected = False
                self.client = None
                self._notify()
                await asyncio.sleep(1.0)

    async def _serve(self, client) -> None:
        self._lease = await client.lease(LEASE_SECONDS)
        self._last_contact = asyncio.get_running_loop().time()
        self.lease_id = self._lease.id
        published = self._encoded()
        await client.put(self.key, published, lease=self._lease)
        listing = await client.get_prefix(self.prefix)
        self._replace_tables(listing.kvs)
        watch = await client.watch_prefix(self.prefix, start_revision=listing.header.revision + 1)
        if not self.connected:
            log.info("replica %s joined fleet %s (%d replicas)", self.replica_id, self.fleet, len(self.replicas))
        self.client, self.connected = client, True
        await self._fence("")
        self._notify()
        follow = asyncio.create_task(self._follow(watch))
        try:
            refreshed = asyncio.get_running_loop().time()
            while not follow.done():
                asked = asyncio.ensure_future(self._publish_soon.wait())
                await asyncio.wait([follow, asked], timeout=PUBLISH_EVERY, return_when=asyncio.FIRST_COMPLETED)
                asked.cancel()
                self._publish_soon.clear()
                now = asyncio.get_running_loop().time()
                if now - refreshed >= PUBLISH_EVERY:
                    refreshed = now
                    if (await self._lease.refresh()).TTL <= 0:  # stalled past it: the record is gone
                        raise ConnectionError("the lease ran out")
                    self._last_contact = now
                async with self._writing:
                    current = self._encoded()
                    if current != published:
                        await client.put(self.key, current, lease=self._lease)
                        published = current
            follow.result()
        finally:
            follow.cancel()
            self.client = None

    async def _fence_while_cut_off(self) -> None:
        while True:
            await asyncio.sleep(FENCE_CHECK_EVERY)
            try:
                await self._check_fence()
            except Exception:  # never silently: a dead check would leave the replica fenced, or not
                log.exception("checking whether this replica is cut off from etcd failed")

    async def _check_fence(self) -> None:
        if not self._cut_off():
            if self.fenced and self.connected:  # joined again: a fence set from an older answer goes
                await self._fence("")
            return
        if self.witness is None:
            return
        missing_from, etcd_gone_there = await self.witness()
        if not self._cut_off():  # etcd came back while the peers were asked: their answer is old
            return
        if missing_from is not None:
            await self._fence(f"cut off from etcd, which ended this replica's lease (replica {missing_from} "
                              "no longer lists it)")
        elif self.fenced and etcd_gone_there:  # etcd has since gone for the others: none is better placed
            await self._fence("")

    def _cut_off(self) -> bool:
        """No word from etcd for longer than the lease (and there was word once)."""
        return bool(self._last_contact) and asyncio.get_running_loop().time() - self._last_contact > LEASE_SECONDS

    async def _fence(self, why: str) -> None:
        if why == self.fenced:
            return
        if why:
            log.warning("fenced: %s; not ready until etcd is back, serving only what is already here", why)
        else:
            log.info("no longer fenced: ready again")
        self.fenced = why
        if self.fence_changed is not None:
            try:
                await self.fence_changed()
            except Exception:  # the readiness probes' state; etcd's connection has nothing to do with it
                log.exception("telling the front doors about the fence failed")

    async def _follow(self, watch) -> None:
        async for event in watch:
            self._apply(event.kv.key, event.kv.value if event.kind == "PUT" else None)
            self._notify()
        raise ConnectionError("the etcd watch ended")

    def _replace_tables(self, kvs) -> None:
        """A fresh listing (at join, and after etcd came back): what went meanwhile is reported gone."""
        before = {section: dict(table) for section, table in self.tables.items()}
        for table in self.tables.values():
            table.clear()
        for kv in kvs:
            self._apply(kv.key, kv.value, quiet=True)
        for section, table in self.tables.items():
            for name in before[section].keys() - table.keys():
                self._tell(section, name, None)
            for name, value in table.items():
                if before[section].get(name) != value:
                    self._tell(section, name, value)

    def _apply(self, key: bytes, value: bytes | None, quiet: bool = False) -> None:
        section, _, name = key[len(self.prefix):].decode().partition("/")
        table = self.tables.get(section)
        if table is None or not name:
            return
        if value is None:
            if table.pop(name, None) is not None and not quiet:
                self._tell(section, name, None)
            return
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("a fleet record that is not JSON, skipped: %r", key)
            return
        table[name] = parsed
        if not quiet:
            self._tell(section, name, parsed)

    def _tell(self, section: str, name: str, value: dict[str, Any] | None) -> None:
        for listener in self.listeners:
            try:
                listener(section, name, value)
            except Exception:
                log.exception("a fleet listener failed on %s/%s", section, name)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _encoded(self) -> bytes:
        return orjson.dumps({"id": self.replica_id, "lease": self.lease_id, **self.record(), "state": self.state})
