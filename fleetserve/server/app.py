"""The server process: REST, gRPC and metrics on one event loop, models loaded behind them.

Ports open first (liveness answers at once); readiness turns true once every model in the
repository has been tried. SIGTERM or SIGINT stop new work, let in-flight requests finish, unload
the models, then exit: within the shutdown grace, whatever still runs (a predict, a model's
load) is left behind. Loads not yet begun when the signal comes are never begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import uvicorn
from prometheus_client import REGISTRY, disable_created_metrics

from fleetserve import tracing
from fleetserve.errors import FleetError, describe
from fleetserve.fleet.forward import FleetCollector, Hops
from fleetserve.fleet.membership import LEASE_SECONDS, Membership
from fleetserve.fleet.models import FleetModels, repository_manifest
from fleetserve.graph.applied import AppliedManifests
from fleetserve.graph.manifests import parse_manifest
from fleetserve.graph.router import GraphCollector, Router
from fleetserve.runtime.artifacts import ArtifactCache
from fleetserve.runtime.dataplane import DataPlane
from fleetserve.runtime.memory import MemoryCollector, MemoryManager, keep_freed_buffers_for_reuse
from fleetserve.runtime.metrics import (MODEL_CHANGES, DriftCollector, InferenceCalls, InferenceCollector, internal_name,
                                        configure_server_labels)
from fleetserve.runtime.registry import Registry
from fleetserve.runtime.repository import ModelRepository
from fleetserve.runtime.workers import remove_stale_blocks
from fleetserve.runtimes import alibi_explain, resolve_runtime, triton
from fleetserve.server import logs
from fleetserve.server.grpc_service import build_grpc_server, set_serving
from fleetserve.server.limits import Admission, LimitsCollector, StalledRequestGuard
from fleetserve.server.rest import build_metrics_app, build_rest_app
from fleetserve.server.security import TLS, Tokens, log_front_doors, protect_rest
from fleetserve.settings import ServerSettings, mlserver_model

log = logging.getLogger("fleetserve")

OFFERS_AT_ONCE = 64  # repository models offered to the fleet's etcd at once, at start


class _UvicornServer(uvicorn.Server):
    """Uvicorn without its own signal handling: the FleetServer decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield

    async def shutdown(self, sockets=None) -> None:
        if self.config.is_ssl:
            # Closing TLS sends close_notify and waits (30 s) for the peer's, which a pooled idle
            # client sends only when it next uses the connection: that held SIGTERM for 30 s.
            # An idle keep-alive connection carries nothing, so it is dropped at once.
            for connection in list(self.server_state.connections):
                cycle = getattr(connection, "cycle", "not http")  # a websocket has none
                if cycle is None or getattr(cycle, "response_complete", False):
                    connection.transport.abort()
        await super().shutdown(sockets)


async def _serve_until_exit(server: _UvicornServer) -> None:
    # Uvicorn calls sys.exit() when it cannot bind; that must end this task, not the event loop.
    with contextlib.suppress(SystemExit):
        await server.serve()


