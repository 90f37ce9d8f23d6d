"""The gRPC front door: Triton's `inference.GRPCInferenceService` (a superset of KServe's),
plus the standard `grpc.health.v1` service.

The protocol messages come from tritonclient's generated modules, so the wire format is the one
Triton clients are built against. Raw input contents are read with `np.frombuffer`;
`raw_output_contents` are always filled.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from fleetserve import tracing
from fleetserve.codecs import json_text
from fleetserve.codecs.numpy import array_from_buffer, array_from_json, array_to_buffer
from fleetserve.errors import ANSWERED, FleetError, InvalidInput, Relayed, describe
from fleetserve.fleet.forward import FORWARDED
from fleetserve.graph.router import seldon_target
from fleetserve.runtime.metrics import grpc_code_name
from fleetserve.server import documents
from fleetserve.server.logs import GrpcAccess, per_request
from fleetserve.server.security import grpc_interceptors, unclassified_rpcs
from fleetserve.server.limits import apply_deadline
from fleetserve.types import InferenceRequest, InferenceResponse, RequestedOutput, Tensor, check_datatype

if TYPE_CHECKING:
    from fleetserve.server.app import FleetServer

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
# What the server registers; every RPC of each is classified in security.RPCS.
SERVICES = (service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"])

# Where typed (non-raw) contents live per datatype; FP16 travels only as raw contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameters(message_parameters) -> dict[str, Any]:
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in message_parameters.items()
            if value.WhichOneof("parameter_choice")}


def _set_parameters(target, parameters: dict[str, Any]) -> None:
    for key, value in parameters.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, (dict, list)):  # a protobuf parameter holds no structure: JSON text, as REST shows it
            target[key].string_param = json_text(value)
        else:
            target[key].string_param = str(value)


def decode_infer_request(message: service_pb2.ModelInferRequest) -> InferenceRequest:
    raw = message.raw_input_contents
    if raw and len(raw) != len(message.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(message.inputs)} inputs; send one per input")
    inputs = []
    for index, tensor in enumerate(message.inputs):
        name, datatype, shape = tensor.name, tensor.datatype, tuple(tensor.shape)
        if raw:
            data = array_from_buffer(raw[index], datatype, shape, name)
        else:
            field = _CONTENTS_FIELD.get(datatype)
            if field is None:
                check_datatype(datatype, name)  # an unknown datatype gets its own message
                raise InvalidInput(f"input '{name}': {datatype} can only be sent in raw_input_contents")
            data = array_from_json(list(getattr(tensor.contents, field)), datatype, shape, name)
        inputs.append(Tensor(name, data, _parameters(tensor.parameters)))
    return InferenceRequest(
        inputs=inputs,
        id=message.id or None,
        parameters=_parameters(message.parameters),
        outputs=[RequestedOutput(output.name, _parameters(output.parameters)) for output in message.outputs],
    )


def encode_infer_response(response: InferenceResponse) -> service_pb2.ModelInferResponse:
    message = service_pb2.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version or "", id=response.id or ""
    )
    _set_parameters(message.parameters, response.parameters)
    for tensor in response.outputs:
        output = message.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        _set_parameters(output.parameters, tensor.parameters)
        message.raw_output_contents.append(bytes(array_to_buffer(tensor.data)))
    return message


def encode_infer_request(model: str, request: InferenceRequest) -> service_pb2.ModelInferRequest:
    """decode_infer_request's inverse: a request this server sends on (a fleet hop), tensors raw."""
    message = service_pb2.ModelInferRequest(model_name=model, id=request.id or "")
    _set_parameters(message.parameters, request.parameters)
    for tensor in request.inputs:
        entry = message.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        _set_parameters(entry.parameters, tensor.parameters)
        message.raw_input_contents.append(bytes(array_to_buffer(tensor.data)))
    for output in request.outputs:
        _set_parameters(message.outputs.add(name=output.name).parameters, output.parameters)
    return message


def decode_infer_response(message: service_pb2.ModelInferResponse) -> InferenceResponse:
    """encode_infer_response's inverse: a fleet peer's answer."""
    raw = message.raw_output_contents
    outputs = [Tensor(tensor.name, array_from_buffer(raw[index], tensor.datatype, tuple(tensor.shape), tensor.name),
                      _parameters(tensor.parameters))
               for index, tensor in enumerate(message.outputs)]
    return InferenceResponse(model_name=message.model_name, model_version=message.model_version or None,
                             outputs=outputs, id=message.id or None, parameters=_parameters(message.parameters))


class _Undecodable:
    """What a request deserializer hands over for bytes that are not the method's message."""

    def __init__(self, message: str):
        self.message = message


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    undecodable = _Undecodable(f"the request bytes are not a valid {deserialize.__self__.DESCRIPTOR.full_name} message")

    def deserialize_or_mark(data: bytes):
        try:
            return deserialize(data)
        except DecodeError:
            return undecodable

    return deserialize_or_mark


