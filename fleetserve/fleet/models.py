"""Fleet-wide models: applied once through any replica, kept in etcd, loaded where placement
says, and answered from every replica.

Keys, under `fleetserve/<fleet>/`:
- `manifests/Model/<name>`: the applied manifest (a Seldon `Model`, as JSON), or a repository
  folder's (repository_manifest). It outlives every replica, as --state-dir does for one process.
- `loads/<name>`: the claim that one replica is loading the model, with the placement's figures.
  It is created only where absent (a compare-and-swap on the key's version) and bound to the
  loading replica's lease, so one load runs in the whole fleet however many replicas ask at
  once, and a loader that dies takes its claim with it. The loader deletes it once its record
  lists the model, or first writes `failed` into it so every waiter gets the reason.
- `placements/<name>/<replica>`: why a copy is where it is (the candidates and their figures, the
  cost placement assumed and what the load measured); removed when the copy goes.
- `costs/<name>`: what loading the model measured last, the figure placement uses (before any
  load, Registry.estimate: declared memory, else its artifacts' bytes times its runtime's ratio).

What routing believes: a replica serves a model when its record lists it. So a replica publishes
its record before it deletes a claim (peers route to a model that is there), and publishes it
without a model before it drops that model to make room (peers stop routing there first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import orjson

from fleetserve.errors import FleetError, InvalidInput, ModelUnavailable, NotFound, Relayed, describe
from fleetserve.fleet.membership import LEASE_SECONDS, Membership
from fleetserve.fleet.placement import NoPlace, choose
from fleetserve.graph.manifests import parse_manifest

from fleetserve.runtime.artifacts import is_remote
from fleetserve.runtime.registry import LOADING, READY, UNAVAILABLE, Registry
from fleetserve.runtime.repository import TRITON_CONFIG, is_version_number
from fleetserve.settings import is_within

if TYPE_CHECKING:
    from fleetserve.runtime.repository import Found

log = logging.getLogger(__name__)

COPY_WAIT = 120.0  # seconds a request waits for a copy to be loaded somewhere
IDLE_SECONDS = 10.0  # a copy unused this long may be dropped to make room for another model
# A copy with this many requests in it (queued or running) at HOT_CHECKS checks a second apart
# is hot: its model gains a copy, up to the manifest's maxReplicas.
HOT_IN_FLIGHT = 4
HOT_CHECKS = 3


def copies_wanted(manifest: dict[str, Any]) -> tuple[int, int]:
    """Seldon's `replicas`, `minReplicas` and `maxReplicas` as (copies on apply, most copies)."""
    spec = manifest.get("spec") or {}
    counts = {key: spec.get(key) for key in ("replicas", "minReplicas", "maxReplicas")}
    for key, value in counts.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InvalidInput(f"Model '{manifest['metadata']['name']}': spec.{key} must be a whole number")
    least = max(counts["replicas"] or 0, counts["minReplicas"] or 0, 1)
    most = counts["maxReplicas"] or least
    if most < least:
        raise InvalidInput(f"Model '{manifest['metadata']['name']}': spec.maxReplicas {most} is below {least} copies")
    return least, most


def repository_manifest(found: "Found") -> dict[str, Any] | None:
    """A model folder of the repository as the fleet's Model manifest, its storageUri the folder
    (so every replica must read that path: a shared folder, or one baked into the image); None
    for a folder that stays this replica's own, served to the fleet from here: one with version
    folders, a Triton model folder, one whose artifacts lie outside it, a broken one."""
    if found.error or len(found.versions) != 1:
        return None
    settings = found.versions[0]
    if is_version_number(settings.folder.name) or (settings.folder / TRITON_CONFIG).is_file():
        return None
    if settings.uri and (is_remote(settings.uri) or not is_within(settings.artifact_path, settings.folder)):
        return None
    spec: dict[str, Any] = {"storageUri": str(settings.folder)}
    if settings.requirements:
        spec["requirements"] = list(settings.requirements)
    if settings.memory:
        spec["memory"] = settings.memory
    return {"apiVersion": "mlops.seldon.io/v1alpha1", "kind": "Model", "metadata": {"name": found.name}, "spec": spec}


