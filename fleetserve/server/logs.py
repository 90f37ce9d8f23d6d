"""The server's logs: text or JSON lines (--log-format), and the access log (--access-log).

A JSON line is one orjson document: time, level, logger, message, and where they are known the
model, version and request id of the request being served (and trace and span ids when tracing).
The request is known from a context variable that the access layer sets for each REST request
and each RPC; that layer is installed only when JSON lines or the access log are asked for, so
with both off nothing runs per request.

The access log has one line per request (logger `fleetserve.access`): method and path, or the
RPC; status; model and version; milliseconds; bytes in and out; request id; client. Health
probes that succeed are not logged.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any

import grpc
import orjson

from fleetserve import tracing
from fleetserve.runtime.artifacts import redact_text

# (model, version, request id) of the request this task serves.
REQUEST: ContextVar[tuple[str | None, str | None, str | None] | None] = ContextVar("fleetserve_request", default=None)

access_log = logging.getLogger("fleetserve.access")

# Attributes a record may carry (`extra=`, or the request's context) that a JSON line shows.
_FIELDS = ("model", "version", "request_id", "trace_id", "span_id", "method", "path", "rpc", "status", "ms",
           "bytes_in", "bytes_out", "client")
_HEALTH = ("/v2/health/", "/grpc.health.v1.Health/", "/inference.GRPCInferenceService/ServerLive",
           "/inference.GRPCInferenceService/ServerReady")


class RedactCredentials(logging.Filter):
    """Credentials written in a URI (s3://KEY:SECRET@...) never reach the log, whoever logs it
    (fsspec, for one, logs the URLs it fetches at debug level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


class JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if tracing.TRACER is not None:
            document.update(tracing.current_ids())
        request = REQUEST.get()
        if request is not None:
            for key, value in zip(("model", "version", "request_id"), request):
                if value is not None:
                    document[key] = value
        for key in _FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(document, default=str).decode()


def per_request(settings) -> bool:
    """Whether the access layers run for each request: for JSON lines (the request's fields) or the access log."""
    return settings.access_log or settings.log_format == "json"


def configure(level: str, log_format: str) -> None:
    """One handler on the root logger, text or JSON; uvicorn's loggers propagate to it."""
    if log_format not in ("text", "json"):
        raise SystemExit(f"--log-format (FLEETSERVE_LOG_FORMAT) is text or json, not {log_format!r}")
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonLines())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactCredentials())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn runs the REST and the metrics port, so its start and stop lines came twice; the
    # server's own lines say the same once ("fleetserve listening", "fleetserve stopped").
    if root.level > logging.DEBUG:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


def _model_of(path: str) -> tuple[str | None, str | None]:
    """The model and version a REST path names (/v2/models/NAME[/versions/V]/...)."""
    parts = path.split("/")
    if len(parts) < 4 or parts[1] != "v2" or parts[2] not in ("models", "pipelines"):
        return None, None
    version = parts[5] if len(parts) > 5 and parts[4] == "versions" else None
    return parts[3], version


def _line(started: float, **fields: Any) -> None:
    fields["ms"] = round((time.perf_counter() - started) * 1000, 3)
    where = fields.get("path") or fields.get("rpc")
    text = " ".join(f"{key}={value}" for key, value in fields.items()
                    if value is not None and key not in ("method", "path", "rpc", "status"))
    access_log.info("%s %s %s %s", fields.get("method", "RPC"), where, fields["status"], text, extra=fields)


class RestAccess:
    """ASGI middleware: the request's context for log lines, and its access line."""

    def __init__(self, app, lines: bool):
        self.app = app
        self.lines = lines

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        model, version = _model_of(path)
        request_id = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"x-request-id"), None)
        token = REQUEST.set((model, version, request_id))
        sizes = [0, 0]
        status = [500]  # what the client got if the app raised before answering

        async def counted_receive():
            message = await receive()
            sizes[0] += len(message.get("body", b""))
            return message

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body":
                sizes[1] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            REQUEST.reset(token)
            if self.lines and not (path.startswith(_HEALTH) and status[0] < 400):
                client = scope.get("client")
                _line(started, method=scope["method"], path=path, status=status[0], model=model, version=version,
                      bytes_in=sizes[0], bytes_out=sizes[1], request_id=request_id,
                      client=f"{client[0]}:{client[1]}" if client else None)


class GrpcAccess(grpc.aio.ServerInterceptor):
    """gRPC's counterpart of RestAccess: each RPC (a stream as one) gets its context and a line."""

    def __init__(self, lines: bool):
        self.lines = lines

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        rpc = details.method
        request_id = next((value for key, value in details.invocation_metadata or () if key == "x-request-id"), None)
        lines = self.lines and not rpc.startswith(_HEALTH)

        def finish(context, started: float, model, version, sizes: list[int], failed: bool) -> None:
            if not lines:
                return
            code = context.code() or (grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK)
            _line(started, rpc=rpc, status=code.name, model=model, version=version, bytes_in=sizes[0],
                  bytes_out=sizes[1], request_id=request_id, client=context.peer())

        if not handler.request_streaming and not handler.response_streaming:
            inner = handler.unary_unary

            async def unary(request, context):
                started = time.perf_counter()
                model, version = _named(request)
                token = REQUEST.set((model, version, request_id))
                sizes, failed = [_size(request) if lines else 0, 0], True
                try:
                    response = await inner(request, context)
                    sizes[1], failed = _size(response) if lines else 0, False
                    return response
                finally:
                    REQUEST.reset(token)
                    finish(context, started, model, version, sizes, failed)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=handler.request_deserializer,
                                                       response_serializer=handler.response_serializer)
        if handler.request_streaming and handler.response_streaming:
            inner_stream = handler.stream_stream

            async def stream(requests, context):
                started = time.perf_counter()
                token = REQUEST.set((None, None, request_id))
                sizes, failed = [0, 0], True
                try:
                    async for response in inner_stream(requests, context):
                        if lines:
                            sizes[1] += _size(response)
                        yield response
                    failed = False
                finally:
                    REQUEST.reset(token)
                    finish(context, started, None, None, sizes, failed)

            return grpc.stream_stream_rpc_method_handler(stream, request_deserializer=handler.request_deserializer,
                                                         response_serializer=handler.response_serializer)
        return handler


def _size(message) -> int:
    """About a message's bytes on the wire: its raw tensors' (ByteSize would serialise them all
    again), else ByteSize; 0 for one that did not decode."""
    raw = getattr(message, "raw_input_contents", None) or getattr(message, "raw_output_contents", None)
    if raw:
        return sum(map(len, raw))
    return message.ByteSize() if hasattr(message, "ByteSize") else 0


def _named(message) -> tuple[str | None, str | None]:
    """The model and version an RPC's request names (ModelInfer's model_name, the reads' name)."""
    model = getattr(message, "model_name", None) or getattr(message, "name", None) or None
    version = getattr(message, "model_version", None) or getattr(message, "version", None) or None
    return model, version
