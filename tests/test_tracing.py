"""OpenTelemetry traces, received by an OTLP receiver this test runs on loopback (a gRPC
TraceService on opentelemetry-proto): one trace across a pipeline of two models, continued from
the caller's traceparent, with Triton's span names."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import ROOT, free_port, iris_json, running_server

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"

PIPELINE = """
kind: Pipeline
metadata: {name: chain}
spec:
  steps:
  - name: first
  - name: second
    inputs: [chain.inputs]
  output:
    steps: [first, second]
    tensorMap: {first.outputs.predict: a, second.outputs.predict: b}
"""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self):
        self.spans: list = []
        self.services: set[str] = set()
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                self.services |= {attribute.value.string_value for attribute in resource_spans.resource.attributes
                                  if attribute.key == "service.name"}
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: str) -> list:
        with self.lock:
            return [span for span in self.spans if span.trace_id.hex() == trace_id]


@pytest.fixture(scope="module")
def receiver():
    port = free_port()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    receiving = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiving, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    receiving.port = port
    yield receiving
    server.stop(0)


def attributes(span) -> dict:
    return {attribute.key: attribute.value.string_value or attribute.value.int_value for attribute in span.attributes}


def wait_for_spans(receiver: Receiver, trace_id: str, count: int) -> list:
    deadline = time.monotonic() + 20
    while len(spans := receiver.trace(trace_id)) < count:
        assert time.monotonic() < deadline, [span.name for span in spans]
        time.sleep(0.1)
    return spans


def test_one_trace_across_a_pipeline_of_two_models_continued_from_the_callers(receiver, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    repository = tmp_path / "repo"
    for name in ("first", "second"):
        shutil.copytree(ROOT / "model_repo" / "iris", repository / name)
        (repository / name / "model-settings.json").unlink()  # named after its folder
        (repository / name / "model-settings.json").write_text('{"implementation": "sklearn"}')
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
           "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "fleetserve-under-test"}
    with running_server(repository, tmp_path / "server.log", env) as server:
        assert httpx.post(f"{server.url}/v2/pipelines", content=PIPELINE, timeout=30).status_code == 200
        answer = httpx.post(f"{server.url}/v2/pipelines/chain/infer", json=iris_json(id="req-7"), timeout=30,
                            headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
        assert answer.status_code == 200, answer.text
        # InferRequest; a span per step, per model, and each model's queue and compute: 1 + 2 * 4.
        spans = wait_for_spans(receiver, TRACE_ID, 9)
        by_id = {span.span_id: span for span in spans}
        [root] = [span for span in spans if span.name == "InferRequest"]
        assert root.parent_span_id.hex() == CALLER_SPAN and root.kind == root.SPAN_KIND_SERVER
        assert attributes(root)["url.path"] == "/v2/pipelines/chain/infer"
        for model in ("first", "second"):
            [step] = [span for span in spans if span.name == f"chain.{model}"]
            [model_span] = [span for span in spans if span.name == model]
            assert step.parent_span_id == root.span_id and model_span.parent_span_id == step.span_id
            assert attributes(model_span)["model_name"] == model and attributes(model_span)["request_id"] == "req-7"
            phases = sorted(span.name for span in spans if span.parent_span_id == model_span.span_id)
            assert phases == ["compute", "queue"]
            for phase in (span for span in spans if span.parent_span_id == model_span.span_id):
                assert model_span.start_time_unix_nano <= phase.start_time_unix_nano <= phase.end_time_unix_nano \
                    <= model_span.end_time_unix_nano
        assert all(span.parent_span_id in by_id for span in spans if span is not root)
        assert "fleetserve-under-test" in receiver.services

        # gRPC: the traceparent in the call's metadata.
        grpc_trace = "0af7651916cd43dd8448eb211c80319c"
        with grpcclient.InferenceServerClient(server.grpc_address) as client:
            tensor = grpcclient.InferInput("input-0", [1, 4], "FP32")
            tensor.set_data_from_numpy(np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32))
            client.infer("first", [tensor], headers={"traceparent": f"00-{grpc_trace}-b7ad6b7169203331-01"})
        names = sorted(span.name for span in wait_for_spans(receiver, grpc_trace, 4))
        assert names == ["InferRequest", "compute", "first", "queue"]


class HttpReceiver(BaseHTTPRequestHandler):
    """OTLP over HTTP: POST /v1/traces with an ExportTraceServiceRequest, as protobuf or as JSON."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Type", "").startswith("application/json"):
            request = json_format.ParseDict(_hex_ids_as_base64(json.loads(body)), trace_service_pb2.ExportTraceServiceRequest())
        else:
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.paths.append(self.path)
            self.server.spans.extend(span for resource_spans in request.resource_spans
                                     for scope in resource_spans.scope_spans for span in scope.spans)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def _hex_ids_as_base64(value):
    """OTLP's JSON writes trace and span ids in hex, where protobuf's JSON mapping has base64."""
    if isinstance(value, dict):
        return {key: base64.b64encode(bytes.fromhex(item)).decode() if key in ("traceId", "spanId", "parentSpanId")
                and isinstance(item, str) else _hex_ids_as_base64(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_hex_ids_as_base64(item) for item in value]
    return value


def test_http_protobuf_and_mlservers_variable_export_too(receiver, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    repository = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repo" / "iris", repository / "iris")
    http_receiver = ThreadingHTTPServer(("127.0.0.1", 0), HttpReceiver)
    http_receiver.lock, http_receiver.paths, http_receiver.spans = threading.Lock(), [], []
    threading.Thread(target=http_receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        ways = {  # trace id: the server's environment
            "11111111111111111111111111111111": {
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http_receiver.server_address[1]}",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_BSP_SCHEDULE_DELAY": "100"},
            "22222222222222222222222222222222": {  # as Seldon's chart sets it: host:port, gRPC
                "MLSERVER_TRACING_SERVER": f"127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "100"},
        }
        for trace_id, env in ways.items():
            with running_server(repository, tmp_path / f"{trace_id[0]}.log", env) as server:
                answer = httpx.post(f"{server.url}/v2/models/iris/infer", json=iris_json(), timeout=30,
                                    headers={"traceparent": f"00-{trace_id}-{CALLER_SPAN}-01"})
                assert answer.status_code == 200, answer.text
                if "MLSERVER_TRACING_SERVER" in env:
                    spans = wait_for_spans(receiver, trace_id, 4)
                else:
                    deadline = time.monotonic() + 20
                    while len(spans := [span for span in list(http_receiver.spans) if span.trace_id.hex() == trace_id]) < 4:
                        assert time.monotonic() < deadline, http_receiver.paths
                        time.sleep(0.1)
                    assert set(http_receiver.paths) == {"/v1/traces"}
                assert sorted(span.name for span in spans) == ["InferRequest", "compute", "iris", "queue"]
    finally:
        http_receiver.shutdown()
        http_receiver.server_close()


def test_the_sampler_variables_choose_what_is_traced(receiver, tmp_path):
    """OTEL_TRACES_SAMPLER[_ARG], read by the SDK: here a caller's decision is followed and a call
    without a traceparent is sampled at rate 0."""
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    repository = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repo" / "iris", repository / "iris")
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}", "OTEL_BSP_SCHEDULE_DELAY": "100",
           "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    declined, sampled = "33333333333333333333333333333333", "44444444444444444444444444444444"
    with running_server(repository, tmp_path / "server.log", env) as server:
        before = len(receiver.spans)
        for traceparent in (None, f"00-{declined}-{CALLER_SPAN}-00", f"00-{sampled}-{CALLER_SPAN}-01"):
            headers = {"traceparent": traceparent} if traceparent else {}
            assert httpx.post(f"{server.url}/v2/models/iris/infer", json=iris_json(), headers=headers, timeout=30).status_code == 200
        # Spans leave in the order they end, so the first two calls' would have come with the last's.
        wait_for_spans(receiver, sampled, 4)
        with receiver.lock:
            assert {span.trace_id.hex() for span in receiver.spans[before:]} == {sampled}
