"""Model states and versions: what is loaded, what is loading, and why a model is unavailable.

Every call into a model goes through `acquire()`/`release()`, so a model is never unloaded
under a request: unload waits for in-flight requests to finish first.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

from fleetserve.errors import FleetError, ModelLoadError, ModelUnavailable, NotFound
from fleetserve.runtime import metrics
from fleetserve.runtime.base import Runtime
from fleetserve.runtime.repository import ModelRepository
from fleetserve.settings import ModelSettings, check_model_name

log = logging.getLogger(__name__)

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"

RuntimeResolver = Callable[[ModelSettings], type[Runtime]]


@dataclass
class Statistics:
    """Triton-style counters: durations in nanoseconds, `last_inference` in epoch milliseconds."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0  # waiting for a worker thread
    compute_infer_ns: int = 0
    last_inference: int = 0


@dataclass(eq=False)
class ModelVersion:
    settings: ModelSettings
    state: str = LOADING
    reason: str = ""
    runtime: Runtime | None = None
    predict_is_async: bool = False
    in_flight: int = 0
    stats: Statistics = field(default_factory=Statistics)

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str | None:
        return self.settings.version


@dataclass(eq=False)
class Model:
    name: str
    versions: dict[str | None, ModelVersion] = field(default_factory=dict)
    reason: str = ""  # why the model as a whole is unavailable (broken settings)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def default_version(self) -> ModelVersion | None:
        """The highest ready version, else the highest version (to report its state)."""
        if not self.versions:
            return None
        ordered = sorted(self.versions.values(), key=lambda v: _version_order(v.version))
        ready = [version for version in ordered if version.state == READY]
        return (ready or ordered)[-1]


def _freeze_long_lived_objects() -> None:
    """Move what loading created (the model, framework modules) out of the collector's reach.

    Full collections traverse every tracked object; with a framework or two imported they take
    tens of milliseconds and show up as the p99 of every request. Garbage is collected first so
    only live objects are frozen; refcounting still frees a model's objects when it is unloaded.
    """
    gc.collect()
    gc.freeze()


def _version_order(version: str | None) -> tuple[int, str]:
    if version is None:
        return (-1, "")
    return (int(version), version) if version.isdigit() else (0, version)


