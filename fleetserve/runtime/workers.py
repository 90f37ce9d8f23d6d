"""Worker processes for models whose predict holds the GIL: a model with `"parallel_workers": N`
in its model-settings.json is loaded in N processes of its own, and its predicts run there,
one at a time per process, in parallel with the server's event loop and with each other.

Tensors cross through shared memory, not pickles: each worker has an input block the server
writes and an output block the worker writes (files in /dev/shm, grown as requests need), and
the pipe between them carries only names, dtypes, shapes and offsets (BYTES tensors, which are
Python objects, travel pickled). A worker that dies fails the request it was computing and is
replaced; the model keeps serving from the others meanwhile.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import mmap
import multiprocessing
import os
import pickle
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from fleetserve.errors import STATUS, FleetError, InferenceError, ModelLoadError, ModelUnavailable, WorkerDied, describe
from fleetserve.runtime.base import Runtime
from fleetserve.runtime.memory import rss
from fleetserve.settings import ModelSettings, TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor

log = logging.getLogger(__name__)

SHARED_DIR = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
ALIGNMENT = 64
_blocks = itertools.count(1)


class SharedBlock:
    """A file in shared memory, mapped; it grows by being replaced with a larger file."""

    def __init__(self, prefix: str, size: int = 1 << 20):
        self.prefix = prefix
        self.path: Path | None = None
        self.size = 0
        self.map: mmap.mmap | None = None
        self.reserve(size)

    def reserve(self, size: int) -> None:
        if size <= self.size:
            return
        size = max(size, 2 * self.size)
        path = SHARED_DIR / f"{self.prefix}-{next(_blocks)}"
        with open(path, "w+b") as file:
            try:
                # Allocated now, so a full /dev/shm is an error here rather than a SIGBUS later.
                os.posix_fallocate(file.fileno(), 0, size)
            except OSError as error:
                path.unlink(missing_ok=True)
                raise InferenceError(f"cannot allocate {size} bytes of shared memory in {SHARED_DIR}: {error}") from None
            mapped = mmap.mmap(file.fileno(), size)
        self.close()
        self.path, self.size, self.map = path, size, mapped

    def close(self) -> None:
        if self.map is not None:
            self.path.unlink(missing_ok=True)
            self.map = None  # unmapped once no array views it any more


class MappedBlocks:
    """The other side's blocks, mapped read/write by path, the latest one kept open."""

    def __init__(self):
        self.path: str | None = None
        self.map: mmap.mmap | None = None

    def get(self, path: str) -> mmap.mmap:
        if path != self.path:
            # The old map is not closed here: arrays a model kept may still view it; it is
            # unmapped when the last of them goes.
            with open(path, "r+b") as file:
                self.map = mmap.mmap(file.fileno(), 0)
            self.path = path
        return self.map

    def close(self) -> None:
        self.map = None


