"""Model memory: capacity with overcommit, the LRU of resident models, eviction choices, and
measuring what a load really took.

A model's cost is max(declared, measured). Registered models may total the limit plus the
overcommit; resident ones never exceed the limit. When a model must become resident, the least
recently used idle resident models make room; a model serving a request is never chosen.
Each device keeps its own books: "cpu" for the models in this process, "gpu" for the models
proxied to Triton (evicting one unloads it from Triton). The registry carries out the
evictions; this module only keeps the books.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib.util
import itertools
import os
import sys
import threading
import tracemalloc
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric

from fleetserve.errors import CapacityExceeded
from fleetserve.runtime.metrics import SERVER_LABELS, internal_name


class Accountable(Protocol):
    name: str
    version: str | None
    device: str
    in_flight: int
    state: str
    declared: int
    measured: int
    estimated: int
    reload_seconds: float

    @property
    def cost(self) -> int: ...


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024


# Eviction weighs what a reload costs, not only recency (victims()).
WEIGHED_VICTIMS = 8
COSTLY_RELOAD = 1.0  # seconds


class DeviceMemory:
    """One device's books. Without a limit (a GPU with no --gpu-memory-limit) models are counted
    but never refused or evicted.

    Totals are kept as models come and go, so no operation costs more with more models
    registered: each version's cost is counted once, when it registers, and again (recount)
    when a load measures it.
    """

    def __init__(self, device: str, limit: int | None, overcommit_percent: float):
        self.device = device
        self.limit = sys.maxsize if limit is None else limit
        self.limited = limit is not None
        self.overcommit_percent = overcommit_percent
        self.registered_limit = int(self.limit * (1 + overcommit_percent / 100)) if self.limited else sys.maxsize
        self.registered: dict[Accountable, int] = {}  # version -> the cost counted for it
        self.resident: OrderedDict[Accountable, None] = OrderedDict()  # least recently used first
        self.registered_bytes = 0
        self.resident_bytes = 0
        self.evictions = 0
        self.misses = 0

    @property
    def _models(self) -> str:
        return "registered models" if self.device == "cpu" else f"registered {self.device.upper()} models"

    def check_register(self, versions: list[Accountable], replacing: set[Accountable]) -> None:
        """Refuse, with the figures, versions that would take the registered total past the
        overcommitted budget."""
        adding = sum(version.cost for version in versions)
        already = self.registered_bytes - sum(self.registered.get(version, 0) for version in replacing)
        for version in versions:
            self.check_fits(version)
        if already + adding > self.registered_limit:
            raise CapacityExceeded(
                f"cannot register model '{versions[0].name}' ({format_bytes(adding)}"
                f"{', estimated from its artifacts' if any(map(_estimated, versions)) else ''}): "
                f"{self.describe_registered(already)}"
            )

    def describe_registered(self, registered: int | None = None) -> str:
        registered = self.registered_bytes if registered is None else registered
        return (f"{self._models} take {format_bytes(registered)} of {format_bytes(self.registered_limit)} "
                f"({format_bytes(self.limit)} limit + {self.overcommit_percent:g}% overcommit)")

    def check_fits(self, version: Accountable) -> None:
        """A version bigger than the whole limit can never be resident."""
        if version.cost > self.limit:
            kind = "memory" if self.device == "cpu" else f"{self.device.upper()} memory"
            how = ", estimated from its artifacts," if _estimated(version) else ""
            raise CapacityExceeded(
                f"model '{version.name}' needs {format_bytes(version.cost)}{how} more than the {kind} limit of "
                f"{format_bytes(self.limit)}"
            )

    def register(self, versions: list[Accountable]) -> None:
        for version in versions:
            self.unregister(version)
            self.registered[version] = version.cost
            self.registered_bytes += version.cost

    def recount(self, version: Accountable) -> None:
        """A load measured the version: its cost in the totals becomes what it costs now."""
        counted = self.registered.get(version)
        if counted is None:
            return
        change = version.cost - counted
        self.registered[version] = version.cost
        self.registered_bytes += change
        if version in self.resident:
            self.resident_bytes += change

    def unregister(self, version: Accountable) -> None:
        self.mark_evicted(version)
        self.registered_bytes -= self.registered.pop(version, 0)

    def touch(self, version: Accountable) -> None:
        """A request used this version: it becomes the most recently used."""
        if version in self.resident:
            self.resident.move_to_end(version)

    def mark_resident(self, version: Accountable) -> None:
        if version not in self.resident:
            self.resident_bytes += self.registered[version]
        self.resident[version] = None
        self.resident.move_to_end(version)

    def mark_evicted(self, version: Accountable) -> None:
        if version in self.resident:
            del self.resident[version]
            self.resident_bytes -= self.registered[version]

    def victims(self, needed: int, keep: Accountable | None = None) -> list[Accountable] | None:
        """The idle versions whose eviction frees `needed` bytes ([] if they fit already), or
        None if only busy models could make room. The least recently used go first, except that
        among the WEIGHED_VICTIMS least recently used, one whose last reload took over COSTLY_RELOAD
        and over ten times the cheapest there is passed over while others can make room."""
        free = self.limit - self.resident_bytes
        if free >= needed:
            return []
        idle = (version for version in self.resident
                if version is not keep and not version.in_flight and version.state == "READY")
        window = list(itertools.islice(idle, WEIGHED_VICTIMS))
        cheapest = min((version.reload_seconds for version in window), default=0.0)
        costly = [version for version in window if version.reload_seconds > max(COSTLY_RELOAD, 10 * cheapest)]
        chosen: list[Accountable] = []
        for version in itertools.chain((version for version in window if version not in costly), idle, costly):
            if free >= needed:
                break
            chosen.append(version)
            free += self.registered[version]
        return chosen if free >= needed else None


def _estimated(version: Accountable) -> bool:
    """Whether the version's cost is its estimate: neither declared nor measured yet."""
    return version.estimated > max(version.declared, version.measured)