class FleetServer:
    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.tokens = Tokens.from_settings(settings)
        self.tls = TLS.from_settings(settings)
        self.executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="fleetserve-worker")
        self.repository = ModelRepository(settings.model_repository, mlserver_model())
        remove_stale_blocks()  # shared memory left by a server or worker that was killed
        keep_freed_buffers_for_reuse()
        capabilities = settings.capability_list
        triton.configure(settings)
        self.memory = MemoryManager(settings.memory_limit_bytes, settings.overcommit_percent, settings.gpu_memory_limit_bytes)
        # Code that came with downloaded artifacts is refused unless the operator allowed it.
        downloads = None if settings.allow_remote_code else Path(settings.cache_dir)
        self.registry = Registry(
            self.repository,
            lambda model_settings: resolve_runtime(model_settings, capabilities, downloads),
            self.memory,
            ArtifactCache(settings.cache_dir, settings.allowed_storage_prefixes, settings.max_download_bytes,
                          settings.download_timeout),
            max_concurrency=max(1, settings.inference_threads // 2),
            eviction_wait=settings.eviction_wait,
            custom_workers=settings.parallel_workers,
        )
        if settings.allow_remote_code and not settings.allowed_storage:
            log.warning("--allow-remote-code without --allowed-storage: a manifest naming any storage can run its "
                        "own code in this server")
        REGISTRY.register(MemoryCollector(self.memory, self.registry.all_versions))
        REGISTRY.register(InferenceCollector(self.registry.all_versions))
        REGISTRY.register(MODEL_CHANGES)
        REGISTRY.register(DriftCollector(
            lambda: [version.name for version in self.registry.all_versions() if self.memory.is_registered(version)]))
        disable_created_metrics()  # a _created series per counter and histogram doubles /metrics for nothing
        self.dataplane = DataPlane(self.registry, self.executor, settings.inline_predict_us)
        self.router = Router(self.registry, self.dataplane)
        self.calls = InferenceCalls(self._counted_label)
        REGISTRY.register(self.calls)
        self.applied = AppliedManifests(settings.state_dir)
        self.membership = self.fleet_models = self.hops = None
        if settings.etcd:
            self.membership = Membership(settings, self._fleet_record)
            # Seldon's labels: the fleet is the Server, each replica one of its replicas.
            configure_server_labels(settings.fleet, self.membership.replica_id)
            self.fleet_models = FleetModels(self.membership, self.registry)
            self.hops = Hops(self.fleet_models, settings, self.tls, self.tokens)
            self.membership.witness = self.hops.peers_on_me
            self.router.fleet = self.hops
            REGISTRY.register(FleetCollector(self.hops))
            self.fleet_graphs: dict[tuple[str, str], dict] = {}  # pipelines and experiments applied from etcd
            self.membership.listeners.append(self._on_fleet_change)
        alibi_explain.configure(self.router)
        REGISTRY.register(GraphCollector(self.router))
        self.admission = Admission(settings.max_concurrent_requests)
        self.stall_guard = StalledRequestGuard(settings.request_head_timeout, settings.request_body_timeout)
        REGISTRY.register(LimitsCollector(self.admission, self.stall_guard))
        self.ready = False
        self.stopping = False
        self.still_running = ""  # what outlived the shutdown grace: the process exits without waiting for it
        self.load_failed = False
        self.stop_requested = asyncio.Event()

    def _uvicorn(self, app, port: int) -> _UvicornServer:
        config = uvicorn.Config(
            app,
            host=self.settings.host,
            port=port,
            lifespan="off",
            access_log=False,
            # uvicorn's loggers go to the server's one handler, at the levels server/logs.py set.
            log_config=None,
            log_level=None,
            timeout_graceful_shutdown=int(self.settings.shutdown_grace),
            # Keep-alive connections from load balancers and clients outlive uvicorn's 5 s default.
            timeout_keep_alive=75,
            **(self.tls.uvicorn_options() if self.tls else {}),
            http=self.stall_guard.protocol,
        )
        return _UvicornServer(config)

    def request_stop(self) -> None:
        self.stop_requested.set()

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.request_stop)

        rest = build_rest_app(self)
        front = protect_rest(rest, rest.app.routes, self.tokens)
        if logs.per_request(self.settings):  # else nothing runs per request
            front = logs.RestAccess(front, self.settings.access_log)
        http = self._uvicorn(front, self.settings.http_port)
        metrics = self._uvicorn(build_metrics_app(), self.settings.metrics_port)
        try:
            grpc_server, health = build_grpc_server(self)
        except RuntimeError as error:  # grpc's way of saying it cannot bind
            log.error("cannot serve gRPC on %s:%d: %s", self.settings.host, self.settings.grpc_port, error)
            return 1
        await set_serving(health, False)
        await grpc_server.start()
        front_doors = [asyncio.create_task(_serve_until_exit(http)), asyncio.create_task(_serve_until_exit(metrics))]
        sweeping = asyncio.create_task(self.stall_guard.run()) if self.stall_guard.enabled else None
        log.info(
            "fleetserve listening: %s %s:%d, grpc %s:%d, metrics %s:%d", "https" if self.tls else "http",
            self.settings.host, self.settings.http_port, self.settings.host, self.settings.grpc_port,
            self.settings.host, self.settings.metrics_port,
        )

        log_front_doors(self.settings, self.tokens, self.tls)
        if self.membership is not None:
            self.membership.fence_changed = lambda: set_serving(health, self.ready and not self.fenced)
            self.membership.start()
            self.fleet_models.start()
        loading = asyncio.create_task(self._load_models(health))
        stop = asyncio.create_task(self.stop_requested.wait())
        done, _ = await asyncio.wait([stop, *front_doors], return_when=asyncio.FIRST_COMPLETED)
        failed = stop not in done or self.load_failed  # a front door could not bind its port, or no repository
        if stop not in done:
            log.error("a listener failed to start; shutting down")

        log.info("shutting down: draining in-flight requests")
        grace = self.settings.shutdown_grace
        stop_by = time.monotonic() + grace
        self.ready, self.stopping = False, True
        if self.membership is not None:
            # Serving on until every model only this replica has is ready elsewhere; then peers
            # are told to send nothing more here, and what is in flight finishes below.
            await self.fleet_models.hand_over(max(0.0, stop_by - time.monotonic()) / 2)
            await self.fleet_models.stop_serving()
        loading.cancel()
        await set_serving(health, False)
        http.should_exit = metrics.should_exit = True
        await asyncio.gather(grpc_server.stop(grace), *front_doors, return_exceptions=True)
        if self.membership is not None:  # the requests in flight here may have needed a hop or etcd
            await self.membership.stop()
            await self.fleet_models.stop()
            await self.hops.close()
        if sweeping is not None:
            sweeping.cancel()
        left = max(0.0, stop_by - time.monotonic())
        try:
            # Unloads wait for loads under way; a load that outlives the grace is left to the exit.
            await asyncio.wait_for(self.registry.unload_all(left), left + 1.0)
        except TimeoutError:
            self.still_running = "model loads or unloads still running"
        self.executor.shutdown(wait=False, cancel_futures=True)
        predicts = sum(version.in_flight for version in self.registry.all_versions())
        if predicts:
            self.still_running = f"{predicts} predict(s) still running"
        await asyncio.to_thread(tracing.shutdown)  # the spans still buffered go out
        log.info("fleetserve stopped")
        return 1 if failed else 0

    async def _load_models(self, health) -> None:
        try:
            found = await self.registry.scan()
        except Exception as error:  # the repository itself cannot be read: nothing to serve
            log.error("cannot read the model repository %s: %s", self.settings.model_repository, describe(error))
            self.load_failed = True
            self.request_stop()
            return
        if not self.settings.load_models_at_startup:  # the folders load through the repository API
            found = {name: entry for name, entry in found.items() if self.repository.is_described(name)}
        offered = await self._offer_to_fleet(found) if self.fleet_models is not None else {}
        await self.registry.load_all({name: entry for name, entry in found.items() if name not in offered})
        # Ready once each of them has a copy somewhere in the fleet, as one process is once its repository is loaded.
        await self.registry.in_turns({name: partial(self.fleet_models.copy_for, name, manifest=manifest)
                                      for name, manifest in sorted(offered.items())})
        await self._apply_again()
        self.ready = True
        await set_serving(health, not self.fenced)
        log.info("ready: %d model version(s) loaded", len(self.registry.ready_versions()))

    async def _offer_to_fleet(self, found: dict) -> dict[str, dict]:
        """The repository's plain model folders become the fleet's (repository_manifest says
        which): the names that did, or were the fleet's already, with the fleet's manifest.
        Without etcd at start, none: this replica loads them itself, as its own."""
        manifests = {name: manifest for name, entry in found.items() if (manifest := repository_manifest(entry))}
        if not manifests:
            return {}
        if not await self.membership.joined(LEASE_SECONDS):
            log.warning("etcd is unreachable: the repository's %d model(s) load here, as this replica's own",
                        len(manifests))
            return {}
        offers = list(manifests.items())
        outcomes = []
        for start in range(0, len(offers), OFFERS_AT_ONCE):
            batch = offers[start:start + OFFERS_AT_ONCE]
            outcomes += await asyncio.gather(*(self.fleet_models.offer(manifest) for _, manifest in batch),
                                             return_exceptions=True)
        offered = {name: outcome[1] for (name, _), outcome in zip(offers, outcomes) if not isinstance(outcome, BaseException)}
        log.info("the repository's %d model(s) are the fleet's (%d new to it)", len(offered),
                 sum(not isinstance(outcome, BaseException) and outcome[0] for outcome in outcomes))
        for (name, _), outcome in zip(offers, outcomes):
            if isinstance(outcome, BaseException):
                log.warning("model %s loads here, as this replica's own: %s", name, describe(outcome))
        return offered

    async def index(self, ready_only: bool = False) -> list[dict]:
        """The repository index: this replica's models and, in a fleet, the ones peers hold."""
        elsewhere = self.fleet_models.index_entries() if self.fleet_models is not None else None
        return await self.registry.index(ready_only, elsewhere)

    @property
    def fenced(self) -> str:
        """Why this replica is fenced (cut off from an etcd that lives on), or "" (fleet/membership.py)."""
        return self.membership.fenced if self.membership is not None else ""

    def _counted_label(self, kind: str, name: str, version: str | None) -> str | None:
        """What Seldon's call series count this name (and version) under (metrics.InferenceCalls):
        a model's `model_internal` with the version the registry resolves a request to, ""
        for a pipeline, None for a name or version the server does not have."""
        if kind != "models":
            return "" if name in self.router.pipelines else None
        try:
            found = self.registry.get(name, version)
        except FleetError:
            return None
        # A version the registry accepts is the one named (a Triton model's own, too); none, its default.
        return internal_name(name, version or found.version)

    def _fleet_record(self) -> dict:
        """This replica as its fleet peers see it (fleet/membership.py)."""
        host, books = self.membership.host, self.memory.devices["cpu"]
        return {
            "address": f"{host}:{self.settings.http_port}",
            "grpc": f"{host}:{self.settings.grpc_port}",
            "capabilities": self.settings.capability_list,
            "memory": {"limit": books.limit, "budget": books.registered_limit, "registered": books.registered_bytes,
                       "resident": books.resident_bytes, "idle": self.fleet_models.idle_bytes()},
            "models": self.fleet_models.serving_here(),
            "in_flight": self.admission.in_flight,
            "ready": self.ready,
        }

    async def load(self, name: str) -> None:
        """The repository API's load: a fleet model gets a copy somewhere if it has none (loaded
        once, where placement says); any other model loads here from the repository."""
        if self.fleet_models is not None:
            manifest = self.fleet_models.manifest(name)
            if manifest is None:  # a folder new to the repository: the fleet's too, if it can be
                manifest = repository_manifest(await self.registry.find(name))
                if manifest is not None:
                    try:
                        manifest = (await self.fleet_models.offer(manifest))[1]
                    except FleetError as error:  # etcd unreachable: this replica's own, as at start
                        log.warning("model %s loads here, as this replica's own: %s", name, error.message)
                        manifest = None
            if manifest is not None:
                await self.fleet_models.copy_for(name, manifest=manifest)
                return
        await self.registry.load(name)

    async def unload(self, name: str) -> None:
        """The repository API's unload: a fleet model's copy here leaves this replica (the model
        stays in the fleet, loaded again on demand); any other model is unloaded."""
        if self.fleet_models is not None and name in self.fleet_models.here:
            return await self.fleet_models.drop(name)
        await self.registry.unload(name, self.settings.shutdown_grace)

    # Manifests: applied through REST, kept in --state-dir, applied again at start.

    async def apply(self, kind: str, parsed) -> None:
        """Apply a manifest (parse_manifest's form) and keep it as applied: in etcd for a fleet
        (every replica applies it), else in --state-dir."""
        if self.fleet_models is not None:
            return await self._apply_to_fleet(kind, parsed)
        if kind != "Model":
            self._apply_graph(kind, parsed)
            self.applied.record(kind, parsed.name, parsed.manifest)
            return
        try:
            await self.registry.apply(parsed)
        finally:  # a failed load puts back the manifest before it; a failed reload keeps the new one
            current = self.registry.manifests.get(parsed.name)
            if current is None:
                self.applied.forget(kind, parsed.name)
            else:
                self.applied.record(kind, parsed.name, current.manifest)

    async def _apply_to_fleet(self, kind: str, parsed) -> None:
        if kind == "Model":
            return await self.fleet_models.apply(parsed.manifest)
        previous = self.fleet_graphs.get((kind, parsed.name))
        self._apply_graph(kind, parsed)  # here first (it checks it); the other replicas as their watch tells them
        self.fleet_graphs[(kind, parsed.name)] = parsed.manifest
        try:
            await self.fleet_models.keep(kind, parsed.name, parsed.manifest)
        except FleetError:  # not the fleet's: not this replica's either
            if previous is None:
                self.fleet_graphs.pop((kind, parsed.name))
                self._delete_graph(kind, parsed.name)
            else:
                self.fleet_graphs[(kind, parsed.name)] = previous
                self._apply_graph(kind, parse_manifest(previous))
            raise

    def _apply_graph(self, kind: str, parsed) -> None:
        if kind == "Pipeline":
            self.router.add_pipeline(parsed)
        else:
            self.router.add_experiment(parsed)

    def _delete_graph(self, kind: str, name: str) -> None:
        if kind == "Pipeline":
            self.router.delete_pipeline(name)
        else:
            self.router.delete_experiment(name)

    async def delete(self, kind: str, name: str) -> None:
        if self.fleet_models is not None and self.fleet_models.kept(kind, name):
            await self.fleet_models.forget(kind, name)  # each replica unloads or removes it as its watch tells
            return
        try:
            if kind == "Model":
                await self.registry.delete(name, self.settings.shutdown_grace)
            else:
                self._delete_graph(kind, name)
        finally:  # also a manifest kept but not applied again at start (it failed then)
            self.applied.forget(kind, name)

    def _on_fleet_change(self, section: str, name: str, manifest: dict | None) -> None:
        """A pipeline or experiment applied or deleted through any replica, applied here too."""
        kind, _, graph = name.partition("/")
        if section != "manifests" or kind == "Model":
            return
        key = (kind, graph)
        try:
            if manifest is None:
                if self.fleet_graphs.pop(key, None) is not None:
                    self._delete_graph(kind, graph)
            elif self.fleet_graphs.get(key) != manifest:
                self._apply_graph(kind, parse_manifest(manifest))
                self.fleet_graphs[key] = manifest
        except Exception as error:
            log.error("cannot apply the fleet's %s %s here: %s", kind.lower(), graph, describe(error))

    async def _apply_again(self) -> None:
        """What was applied before a restart, applied again: models (LOAD_TURNS at a time), then
        pipelines and experiments. A manifest that fails now is logged and kept for the next start."""
        parsed = []
        for manifest in self.applied.saved():
            try:
                parsed.append((manifest["kind"], parse_manifest(manifest)))
            except Exception as error:  # an edited file: the others still apply
                log.error("cannot apply the kept manifest %s again: %s", manifest.get("metadata"), describe(error))
        await self.registry.apply_all([item for kind, item in parsed if kind == "Model"])
        for kind, item in parsed:
            if kind != "Model":
                try:
                    self._apply_graph(kind, item)
                except Exception as error:
                    log.error("cannot apply the kept %s %s again: %s", kind.lower(), item.name, describe(error))


def run(settings: ServerSettings) -> int:
    logs.configure(settings.log_level, settings.log_format)
    tracing.configure()

    server: FleetServer | None = None

    async def main() -> int:
        nonlocal server
        server = FleetServer(settings)
        return await server.serve()

    try:
        import uvloop
    except ImportError:
        code = asyncio.run(main())
    else:
        code = uvloop.run(main())
    if server is not None and server.still_running:
        # Python would wait at exit for the threads that outlived the grace period: leave now.
        logging.getLogger("fleetserve").warning("%s; exiting anyway", server.still_running)
        logging.shutdown()
        os._exit(code)
    return code
