"""Model states and versions: what is loaded, what is loading, and why a model is unavailable.

The data plane counts every request into a version (`in_flight`), so a model is never unloaded
or evicted under a request: unload waits for in-flight requests to finish first. A reload that
fails leaves the versions that were serving in place.

An evicted version stays READY to clients: it is registered, its artifacts stay in the disk
cache, and the next request reloads it (one reload, however many requests wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import gc
import inspect
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Awaitable, Callable

from fleetserve.errors import Busy, CapacityExceeded, FleetError, ModelLoadError, ModelUnavailable, NotFound, describe
from fleetserve.runtime import metrics
from fleetserve.runtime.artifacts import ArtifactCache, cache_key, is_remote, size_on_disk
from fleetserve.runtime.base import Runtime, is_custom_runtime
from fleetserve.runtime.memory import MemoryManager, format_bytes, return_freed_memory, start_measured
from fleetserve.runtime.repository import Found, ModelRepository, is_version_number
from fleetserve.runtime.workers import WorkerPool
from fleetserve.settings import ModelSettings, TensorMetadata, check_model_name

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"

RuntimeResolver = Callable[[ModelSettings], type[Runtime]]

# Threads that read artifacts and load models (Triton's --model-load-thread-count).
LOAD_THREADS = 4
# Estimates (Registry._estimate) learn what a runtime keeps per artifact byte only from artifacts
# this big, and believe at most this ratio: a model's memory is mostly its weights, unpacked.
_LEARN_FROM_BYTES = 1 << 20
_MOST_KEPT_PER_ARTIFACT_BYTE = 32.0

# Models the start-up loads at a time, so that a stop waits only for those. Not fewer: loads
# that begin together queue their runtime imports (frameworks) on the load threads ahead of any
# unpickling; with 4 at a time a framework imported on one thread while another thread unpickled
# a model of it failed in Python's import locks (_DeadlockError, half-imported sklearn modules).
LOAD_TURNS = 4 * LOAD_THREADS


@dataclass
class Statistics:
    """Triton-style counters: durations in nanoseconds, `last_inference` in epoch milliseconds.
    Also what /metrics reports for the version (metrics.InferenceCollector)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0  # waiting for a worker thread
    compute_infer_ns: int = 0
    last_inference: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by outcome: the error's kind
    # Successes by latency: one count per metrics.LATENCY_BUCKETS_NS bound, then one past the last.
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(metrics.LATENCY_BUCKETS_NS) + 1))


@dataclass(eq=False)
class ModelVersion:
    settings: ModelSettings
    # Caps the worker threads one version may hold, so one slow model cannot take them all.
    slots: asyncio.Semaphore
    device: str = "cpu"  # whose memory books count it: "cpu" (this process) or "gpu" (Triton)
    state: str = LOADING
    reason: str = ""
    runtime: Runtime | None = None  # None while loading, after unload, and while evicted
    predict_is_async: bool = False
    pooled: bool = False  # its predicts run in worker processes: one slot per worker
    in_flight: int = 0
    queued: int = 0  # requests waiting for a slot under the model's queue policy (the data plane's)
    measured: int = 0  # bytes the first measured load took
    unmeasured: bool = False  # loaded while another load was measured: measure at the next reload
    # Before its first measured load, a model that declares no memory costs an estimate: its
    # artifacts' bytes times what its runtime kept per artifact byte when it last measured one.
    estimated: int = 0
    reload_seconds: float = 0.0  # its last reload after eviction: reading artifacts and starting the runtime
    artifact_bytes: int = 0
    reloading: asyncio.Future | None = None
    stats: Statistics = field(default_factory=Statistics)
    inputs: list[TensorMetadata] = field(default_factory=list)  # as the runtime describes them once loaded
    outputs: list[TensorMetadata] = field(default_factory=list)
    backend_versions: list[str] = field(default_factory=list)  # as the runtime's backend serves them (Triton's)
    platform: str = ""  # the backend's name for what runs the model, once loaded (Triton's "python", say)
    input_checks: dict | None = None  # the data plane's checks of the declared inputs
    pace: Any = None  # the data plane's Pace: may predict run on the event loop
    batcher: Any = None  # the data plane's AdaptiveBatcher; False when batching is off

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def declared(self) -> int:
        return self.settings.memory

    @property
    def cost(self) -> int:
        return max(self.declared, self.measured, self.estimated)

    @property
    def version(self) -> str | None:
        return self.settings.version