class MemoryManager:
    """The books of every device; a version is kept in the books of its `device`."""

    def __init__(self, limit: int, overcommit_percent: float, gpu_limit: int | None = None):
        self.devices = {
            "cpu": DeviceMemory("cpu", limit, overcommit_percent),
            "gpu": DeviceMemory("gpu", gpu_limit, overcommit_percent),
        }

    def of(self, version: Accountable) -> DeviceMemory:
        return self.devices[version.device]

    def touch(self, version: Accountable) -> None:
        self.devices[version.device].touch(version)

    def is_registered(self, version: Accountable) -> bool:
        return version in self.devices[version.device].registered

    @property
    def registered(self) -> list[Accountable]:
        return [version for books in self.devices.values() for version in books.registered]

    def register(self, versions: Iterable[Accountable], replacing: Iterable[Accountable] = ()) -> None:
        """Count new versions against their device's overcommitted budget; refuse all of them
        if any device cannot take its share."""
        versions, replacing = list(versions), set(replacing)
        by_device: dict[str, list[Accountable]] = {}
        for version in versions:
            by_device.setdefault(version.device, []).append(version)
        for device, share in by_device.items():
            self.devices[device].check_register(share, replacing)
        for device, share in by_device.items():
            self.devices[device].register(share)

    def recount(self, version: Accountable) -> None:
        self.devices[version.device].recount(version)


_measuring = threading.Lock()  # tracemalloc and RSS are process-wide: one load measured at a time
# Loads running unmeasured, and how many have started: a measurement they overlap is only an estimate.
_unmeasured = {"running": 0, "started": 0}
_unmeasured_guard = threading.Lock()
# How long a load waits for another to be measured before it runs unmeasured.
MEASURE_WAIT = 2.0

T = TypeVar("T")


