"""Models served by a Triton Inference Server beside fleetserve: the GPU models (TensorRT,
PyTorch, TensorFlow, ONNX on GPU, OpenVINO, Triton's Python backend).

The model's artifact is a Triton model folder (`config.pbtxt` and version folders). It reaches
Triton inside the load request (Triton's repository API takes a config override and files, so
no shared volume is needed), or, with `--triton-repository`, as a copy in a folder Triton also
reads. Inference is forwarded with tritonclient's asyncio gRPC client; clients keep talking to
fleetserve only.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import grpc
from google.protobuf import json_format, text_format
from tritonclient.grpc import aio as triton
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from fleetserve import tracing
from fleetserve.errors import FleetError, InferenceError, InvalidInput, ModelLoadError, ServerUnavailable
from fleetserve.runtime.base import Runtime
from fleetserve.settings import ServerSettings, TensorMetadata
from fleetserve.types import InferenceRequest, InferenceResponse, Tensor


class TritonBackend:
    """The Triton server the proxied models live in; one gRPC channel, opened on first use."""

    def __init__(self, url: str, repository: str = ""):
        self.url = url
        self.repository = Path(repository) if repository else None
        self._client: triton.InferenceServerClient | None = None

    @property
    def client(self) -> triton.InferenceServerClient:
        if self._client is None:  # bound to the running event loop, so made there
            # Reconnect within a second once Triton is back, not after gRPC's default minutes of backoff.
            options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000)]
            self._client = triton.InferenceServerClient(self.url, channel_args=options)
        return self._client


class TritonRuntime(Runtime):
    """A model whose load, predict and unload are Triton's."""

    backend: TritonBackend | None = None  # set by configure() when the server has --triton-url
    # Which runtime holds each model name in Triton: a reload's new runtime takes the name over,
    # and the old one's unload must then leave Triton's copy alone.
    owners: dict[str, "TritonRuntime"] = {}
    _reloading: asyncio.Future | None = None
    _gpu_bytes = 0
    _closed = False  # unloaded or evicted: nothing may push the model into Triton again

    async def load(self) -> None:
        await self._push()
        try:
            client = self._backend().client
            metadata = await _call(client.get_model_metadata(self.name), f"model '{self.name}'", ModelLoadError)
            self.own_inputs = [_tensor_metadata(tensor) for tensor in metadata.inputs]
            self.own_outputs = [_tensor_metadata(tensor) for tensor in metadata.outputs]
            self.own_versions, self.own_platform = list(metadata.versions), metadata.platform
            self._gpu_bytes = await self._reported_gpu_bytes()
        except BaseException:
            await self.unload()  # a half-loaded model must not stay in Triton, outside the books
            raise

    async def _reported_gpu_bytes(self) -> int:
        try:
            statistics = await self._backend().client.get_inference_statistics(self.name)
        except InferenceServerException:
            return 0  # a figure only; the files' size stands in
        return sum(usage.byte_size for model in statistics.model_stats for usage in model.memory_usage if usage.type == "GPU")

    def footprint(self) -> int:
        """The GPU memory Triton reports for the model (backends that report it: TensorRT, ONNX
        Runtime, PyTorch), and at least the size of its files: the weights are on the GPU."""
        files = sum(path.stat().st_size for path in self.settings.artifact_path.rglob("*") if path.is_file())
        return max(self._gpu_bytes, files)

    async def _push(self) -> None:
        """Load the model folder into Triton (again, after Triton restarted without it)."""
        backend = self._backend()
        folder = self.settings.artifact_path
        config_file = folder / "config.pbtxt"
        if not config_file.is_file():
            raise ModelLoadError(f"model '{self.name}': {folder} is not a Triton model folder (no config.pbtxt)")
        try:
            config = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
        except text_format.ParseError as error:
            raise ModelLoadError(f"model '{self.name}': config.pbtxt: {error}") from None
        config.name = self.name  # Triton knows the model by fleetserve's name, whatever the folder says
        self.owners[self.name] = self
        if backend.repository is not None:
            _copy_into(folder, backend.repository / self.name, config)
            await _call(backend.client.load_model(self.name), f"loading model '{self.name}' in Triton", ModelLoadError)
        else:
            files = {f"file:{path.relative_to(folder).as_posix()}": path.read_bytes()
                     for path in sorted(folder.rglob("*")) if path.is_file() and path != config_file}
            await _call(backend.client.load_model(self.name, config=json_format.MessageToJson(config), files=files),
                        f"loading model '{self.name}' in Triton", ModelLoadError)

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        try:
            return await self._forward(request)
        except _NotInTriton:
            await self._reload()
            return await self._forward(request)

    async def _reload(self) -> None:
        """One reload however many requests found the model missing (Triton restarted)."""
        if self._closed:
            raise ModelLoadError(f"model '{self.name}' was unloaded")
        if self._reloading is None or self._reloading.done():
            self._reloading = asyncio.ensure_future(self._push())
        await asyncio.shield(self._reloading)

    async def _forward(self, request: InferenceRequest) -> InferenceResponse:
        backend = self._backend()
        inputs = []
        for tensor in request.inputs:
            wire = triton.InferInput(tensor.name, list(tensor.data.shape), tensor.datatype)
            wire.set_data_from_numpy(tensor.data)
            inputs.append(wire)
        outputs = [triton.InferRequestedOutput(output.name) for output in request.outputs] or None
        result = await _call(
            backend.client.infer(self.name, inputs, model_version=request.model_version or "", outputs=outputs,
                                 request_id=request.id or "",
                                 headers=tracing.headers() if tracing.TRACER is not None else None),
            f"model '{self.name}'", InferenceError,
        )
        answer = result.get_response()
        tensors = [Tensor(output.name, result.as_numpy(output.name)) for output in answer.outputs]
        response = self.response(tensors, request)
        response.model_version = answer.model_version or None
        return response

    async def unload(self) -> None:
        self._closed = True
        if self.owners.get(self.name) is not self:  # a newer runtime of this model holds Triton's copy
            return
        del self.owners[self.name]
        backend = self._backend()
        try:
            await _call(backend.client.unload_model(self.name), f"unloading model '{self.name}' in Triton", InferenceError)
            await self._unloaded(backend)
        except _NotInTriton:  # Triton restarted without it: nothing to unload
            pass
        if backend.repository is not None:
            shutil.rmtree(backend.repository / self.name, ignore_errors=True)

    async def _unloaded(self, backend: TritonBackend, wait: float = 10.0) -> None:
        """Triton unloads in the background: wait until the model is gone, so an eviction frees
        its GPU memory before the model that needed the room is pushed."""
        deadline = asyncio.get_running_loop().time() + wait
        while await _call(backend.client.is_model_ready(self.name), f"model '{self.name}'", InferenceError):
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.05)

    async def backend_ready(self) -> bool:
        """Triton's word; a Triton that answers without the model (restarted) gets it loaded again."""
        if self._closed:  # evicted while the probe awaited: still ready, a request reloads it
            return True
        try:
            if await self._backend().client.is_model_ready(self.name):
                return True
            await self._reload()
            return True
        except (InferenceServerException, FleetError):
            return False

    async def backend_config(self) -> dict:
        answer = await _call(self._backend().client.get_model_config(self.name, as_json=True), f"model '{self.name}'", InferenceError)
        return _numbers(answer["config"])

    async def backend_statistics(self) -> dict:
        answer = await _call(self._backend().client.get_inference_statistics(self.name, as_json=True), f"model '{self.name}'",
                             InferenceError)
        return _numbers(answer["model_stats"][0])

    def _backend(self) -> TritonBackend:
        if self.backend is None:
            raise ModelLoadError(f"model '{self.name}' is served by Triton, but this server has no Triton backend: "
                                 "start it with --triton-url (FLEETSERVE_TRITON_URL)")
        return self.backend