class _Captured:
    """Stands in for a server to receive the handlers generated code registers."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = handlers


def _add_inference_service(servicer: "InferenceService", grpc_server: grpc.aio.Server) -> None:
    """Registers the service as the generated code does, but with request deserializers that
    hand an _Undecodable over instead of raising: gRPC would answer UNKNOWN, naming a Python class."""
    captured = _Captured()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = {
        name: handler._replace(request_deserializer=_tolerant(handler.request_deserializer))
        for name, handler in captured.handlers.items()
    }
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    grpc_server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _aborts_on_error(method: Callable[..., Awaitable[Any]]):
    """Turn a FleetError, or a request that did not decode, into the gRPC status it calls for."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        if type(request) is _Undecodable:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(self, request, context)
        except FleetError as error:
            # Marks the answer as this server's own (a fleet peer relays it, never takes it for a
            # broken connection), with the HTTP status REST would have answered.
            context.set_trailing_metadata(((ANSWERED, str(error.http_status)),))
            await context.abort(error.grpc_code, error.message)
        except Exception as error:
            log.exception("unexpected error in %s", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {describe(error)}")

    return wrapper


def _counted(method: Callable[..., Awaitable[Any]]):
    """Count the call against --max-concurrent-requests (with REST's requests), refused past it.
    Inside _aborts_on_error, which turns the refusal into RESOURCE_EXHAUSTED."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        admission = self.admission
        if admission.in_flight >= admission.limit:
            raise admission.refusal()
        admission.in_flight += 1
        try:
            return await method(self, request, context)
        finally:
            admission.in_flight -= 1

    return wrapper


class InferenceService(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Inference and repository calls count against --max-concurrent-requests (a stream, each of
    its requests); health, readiness, metadata and statistics never do."""

    def __init__(self, server: "FleetServer"):
        self.server = server
        self.registry = server.registry
        self.router = server.router
        self.admission = server.admission
        self.hops = server.hops
        self.calls = server.calls
        if tracing.TRACER is not None:  # else the entry point stays unwrapped
            self._infer = self._traced_infer

    async def _traced_infer(self, message: service_pb2.ModelInferRequest, context):
        carrier = {key: value for key, value in context.invocation_metadata() or () if key in ("traceparent", "tracestate")}
        with tracing.server_span("InferRequest", carrier, **{"rpc.method": "ModelInfer"}):
            return await InferenceService._infer(self, message, context)

    @_aborts_on_error
    async def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    @_aborts_on_error
    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=self.server.ready and not self.server.fenced)

    @_aborts_on_error
    async def ModelReady(self, request, context):
        if self.hops is not None and self.hops.models.elsewhere(request.name) and self.hops.models.known(request.name):
            return service_pb2.ModelReadyResponse(ready=True)  # served by a peer, or loaded on demand
        try:
            model = self.registry.get(request.name, request.version or None)
        except FleetError:
            return service_pb2.ModelReadyResponse(ready=False)
        ready = model.state == "READY" and (model.runtime is None or await model.runtime.backend_ready())
        return service_pb2.ModelReadyResponse(ready=ready)

    @_aborts_on_error
    async def ServerMetadata(self, request, context):
        return json_format.ParseDict(documents.server_metadata(), service_pb2.ServerMetadataResponse())

    @_aborts_on_error
    async def ModelMetadata(self, request, context):
        if (answer := await self._from_peer("ModelMetadata", request, context)) is not None:
            return answer
        model = self.registry.get_ready(request.name, request.version or None)
        document = documents.model_metadata(self.registry, model)
        return json_format.ParseDict(document, service_pb2.ModelMetadataResponse(), ignore_unknown_fields=True)

    @_aborts_on_error
    async def ModelInfer(self, request, context):
        admission = self.admission  # _counted's work, inline: a wrapper's coroutine costs 0.5 µs here
        if admission.in_flight >= admission.limit:
            raise admission.refusal()
        admission.in_flight += 1
        try:
            response, route = await self._infer(request, context)
        finally:
            admission.in_flight -= 1
        if route is not None:  # a header, as Seldon sends it
            await context.send_initial_metadata((("x-seldon-route", route),))
        return response

    async def _from_peer(self, method: str, request, context):
        """A read about a model a fleet peer serves (none here), answered by that peer."""
        hops = self.hops
        if hops is None:
            return None
        metadata = context.invocation_metadata() or ()
        forwarded = next((value for key, value in metadata if key == FORWARDED), None)
        if not hops.elsewhere(request.name, self.router.takeovers, None, forwarded):
            return None
        try:
            return await hops.rpc(method, request.name, request, metadata, context.time_remaining())
        except grpc.aio.AioRpcError as error:
            raise Relayed.of(error) from None

    async def _infer(self, message: service_pb2.ModelInferRequest, context) -> tuple[service_pb2.ModelInferResponse, str | None]:
        """The answer, and the experiment's route when one chose (a stream cannot send it per message)."""
        seldon_model = route = forwarded = None
        metadata = context.invocation_metadata() or ()
        for key, value in metadata:
            if key == "seldon-model":
                seldon_model = value
            elif key == "x-seldon-route":
                route = value
            elif key == FORWARDED:
                forwarded = value
        remaining = context.time_remaining()
        hops = self.hops
        if hops is not None and hops.elsewhere(message.model_name, self.router.takeovers, seldon_model, forwarded):
            try:
                answer = await hops.rpc("ModelInfer", message.model_name, message, metadata, remaining)
            except grpc.aio.AioRpcError as error:
                raise Relayed.of(error) from None
            if answer is not None:
                return answer, None
        started = time.perf_counter()
        response = chosen = None
        try:
            request = decode_infer_request(message)
            if remaining is not None or "timeout" in request.parameters:
                apply_deadline(request, remaining)
            response, chosen = await self.router.infer(message.model_name, message.model_version or None, request,
                                                       seldon_model, route)
            answer = encode_infer_response(response)
        except Exception as error:
            if isinstance(error, FleetError):
                code, chosen = error.grpc_code, chosen or error.route
            else:
                code = grpc.StatusCode.INTERNAL
            self._count(message, seldon_model, chosen, response, code, started)
            raise
        self._count(message, seldon_model, chosen, response, grpc.StatusCode.OK, started)
        return answer, chosen

    def _count(self, message, seldon_model: str | None, route: str | None, response: InferenceResponse | None,
               code: grpc.StatusCode, started: float) -> None:
        counted = seldon_target("models", message.model_name, message.model_version or None, seldon_model, route, response)
        if counted is not None:
            self.calls.record(*counted, "grpc", grpc_code_name(code), time.perf_counter() - started)

    async def ModelStreamInfer(self, request_iterator, context) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        # Errors travel in the stream (as Triton does), so one bad request does not end it. The
        # stream ends when the server stops, instead of holding shutdown for its whole grace.
        stop = asyncio.ensure_future(self.server.stop_requested.wait())
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                await asyncio.wait((read, stop), return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    return
                message = read.result()
                if message is grpc.aio.EOF:
                    return
                if type(message) is _Undecodable:
                    yield service_pb2.ModelStreamInferResponse(error_message=message.message)
                    continue
                yield await self._stream_response(message, context)
        finally:
            stop.cancel()

    async def _stream_response(self, message: service_pb2.ModelInferRequest, context) -> service_pb2.ModelStreamInferResponse:
        admission = self.admission
        try:
            if admission.in_flight >= admission.limit:
                raise admission.refusal()
            admission.in_flight += 1
            try:
                return service_pb2.ModelStreamInferResponse(infer_response=(await self._infer(message, context))[0])
            finally:
                admission.in_flight -= 1
        except Exception as error:
            if isinstance(error, FleetError):
                text = error.message
            else:
                log.exception("unexpected error in a stream")
                text = f"internal error: {describe(error)}"
            return service_pb2.ModelStreamInferResponse(
                error_message=text,
                infer_response=service_pb2.ModelInferResponse(model_name=message.model_name, id=message.id),
            )

    @_aborts_on_error
    async def ModelConfig(self, request, context):
        if (answer := await self._from_peer("ModelConfig", request, context)) is not None:
            return answer
        config = await documents.model_config(self.registry.get(request.name, request.version or None))
        return service_pb2.ModelConfigResponse(config=json_format.ParseDict(config, model_config_pb2.ModelConfig()))

    @_aborts_on_error
    async def ModelStatistics(self, request, context):
        document = await documents.model_statistics(self.registry, request.name or None, request.version or None)
        return json_format.ParseDict(document, service_pb2.ModelStatisticsResponse())

    @_aborts_on_error
    @_counted
    async def RepositoryIndex(self, request, context):
        entries = await self.server.index(ready_only=request.ready)
        # Memory figures are REST-only: Triton's ModelIndex has no fields for them.
        return json_format.ParseDict({"models": entries}, service_pb2.RepositoryIndexResponse(), ignore_unknown_fields=True)

    @_aborts_on_error
    @_counted
    async def RepositoryModelLoad(self, request, context):
        documents.refuse_load_overrides(_parameters(request.parameters))
        await self.server.load(request.model_name)
        return service_pb2.RepositoryModelLoadResponse()

    @_aborts_on_error
    @_counted
    async def RepositoryModelUnload(self, request, context):
        await self.server.unload(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()


def build_grpc_server(server: "FleetServer") -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    limit = server.settings.max_message_size
    if missing := unclassified_rpcs(SERVICES):
        raise RuntimeError(f"gRPC methods missing from fleetserve.server.security.RPCS: {missing}")
    interceptors = grpc_interceptors(server.tokens) or []
    if per_request(server.settings):  # else nothing runs per RPC
        interceptors.insert(0, GrpcAccess(server.settings.access_log))  # outermost: refusals are logged too
    grpc_server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # Without this a second server on the same port silently shares it.
            ("grpc.so_reuseport", 0),
        ]
    )
    _add_inference_service(InferenceService(server), grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    address = f"{server.settings.host}:{server.settings.grpc_port}"
    if server.tls is None:
        port = grpc_server.add_insecure_port(address)
    else:
        port = grpc_server.add_secure_port(address, server.tls.grpc_credentials())
    if port == 0:
        raise RuntimeError(f"failed to bind to {address}")
    return grpc_server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)
