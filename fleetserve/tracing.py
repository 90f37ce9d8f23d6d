"""OpenTelemetry traces: off unless an exporter is configured, and then only with the SDK installed
(the `tracing` extra).

Configured with the SDK's own variables (OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT and _PROTOCOL,
grpc or http/protobuf; OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER[_ARG],
OTEL_BSP_*), or MLServer's MLSERVER_TRACING_SERVER (an OTLP gRPC endpoint, as Seldon's chart sets it).

Spans take Triton's names where they mean the same: the server call (`InferRequest`, continuing a
W3C `traceparent` from the request's headers or gRPC metadata), one span per model call named
after the model (`model_name`, `model_version`, `request_id`), its `queue` and `compute`, and a
`reload` where an evicted model came back first; a pipeline's steps each have their span. The
context goes on to Triton and to fleet peers as `traceparent`.

With tracing off, TRACER is None: every instrumented place checks that one global first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any, Iterator, Mapping

log = logging.getLogger(__name__)

TRACER: Any = None  # an opentelemetry Tracer once configure() found an exporter and the SDK
_provider: Any = None
_propagator: Any = None


def configure() -> bool:
    """Tracing on when an exporter endpoint is configured and the SDK is installed; whether it is."""
    global TRACER, _provider, _propagator
    mlserver = os.environ.get("MLSERVER_TRACING_SERVER")
    if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or mlserver):
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        log.warning("tracing is configured but the OpenTelemetry SDK is not installed (pip install 'fleetserve[tracing]'); "
                    "serving without traces")
        return False
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise SystemExit(f"OTEL_EXPORTER_OTLP_PROTOCOL is grpc or http/protobuf, not {protocol!r}")
    # The SDK reads the OTEL_* variables itself; MLServer's names a gRPC endpoint, used where they name none.
    standard = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if mlserver and not standard and protocol != "grpc":
        raise SystemExit("MLSERVER_TRACING_SERVER is an OTLP gRPC endpoint; for http/protobuf set OTEL_EXPORTER_OTLP_ENDPOINT")
    exporter = OTLPSpanExporter() if standard else OTLPSpanExporter(endpoint=mlserver, insecure=True)
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    attributes = {} if named else {"service.name": "fleetserve"}
    _provider = TracerProvider(resource=Resource.create(attributes))  # the sampler from OTEL_TRACES_SAMPLER
    _provider.add_span_processor(BatchSpanProcessor(exporter))
    _propagator = TraceContextTextMapPropagator()
    TRACER = _provider.get_tracer("fleetserve")
    log.info("tracing: spans go to an OTLP %s exporter", protocol)
    return True


def shutdown() -> None:
    """Export what is still buffered (at the server's stop)."""
    if _provider is not None:
        _provider.shutdown()


@contextlib.contextmanager
def server_span(name: str, carrier: Mapping[str, str], **attributes: Any) -> Iterator[Any]:
    """The server's span for one call, continuing the caller's trace (its `traceparent`)."""
    from opentelemetry.trace import SpanKind

    with TRACER.start_as_current_span(name, context=_propagator.extract(carrier), kind=SpanKind.SERVER,
                                      attributes=_present(attributes)) as span:
        yield span


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[Any]:
    """A span under the current one, current itself while the block runs."""
    with TRACER.start_as_current_span(name, attributes=_present(attributes)) as opened:
        yield opened


def phases(started_ns: int, computed_ns: int, ended_ns: int) -> None:
    """`queue` and `compute` under the current span, from the data plane's perf_counter_ns readings."""
    offset = time.time_ns() - time.perf_counter_ns()
    for name, start, end in (("queue", started_ns, computed_ns), ("compute", computed_ns, ended_ns)):
        TRACER.start_span(name, start_time=start + offset).end(end_time=end + offset)


def annotate(**attributes: Any) -> None:
    """Attributes on the current span (an experiment's chosen candidate, say)."""
    from opentelemetry import trace

    trace.get_current_span().set_attributes(_present(attributes))


def current_ids() -> dict[str, str]:
    """The current span's trace and span ids, in hex (for log lines); none outside a span."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"} if context.is_valid else {}


def headers() -> dict[str, str]:
    """The current context as W3C headers (`traceparent`), for a call that goes on elsewhere."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier


def _present(attributes: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in attributes.items() if value is not None}