class Registry:
    def __init__(self, repository: ModelRepository, resolve_runtime: RuntimeResolver, executor: Executor):
        self.repository = repository
        self.resolve_runtime = resolve_runtime
        self.executor = executor
        self.models: dict[str, Model] = {}

    # Lookups on the request path: plain dict reads, no awaits.

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        model = self.models.get(name)
        if model is None:
            raise NotFound(f"model '{name}' not found")
        if version:
            found = model.versions.get(version)
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

    def ready_versions(self) -> list[ModelVersion]:
        return [v for model in self.models.values() for v in model.versions.values() if v.state == READY]

    def index(self, ready_only: bool = False) -> list[dict]:
        """Every model the server knows or the repository holds, with its state and reason."""
        entries = []
        for model in self.models.values():
            if not model.versions:
                entries.append({"name": model.name, "state": UNAVAILABLE, "reason": model.reason})
            for version in model.versions.values():
                entry = {"name": model.name, "state": version.state, "reason": version.reason}
                if version.version is not None:
                    entry["version"] = version.version
                entries.append(entry)
        for name, found in self.repository.scan().items():
            if name not in self.models:
                entries.append({"name": name, "state": UNAVAILABLE, "reason": found.error or "not loaded"})
        if ready_only:
            entries = [entry for entry in entries if entry["state"] == READY]
        return sorted(entries, key=lambda entry: (entry["name"], _version_order(entry.get("version"))))

    # Lifecycle.

    async def load_all(self) -> None:
        """Load every model in the repository concurrently; failures are recorded, not raised."""
        names = list(self.repository.scan())
        results = await asyncio.gather(*(self.load(name) for name in names), return_exceptions=True)
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                log.error("model %s is unavailable: %s", name, getattr(result, "message", result))

    async def load(self, name: str) -> None:
        """Load (or reload) a model from the repository. The old versions serve until the new ones are ready."""
        check_model_name(name)
        found = self.repository.find(name)
        model = self.models.setdefault(name, Model(name))
        async with model.lock:
            if found.error:
                model.reason = found.error
                raise ModelLoadError(f"model '{name}' failed to load: {found.error}")
            loading = [ModelVersion(settings) for settings in found.versions]
            if not any(version.state == READY for version in model.versions.values()):
                model.versions = {version.version: version for version in loading}
            await asyncio.gather(*(self._load_version(version) for version in loading))
            previous = model.versions
            model.versions = {version.version: version for version in loading}
            model.reason = ""
            for version in previous.values():
                if version not in loading and version.runtime is not None:
                    await self._unload_version(version)
            failures = [v for v in loading if v.state != READY]
            if failures and len(failures) == len(loading):
                raise ModelLoadError(f"model '{name}' failed to load: " + "; ".join(v.reason for v in failures))

    async def unload(self, name: str, grace: float = 30.0) -> None:
        check_model_name(name)
        model = self.models.get(name)
        if model is None or not any(v.runtime for v in model.versions.values()):
            raise NotFound(f"model '{name}' is not loaded")
        async with model.lock:
            await asyncio.gather(*(self._unload_version(version, grace) for version in model.versions.values()))

    async def unload_all(self, grace: float) -> None:
        await asyncio.gather(
            *(self.unload(name, grace) for name, model in self.models.items() if any(v.runtime for v in model.versions.values())),
            return_exceptions=True,
        )

    async def _load_version(self, version: ModelVersion) -> None:
        label = f"{version.name}" + (f" version {version.version}" if version.version else "")
        started = time.perf_counter()
        version.state = LOADING
        try:
            loop = asyncio.get_running_loop()
            # Resolving imports the framework (seconds for some): keep it off the event loop too.
            runtime = await loop.run_in_executor(self.executor, self._build_runtime, version.settings)
            if inspect.iscoroutinefunction(runtime.load):
                await runtime.load()
            else:
                await loop.run_in_executor(self.executor, runtime.load)
            await loop.run_in_executor(self.executor, _freeze_long_lived_objects)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # a model's code may raise anything, even SystemExit; it must not stop the server
            reason = error.message if isinstance(error, FleetError) else f"{type(error).__name__}: {error}"
            version.state, version.reason = UNAVAILABLE, reason
            metrics.MODEL_LOAD_DURATION.labels(version.name, "error").observe(time.perf_counter() - started)
            log.error("model %s failed to load: %s", label, reason)
            return
        version.runtime = runtime
        version.predict_is_async = inspect.iscoroutinefunction(runtime.predict)
        version.state, version.reason = READY, ""
        elapsed = time.perf_counter() - started
        metrics.MODEL_LOAD_DURATION.labels(version.name, "success").observe(elapsed)
        metrics.MODELS_LOADED.inc()
        log.info("model %s loaded in %.2fs (%s)", label, elapsed, type(runtime).__name__)

    def _build_runtime(self, settings: ModelSettings) -> Runtime:
        return self.resolve_runtime(settings)(settings)

    async def _unload_version(self, version: ModelVersion, grace: float = 30.0) -> None:
        runtime = version.runtime
        if runtime is None:
            return
        version.state = UNLOADING
        deadline = time.monotonic() + grace
        while version.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        version.runtime = None
        version.state, version.reason = UNAVAILABLE, "unloaded"
        metrics.MODELS_LOADED.dec()
        try:
            if inspect.iscoroutinefunction(runtime.unload):
                await runtime.unload()
            else:
                await asyncio.get_running_loop().run_in_executor(self.executor, runtime.unload)
        except Exception:
            log.exception("model %s raised while unloading", version.name)
        log.info("model %s unloaded", version.name)
