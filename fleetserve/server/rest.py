"""The REST front door: the V2 HTTP API. Inference takes a small ASGI fast path straight to the
data plane; every other route is a FastAPI handler. The API's document (server/openapi.py) and
its Swagger UI page are served under /v2/docs.

Handlers take the raw request and return raw responses: bodies are parsed once with orjson
into numpy tensors (server/binary.py), never through pydantic models. Every failure answers
`{"error": "..."}` with the status its exception carries.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.routing import Match
from swagger_ui_bundle import swagger_ui_path

from fleetserve import tracing
from fleetserve.errors import (
    FleetError, InvalidInput, ModelUnavailable, NotFound, NotReady, Overloaded, PayloadTooLarge,
    ServerUnavailable, describe,
)
from fleetserve.fleet.forward import FORWARDED
from fleetserve.graph.manifests import manifest_name, parse_manifest, parse_manifests
from fleetserve.graph.router import seldon_target
from fleetserve.server import documents, openapi
from fleetserve.server.routes import infer_target
from fleetserve.server.binary import HEADER_LENGTH, decode_request, encode_response, parse_json_object, refuse_deep_json
from fleetserve.server.limits import RETRY_AFTER, apply_deadline

if TYPE_CHECKING:
    from fleetserve.server.app import FleetServer

log = logging.getLogger(__name__)

JSON = "application/json"
OFFLOAD_BYTES = 1 << 20


def json_response(document: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(document), status_code=status, media_type=JSON, headers=headers)


def error_response(message: str, status: int, request: Request | None = None,
                   headers: dict[str, str] | None = None) -> Response:
    if request is not None and (request_id := request.headers.get("x-request-id")):
        headers = {**(headers or {}), "x-request-id": request_id}
    return json_response({"error": message}, status, headers)


async def read_body(receive, headers, limit: int) -> bytes:
    """The request body from an ASGI `receive`, refused past `limit` bytes, inflated if it came
    compressed. `headers` is any mapping of lower-case names."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise InvalidInput("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    encoding = headers.get("content-encoding")
    if encoding:
        body = _inflate(body, encoding.strip().lower(), limit)
    return body


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding == "identity":
        return body
    if encoding not in _WBITS:
        if "," in encoding:  # each layer would cost up to `limit` again
            raise InvalidInput(f"Content-Encoding '{encoding}' stacks encodings; send one: gzip or deflate")
        raise InvalidInput(f"unsupported Content-Encoding '{encoding}'; use gzip or deflate")
    # Inflate at most limit + 1 bytes: a small compressed body must not expand without bound.
    inflated = bytearray()
    remaining = body
    try:
        while True:
            stream = zlib.decompressobj(_WBITS[encoding])
            inflated += stream.decompress(remaining, limit + 1 - len(inflated))
            if len(inflated) > limit:
                raise PayloadTooLarge(f"inflated request body exceeds the limit of {limit} bytes")
            if not stream.eof:
                raise zlib.error("the compressed stream is truncated")
            remaining = stream.unused_data
            if encoding != "gzip" or not remaining:  # gzip bodies may hold several members
                return bytes(inflated)
    except zlib.error as error:
        raise InvalidInput(f"request body is not valid {encoding}: {error}") from None


# zlib window bits: 31 reads the gzip wrapper, 15 the zlib wrapper HTTP's "deflate" means.
_WBITS = {"gzip": 31, "deflate": 15}


