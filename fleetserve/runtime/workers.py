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
import signal
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from fleetserve.errors import InferenceError, ModelLoadError, describe
from fleetserve.runtime.base import Runtime
from fleetserve.settings import ModelSettings
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


def _serve(connection: Connection, settings: ModelSettings, cores: int) -> None:
    """A worker process: load the model, then answer predicts until the server hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    # Frameworks size their thread pools to every core; N workers doing so oversubscribe the
    # machine N times over (xgboost fell from 1,763 to 126 req/s with 2 workers on 2 cores).
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, str(cores))
    from fleetserve.runtimes import resolve_runtime

    try:
        runtime = resolve_runtime(settings, settings.requirements)(settings)
        runtime.load()
    except BaseException as error:
        connection.send(("error", describe(error)))
        return
    connection.send(("ready", None))
    inputs, outputs = MappedBlocks(), SharedBlock(f"fleetserve-{os.getpid()}-out")
    try:
        while True:
            try:
                message = connection.recv()
            except EOFError:  # the server is gone
                return
            if message is None:
                return
            path, described, request_id, parameters, requested = message
            request = InferenceRequest(
                inputs=_read_tensors(described, inputs.get(path), copy=False),
                id=request_id,
                parameters=parameters,
                outputs=[RequestedOutput(name, output_parameters) for name, output_parameters in requested],
            )
            try:
                response = runtime.predict(request)
                if not isinstance(response, InferenceResponse) or not all(
                    isinstance(tensor, Tensor) and isinstance(tensor.data, np.ndarray) for tensor in response.outputs
                ):
                    raise InferenceError(
                        f"predict() returned {type(response).__name__}; it must return an InferenceResponse "
                        "whose outputs are Tensors holding numpy arrays"
                    )
                written = _write_tensors(response.outputs, outputs)
                connection.send(("ok", (str(outputs.path), written, response.parameters)))
            except BaseException as error:
                connection.send(("error", describe(error)))
    finally:
        outputs.close()
        inputs.close()


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.Process
    connection: Connection
    inputs: SharedBlock
    outputs: MappedBlocks


class WorkerPool(Runtime):
    """The model's runtime as the server sees it: predicts go to an idle worker process."""

    def __init__(self, settings: ModelSettings, size: int):
        super().__init__(settings)
        self.size = size
        self.workers: list[_Worker] = []
        self.idle: asyncio.Queue[_Worker] | None = None
        self.closed = False

    def load(self) -> None:
        try:
            for _ in range(self.size):
                self.workers.append(self._start_worker())
        except BaseException:
            self.unload()
            raise

    def _start_worker(self) -> _Worker:
        """Blocking: spawns a process and waits until it has loaded the model."""
        context = multiprocessing.get_context("spawn")  # fork would copy the server's threads' locks
        ours, theirs = context.Pipe()
        cores = max(1, len(os.sched_getaffinity(0)) // self.size)
        process = context.Process(target=_serve, args=(theirs, self.settings, cores), daemon=True,
                                  name=f"fleetserve-worker-{self.name}")
        process.start()
        theirs.close()
        try:
            status, detail = ours.recv()
        except EOFError:
            process.join(5)
            raise ModelLoadError(f"model '{self.name}': its worker process exited with code {process.exitcode} while loading") from None
        if status != "ready":
            process.join(5)
            raise ModelLoadError(f"model '{self.name}' failed to load in its worker process: {detail}")
        return _Worker(process, ours, SharedBlock(f"fleetserve-{os.getpid()}-{process.pid}-in"), MappedBlocks())

    def memory_bytes(self) -> int:
        """What the workers hold: their resident memory, interpreter and imports included."""
        total = 0
        for worker in self.workers:
            try:
                status = Path(f"/proc/{worker.process.pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        return total

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        if self.idle is None:
            self.idle = asyncio.Queue()
            for worker in self.workers:
                self.idle.put_nowait(worker)
        worker = await self.idle.get()
        try:
            described = _write_tensors(request.inputs, worker.inputs)
            requested = [(output.name, output.parameters) for output in request.outputs]
            worker.connection.send((str(worker.inputs.path), described, request.id, request.parameters, requested))
        except OSError as error:  # the worker died while idle
            self._replace(worker)
            raise InferenceError(f"model '{self.name}': its worker process is gone ({error}); starting another") from None
        except BaseException:
            self.idle.put_nowait(worker)
            raise
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        loop.add_reader(worker.connection.fileno(), self._on_answer, worker, answer)
        # A cancelled caller must not take the worker away mid-predict: _on_answer gives it back.
        return await asyncio.shield(answer)

    def _on_answer(self, worker: _Worker, answer: asyncio.Future) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.connection.fileno())
        try:
            status, detail = worker.connection.recv()
        except (EOFError, OSError):
            worker.process.join(1)
            error = InferenceError(
                f"model '{self.name}': its worker process exited (code {worker.process.exitcode}) during the predict"
            )
            log.error("%s; starting another", error.message)
            self._replace(worker)
            if not answer.done():
                answer.set_exception(error)
            return
        if status == "ok":
            path, described, parameters = detail
            outputs = _read_tensors(described, worker.outputs.get(path), copy=True)  # the block is reused
            result = InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs, parameters=parameters)
            if not answer.done():
                answer.set_result(result)
        elif not answer.done():
            answer.set_exception(InferenceError(f"model '{self.name}' failed: {detail}"))
        self.idle.put_nowait(worker)

    def _replace(self, dead: _Worker) -> None:
        self._close_worker(dead)

        async def restart() -> None:
            try:
                worker = await asyncio.to_thread(self._start_worker)
            except Exception as error:
                log.error("model '%s': could not start a worker process again: %s", self.name, describe(error))
                return
            if self.closed:
                self._stop_worker(worker)
                return
            self.workers[self.workers.index(dead)] = worker
            self.idle.put_nowait(worker)

        asyncio.get_running_loop().create_task(restart())

    def unload(self) -> None:
        self.closed = True
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
        # The worker unlinks its own output blocks; one that was killed cannot.
        for leftover in SHARED_DIR.glob(f"fleetserve-{worker.process.pid}-out-*"):
            leftover.unlink(missing_ok=True)