def _write_tensors(tensors: list[Tensor], block: SharedBlock) -> list[tuple]:
    """Copy the arrays into the block; what the other side needs to find them again."""
    offsets, end = [], 0
    for tensor in tensors:
        offsets.append(end)
        if tensor.data.dtype != object:
            end += -(-tensor.data.nbytes // ALIGNMENT) * ALIGNMENT
    block.reserve(end)
    described = []
    for tensor, offset in zip(tensors, offsets):
        array = tensor.data
        if array.dtype == object:
            described.append((tensor.name, None, array, tensor.parameters))
            continue
        np.ndarray(array.shape, array.dtype, buffer=block.map, offset=offset)[...] = array
        described.append((tensor.name, array.dtype.str, (array.shape, offset), tensor.parameters))
    return described


def _read_tensors(described: list[tuple], buffer, copy: bool) -> list[Tensor]:
    tensors = []
    for name, dtype, where, parameters in described:
        if dtype is None:
            tensors.append(Tensor(name, where, parameters))
            continue
        shape, offset = where
        array = np.ndarray(shape, np.dtype(dtype), buffer=buffer, offset=offset)
        tensors.append(Tensor(name, array.copy() if copy else array, parameters))
    return tensors


def serve(connection: Connection, settings: ModelSettings) -> None:
    """A worker process: load the model, then answer predicts until the server hangs up."""
    from fleetserve.runtimes import resolve_runtime

    try:
        runtime = resolve_runtime(settings, settings.requirements)(settings)
        runtime.load()
        metadata = (runtime.metadata_inputs(), runtime.metadata_outputs())  # the graph's or signature's, say
    except BaseException as error:
        connection.send(("error", describe(error)))
        return
    connection.send(("ready", metadata))
    inputs, outputs = MappedBlocks(), SharedBlock(f"fleetserve-{os.getpid()}-out")
    try:
        while True:
            try:
                message = connection.recv()
            except EOFError:  # the server is gone
                return
            if message is None:
                return
            connection.send(_predict(runtime, message, inputs, outputs))
    finally:
        outputs.close()


def _predict(runtime: Runtime, message: tuple, inputs: MappedBlocks, outputs: SharedBlock) -> tuple:
    path, described, request_id, parameters, requested = message
    try:
        request = InferenceRequest(
            inputs=_read_tensors(described, inputs.get(path), copy=False),
            id=request_id,
            parameters=parameters,
            outputs=[RequestedOutput(name, output_parameters) for name, output_parameters in requested],
        )
        response = runtime.predict(request)
        if not isinstance(response, InferenceResponse) or not all(
            isinstance(tensor, Tensor) and isinstance(tensor.data, np.ndarray) for tensor in response.outputs
        ):
            raise InferenceError(
                f"predict() returned {type(response).__name__}; it must return an InferenceResponse "
                "whose outputs are Tensors holding numpy arrays"
            )
        written = _write_tensors(response.outputs, outputs)  # first: it may move to a larger block
        return "ok", (str(outputs.path), written, response.parameters)
    except BaseException as error:  # a model's code may raise anything, even SystemExit
        if type(error) in STATUS:  # the model's own verdict (InvalidInput: 400) crosses as it is
            return "refused", error
        return "error", describe(error)


def remove_stale_blocks() -> None:
    """Shared-memory files of processes that are gone (killed before they could remove them)."""
    for path in SHARED_DIR.glob("fleetserve-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            path.unlink(missing_ok=True)


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.Process
    connection: Connection
    inputs: SharedBlock
    outputs: MappedBlocks
    answer: asyncio.Future | None = None  # the predict it is computing


class WorkerPool(Runtime):
    """The model's runtime as the server sees it: predicts go to an idle worker process."""

    def __init__(self, settings: ModelSettings, size: int):
        super().__init__(settings)
        self.size = size
        self.workers: list[_Worker] = []
        self.idle: asyncio.Queue[_Worker | None] | None = None
        self.closed = False
        self.failure = ""  # why a worker could not be started again
        self.metadata: tuple[list[TensorMetadata], list[TensorMetadata]] = (settings.inputs, settings.outputs)

    def load(self) -> None:
        try:
            for _ in range(self.size):
                self.workers.append(self._start_worker())
        except BaseException:
            self._stop_all()
            raise

    def _start_worker(self) -> _Worker:
        """Blocking: spawns a process and waits until it has loaded the model."""
        from fleetserve.runtime.worker_process import main

        context = multiprocessing.get_context("spawn")  # fork would copy the server's threads' locks
        ours, theirs = context.Pipe()
        cores = max(1, len(os.sched_getaffinity(0)) // self.size)
        process = context.Process(target=main, args=(theirs, pickle.dumps(self.settings), cores), daemon=True,
                                  name=f"fleetserve-worker-{self.name}")
        process.start()
        theirs.close()
        try:
            status, detail = ours.recv()
        except EOFError:
            process.join(5)
            ours.close()
            raise ModelLoadError(f"model '{self.name}': its worker process exited with code {process.exitcode} while loading") from None
        if status != "ready":
            process.join(5)
            ours.close()
            raise ModelLoadError(f"model '{self.name}' failed to load in its worker process: {detail}")
        self.metadata = detail
        return _Worker(process, ours, SharedBlock(f"fleetserve-{os.getpid()}-{process.pid}-in"), MappedBlocks())

    def metadata_inputs(self) -> list[TensorMetadata]:
        return self.metadata[0]

    def metadata_outputs(self) -> list[TensorMetadata]:
        return self.metadata[1]

    def memory_bytes(self) -> int:
        """What the workers hold: their resident memory, interpreter and imports included."""
        return sum(rss(worker.process.pid) for worker in self.workers)

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        if self.idle is None:
            self.idle = asyncio.Queue()
            for worker in self.workers:
                self.idle.put_nowait(worker)
        if not self.workers:
            raise ModelUnavailable(f"model '{self.name}' has no worker process: {self.failure or 'unloaded'}")
        worker = await self.idle.get()
        if worker is None:  # woken to be told the pool is closed or empty; wake the next waiter too
            self.idle.put_nowait(None)
            raise ModelUnavailable(f"model '{self.name}' has no worker process: {self.failure or 'unloaded'}")
        try:
            described = _write_tensors(request.inputs, worker.inputs)
            requested = [(output.name, output.parameters) for output in request.outputs]
            worker.connection.send((str(worker.inputs.path), described, request.id, request.parameters, requested))
        except OSError as error:  # the worker died while idle
            self._replace(worker)
            raise ModelUnavailable(f"model '{self.name}': its worker process is gone ({error}); starting another") from None
        except BaseException:
            self.idle.put_nowait(worker)
            raise
        loop = asyncio.get_running_loop()
        worker.answer = loop.create_future()
        loop.add_reader(worker.connection.fileno(), self._on_answer, worker)
        return await worker.answer

    def _on_answer(self, worker: _Worker) -> None:
        answer, worker.answer = worker.answer, None
        asyncio.get_running_loop().remove_reader(worker.connection.fileno())
        # uvloop's add_reader left the socket non-blocking: a pickled answer (BYTES tensors) larger
        # than its buffer would fail half read, and the next large request half sent. The read
        # blocks the loop until the answer is whole: a worker stopped mid-send (SIGSTOP) holds it.
        os.set_blocking(worker.connection.fileno(), True)
        try:
            status, detail = worker.connection.recv()
        except (EOFError, OSError):
            worker.process.join(0.5)  # reaps it: it closed the pipe by exiting
            error = WorkerDied(
                f"model '{self.name}': its worker process exited (code {worker.process.exitcode}) during the predict"
            )
            log.error("%s; starting another", error.message)
            self._replace(worker)
            answer.set_exception(error)
            return
        try:
            if status == "refused":
                raise detail
            if status != "ok":
                raise InferenceError(f"model '{self.name}' failed: {detail}")
            path, described, parameters = detail
            outputs = _read_tensors(described, worker.outputs.get(path), copy=True)  # the block is reused
            answer.set_result(InferenceResponse(self.name, outputs, self.version, parameters=parameters))
        except BaseException as error:
            answer.set_exception(error if isinstance(error, FleetError) else InferenceError(describe(error)))
        finally:
            self.idle.put_nowait(worker)

    def _replace(self, dead: _Worker) -> None:
        self._close_worker(dead)
        if self.closed:
            return

        async def restart() -> None:
            try:
                worker = await asyncio.to_thread(self._start_worker)
            except Exception as error:
                self.failure = describe(error)
                log.error("model '%s': could not start a worker process again: %s", self.name, self.failure)
                self.workers.remove(dead)
                if not self.workers:
                    self.idle.put_nowait(None)  # requests waiting for a worker fail now rather than never
                return
            if self.closed:
                await asyncio.to_thread(self._stop_worker, worker)
                return
            self.workers[self.workers.index(dead)] = worker
            self.idle.put_nowait(worker)

        asyncio.get_running_loop().create_task(restart())

    async def unload(self) -> None:
        """On the loop: stop listening to the workers and fail what still waits; then stop them."""
        self.closed = True
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if worker.answer is not None:
                loop.remove_reader(worker.connection.fileno())
                worker.answer.set_exception(ModelUnavailable(f"model '{self.name}' was unloaded during the predict"))
                worker.answer = None
        if self.idle is not None:
            self.idle.put_nowait(None)
        await asyncio.to_thread(self._stop_all)

    def _stop_all(self) -> None:
        for worker in self.workers:
            self._stop_worker(worker)

    def _stop_worker(self, worker: _Worker) -> None:
        try:
            worker.connection.send(None)
        except OSError:
            pass
        worker.process.join(5)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join(5)
        self._close_worker(worker)

    @staticmethod
    def _close_worker(worker: _Worker) -> None:
        worker.connection.close()
        worker.inputs.close()
        worker.outputs.close()
        # The worker removes its own output blocks; one that was killed cannot.
        for leftover in SHARED_DIR.glob(f"fleetserve-{worker.process.pid}-out-*"):
            leftover.unlink(missing_ok=True)