class _AnswerUnexpectedErrors:
    """Answers a bug's exception with a 500 `{"error"}` and keeps the connection.

    Starlette's own catch-all handler re-raises after answering, and uvicorn then closes the
    connection, failing the next request a keep-alive client sends on it.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracking_start(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except Exception as error:
            if started:
                raise
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            request = Request(scope)
            await error_response(f"internal error: {describe(error)}", 500, request)(scope, receive, send)


def build_rest_app(server: "FleetServer") -> "InferenceFastPath":
    registry = server.registry
    router = server.router
    limit = server.settings.max_message_size
    app = FastAPI(title="fleetserve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(FleetError)
    async def on_fleet_error(request: Request, error: FleetError) -> Response:
        response = error_response(error.message, error.http_status, request)
        if isinstance(error, Overloaded):
            response.headers["retry-after"] = RETRY_AFTER[1].decode()
        return response

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, error: HTTPException) -> Response:
        headers = error.headers
        if error.status_code == 405:  # Starlette's Allow names only the first route's methods
            headers = {"Allow": _allowed_methods(app, request.scope)}
        return error_response(str(error.detail), error.status_code, request, headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> Response:
        return error_response(f"invalid request: {error.errors()}", 400, request)

    app.add_middleware(_AnswerUnexpectedErrors)

    # Health and metadata.

    @app.get("/v2/health/live")
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if not server.ready:
            raise ServerUnavailable("the server is not ready: " + ("shutting down" if server.stopping else "loading models"))
        if server.fenced:
            raise ServerUnavailable("the server is not ready: " + server.fenced)
        return json_response({"ready": True})

    @app.get("/v2")
    async def metadata() -> Response:
        return json_response(documents.server_metadata())

    # Before /v2/models/{name}, which would take "stats" for a model name.
    @app.get("/v2/models/stats")
    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(name: str | None = None, version: str | None = None) -> Response:
        return json_response(await documents.model_statistics(registry, name, version))

    async def from_peer(request: Request, name: str, body: bytes = b"") -> Response | None:
        """A request about a model a fleet peer serves (none here), answered by that peer."""
        hops = server.hops
        if hops is None or not hops.elsewhere(name, router.takeovers, None, request.headers.get(FORWARDED)):
            return None
        answer = await hops.send(request.method, name, request.url.path, body, request.headers)
        if answer is None:
            return None
        return Response(answer.body, answer.status, headers={key.decode(): value.decode("latin-1")
                                                             for key, value in answer.headers})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
        if (answer := await from_peer(request, name)) is not None:
            return answer
        return json_response(documents.model_metadata(registry, registry.get_ready(name, version)))

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
        if server.hops is not None and server.hops.models.elsewhere(name) and server.hops.models.known(name):
            return json_response({"name": name, "ready": True})  # served by a peer, or loaded on demand
        model = registry.get_ready(name, version)
        if model.runtime is not None and not await model.runtime.backend_ready():
            raise ModelUnavailable(f"model '{name}' is not ready in its backend")
        return json_response({"name": model.name, "ready": True})

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(request: Request, name: str, version: str | None = None) -> Response:
        if (answer := await from_peer(request, name)) is not None:
            return answer
        return json_response(await documents.model_config(registry.get(name, version)))

    # MLflow's scoring protocol, per MLflow model (what `mlflow models serve` answers at / ).

    @app.post("/v2/models/{name}/invocations")
    @app.post("/v2/models/{name}/versions/{version}/invocations")
    async def mlflow_invocations(request: Request, name: str, version: str | None = None) -> Response:
        body = await read_body(request.receive, request.headers, limit)
        if (answer := await from_peer(request, name, body)) is not None:
            return answer
        content_type = request.headers.get("content-type", "application/json")
        if content_type.startswith("application/json"):
            refuse_deep_json(body)  # MLflow's json.loads would recurse
        status, content, media_type = await server.dataplane.call(name, version, "invocations", body, content_type)
        return Response(content, status_code=status, media_type=media_type)

    @app.get("/v2/models/{name}/ping")
    @app.get("/v2/models/{name}/versions/{version}/ping")
    async def mlflow_ping(request: Request, name: str, version: str | None = None) -> Response:
        if (answer := await from_peer(request, name)) is not None:
            return answer
        model = registry.get_ready(name, version)
        # An evicted model's runtime is not there to ask: it answers as ready, like any ready model.
        if model.runtime is not None and not hasattr(model.runtime, "invocations"):
            raise NotFound(f"model '{name}' is not an MLflow model: it has no /ping")
        return Response("\n", media_type="text/plain")  # MLflow's own labels this newline JSON; it is not

    # Repository.

    @app.post("/v2/repository/index")
    async def repository_index(request: Request) -> Response:
        body = await read_body(request.receive, request.headers, limit)
        options = parse_json_object(body) if body.strip() else {}  # an empty body means no options
        return json_response(await server.index(ready_only=bool(options.get("ready", False))))

    @app.post("/v2/repository/models/{name}/load")
    async def repository_load(request: Request, name: str) -> Response:
        body = await read_body(request.receive, request.headers, limit)
        options = parse_json_object(body) if body.strip() else {}
        parameters = options.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise InvalidInput("'parameters' must be an object")
        documents.refuse_load_overrides(parameters)
        await server.load(name)
        return json_response({})

    @app.post("/v2/repository/models/{name}/unload")
    async def repository_unload(name: str) -> Response:
        await server.unload(name)
        return json_response({})

    # Seldon Core 2 manifests (YAML or JSON, several documents allowed). Every document is
    # checked before the first is applied (a model's load can still fail after others applied).

    @app.post("/v2/manifests")
    async def apply_manifests(request: Request) -> Response:
        documents_ = parse_manifests(await read_body(request.receive, request.headers, limit))
        items = [(document["kind"], parse_manifest(document)) for document in documents_]
        router.check_experiments([parsed for kind, parsed in items if kind == "Experiment"])
        return json_response({"applied": await _each(items, server.apply, "applied")})

    @app.delete("/v2/manifests")
    async def delete_manifests(request: Request) -> Response:
        documents_ = parse_manifests(await read_body(request.receive, request.headers, limit))
        items = [(document["kind"], manifest_name(document)) for document in documents_]
        return json_response({"deleted": await _each(items, server.delete, "deleted")})

    # Pipelines and experiments (inference on a pipeline takes the fast path below).

    async def manifests_of(request: Request, kind: str) -> list:
        documents_ = parse_manifests(await read_body(request.receive, request.headers, limit))
        wrong = [document["kind"] for document in documents_ if document["kind"] != kind]
        if wrong:
            raise InvalidInput(f"this endpoint takes kind: {kind} manifests, got {wrong}")
        return [parse_manifest(document) for document in documents_]

    def graph_routes(kind: str, names, get, status, problem) -> None:
        """The same API for pipelines and experiments: create (manifests), list, status, ready, delete."""
        path = f"/v2/{kind.lower()}s"

        async def create(request: Request) -> Response:
            items = [(kind, parsed) for parsed in await manifests_of(request, kind)]
            router.check_experiments([parsed for kind_, parsed in items if kind_ == "Experiment"])
            return json_response({"applied": await _each(items, server.apply, "applied")})

        async def listing() -> Response:
            return json_response([status(router, name) for name in names()])

        async def one(name: str) -> Response:
            get(name)
            return json_response(status(router, name, with_manifest=True))

        async def ready(name: str) -> Response:
            get(name)
            if reason := problem(name):
                raise NotReady(f"{kind.lower()} '{name}' is not ready: {reason}")
            return json_response({"name": name, "ready": True})

        async def remove(name: str) -> Response:
            await server.delete(kind, name)
            return json_response({})

        app.post(path)(create)
        app.get(path)(listing)
        app.get(path + "/{name}")(one)
        app.get(path + "/{name}/ready")(ready)
        app.delete(path + "/{name}")(remove)

    graph_routes("Pipeline", lambda: list(router.pipelines), router.get_pipeline, documents.pipeline_status,
                 router.pipeline_problem)
    graph_routes("Experiment", lambda: list(router.experiments), router.get_experiment, documents.experiment_status,
                 router.experiment_problem)

    @app.get("/v2/pipelines/{name}/inspect")
    @app.get("/v2/pipelines/{name}/inspect/{target}")
    async def inspect_pipeline(name: str, target: str | None = None, limit: int | None = None) -> Response:
        return json_response(documents.pipeline_messages(router.get_pipeline(name), target, limit))

    @app.get("/v2/fleet")
    async def fleet() -> Response:
        if server.membership is None:
            raise NotFound("this server is not part of a fleet: start it with --etcd")
        return json_response(server.membership.document())

    @app.get("/v2/fleet/models/{name}")
    async def fleet_model(name: str) -> Response:
        if server.fleet_models is None:
            raise NotFound("this server is not part of a fleet: start it with --etcd")
        return json_response(server.fleet_models.document(name))

    app.get("/metrics")(metrics)

    # The API's documentation, with Swagger UI's files served from here: the page works offline.
    app.get(DOCS)(docs_page)
    app.get(f"{DOCS}/dataplane.json")(openapi_document)
    for asset, media_type in openapi.DOCS_ASSETS.items():
        app.get(f"{DOCS}/{asset}")(_asset(asset, media_type))

    def known_model(name: str, version: str | None) -> None:
        """NotFound unless the model (and version) is served here or, in a fleet, anywhere."""
        if not (server.fleet_models is not None and server.fleet_models.known(name) and version is None):
            registry.get(name, version)

    @app.get("/v2/models/{name}/docs")
    @app.get("/v2/models/{name}/versions/{version}/docs")
    async def model_docs_page(name: str, version: str | None = None) -> Response:
        known_model(name, version)
        base = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        return Response(_docs_page(f"{base}/docs/dataplane.json", f"fleetserve: model {name}"), media_type="text/html")

    @app.get("/v2/models/{name}/docs/dataplane.json")
    @app.get("/v2/models/{name}/versions/{version}/docs/dataplane.json")
    async def model_docs(name: str, version: str | None = None) -> Response:
        known_model(name, version)
        return json_response(openapi.model_document(name, version))

    return InferenceFastPath(app, server)


def _allowed_methods(app: FastAPI, scope) -> str:
    """Every method some route answers at this path: one path's methods may be several routes."""
    return ", ".join(sorted({method for route in app.router.routes if route.matches(scope)[0] is not Match.NONE
                             for method in route.methods}))