def digest(manifest: dict[str, Any]) -> str:
    """A manifest's fingerprint: which one a copy serves, or failed to load."""
    return hashlib.sha256(orjson.dumps(manifest, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _failure(error: BaseException) -> dict[str, Any]:
    """A load's error as etcd keeps it for every replica: as one process would have answered it."""
    failed = error if isinstance(error, FleetError) else ModelUnavailable(describe(error))
    return {"failed": failed.message, "status": failed.http_status, "code": failed.grpc_code.name}


def _relayed(record: dict[str, Any]) -> Relayed:
    return Relayed(grpc.StatusCode[record.get("code", "UNAVAILABLE")], record["failed"], record.get("status", 503))


@dataclass(frozen=True)
class _Applied:
    """A manifest this replica wrote: where, at which etcd revision, and what it replaced (None: nothing)."""
    key: bytes
    revision: int
    previous: dict[str, Any] | None


class _Etcd:
    """An etcd client whose calls fail as ModelUnavailable (503), whatever the client raised."""

    def __init__(self, client):
        self._client = client

    def __getattr__(self, name: str):
        call = getattr(self._client, name)

        async def wrapped(*args, **kwargs):
            try:
                return await call(*args, **kwargs)
            except Exception as error:
                raise ModelUnavailable(f"etcd: {describe(error)}") from error

        return wrapped


class FleetModels:
    def __init__(self, membership: Membership, registry: Registry):
        self.membership = membership
        self.registry = registry
        self.here: dict[str, dict[str, Any]] = {}  # fleet models with a copy here -> the manifest it runs
        self.leaving: set[str] = set()  # copies being dropped: already out of this replica's record
        self.stopped_serving = False  # drained: the record lists no model
        self.loaded_at: dict[str, float] = {}  # epoch ms each copy here was loaded
        self.loading: set[str] = set()
        self.claiming: set[str] = set()
        self.reloading: dict[str, asyncio.Task] = {}  # the reload task of each model (the last one)
        # model -> when its last fleet load failed, and the loader's error
        self.failures: dict[str, tuple[float, Relayed]] = {}
        self.placements = 0  # claims this replica won (metrics)
        self.loads: Counter[tuple[str, str]] = Counter()  # (model, "success" or "failure") loaded here for the fleet
        self.forwarded_to: Counter[str] = Counter()  # this replica's forwarded requests in flight, per replica
        self.unreachable: dict[str, float] = {}  # replica -> until when it is skipped (a failed hop)
        self._tasks: set[asyncio.Task] = set()
        self._gone: dict[str, asyncio.Future] = {}
        membership.listeners.append(self._on_change)

    @property
    def me(self) -> str:
        return self.membership.replica_id

    def manifest(self, name: str) -> dict[str, Any] | None:
        return self.membership.tables["manifests"].get(f"Model/{name}")

    def known(self, name: str) -> bool:
        """Whether the fleet has model `name`: applied to it, or served by a peer."""
        return self.manifest(name) is not None or bool(self.copies(name))

    def elsewhere(self, name: str) -> bool:
        """Whether requests for `name` go to a peer: no copy here serves it (one loading here
        serves once ready, the fleet's others meanwhile) and the fleet has it."""
        here = self.registry.models.get(name)
        if here is None:
            return True
        return not here.serving and self.manifest(name) is not None

    def serving_here(self) -> dict[str, int]:
        """This replica's copies as its record tells peers, with what each costs (the default
        version's measured or declared bytes): the ones on their way out are not."""
        if self.stopped_serving:
            return {}
        return {version.name: version.cost for version in self.registry.ready_versions() if version.name not in self.leaving}

    def idle_bytes(self) -> int:
        """What dropping this replica's idle fleet copies would free (placement weighs it)."""
        return sum(cost for _, cost in self._idle_copies())

    # Where a request goes.

    def copies(self, name: str, exclude: set[str] = frozenset()) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [record for replica, record in self.membership.replicas.items()
                if name in (record.get("models") or ()) and replica != self.me and replica not in exclude
                and record.get("state") in ("ready", "draining") and self.unreachable.get(replica, 0) < now]

    async def copy_for(self, name: str, exclude: set[str] = frozenset(), manifest: dict[str, Any] | None = None,
                       wait: float = COPY_WAIT) -> dict[str, Any]:
        """The peer to send a request for `name` to: the copy with the fewest requests in flight;
        none anywhere, one is claimed and loaded (or this waits for the load another claimed)."""
        started = time.monotonic()
        deadline = started + wait
        while True:
            copies = self.copies(name, exclude)
            if copies:  # a draining replica's copy only while there is no other
                return min(copies, key=lambda record: (record.get("state") != "ready",
                                                       record.get("in_flight", 0) + self.forwarded_to[record["id"]],
                                                       random.random()))
            if name in self.here and name not in self.leaving and self.me not in exclude:
                return self.membership.replicas.get(self.me) or {"id": self.me}
            failed = self.failures.get(name)
            if failed is not None and failed[0] >= started:
                raise failed[1]
            if name not in self.membership.tables["loads"] and name not in self.claiming:
                self.claiming.add(name)  # one claim at a time from this replica; the rest wait for it
                try:
                    await self._claim(name, manifest or self.manifest(name), exclude)
                finally:
                    self.claiming.discard(name)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelUnavailable(f"model '{name}' was not loaded anywhere in the fleet within {wait:.0f}s")
            await self.membership.changed(min(remaining, 1.0))

    async def _claim(self, name: str, manifest: dict[str, Any] | None, exclude: set[str]) -> None:
        if manifest is None:
            raise NotFound(f"model '{name}' not found")
        client = self.membership.client
        if client is None:
            raise ModelUnavailable(f"model '{name}' has no copy loaded, and none can be placed while etcd is unreachable")
        found = parse_manifest(manifest)
        versions = found.versions
        measured = self.membership.tables["costs"].get(name)
        cost = int(measured["bytes"]) if measured else await self.registry.estimate(found)
        requirements = sorted({requirement for version in versions for requirement in version.requirements})
        now = time.monotonic()
        skipped = set(exclude) | {replica for replica, until in self.unreachable.items() if until > now}
        try:
            target, candidates = choose(self.membership.replicas, requirements, cost, skipped, self._loading_bytes())
        except NoPlace as error:
            raise ModelUnavailable(f"model '{name}' cannot be placed: {error}") from None
        claim = {"replica": target, "by": self.me, "cost": cost, "at": time.time(),
                 "candidates": [candidate.describe() for candidate in candidates]}
        key, txn = self.membership.key_of("loads", name), self.membership.transactions
        try:
            created, _ = await _Etcd(client).transaction(
                compare=[txn.Version(key) == 0],
                success=[txn.Put(key, orjson.dumps(claim), self.membership.replicas[target]["lease"])], failure=[])
        except Exception as error:
            if "lease not found" not in str(error):
                raise
            # The target's lease ended after the table was read (it died): its record is about to go.
            self.unreachable[target] = now + LEASE_SECONDS
            log.info("model %s was not placed on replica %s: it left the fleet", name, target)
            return
        if created:
            self.placements += 1
            log.info("model %s placed on replica %s (%s bytes)", name, target, cost)

    def _loading_bytes(self) -> Counter[str]:
        """What the loads claimed and not yet done will take, by replica: placement counts them
        as taken, so many cold models asked for at once do not all pick the same roomiest replica."""
        loading: Counter[str] = Counter()
        for claim in self.membership.tables["loads"].values():
            if not claim.get("failed"):
                loading[claim.get("replica", "")] += int(claim.get("cost") or 0)
        return loading

    # Changes seen in etcd.

    def gone(self, replica: str) -> asyncio.Future:
        """Done when `replica` leaves the fleet's table (its lease ended: it died, hangs or is cut off)."""
        future = self._gone.get(replica)
        if future is None or future.done():
            future = self._gone[replica] = asyncio.get_running_loop().create_future()
        return future

    def _on_change(self, section: str, name: str, value: dict[str, Any] | None) -> None:
        if section == "replicas" and value is None and (left := self._gone.pop(name, None)) is not None:
            left.set_result(None)
        if section == "loads" and value is not None:
            if value.get("failed"):  # the loader's own error, as a load here would have answered it
                self.failures[name] = (time.monotonic(), _relayed(value))
            elif value.get("replica") == self.me and name not in self.loading:
                self.loading.add(name)
                self._spawn(self._load_here(name, value))
        elif section == "manifests":
            kind, _, model = name.partition("/")
            if kind == "Model" and model in self.here:
                if value is None:
                    self._spawn(self.drop(model))
                else:
                    self._follow_manifest(model)

    def _spawn(self, work) -> asyncio.Task:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _load_here(self, name: str, claim: dict[str, Any]) -> None:
        membership, key = self.membership, self.membership.key_of("loads", name)
        try:
            manifest = self.manifest(name)
            if manifest is None:
                raise NotFound(f"model '{name}' was deleted")
            found = parse_manifest(manifest)
            await self._make_room(int(claim.get("cost") or 0), keep=name)
            await self.registry.apply(found)
        except Exception as error:
            failure = _failure(error)
            self.loads[name, "failure"] += 1
            log.error("model %s failed to load for the fleet: %s", name, failure["failed"])
            try:
                await self._etcd().put(key, orjson.dumps({**claim, **failure}), lease=membership.lease_id)
                await self._etcd().delete(key)
            except Exception as unreported:
                log.warning("could not report model %s's failed load (%s); its claim ends with this replica's lease",
                            name, describe(unreported))
            return
        finally:
            self.loading.discard(name)
        self.loads[name, "success"] += 1
        self.here[name] = manifest
        self.loaded_at[name] = time.time() * 1000  # not idle before its first requests came
        self.leaving.discard(name)
        try:
            await membership.publish()  # peers find the copy before the claim goes
            cost = self.registry.get(name).cost
            txn = membership.transactions
            await self._etcd().transaction(compare=[], success=[
                txn.Delete(key),
                txn.Put(membership.key_of("placements", f"{name}/{self.me}"),
                        orjson.dumps({**claim, "measured": cost, "serves": digest(manifest)})),
                txn.Put(membership.key_of("costs", name), orjson.dumps({"bytes": cost})),
            ], failure=[])
        except Exception as error:  # loaded and serving; etcd learns of it from the next record
            log.warning("model %s loaded here, but etcd could not be told (%s)", name, describe(error))
        self._follow_manifest(name)  # applied again while it loaded: that one is loaded next

    def _follow_manifest(self, name: str) -> None:
        """The copy here comes to serve the model's manifest as etcd has it now: one reload task per
        model, which loads again while the manifest changed under a reload (a rollback included)."""
        running = self.reloading.get(name)
        if running is None or running.done():
            self.reloading[name] = self._spawn(self._reload_until_current(name))

    async def _reload_until_current(self, name: str) -> None:
        tried = None  # the manifest that failed here: tried again only once applied anew
        while name in self.here and name not in self.leaving:
            wanted = self.manifest(name)
            if wanted is None or wanted == self.here[name] or wanted == tried:
                return
            if not await self._reload(name, wanted):
                tried = wanted

    async def _reload(self, name: str, manifest: dict[str, Any]) -> bool:
        """A manifest applied again: loaded here in the old one's place, or (it fails) the old one
        serves on. Either way the placement record says so, for the replica that applied it."""
        key = self.membership.key_of("placements", f"{name}/{self.me}")
        try:
            await self.registry.apply(parse_manifest(manifest))
            self.here[name] = manifest
            outcome = {"serves": digest(manifest)}
        except Exception as error:
            outcome = {**_failure(error), "manifest": digest(manifest)}
            log.error("model %s's new manifest failed to load here; the old one serves on: %s", name, outcome["failed"])
        placement = {key: value for key, value in self._placement(name, self.me).items()
                     if key not in ("failed", "status", "code", "manifest")}
        placement["reloads"] = placement.get("reloads", 0) + 1
        try:
            await self._etcd().put(key, orjson.dumps({**placement, **outcome}))
        except FleetError as error:
            log.warning("model %s's reload here could not be reported: %s", name, error.message)
        return "serves" in outcome

    def _idle_copies(self) -> list[tuple[str, int]]:
        """Fleet copies here that nothing used for IDLE_SECONDS: extra copies first, then least recently used."""
        quiet_since = (time.time() - IDLE_SECONDS) * 1000
        idle = []
        for name in self.here:
            if name in self.leaving or name in self.loading:
                continue
            try:
                version = self.registry.get(name)
            except FleetError:
                continue
            if version.in_flight == 0 and max(version.stats.last_inference, self.loaded_at.get(name, 0)) < quiet_since:
                # A copy with others elsewhere goes first: dropping it leaves the model served.
                idle.append((not self.copies(name), version.stats.last_inference, name, version.cost))
        return [(name, cost) for *_, name, cost in sorted(idle)]

    async def _make_room(self, cost: int, keep: str) -> None:
        """Drop idle fleet copies, least recently used first, until `cost` fits this replica's books."""
        books = self.registry.memory.devices["cpu"]
        needed = books.registered_bytes + cost - books.registered_limit
        victims = []
        for name, freed in self._idle_copies():
            if needed <= 0:
                break
            if name != keep:
                victims.append(name)
                needed -= freed
        if victims:
            self.leaving.update(victims)
            await self.membership.publish()  # peers stop routing to them before they go
            await asyncio.gather(*(self.drop(name) for name in victims))

    async def drop(self, name: str) -> None:
        """This replica's copy leaves: first out of its record (peers stop routing here), then unloaded."""
        self.leaving.add(name)
        try:
            await self.membership.publish()
        except Exception as error:  # etcd gone: peers find out from a 421
            log.warning("dropping model %s's copy before etcd knows (%s)", name, describe(error))
        try:
            await self.registry.delete(name)
        except NotFound:
            pass
        finally:
            self.here.pop(name, None)
            self.leaving.discard(name)
        with contextlib.suppress(Exception):  # a placement left behind only explains a copy no record lists
            await self._etcd().delete(self.membership.key_of("placements", f"{name}/{self.me}"))
        log.info("model %s's copy left replica %s", name, self.me)

    async def hand_over(self, within: float) -> None:
        """Draining (SIGTERM): peers stop placing here, and every model whose only copy is here
        is loaded elsewhere before this returns (or `within` seconds pass); this replica serves
        them meanwhile."""
        self.membership.state = "draining"
        try:
            await self.membership.publish()
        except Exception as error:  # etcd gone: nothing can be placed elsewhere anyway
            log.warning("draining without etcd (%s): this replica's models are not handed over", describe(error))
            return
        leaving = {self.me} | {replica for replica, record in self.membership.replicas.items()
                               if record.get("state") != "ready"}  # another draining replica is no heir
        alone = [name for name in self.here if not self.copies(name, exclude=leaving)]
        if not alone:
            return
        log.info("draining: handing over %d model(s) with no other copy: %s", len(alone), ", ".join(sorted(alone)))
        handed = await asyncio.gather(*(self.copy_for(name, exclude=leaving, wait=within) for name in alone),
                                      return_exceptions=True)
        for name, result in zip(alone, handed):
            if isinstance(result, BaseException):
                log.warning("draining: model %s was not handed over: %s", name, describe(result))

    async def stop_serving(self) -> None:
        """The last of a drain: this replica's record lists no model, so peers send nothing more."""
        self.stopped_serving = True
        try:
            await self.membership.publish()
        except Exception as error:
            log.warning("could not tell the fleet this replica serves nothing more (%s)", describe(error))

    # Manifests applied and deleted through this replica.

    async def apply(self, manifest: dict[str, Any]) -> None:
        """Keep the manifest in etcd; replicas with a copy load it again, and a model with none
        is placed and loaded before this returns (a load that fails puts back the manifest before)."""
        name = manifest["metadata"]["name"]
        wanted, _ = copies_wanted(manifest)
        key = self.membership.key_of("manifests", f"Model/{name}")
        reloads = {holder: self._placement(name, holder).get("reloads", 0) for holder in self.holders(name)}
        put = await self._etcd().put(key, orjson.dumps(manifest), prev_kv=True)
        # A new key comes back with an empty previous value (a manifest is never empty).
        previous = orjson.loads(put.prev_kv.value) if put.prev_kv is not None and put.prev_kv.value else None
        applied = _Applied(key, put.header.revision, previous)
        if self.copies(name) or name in self.here:
            if previous is not None and previous != manifest:
                await self._reloaded_everywhere(name, manifest, applied, reloads)
            return
        try:
            await self.copy_for(name, manifest=manifest)
        except FleetError:
            await self._put_back(applied)
            raise
        while len(self.holders(name)) < wanted:
            before = len(self.holders(name))
            try:
                await self.add_copy(name, manifest)
            except FleetError as error:
                log.warning("model %s has %d of its %d copies: %s", name, before, wanted, error.message)
                return

    async def offer(self, manifest: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """A repository's model becomes the fleet's, unless the fleet has one of that name
        (applied, or offered by another replica): that one stays. Whether it became the fleet's,
        and the fleet's manifest (read with the offer: the watch may not have brought it yet)."""
        key, txn = self.membership.key_of("manifests", f"Model/{manifest['metadata']['name']}"), self.membership.transactions
        created, responses = await self._etcd().transaction(compare=[txn.Version(key) == 0],
                                                            success=[txn.Put(key, orjson.dumps(manifest))],
                                                            failure=[txn.Get(key)])
        if created or not responses or not responses[0]:  # deleted since: this one is as good as any
            return created, manifest
        return False, orjson.loads(responses[0][0][0])

    async def _put_back(self, applied: "_Applied") -> None:
        """The manifest before an apply that failed, unless another apply came since (that one stays)."""
        txn = self.membership.transactions
        restore = (txn.Delete(applied.key) if applied.previous is None
                   else txn.Put(applied.key, orjson.dumps(applied.previous)))
        try:
            restored, _ = await self._etcd().transaction(compare=[txn.Mod(applied.key) == applied.revision],
                                                         success=[restore], failure=[])
        except FleetError as error:
            log.error("%s: the manifest before could not be put back; the failed one stays in etcd (%s)",
                      applied.key.decode(), error.message)
            return
        if not restored:
            log.warning("%s was applied again meanwhile: that manifest stays", applied.key.decode())

    async def _reloaded_everywhere(self, name: str, manifest: dict[str, Any], applied: "_Applied",
                                   reloads: dict[str, int]) -> None:
        """Waits for every copy of `name` to load its new manifest. Where one fails (a reload
        after `reloads`, the holders' count before the apply), the previous manifest is put back
        (every copy still serves it: a failed reload keeps the old) and the apply answers with
        that copy's error, as one process answers a reload that fails."""
        new = digest(manifest)
        deadline = time.monotonic() + COPY_WAIT
        while time.monotonic() < deadline:
            outcomes = {holder: self._placement(name, holder) for holder in self.holders(name)}
            failed = next((outcome for holder, outcome in outcomes.items()
                           if outcome.get("manifest") == new and outcome.get("reloads", 0) > reloads.get(holder, 0)), None)
            if failed is not None:
                await self._put_back(applied)
                raise _relayed(failed)
            if all(outcome.get("serves") == new for outcome in outcomes.values()):
                return
            await self.membership.changed(1.0)
        late = sorted(holder for holder, outcome in outcomes.items() if outcome.get("serves") != new)
        log.warning("model %s: copies on %s did not report loading its new manifest within %.0fs", name,
                    ", ".join(late), COPY_WAIT)

    def _placement(self, name: str, replica: str) -> dict[str, Any]:
        return self.membership.tables["placements"].get(f"{name}/{replica}") or {}

    def holders(self, name: str) -> set[str]:
        """The replicas serving `name`, this one included."""
        holders = {record["id"] for record in self.copies(name)}
        return holders | {self.me} if name in self.here and name not in self.leaving else holders

    async def add_copy(self, name: str, manifest: dict[str, Any], wait: float = COPY_WAIT) -> None:
        """One more copy of `name`, on a replica without one; returns once it serves."""
        await self.copy_for(name, exclude=self.holders(name), manifest=manifest, wait=wait)

    async def _add_copies_where_hot(self) -> None:
        """Every second: a copy here that stays hot gives its model another copy (maxReplicas)."""
        heat: Counter[str] = Counter()
        while True:
            await asyncio.sleep(1.0)
            try:
                self._check_heat(heat)
            except Exception:  # one bad manifest must not end the loop for every model
                log.exception("checking which models are hot failed")

    def _check_heat(self, heat: Counter) -> None:
        for name in list(self.here):
            try:
                hot = self.registry.get(name).in_flight >= HOT_IN_FLIGHT
            except FleetError:
                hot = False
            heat[name] = heat[name] + 1 if hot else 0
            if heat[name] < HOT_CHECKS or name in self.membership.tables["loads"] or self.membership.client is None:
                continue
            heat[name] = 0
            manifest = self.here[name]
            if len(self.holders(name)) < copies_wanted(manifest)[1]:
                log.info("model %s is hot here (%d requests in it): adding a copy", name, HOT_IN_FLIGHT)
                self._spawn(self._quietly(self.add_copy(name, manifest)))

    @staticmethod
    async def _quietly(work) -> None:
        try:
            await work
        except FleetError as error:
            log.warning("%s", error.message)

    def start(self) -> None:
        self._spawn(self._add_copies_where_hot())

    def kept(self, kind: str, name: str) -> bool:
        return f"{kind}/{name}" in self.membership.tables["manifests"]

    async def keep(self, kind: str, name: str, manifest: dict[str, Any]) -> None:
        """A pipeline's or an experiment's manifest, kept for every replica to apply."""
        await self._etcd().put(self.membership.key_of("manifests", f"{kind}/{name}"), orjson.dumps(manifest))

    async def forget(self, kind: str, name: str) -> None:
        """The manifest leaves etcd; every replica removes what it applied (a model's copies unload)."""
        etcd = self._etcd()
        await etcd.delete(self.membership.key_of("manifests", f"{kind}/{name}"))
        if kind == "Model":  # a model applied again under this name is measured afresh
            await etcd.delete(self.membership.key_of("costs", name))

    def _etcd(self) -> "_Etcd":
        """etcd's client, whose failures are the fleet's 503s, not 500s."""
        client = self.membership.client
        if client is None:
            raise ModelUnavailable("etcd is unreachable: the fleet's models cannot change until it returns")
        return _Etcd(client)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def index_entries(self) -> dict[str, dict[str, Any]]:
        """The repository index's entries for the fleet's models that no version here serves:
        READY while a peer serves one (a request for it here is forwarded there), LOADING while the
        fleet loads one, UNAVAILABLE when no copy is anywhere. A model this replica tried and failed
        to load, with no copy elsewhere, keeps its own entry: its error says why."""
        names = {key.partition("/")[2] for key in self.membership.tables["manifests"] if key.startswith("Model/")}
        names.update(name for replica, record in self.membership.replicas.items() if replica != self.me
                     for name in record.get("models") or ())
        serving = {version.name for version in self.registry.ready_versions()}
        entries = {}
        for name in names - serving:
            holders = sorted(record["id"] for record in self.copies(name))
            claim = self.membership.tables["loads"].get(name)
            if holders:
                state, reason = READY, f"served by replica {', '.join(holders)}"
            elif claim is not None and not claim.get("failed"):
                state, reason = LOADING, "loading in the fleet"
            elif name in self.registry.models:
                continue
            else:
                state, reason = UNAVAILABLE, "no copy in the fleet"
            entries[name] = {"name": name, "state": state, "reason": reason}
        return entries

    def document(self, name: str) -> dict[str, Any]:
        """A model across the fleet: its copies and why each is where it is."""
        manifest = self.manifest(name)
        copies = [{"replica": replica, "address": record.get("address"), "state": record.get("state"),
                   "in_flight": record.get("in_flight", 0)}
                  for replica, record in sorted(self.membership.replicas.items()) if name in (record.get("models") or ())]
        if manifest is None and not copies:
            raise NotFound(f"model '{name}' is not in the fleet")
        placements = {key.partition("/")[2]: value for key, value in self.membership.tables["placements"].items()
                      if key.partition("/")[0] == name}
        for copy in copies:
            copy["placement"] = placements.get(copy["replica"])
        cost = self.membership.tables["costs"].get(name)
        return {"name": name, "manifest": manifest is not None, "cost_bytes": cost and cost["bytes"],
                "loading": self.membership.tables["loads"].get(name), "copies": copies}