@dataclass(eq=False)
class Model:
    name: str
    versions: dict[str | None, ModelVersion] = field(default_factory=dict)
    reason: str = ""  # why the model as a whole is unavailable (broken settings)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def serving(self) -> bool:
        return any(version.state == READY for version in self.versions.values())

    def default_version(self) -> ModelVersion | None:
        """The highest ready version, else the highest version (to report its state)."""
        if len(self.versions) == 1:
            return next(iter(self.versions.values()))
        if not self.versions:
            return None
        ordered = sorted(self.versions.values(), key=lambda v: _version_order(v.version))
        ready = [version for version in ordered if version.state == READY]
        return (ready or ordered)[-1]


def _refreeze_heap() -> None:
    """Move live long-lived objects (models, framework modules) out of the collector's reach.

    Full collections traverse every tracked object; with a framework or two imported they take
    tens of milliseconds and show up as the p99 of every request. Run after loads and unloads
    (see _schedule_refreeze): unfreezing first lets an unloaded model's reference cycles be collected.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    return_freed_memory()


def _freeze_new_objects() -> None:
    gc.collect(1)  # young garbage first, so only live objects are frozen
    gc.freeze()


def _version_order(version: str | None) -> tuple[int, str]:
    if version is None:
        return (-1, "")
    return (int(version), version) if is_version_number(version) else (0, version)


class Registry:
    def __init__(
        self,
        repository: ModelRepository,
        resolve_runtime: RuntimeResolver,
        memory: MemoryManager,
        artifacts: ArtifactCache,
        max_concurrency: int = 4,
        eviction_wait: float = 30.0,
        custom_workers: int = 1,
    ):
        self.repository = repository
        self.resolve_runtime = resolve_runtime
        self.memory = memory
        self.artifacts = artifacts
        self.max_concurrency = max_concurrency
        self.eviction_wait = eviction_wait
        self.custom_workers = custom_workers  # worker processes of a custom runtime that does not say
        # Loads read files and import frameworks: their own threads, never the inference ones.
        self.executor = ThreadPoolExecutor(LOAD_THREADS, thread_name_prefix="fleetserve-load")
        self.models: dict[str, Model] = {}
        self.manifests: dict[str, Found] = {}  # models applied as manifests, not found in the repository
        # One model at a time claims a device's memory, so two never claim the same bytes.
        self._admission = {device: asyncio.Lock() for device in memory.devices}
        self._kept_per_artifact_byte: dict[str, float] = {}  # by runtime (ModelSettings.runtime_key)
        self._refreeze: asyncio.TimerHandle | None = None

    # Lookups on the request path: plain dict reads, no awaits.

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model '{name}' not found")
        if version:
            found = model.versions.get(version)
            if found is None and (own := model.versions.get(None)) is not None and version in own.backend_versions:
                found = own  # its backend tells the version apart (runtime.Runtime.own_versions)
            if found is None:
                raise NotFound(f"model '{name}' has no version '{version}'")
        else:
            found = model.default_version()
            if found is None:
                raise ModelUnavailable(f"model '{name}' is unavailable: {model.reason or 'not loaded'}")
        return found

    def get_ready(self, name: str, version: str | None = None) -> ModelVersion:
        found = self.get(name, version)
        if found.state != READY:
            reason = f": {found.reason}" if found.reason else ""
            raise ModelUnavailable(f"model '{name}' is {found.state.lower()}{reason}")
        return found

    def all_versions(self) -> list[ModelVersion]:
        # list() copies in one step, so /metrics (on a worker thread) can read while the loop changes them.
        return [version for model in list(self.models.values()) for version in list(model.versions.values())]

    def ready_versions(self) -> list[ModelVersion]:
        return [version for version in self.all_versions() if version.state == READY]

    async def index(self, ready_only: bool = False, elsewhere: dict[str, dict] | None = None) -> list[dict]:
        """Every model the server knows or the repository holds: state, reason and memory; and,
        in a fleet, the entries of the models only peers hold (`elsewhere`, by name)."""
        elsewhere = elsewhere or {}
        entries = list(elsewhere.values())
        for model in self.models.values():
            if model.name in elsewhere:
                continue
            if not model.versions:
                entries.append({"name": model.name, "state": UNAVAILABLE, "reason": model.reason})
            for version in model.versions.values():
                entry = {"name": model.name, "state": version.state, "reason": version.reason}
                if version.version is not None:
                    entry["version"] = version.version
                entry.update(
                    device=version.device,
                    resident=version.runtime is not None,
                    declared_memory_bytes=version.declared,
                    measured_memory_bytes=version.measured,
                )
                entries.append(entry)
        for name, found in (await self.scan()).items():
            if name not in self.models and name not in elsewhere:
                entries.append({"name": name, "state": UNAVAILABLE, "reason": found.error or "not loaded"})
        if ready_only:
            entries = [entry for entry in entries if entry["state"] == READY]
        return sorted(entries, key=lambda entry: (entry["name"], _version_order(entry.get("version"))))

    # Lifecycle.

    async def _in_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def scan(self) -> dict[str, Found]:
        return await self._in_thread(self.repository.scan)

    async def find(self, name: str) -> Found:
        check_model_name(name)
        return await self._in_thread(self.repository.find, name)

    async def load_all(self, found: dict[str, Found] | None = None) -> None:
        """Load every model in the repository (or those `found` in it), LOAD_TURNS at a time;
        failures are recorded, not raised. Cancelled (the server stops), the loads under way
        complete and those not begun never begin."""
        found = await self.scan() if found is None else found
        await self.in_turns({name: partial(self.load, name, entry) for name, entry in found.items()})

    async def apply_all(self, manifests: list[Found]) -> None:
        """apply() each, LOAD_TURNS at a time; failures are logged, not raised."""
        await self.in_turns({found.name: partial(self.apply, found) for found in manifests})

    @staticmethod
    async def in_turns(loads: dict[str, Callable[[], Awaitable[Any]]]) -> None:
        """Each model's load, LOAD_TURNS at a time; a failure is logged, not raised."""
        turns = asyncio.Semaphore(LOAD_TURNS)

        async def in_turn(load) -> None:
            async with turns:
                await load()

        results = await asyncio.gather(*(in_turn(load) for load in loads.values()), return_exceptions=True)
        for name, result in zip(loads, results):
            if isinstance(result, BaseException):
                log.error("model %s is unavailable: %s", name, getattr(result, "message", result))

    async def apply(self, found: Found) -> None:
        """Register a model given by a manifest (it wins over a repository folder of the same name), then load it."""
        check_model_name(found.name)
        previous = self.manifests.get(found.name)
        self.manifests[found.name] = found
        try:
            await self.load(found.name, found)
        except FleetError:
            model = self.models.get(found.name)
            if self.manifests.get(found.name) is found and not (model and model.serving):
                # Nothing of it serves: forget it, so a repository model of that name shows again.
                if previous is None:
                    del self.manifests[found.name]
                else:
                    self.manifests[found.name] = previous
            raise

    async def load(self, name: str, found: Found | None = None) -> None:
        """Load (or reload) a model from its manifest or the repository.

        The versions serving go on serving until the new ones are all ready; if any new version
        fails, the old ones stay and the load answers with the reasons. The load completes even if
        the client that asked goes away: half a load would leave the books wrong.
        """
        check_model_name(name)
        if found is None:
            found = self.manifests.get(name) or await self._in_thread(self.repository.find, name)
        await _to_completion(self._load(name, found))

    async def _load(self, name: str, found: Found) -> None:
        model = self.models.setdefault(name, Model(name))
        async with model.lock:
            serving = model.serving
            if found.error:
                if not serving:
                    model.versions, model.reason = {}, found.error
                raise ModelLoadError(f"model '{name}' failed to load: {found.error}")
            loading = [ModelVersion(settings, asyncio.Semaphore(self.max_concurrency), settings.device)
                       for settings in found.versions]
            replaced = list(model.versions.values())
            if not serving:
                model.versions = {version.version: version for version in loading}  # visible as LOADING
                await asyncio.gather(*(self._unload_version(version) for version in replaced))
            try:
                # A manifest is complete only with its artifacts: their model-settings.json may name
                # the runtime, and so the device whose memory the model takes.
                try:
                    await asyncio.gather(*(self._prepare_artifacts(v) for v in loading if v.settings.from_manifest))
                except Exception as error:
                    raise ModelLoadError(f"model '{name}' failed to load: {describe(error)}") from error
                for version in loading:
                    version.device = version.settings.device
                await self._in_thread(self._estimate, loading)
                self.memory.register(loading, replacing=replaced)
            except BaseException as error:
                if not serving:
                    model.versions, model.reason = {}, describe(error)
                await self._forget_downloads(loading)
                raise
            errors = await asyncio.gather(*(self._load_version(version, replaced) for version in loading))
            failed = [version for version in loading if version.state != READY]
            await self._forget_downloads(failed)  # a failed load leaves no files behind
            reasons = "; ".join(f"{_label(version)}: {version.reason}" for version in failed)
            busy = next((error for error in errors if isinstance(error, Busy)), None)
            if serving and failed:
                await asyncio.gather(*(self._unload_version(version) for version in loading))
                if busy is not None:
                    raise busy  # no room in time: 503, the client may retry
                raise ModelLoadError(f"model '{name}' failed to reload ({reasons}); the loaded versions go on serving")
            previous = model.versions
            model.versions = {version.version: version for version in loading}
            model.reason = ""
            await asyncio.gather(*(self._unload_version(v) for v in previous.values() if v not in loading))
            if failed and len(failed) == len(loading):
                if busy is not None:
                    raise busy
                raise ModelLoadError(f"model '{name}' failed to load: {reasons}")

    async def unload(self, name: str, grace: float = 30.0, keep_files: bool = False) -> None:
        check_model_name(name)
        await _to_completion(self._unload(name, grace, keep_files))

    async def _unload(self, name: str, grace: float, keep_files: bool) -> None:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model '{name}' is not loaded")
        async with model.lock:
            loaded = [version for version in model.versions.values() if self.memory.is_registered(version)]
            if not loaded:
                raise NotFound(f"model '{name}' is not loaded")
            await asyncio.gather(*(self._unload_version(version, grace, keep_files) for version in loaded))

    async def delete(self, name: str, grace: float = 30.0) -> None:
        """Unload a model applied as a manifest and forget the manifest."""
        found = self.manifests.get(name)
        if found is None:
            raise NotFound(f"no model '{name}' was applied as a manifest")
        try:
            await self.unload(name, grace)
        except NotFound:
            pass
        if self.manifests.get(name) is found:  # not re-applied meanwhile
            del self.manifests[name]
            model = self.models.get(name)
            if model is not None and not model.lock.locked() and not any(
                self.memory.is_registered(version) for version in model.versions.values()
            ):
                del self.models[name]  # gone, not listed as unloaded; a repository folder of that name shows again

    async def unload_all(self, grace: float) -> None:
        # Downloaded artifacts stay for the next start to reuse.
        await asyncio.gather(*(self.unload(name, grace, keep_files=True) for name in list(self.models)), return_exceptions=True)
        if self._refreeze is not None:
            self._refreeze.cancel()
        self.executor.shutdown(wait=False)

    async def ensure_resident(self, version: ModelVersion) -> None:
        """Reload an evicted version; every request waiting for it shares one reload."""
        if version.runtime is not None:
            return
        if version.reloading is None:
            self.memory.of(version).misses += 1
            # Shared by every request waiting for it: none of their contexts (log fields, trace) is its own.
            version.reloading = asyncio.get_running_loop().create_task(self._reload(version), context=contextvars.Context())
            version.reloading.add_done_callback(_forget_reload(version))
        await asyncio.shield(version.reloading)

    async def _reload(self, version: ModelVersion) -> None:
        version.in_flight += 1  # the reload pins what it loads, whether or not its requests wait
        try:
            started = time.perf_counter()
            await self._admit(version)
            try:
                loading = time.perf_counter()
                await self._prepare_artifacts(version)
                runtime = await self._start_warm(version, measure=version.unmeasured)
            except BaseException as error:
                self.memory.of(version).mark_evicted(version)
                if isinstance(error, asyncio.CancelledError):
                    raise
                reason = describe(error)
                raise ModelUnavailable(f"model '{version.name}' was evicted and could not be reloaded: {reason}") from error
            # What evicting it costs (DeviceMemory.victims): a reload, which imports no framework.
            version.reload_seconds = time.perf_counter() - loading
            if not self.memory.is_registered(version):  # unloaded while it reloaded
                self.memory.of(version).mark_evicted(version)
                await self._stop_runtime(version, runtime)
                raise ModelUnavailable(f"model '{version.name}' was unloaded")
            version.runtime = runtime
            metrics.MODEL_RELOAD_DURATION.observe(time.perf_counter() - started)
            # The reloaded model's objects join the frozen heap, so full collections stay short.
            asyncio.get_running_loop().run_in_executor(self.executor, _freeze_new_objects)
            await self._trim(version)
        finally:
            version.in_flight -= 1

    async def _admit(self, version: ModelVersion) -> None:
        """Claim the version's memory, evicting least recently used idle models to make room.
        Waits up to `eviction_wait` for busy models to finish, then answers 503."""
        books = self.memory.of(version)
        books.check_fits(version)
        async with self._admission[books.device]:
            deadline = time.monotonic() + self.eviction_wait
            while True:
                if version not in books.registered:
                    raise ModelUnavailable(f"model '{version.name}' was unloaded")
                victims = books.victims(version.cost, keep=version)
                if victims is not None:
                    books.mark_resident(version)
                    await self._evict(victims)
                    return
                if time.monotonic() > deadline:
                    memory = "memory" if books.device == "cpu" else f"{books.device.upper()} memory"
                    raise Busy(
                        f"no {memory} for model '{version.name}' ({format_bytes(version.cost)}): "
                        f"{format_bytes(books.resident_bytes)} of {format_bytes(books.limit)} "
                        f"is held by models serving requests; waited {self.eviction_wait:g}s"
                    )
                await asyncio.sleep(0.01)

    async def _evict(self, victims: list[ModelVersion]) -> None:
        # Every victim leaves the books before any await, so none can be pinned in between.
        stopping = []
        for victim in victims:
            stopping.append((victim, victim.runtime))
            victim.runtime = None
            books = self.memory.of(victim)
            books.mark_evicted(victim)
            books.evictions += 1
            log.info("model %s evicted (%s)", _label(victim), format_bytes(victim.cost))
        for victim, runtime in stopping:
            if runtime is not None:
                await self._stop_runtime(victim, runtime)
        if victims:
            self._schedule_refreeze(within=60.0)

    async def _prepare_artifacts(self, version: ModelVersion) -> None:
        """Check where the artifacts are, download remote ones (a cache hit after the first time)
        and, for a manifest, read the model-settings.json among them."""
        settings = version.settings
        if settings.uri and settings.fetched is None:  # checked before anything is read or downloaded
            self.artifacts.check(settings.uri, settings.folder)
        if is_remote(settings.uri or ""):
            settings.fetched = await self._in_thread(self.artifacts.fetch, settings.uri)
        if settings.from_manifest:
            await self._in_thread(settings.complete_from_artifacts)

    async def _load_version(self, version: ModelVersion, replaced: list[ModelVersion] = ()) -> FleetError | None:
        """Load one version; a failure is recorded on it (and returned), never raised."""
        started = time.perf_counter()
        version.state = LOADING
        try:
            await self._admit(version)
            await self._prepare_artifacts(version)  # a cache hit for a manifest, unless something removed it since
            runtime = await self._start_warm(version, measure=True)
            books = self.memory.of(version)
            # The versions this load replaces serve (and stay registered) until it is done.
            registered = books.registered_bytes - sum(books.registered.get(old, 0) for old in replaced)
            if registered > books.registered_limit:
                books.unregister(version)  # before any await: its cost must not refuse a load beside it
                await self._stop_runtime(version, runtime)
                raise CapacityExceeded(
                    f"model '{version.name}' took {format_bytes(version.cost)} once loaded: "
                    f"{books.describe_registered(registered)}; it was unloaded"
                )
            # Kept for metadata requests while the version is evicted.
            version.inputs, version.outputs = runtime.metadata_inputs(), runtime.metadata_outputs()
            version.backend_versions, version.platform = runtime.own_versions, runtime.own_platform
        except BaseException as error:  # a model's code may raise anything, even SystemExit; it must not stop the server
            reason = describe(error)
            version.state, version.reason = UNAVAILABLE, reason
            self.memory.of(version).unregister(version)
            metrics.MODEL_LOAD_DURATION.labels("error").observe(time.perf_counter() - started)
            log.error("model %s failed to load: %s", _label(version), reason)
            if isinstance(error, asyncio.CancelledError):
                raise
            return error if isinstance(error, FleetError) else None
        version.runtime = runtime
        version.predict_is_async = inspect.iscoroutinefunction(runtime.predict)
        version.state, version.reason = READY, ""
        self._schedule_refreeze()
        elapsed = time.perf_counter() - started
        metrics.MODEL_LOAD_DURATION.labels("success").observe(elapsed)
        metrics.MODELS_LOADED.inc()
        metrics.MODEL_CHANGES.loads += 1
        log.info("model %s loaded in %.2fs (%s, %s)", _label(version), elapsed, type(runtime).__name__,
                 format_bytes(version.cost))
        await self._trim(version)
        return None

    async def _trim(self, keep: ModelVersion) -> None:
        """A load took more than it declared: evict idle models until the resident ones fit again."""
        if keep.declared and keep.measured > 2 * keep.declared:
            log.warning("model %s declares %s of memory but loading it took %s; its cost is the measured figure",
                        _label(keep), format_bytes(keep.declared), format_bytes(keep.measured))
        books = self.memory.of(keep)
        if books.registered_bytes > books.registered_limit:
            log.warning("registered %s models now take %s of %s, after measuring model %s", books.device,
                        format_bytes(books.registered_bytes), format_bytes(books.registered_limit), _label(keep))
        if books.resident_bytes <= books.limit:
            return
        async with self._admission[books.device]:
            await self._evict(books.victims(0, keep=keep) or [])

    async def _start_warm(self, version: ModelVersion, measure: bool = False) -> Runtime:
        """The runtime started, and its warmup requests answered before any other reaches it."""
        runtime = await self._start_runtime(version, measure)
        samples = version.settings.warmup
        if not samples:
            return runtime
        started = time.perf_counter()
        for number, request in enumerate(samples, 1):
            try:
                if inspect.iscoroutinefunction(runtime.predict):  # Triton's, a worker pool's: their own I/O
                    await runtime.predict(request)
                else:
                    await self._in_thread(runtime.predict, request)
            except BaseException as error:
                await self._stop_runtime(version, runtime)
                if isinstance(error, asyncio.CancelledError):
                    raise
                raise ModelLoadError(f"model '{version.name}': warmup request {number} of {len(samples)} failed: "
                                     f"{describe(error)}") from error
        log.info("model %s warmed up with %d request(s) in %.3fs", _label(version), len(samples),
                 time.perf_counter() - started)
        return runtime

    async def _start_runtime(self, version: ModelVersion, measure: bool = False) -> Runtime:
        settings = version.settings
        # Resolving imports the runtime's module (seconds for some): off the event loop too.
        runtime_class = await self._in_thread(self.resolve_runtime, settings)
        is_async = inspect.iscoroutinefunction(runtime_class.load) or inspect.iscoroutinefunction(runtime_class.predict)
        workers = settings.parallel_workers
        if workers is None:
            # User code runs in a process of its own, so a crash in it (a segfault in native code)
            # fails only its own requests; async runtimes run on the loop, which a worker cannot host.
            workers = self.custom_workers if is_custom_runtime(runtime_class) and not is_async else 0
        if workers:
            if is_async:
                raise ModelLoadError(
                    f"model '{settings.name}': parallel_workers runs plain load() and predict() methods in worker "
                    f"processes; {runtime_class.__name__} has async ones, which run on the server's event loop instead"
                )
            pool = WorkerPool(settings, workers)
            # A slot per worker, so requests queue (and keep their deadlines) in the data plane,
            # not in the pool. Nothing holds or awaits the slots of a version that is not resident.
            version.slots, version.pooled = asyncio.Semaphore(workers), True
            await self._in_thread(pool.load)
            self._measured(version, pool.memory_bytes())
            return pool
        if inspect.iscoroutinefunction(runtime_class.load):  # its memory is elsewhere (Triton) or its own to tell
            runtime = runtime_class(settings)
            await runtime.load()
            self._measured(version, runtime.footprint())
            return runtime

        def start() -> Runtime:
            runtime = runtime_class(settings)
            runtime.load()
            return runtime

        if not measure:
            return await self._in_thread(start)
        runtime, measured, exact = await self._in_thread(start_measured, start)
        measured = max(measured, runtime.footprint())
        if not exact:  # an estimate, perhaps swollen by other loads: only when nothing is declared, and capped
            measured = 0 if version.declared else min(measured, self.memory.of(version).limit)
        self._measured(version, measured, exact)
        return runtime

    def _measured(self, version: ModelVersion, measured: int, exact: bool = True) -> None:
        version.measured, version.unmeasured, version.estimated = measured, not exact, 0
        # Learned from weights, not from a few files of code (nor a worker's whole interpreter).
        if exact and not version.pooled and version.artifact_bytes >= _LEARN_FROM_BYTES:
            ratio = min(measured / version.artifact_bytes, _MOST_KEPT_PER_ARTIFACT_BYTE)
            self._kept_per_artifact_byte[version.settings.runtime_key] = ratio
        self.memory.recount(version)

    def _estimate(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            artifact_bytes = self._artifact_bytes(version.settings)
            if artifact_bytes is None:
                continue  # the load refuses it, in its own words
            version.artifact_bytes = artifact_bytes
            if not version.declared:
                version.estimated = self._kept(version.settings, artifact_bytes)

    def _artifact_bytes(self, settings: ModelSettings) -> int | None:
        """The bytes of the model's artifacts here; None where they may not be read."""
        if settings.uri and settings.fetched is None:
            try:
                self.artifacts.check(settings.uri, settings.folder)
            except FleetError:
                return None
        return size_on_disk(settings.artifact_path)

    def _kept(self, settings: ModelSettings, artifact_bytes: int) -> int:
        return int(artifact_bytes * self._kept_per_artifact_byte.get(settings.runtime_key, 1.0))

    async def estimate(self, found: Found) -> int:
        """What loading `found` would take, before any load measured it (the fleet places it by
        this): its declared memory, else its artifacts' bytes times what its runtime kept per
        artifact byte; 0 for artifacts not here yet (remote ones before their download). A
        manifest's artifacts may say which runtime and how much memory (their model-settings.json)."""
        def estimated(settings: ModelSettings) -> int:
            if settings.memory:
                return settings.memory
            if is_remote(settings.uri or "") and settings.fetched is None:
                return 0
            artifact_bytes = self._artifact_bytes(settings)  # the storage is checked before anything is read
            if artifact_bytes is None:
                return 0
            if settings.from_manifest:  # on a copy: the load completes (and checks) its own settings
                settings = copy.copy(settings)
                with contextlib.suppress(FleetError):  # the load refuses it, in its own words
                    settings.complete_from_artifacts()
                if settings.memory:
                    return settings.memory
            return self._kept(settings, artifact_bytes)

        return max(await self._in_thread(lambda: [estimated(settings) for settings in found.versions]), default=0)

    async def _stop_runtime(self, version: ModelVersion, runtime: Runtime) -> None:
        try:
            if inspect.iscoroutinefunction(runtime.unload):
                await runtime.unload()
            else:
                await self._in_thread(runtime.unload)
        except Exception:
            log.exception("model %s raised while unloading", _label(version))

    async def _unload_version(self, version: ModelVersion, grace: float = 30.0, keep_files: bool = False) -> None:
        if not self.memory.is_registered(version):
            return
        was_ready = version.state == READY
        version.state = UNLOADING
        deadline = time.monotonic() + grace
        while version.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        runtime, version.runtime = version.runtime, None
        version.state, version.reason = UNAVAILABLE, "unloaded"
        self.memory.of(version).unregister(version)
        if was_ready:
            metrics.MODELS_LOADED.dec()
            metrics.MODEL_CHANGES.unloads += 1
        if runtime is not None:
            await self._stop_runtime(version, runtime)
            del runtime
        if not keep_files:
            await self._forget_downloads([version])
        self._schedule_refreeze()
        log.info("model %s unloaded", _label(version))

    async def _forget_downloads(self, versions: list[ModelVersion]) -> None:
        """Delete the downloaded artifacts of versions no registered version still uses."""
        remote = {version.settings.uri for version in versions if is_remote(version.settings.uri or "")}
        if not remote:
            return
        used = {cache_key(other.settings.uri or "") for other in self.memory.registered}
        for uri in remote:
            if cache_key(uri) not in used:
                await self._in_thread(self.artifacts.delete, uri)

    def _schedule_refreeze(self, within: float = 1.0) -> None:
        """A full collection stalls every thread for tens of milliseconds, and loads, unloads and
        evictions come in bursts: refreeze once, a quiet second after a load or unload, and at
        most once a minute for evictions (which only matter for models with reference cycles)."""
        loop = asyncio.get_running_loop()
        if self._refreeze is not None:
            if within > 1.0:
                return  # one is due already, no later than this one needs
            self._refreeze.cancel()
        self._refreeze = loop.call_later(within, self._refreeze_now)

    def _refreeze_now(self) -> None:
        self._refreeze = None
        asyncio.get_running_loop().run_in_executor(self.executor, _refreeze_heap)


async def _to_completion(coroutine):
    """Await `coroutine` as a task that goes on if the caller is cancelled (a client went away)."""
    task = asyncio.ensure_future(coroutine)
    task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, so asyncio does not warn
    return await asyncio.shield(task)


def _forget_reload(version: ModelVersion):
    def forget(reload: asyncio.Future) -> None:
        version.reloading = None
        if not reload.cancelled():
            reload.exception()  # retrieved: the waiting requests report it

    return forget


def _label(version: ModelVersion) -> str:
    return version.name + (f" version {version.version}" if version.version else "")