DOCS = "/v2/docs"


def _docs_page(document_url: str, title: str) -> bytes:
    return get_swagger_ui_html(
        openapi_url=document_url,
        title=title,
        swagger_js_url=f"{DOCS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS}/swagger-ui.css",
        swagger_favicon_url=f"{DOCS}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # else the page asks swagger.io to validate the document
    ).body


_DOCS_PAGE = _docs_page(f"{DOCS}/dataplane.json", "fleetserve API")


async def docs_page() -> Response:
    return Response(_DOCS_PAGE, media_type="text/html")


async def openapi_document() -> Response:
    return Response(openapi.DOCUMENT_JSON, media_type=JSON)


def _asset(name: str, media_type: str):
    path = swagger_ui_path / name

    async def asset() -> Response:
        return FileResponse(path, media_type=media_type)
    return asset


# Requests that only read (health, readiness, metadata, statistics, /metrics): never counted
# against --max-concurrent-requests, so never refused.
_READS = frozenset({"GET", "HEAD", "OPTIONS"})

# The headers an inference reads (ASGI gives names in lower case); the rest are not decoded.
_INFER_HEADERS = frozenset({b"content-length", b"content-encoding", b"x-request-id", HEADER_LENGTH.encode(),
                            b"seldon-model", b"x-seldon-route", b"content-type", b"authorization", FORWARDED.encode(),
                            b"traceparent", b"tracestate"})