def rss(pid: int | str = "self") -> int:
    """A process's resident memory in bytes; 0 for one that is gone."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_libc = _load_libc()


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def keep_freed_buffers_for_reuse() -> None:
    """Request tensors of a few MiB are allocated and freed on every request. glibc's defaults
    hand such blocks back to the OS when they are freed (mmap'd blocks, or a trimmed heap top), so
    each request faults their pages in again: about 3 ms for 2 MiB on this kind of machine, ten
    times the copying. Blocks under 16 MiB now come from the heap, and up to 32 MiB of freed
    heap top stays for reuse (4 MiB and 16 MiB left the gRPC proxy's 1 MiB case as slow as
    before); larger blocks (model weights) are still mapped and unmapped on their own. A load's
    growth is also read from malloc's in-use bytes, which see a reused block that RSS does not."""
    if _libc is not None:
        _libc.mallopt(_M_MMAP_THRESHOLD, 16 * 2**20)
        _libc.mallopt(_M_TRIM_THRESHOLD, 32 * 2**20)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    """Bytes the process's malloc has handed out and not had back (0 where glibc cannot say):
    unlike RSS, it grows when a load reuses freed blocks."""
    if _libc is None or not hasattr(_libc, "mallinfo2"):
        return 0
    _libc.mallinfo2.restype = _MallInfo2
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


def return_freed_memory() -> None:
    """Hand memory that models freed back to the OS. glibc keeps freed blocks in its arenas for
    reuse, so without this an unloaded model's weights (torch, onnxruntime, LightGBM buffers)
    still count in the server's RSS, and the next load's RSS growth reads near zero."""
    if _libc is not None:
        _libc.malloc_trim(0)


@dataclass
class _Growth:
    """The process's native memory and modules; the Python heap is _HeapTrace's."""

    rss: int = 0
    malloc: int = 0  # malloc's in-use bytes: unlike RSS, they grow when freed blocks are reused
    modules: int = 0

    @staticmethod
    def now() -> "_Growth":
        return _Growth(rss(), malloc_in_use(), len(sys.modules))

    def since(self, before: "_Growth") -> "_Growth":
        return _Growth(self.rss - before.rss, self.malloc - before.malloc, self.modules - before.modules)

    def add(self, other: "_Growth") -> None:
        self.rss, self.malloc, self.modules = self.rss + other.rss, self.malloc + other.malloc, self.modules + other.modules


class _HeapTrace:
    """The Python heap a load keeps (numpy arrays included), traced by tracemalloc, which can be
    paused: imports are not traced (slow, and their memory is the framework's; a traced framework
    import also left malloc's books so fragmented that reading them took 16 ms ever after). A
    block allocated before a pause and freed after it still counts: a slight overcount."""

    def __init__(self):
        self.owned = not tracemalloc.is_tracing()  # else someone else traces: never stop theirs
        self.kept = 0
        self.resume()

    def resume(self) -> None:
        if self.owned:
            tracemalloc.start()
        self.since = tracemalloc.get_traced_memory()[0]

    def pause(self) -> None:
        self.kept += tracemalloc.get_traced_memory()[0] - self.since
        if self.owned:
            tracemalloc.stop()


class _ImportMeter:
    """What the imports of one thread take while its load is measured: a framework's modules are
    not the model's memory. Each outermost `import` (statements and unpickling both call
    builtins.__import__) that may add modules runs with the heap trace paused and is measured
    before and after; an import that bypasses it (importlib.import_module) is not, and shows in
    the module count."""

    def __init__(self, heap: _HeapTrace):
        self.heap = heap
        self.took = _Growth()
        self.thread = threading.get_ident()
        self.importing = False

    def __enter__(self) -> "_ImportMeter":
        self.original = builtins.__import__
        builtins.__import__ = self.metered
        return self

    def __exit__(self, *exc) -> None:
        builtins.__import__ = self.original

    def metered(self, name, globals=None, locals=None, fromlist=(), level=0):
        if self.importing or threading.get_ident() != self.thread or _imported_already(name, globals, fromlist, level):
            return self.original(name, globals, locals, fromlist, level)
        self.importing = True
        self.heap.pause()
        before = _Growth.now()
        try:
            return self.original(name, globals, locals, fromlist, level)
        finally:
            if len(sys.modules) != before.modules:
                self.took.add(_Growth.now().since(before))
            self.heap.resume()
            self.importing = False


def _imported_already(name: str, globals, fromlist, level: int) -> bool:
    """Whether an import only finds what is imported already, as far as a glance tells (unpickling
    asks for each class's module; functions import inside their bodies): most imports are these.
    Measuring one reads malloc's books, which costs more the bigger the heap."""
    if level:
        try:
            name = importlib.util.resolve_name("." * level + name, (globals or {}).get("__package__"))
        except (ImportError, ValueError):
            return False
    module = sys.modules.get(name)
    return module is not None and all(item in module.__dict__ for item in fromlist or () if item != "*")


def _traced(start: Callable[[], T]) -> tuple[T, int, _Growth, _Growth]:
    """Run `start`; return its result, the Python heap it kept (its imports apart), what it grew
    the process by natively, and what its imports took of that."""
    return_freed_memory()
    before = _Growth.now()
    heap = _HeapTrace()
    try:
        with _ImportMeter(heap) as imports:
            result = start()
    finally:
        heap.pause()
    return_freed_memory()  # what the load freed again is not the model's
    return result, heap.kept, _Growth.now().since(before), imports.took


def _run_unmeasured(start: Callable[[], T]) -> tuple[T, int, bool]:
    with _unmeasured_guard:
        _unmeasured["running"] += 1
        _unmeasured["started"] += 1
    try:
        rss_before = rss()
        result = start()
        return result, max(0, rss() - rss_before), False  # an estimate: other loads grew RSS too
    finally:
        with _unmeasured_guard:
            _unmeasured["running"] -= 1


def start_measured(start: Callable[[], T]) -> tuple[T, int, bool]:
    """Run `start` (build and load a model) once and return it with the bytes it keeps, and
    whether that figure is exact: the larger of its Python heap growth (numpy arrays included)
    and its native growth (RSS, or malloc's in-use bytes), less what the modules it imported
    took, which are the framework's.

    Measuring is process-wide: a load that cannot be measured within MEASURE_WAIT runs
    unmeasured with an RSS estimate, and a measurement that other loads overlapped, or that
    modules imported past the meter swelled, is only an estimate too; the registry measures such
    a model again at its next reload.
    """
    if not _measuring.acquire(timeout=MEASURE_WAIT):
        return _run_unmeasured(start)
    try:
        with _unmeasured_guard:
            started_before = _unmeasured["started"]
            overlapped = _unmeasured["running"] > 0
        result, heap, grew, imports = _traced(start)
        with _unmeasured_guard:
            overlapped = overlapped or _unmeasured["running"] > 0 or _unmeasured["started"] != started_before
        kept = max(0, heap, grew.rss - imports.rss, grew.malloc - imports.malloc)
        return result, kept, not (overlapped or grew.modules > imports.modules)
    finally:
        _measuring.release()


class MemoryCollector:
    """Seldon Core 2's agent metrics and fleetserve's own memory figures, read from the books at
    scrape time so they cannot drift from them."""

    def __init__(self, memory: MemoryManager, versions: Callable[[], Iterable[Accountable]]):
        self.memory = memory
        self.versions = versions

    def collect(self):
        server = list(SERVER_LABELS.values())
        server_labels = [*SERVER_LABELS, "device"]
        books = list(self.memory.devices.values())
        for name, field, text in (
            ("seldon_cache_evict_count", "evictions", "Models evicted from memory"),
            ("seldon_cache_miss_count", "misses", "Evicted models reloaded because a request needed them"),
        ):
            # Seldon's counters have no _total suffix, which prometheus_client's Counter would add.
            family = Metric(name, text, "counter")
            for device in books:
                family.add_sample(name, {**SERVER_LABELS, "device": device.device}, getattr(device, field))
            yield family
        for name, field in (
            ("seldon_server_replica_memory_capacity_bytes_gauge", "limit"),
            ("seldon_server_replica_memory_capacity_overcommit_bytes_gauge", "registered_limit"),
        ):
            family = GaugeMetricFamily(name, "Memory for models on this server", labels=server_labels)
            for device in books:
                if device.limited:
                    family.add_metric([*server, device.device], getattr(device, field))
            yield family
        model_labels = [*server_labels, "model_internal"]
        loaded = GaugeMetricFamily("seldon_loaded_model_memory_bytes_gauge", "Memory of resident models", labels=model_labels)
        evicted = GaugeMetricFamily("seldon_evicted_model_memory_bytes_gauge", "Memory of evicted models", labels=model_labels)
        figures = GaugeMetricFamily(
            "fleetserve_model_memory_bytes", "Declared and measured memory of each model version",
            labels=["model", "version", "device", "kind"],
        )
        for version in self.versions():
            device = self.memory.of(version)
            if version not in device.registered:
                continue
            internal = internal_name(version.name, version.version)
            (loaded if version in device.resident else evicted).add_metric([*server, version.device, internal], version.cost)
            for kind in ("declared", "measured"):
                figures.add_metric([version.name, version.version or "", version.device, kind], getattr(version, kind))
        yield loaded
        yield evicted
        yield figures