def configure(settings: ServerSettings) -> None:
    TritonRuntime.backend = TritonBackend(settings.triton_url, settings.triton_repository) if settings.triton_url else None


class _NotInTriton(InferenceError):
    """Triton answers, but without this model: it restarted since the model was loaded."""


async def _call(awaitable, what: str, failure: type[FleetError]):
    """Triton's answer, its errors keeping their meaning: bad input stays 400, a backend that
    cannot be reached is 503 (the next call tries again: the channel reconnects by itself)."""
    try:
        return await awaitable
    except InferenceServerException as error:
        status = error.status() or ""
        message = f"{what}: Triton: {error.message()}"
        if "unknown model" in (error.message() or ""):
            raise _NotInTriton(message) from None
        if status in (str(grpc.StatusCode.UNAVAILABLE), str(grpc.StatusCode.DEADLINE_EXCEEDED)):
            raise ServerUnavailable(f"{what}: the Triton backend is unavailable: {error.message()}") from None
        if status == str(grpc.StatusCode.INVALID_ARGUMENT) and failure is InferenceError:
            raise InvalidInput(message) from None
        raise failure(message) from None


def _copy_into(folder: Path, target: Path, config) -> None:
    """The model folder in the shared repository, replaced whole, with the renamed config."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(folder, staging)
    (staging / "config.pbtxt").write_text(text_format.MessageToString(config))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)


# protobuf's JSON writes 64-bit integers as strings; Triton's own HTTP API, and its clients, use numbers.
_INT64_FIELDS = frozenset({"dims", "shape", "last_inference", "inference_count", "execution_count", "count", "ns",
                           "batch_size", "max_queue_delay_microseconds", "preferred_batch_size"})


def _numbers(value, field: str | None = None):
    if isinstance(value, dict):
        return {key: _numbers(item, key) for key, item in value.items()}
    if isinstance(value, list):
        return [_numbers(item, field) for item in value]
    if field in _INT64_FIELDS and isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return value


def _tensor_metadata(tensor) -> TensorMetadata:
    return TensorMetadata(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