class InferenceFastPath:
    """POST .../infer goes straight to the data plane; every other request to the FastAPI app.

    Inference is the hot path: FastAPI's middleware stack, routing and dependency resolution
    cost about 40% of the CPU of a small request, and none of them does anything for it.

    Both kinds of request, reads apart, are counted here against --max-concurrent-requests.
    """

    def __init__(self, app: FastAPI, server: "FleetServer"):
        self.app = app
        self.server = server
        self.router = server.router
        self.limit = server.settings.max_message_size
        self.admission = server.admission
        self.hops = server.hops
        self.calls = server.calls
        if tracing.TRACER is not None:  # else the entry point stays unwrapped
            self.infer = self._traced_infer

    async def _traced_infer(self, scope, receive, send, headers: dict[str, str], reply: list,
                            kind: str, name: str, version: str | None) -> None:
        with tracing.server_span("InferRequest", headers, **{"http.request.method": "POST", "url.path": scope["path"]}):
            await InferenceFastPath.infer(self, scope, receive, send, headers, reply, kind, name, version)

    async def __call__(self, scope, receive, send):
        target = infer_target(scope["path"]) if scope["type"] == "http" else None
        if target is None:
            if scope["type"] != "http" or scope["method"] in _READS:
                return await self.app(scope, receive, send)
            return await self._counted_control(scope, receive, send)
        headers = {}
        for key, value in scope["headers"]:
            if key in _INFER_HEADERS:
                headers[key.decode()] = value.decode("latin-1")
        reply = [(b"x-request-id", request_id.encode("latin-1"))] if (request_id := headers.get("x-request-id")) else []
        if scope["method"] != "POST":
            reply += [(b"content-type", b"application/json"), (b"allow", b"POST")]
            return await self._send(send, 405, orjson.dumps({"error": "Method Not Allowed"}), reply)
        if self.admission.in_flight >= self.admission.limit:  # refused before its body is read
            return await self._refuse(send, self.admission.refusal(), reply)
        await self.infer(scope, receive, send, headers, reply, *target)

    async def _counted_control(self, scope, receive, send) -> None:
        admission = self.admission
        if admission.in_flight >= admission.limit:
            return await self._refuse(send, admission.refusal(), [])
        admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            admission.in_flight -= 1

    async def _refuse(self, send, error: Overloaded, reply: list) -> None:
        reply += [(b"content-type", b"application/json"), RETRY_AFTER]
        await self._send(send, error.http_status, orjson.dumps({"error": error.message}), reply)

    async def infer(self, scope, receive, send, headers: dict[str, str], reply: list,
                    kind: str, name: str, version: str | None) -> None:
        # Counted once its body is in: a client trickling a body holds its connection (until
        # --request-body-timeout), never a place among the requests in flight.
        admission = self.admission
        counted = False
        started = 0.0  # once this server answers it itself (a peer counts what it answers)
        response = route = None
        try:
            body = await read_body(receive, headers, self.limit)
            if admission.in_flight >= admission.limit:
                raise admission.refusal()
            admission.in_flight += 1
            counted = True
            if self.hops is not None and kind == "models" and self.hops.elsewhere(
                    name, self.router.takeovers, headers.get("seldon-model"), headers.get(FORWARDED)) and (
                    answer := await self.hops.send("POST", name, scope["path"], body, headers)) is not None:
                status, content = answer.status, answer.body
                reply += answer.headers
            else:
                started = time.perf_counter()
                # On the loop whatever its size: orjson holds the GIL while it parses, so a worker
                # thread freed nothing for other requests and cost 10% of big-JSON throughput.
                request = decode_request(body, headers.get(HEADER_LENGTH))
                if "timeout" in request.parameters:
                    apply_deadline(request)
                if kind == "models":
                    response, route = await self.router.infer(
                        name, version, request, headers.get("seldon-model"), headers.get("x-seldon-route"))
                else:
                    response, route = await self.router.infer_pipeline(name, request, headers.get("x-seldon-route"))
                if route is not None:
                    reply.append((b"x-seldon-route", route.encode("latin-1")))
                if sum(tensor.data.nbytes for tensor in response.outputs) < OFFLOAD_BYTES:
                    content, header_length = encode_response(response, request)
                else:
                    content, header_length = await self._off_loop(encode_response, response, request)
                status = 200
                if header_length is None:
                    reply.append((b"content-type", b"application/json"))
                else:
                    reply.append((b"content-type", b"application/octet-stream"))
                    reply.append((HEADER_LENGTH.encode(), str(header_length).encode()))
        except FleetError as error:
            status, content = error.http_status, orjson.dumps({"error": error.message})
            route = route or error.route  # chosen, then its answer failed to encode; or a candidate failed
            reply.append((b"content-type", b"application/json"))
            if isinstance(error, Overloaded):
                reply.append(RETRY_AFTER)
        except Exception as error:
            log.exception("unexpected error on POST %s", scope["path"])
            status, content = 500, orjson.dumps({"error": f"internal error: {describe(error)}"})
            reply.append((b"content-type", b"application/json"))
        finally:
            if counted:
                admission.in_flight -= 1
        if started and (target := seldon_target(kind, name, version, headers.get("seldon-model") if kind == "models" else None,
                                                route, response)) is not None:
            self.calls.record(*target, "rest", status, time.perf_counter() - started)
        await self._send(send, status, content, reply)

    @staticmethod
    async def _send(send, status: int, content: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        headers.append((b"content-length", str(len(content)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    async def _off_loop(self, function, *args):
        """Big answers are written on a worker thread, so health checks and small requests keep flowing."""
        return await asyncio.get_running_loop().run_in_executor(self.server.executor, function, *args)


async def metrics() -> Response:
    # Thousands of series (per-model histograms) take long enough to write to stall requests.
    return Response(await asyncio.to_thread(generate_latest), media_type=CONTENT_TYPE_LATEST)


async def _each(items: list[tuple[str, Any]], action, done_word: str) -> list[dict]:
    """Apply `action(kind, item)` to each manifest in order; a failure says which ones were done
    before it and which were skipped after it."""
    done: list[dict] = []
    for number, (kind, item) in enumerate(items):
        try:
            await action(kind, item)
        except FleetError as error:
            skipped = [getattr(rest, "name", rest) for _, rest in items[number + 1:]]
            if done:
                error.message = f"{[entry['name'] for entry in done]} {done_word}; then {error.message}"
            if skipped:
                error.message += f"; not {done_word}: {skipped}"
            raise
        done.append({"kind": kind, "name": getattr(item, "name", item)})
    return done


def build_metrics_app() -> FastAPI:
    """The metrics port: /metrics alone."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)  # a wrong path gets {"error"} here too, not FastAPI's {"detail"}
    async def on_http_error(request: Request, error: HTTPException) -> Response:
        return error_response(str(error.detail), error.status_code, request)

    app.get("/metrics")(metrics)
    return app
