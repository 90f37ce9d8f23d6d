"""Who may call what at the front doors (bearer tokens), and how they connect (TLS).

Invariants:
- ONE table classifies every REST route (FastAPI's and the inference fast path's) and every gRPC
  RPC: `ROUTES` and `RPCS`. A route of the REST app missing from `ROUTES` refuses to start the
  server (`protect_rest`); tests walk the app, the fast path and the gRPC services against both.
- A request is classified by matching its path against the same templates Starlette matches; where
  several match, it needs what each of them needs. Every template Starlette could pick for it is
  among them, so the handler that runs never needs more than the check demanded. A request that
  matches no template, or an RPC missing from `RPCS`, needs every token that is set.
- CONTROL needs the admin token when one is set. DATA needs the data token or the admin token
  when a data token is set. OPEN needs nothing. DATA | CONTROL (pipeline inspect) needs a token
  that opens both. Without any token nothing is installed: no ASGI wrapper, no gRPC interceptor,
  no cost.
- Tokens come only from the settings, are compared in constant time (hmac.compare_digest), and
  never reach logs, error bodies or metrics: a refusal says which token a route needs, never what
  was sent or expected.
- TLS, when set, covers the REST, gRPC and metrics ports with one certificate; a client CA makes
  all three require a client certificate it signed. Certificates are loaded once at start, where
  a missing or unreadable file refuses to start with a message naming the flag.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, NamedTuple

import grpc
import orjson
from starlette.routing import WebSocketRoute

from fleetserve.errors import FleetError, PermissionDenied, Unauthenticated
from fleetserve.server.routes import infer_target

if TYPE_CHECKING:
    from fleetserve.settings import ServerSettings

log = logging.getLogger(__name__)


class Access(enum.IntFlag):
    """What a route needs: nothing, the data token, the admin token, or both (the flags combine)."""

    OPEN = 0
    DATA = 1  # inference: sends tensors to a model and reads what it answers
    CONTROL = 2  # changes or reveals the repository: loading a model runs the code it brings


OPEN, DATA, CONTROL = Access.OPEN, Access.DATA, Access.CONTROL
# What a request that matches no route needs: every token that is set.
UNKNOWN = DATA | CONTROL

ROUTES: dict[tuple[str, str], Access] = {
    # Probes, metadata, config and statistics: what load balancers, Kubernetes and clients read
    # before they call. They neither change the repository nor show what it holds beyond the
    # model names a client calls anyway (the repository index, with states and reasons, does).
    ("GET", "/v2/health/live"): OPEN,
    ("GET", "/v2/health/ready"): OPEN,
    ("GET", "/v2"): OPEN,
    ("GET", "/v2/models/stats"): OPEN,
    ("GET", "/v2/models/{name}/stats"): OPEN,
    ("GET", "/v2/models/{name}/versions/{version}/stats"): OPEN,
    ("GET", "/v2/models/{name}"): OPEN,
    ("GET", "/v2/models/{name}/versions/{version}"): OPEN,
    ("GET", "/v2/models/{name}/ready"): OPEN,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): OPEN,
    ("GET", "/v2/models/{name}/config"): OPEN,
    ("GET", "/v2/models/{name}/versions/{version}/config"): OPEN,
    ("GET", "/v2/models/{name}/ping"): OPEN,  # MLflow's health check
    ("GET", "/v2/models/{name}/versions/{version}/ping"): OPEN,
    ("GET", "/v2/pipelines"): OPEN,
    ("GET", "/v2/pipelines/{name}"): OPEN,
    ("GET", "/v2/pipelines/{name}/ready"): OPEN,
    ("GET", "/v2/experiments"): OPEN,
    ("GET", "/v2/experiments/{name}"): OPEN,
    ("GET", "/v2/experiments/{name}/ready"): OPEN,
    ("GET", "/metrics"): OPEN,  # Prometheus scrapes it without credentials; the metrics port too
    # The OpenAPI document and the page (and its assets) that render it.
    ("GET", "/v2/docs"): OPEN,
    ("GET", "/v2/docs/dataplane.json"): OPEN,
    ("GET", "/v2/docs/swagger-ui-bundle.js"): OPEN,
    ("GET", "/v2/docs/swagger-ui.css"): OPEN,
    ("GET", "/v2/docs/favicon-32x32.png"): OPEN,
    ("GET", "/v2/models/{name}/docs"): OPEN,  # MLServer's: the routes of one model (its metadata's peers)
    ("GET", "/v2/models/{name}/docs/dataplane.json"): OPEN,
    ("GET", "/v2/models/{name}/versions/{version}/docs"): OPEN,
    ("GET", "/v2/models/{name}/versions/{version}/docs/dataplane.json"): OPEN,
    # Inference: the fast path's routes (routes.FAST_PATH_ROUTES) and MLflow's scoring protocol.
    ("POST", "/v2/models/{name}/infer"): DATA,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): DATA,
    ("POST", "/v2/pipelines/{name}/infer"): DATA,
    ("POST", "/v2/models/{name}/invocations"): DATA,
    ("POST", "/v2/models/{name}/versions/{version}/invocations"): DATA,
    # Inspect shows the tensors other clients recently sent through a pipeline: inference data
    # (closed by the data token) seen from the operator's side (closed by the admin token). It
    # needs both, so neither token alone leaves it open.
    ("GET", "/v2/pipelines/{name}/inspect"): DATA | CONTROL,
    ("GET", "/v2/pipelines/{name}/inspect/{target}"): DATA | CONTROL,
    # The repository: the index lists every model with its state and failure reasons; loads,
    # manifests, pipelines and experiments change what is served (a load may import code).
    ("POST", "/v2/repository/index"): CONTROL,
    ("GET", "/v2/fleet"): CONTROL,  # every replica's address and models
    ("GET", "/v2/fleet/models/{name}"): CONTROL,
    ("POST", "/v2/repository/models/{name}/load"): CONTROL,
    ("POST", "/v2/repository/models/{name}/unload"): CONTROL,
    ("POST", "/v2/manifests"): CONTROL,
    ("DELETE", "/v2/manifests"): CONTROL,
    ("POST", "/v2/pipelines"): CONTROL,
    ("DELETE", "/v2/pipelines/{name}"): CONTROL,
    ("POST", "/v2/experiments"): CONTROL,
    ("DELETE", "/v2/experiments/{name}"): CONTROL,
}

_INFERENCE, _HEALTH = "/inference.GRPCInferenceService/", "/grpc.health.v1.Health/"
RPCS: dict[str, Access] = {
    _INFERENCE + "ServerLive": OPEN,
    _INFERENCE + "ServerReady": OPEN,
    _INFERENCE + "ServerMetadata": OPEN,
    _INFERENCE + "ModelReady": OPEN,
    _INFERENCE + "ModelMetadata": OPEN,
    _INFERENCE + "ModelConfig": OPEN,
    _INFERENCE + "ModelStatistics": OPEN,
    _INFERENCE + "ModelInfer": DATA,
    _INFERENCE + "ModelStreamInfer": DATA,
    _INFERENCE + "RepositoryIndex": CONTROL,
    _INFERENCE + "RepositoryModelLoad": CONTROL,
    _INFERENCE + "RepositoryModelUnload": CONTROL,
    # Not implemented here (they answer UNIMPLEMENTED), but Triton's clients may call them: they
    # change or show server state, so they are the operator's.
    _INFERENCE + "SystemSharedMemoryStatus": CONTROL,
    _INFERENCE + "SystemSharedMemoryRegister": CONTROL,
    _INFERENCE + "SystemSharedMemoryUnregister": CONTROL,
    _INFERENCE + "CudaSharedMemoryStatus": CONTROL,
    _INFERENCE + "CudaSharedMemoryRegister": CONTROL,
    _INFERENCE + "CudaSharedMemoryUnregister": CONTROL,
    _INFERENCE + "TraceSetting": CONTROL,
    _INFERENCE + "LogSettings": CONTROL,
    _HEALTH + "Check": OPEN,
    _HEALTH + "Watch": OPEN,
}


# --- Tokens -----------------------------------------------------------------------------------

class _Requirement(NamedTuple):
    tokens: tuple[bytes, ...]  # any one of them opens the route
    headers: tuple[bytes, ...]  # the same as "Bearer <token>", what clients send
    needed: str  # what a refusal tells the client it needs


@dataclass(frozen=True)
class Tokens:
    admin: bytes = field(default=b"", repr=False)
    data: bytes = field(default=b"", repr=False)

    @classmethod
    def from_settings(cls, settings: "ServerSettings") -> "Tokens":
        return cls(settings.admin_secret.encode(), settings.data_secret.encode())

    def requirement(self, access: Access) -> _Requirement | None:
        """Which tokens open a route of this access; None: no token is needed."""
        accepted: set[bytes] | None = None  # None: anyone
        if access & DATA and self.data:
            accepted = {self.data, self.admin} - {b""}
        if access & CONTROL and self.admin:
            accepted = {self.admin} if accepted is None else accepted & {self.admin}
        if accepted is None:
            return None
        # The data token first: inference clients hold it, so theirs is the one comparison made.
        named = [(token, name) for token, name in ((self.data, "the data token"), (self.admin, "the admin token"))
                 if token in accepted]
        tokens = tuple(token for token, _ in named)
        return _Requirement(tokens, tuple(b"Bearer " + token for token in tokens), " or ".join(name for _, name in named))


def _refusal(authorization: bytes | None, requirement: _Requirement) -> FleetError | None:
    """Why a request whose Authorization header (or metadata) is `authorization` may not pass; None if it may."""
    if authorization is None:
        return Unauthenticated(f"this route needs {requirement.needed}: send 'Authorization: Bearer <token>'")
    for header in requirement.headers:  # the usual spelling, compared whole: one comparison
        if hmac.compare_digest(authorization, header):
            return None
    scheme, _, token = authorization.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return Unauthenticated(f"malformed Authorization header: expected 'Bearer <token>' ({requirement.needed})")
    for accepted in requirement.tokens:
        if hmac.compare_digest(token, accepted):
            return None
    return PermissionDenied(f"the token sent does not open this route: it needs {requirement.needed}")


# --- REST --------------------------------------------------------------------------------------

class _Node:
    """One path segment of the route templates of one method."""

    __slots__ = ("literals", "parameter", "rest", "access")

    def __init__(self):
        self.literals: dict[str, _Node] = {}
        self.parameter: _Node | None = None  # `{name}`: any one non-empty segment
        self.rest: Access | None = None  # `{name:path}`: whatever follows, slashes included
        self.access: Access | None = None  # a template ends here


def _tree(routes: dict[tuple[str, str], Access]) -> dict[str, _Node]:
    roots: dict[str, _Node] = {}
    for (method, template), access in routes.items():
        node = roots.setdefault(method, _Node())
        segments = template.split("/")[1:]
        for index, segment in enumerate(segments):
            if segment.startswith("{") and segment.endswith(":path}"):
                if index != len(segments) - 1:
                    raise ValueError(f"{template}: a {{name:path}} segment must be the last")
                node.rest = access
                break
            if segment.startswith("{") and segment.endswith("}"):
                node.parameter = node = node.parameter or _Node()
            else:
                node = node.literals.setdefault(segment, _Node())
        else:
            node.access = access
    roots["HEAD"] = roots.get("GET", _Node())  # Starlette answers HEAD with the GET handler
    return roots


def _either(first: Access | None, second: Access | None) -> Access | None:
    if first is None:
        return second
    return first if second is None else first | second


def _match(node: _Node, segments: list[str], index: int) -> Access | None:
    """What every template matching segments[index:] from `node` needs; None when none matches."""
    if index == len(segments):
        return node.access
    found = node.rest
    segment = segments[index]
    child = node.literals.get(segment)
    if child is not None:
        found = _either(found, _match(child, segments, index + 1))
    if node.parameter is not None and segment:
        found = _either(found, _match(node.parameter, segments, index + 1))
    return found


_ROOTS = _tree(ROUTES)


def route_access(method: str, path: str) -> Access:
    """What a REST request needs, from its method and path (as ASGI gives it)."""
    if infer_target(path) is not None:  # the fast path answers it, whatever the method
        return DATA
    return _template_access(method, path)


def _template_access(method: str, path: str) -> Access:
    root = _ROOTS.get(method)
    found = None if root is None else _match(root, path.split("/"), 1)
    return UNKNOWN if found is None else found


def unclassified_routes(routes: Iterable) -> list[str]:
    """The routes of a Starlette app (its `routes`) that `ROUTES` does not name."""
    wildcards = [(method, template[:template.rindex("/") + 1]) for method, template in ROUTES
                 if template.endswith(":path}")]
    missing: dict[str, None] = {}  # ordered, and HEAD folds into GET
    for route in routes:
        if isinstance(route, WebSocketRoute):  # the check guards HTTP requests only
            missing[f"WEBSOCKET {route.path}"] = None
            continue
        methods = getattr(route, "methods", None)
        # A mount (static files) serves everything below its path.
        template = route.path if methods else route.path + "/{path:path}"
        for method in methods or ("GET",):
            method = "GET" if method == "HEAD" else method
            if (method, template) in ROUTES:
                continue
            if not any(method == wild_method and template.startswith(prefix) for wild_method, prefix in wildcards):
                missing[f"{method} {template}"] = None
    return list(missing)


class _RestGuard:
    """The ASGI wrapper: refuses a request that lacks the token its route needs, else passes it on."""

    def __init__(self, app, tokens: Tokens):
        self.app = app
        self.inference = tokens.requirement(DATA)
        self.requirements = {Access(value): tokens.requirement(Access(value)) for value in range(UNKNOWN + 1)}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"]
            # Inference by the fast path's own split; only other routes walk the template tree.
            if infer_target(path) is not None:
                requirement = self.inference
            else:
                requirement = self.requirements[_template_access(scope["method"], path)]
            if requirement is not None:
                authorization = None
                for key, value in scope["headers"]:
                    if key == b"authorization":
                        authorization = value
                        break
                refusal = _refusal(authorization, requirement)
                if refusal is not None:
                    return await _refuse(scope, send, refusal)
        await self.app(scope, receive, send)


async def _refuse(scope, send, error: FleetError) -> None:
    body = orjson.dumps({"error": error.message})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if isinstance(error, Unauthenticated):
        headers.append((b"www-authenticate", b'Bearer realm="fleetserve"'))
    for key, value in scope["headers"]:
        if key == b"x-request-id":
            headers.append((key, value))
            break
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def protect_rest(app, routes: Iterable, tokens: Tokens):
    """`app` (the REST app, whose FastAPI routes are `routes`) behind the token check; `app`
    itself when no token is set. A route missing from ROUTES refuses to start, tokens or not."""
    missing = unclassified_routes(routes)
    if missing:
        raise RuntimeError(f"REST routes missing from fleetserve.server.security.ROUTES: {missing}")
    if not tokens.admin and not tokens.data:
        return app
    return _RestGuard(app, tokens)


# --- gRPC --------------------------------------------------------------------------------------

_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _GrpcGuard(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Tokens):
        self.requirements = {method: tokens.requirement(access) for method, access in RPCS.items()}
        self.unknown = tokens.requirement(UNKNOWN)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        requirement = self.requirements.get(details.method, self.unknown)
        if requirement is None:
            return await continuation(details)
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value.encode() if isinstance(value, str) else value
                break
        refusal = _refusal(authorization, requirement)
        handler = await continuation(details)
        if refusal is None or handler is None:
            return handler
        return _refusing(handler, refusal)


def _refusing(handler: grpc.RpcMethodHandler, error: FleetError) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers the error's status; the request is not decoded."""

    async def refuse(request, context):
        await context.abort(error.grpc_code, error.message)

    make = _HANDLERS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, response_serializer=handler.response_serializer)


def grpc_interceptors(tokens: Tokens) -> list[grpc.aio.ServerInterceptor] | None:
    """The token check for the gRPC server; None when no token is set."""
    if not tokens.admin and not tokens.data:
        return None
    return [_GrpcGuard(tokens)]


def unclassified_rpcs(services: Iterable) -> list[str]:
    """The RPCs of these service descriptors that `RPCS` does not name."""
    return [f"/{service.full_name}/{method.name}" for service in services for method in service.methods
            if f"/{service.full_name}/{method.name}" not in RPCS]


# --- TLS ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TLS:
    cert: str
    key: str
    client_ca: str = ""

    @classmethod
    def from_settings(cls, settings: "ServerSettings") -> "TLS | None":
        """The certificate to serve, checked now; None when TLS is off."""
        cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise SystemExit("TLS needs both --tls-cert (FLEETSERVE_TLS_CERT) and --tls-key (FLEETSERVE_TLS_KEY)"
                             + (", also with --tls-client-ca" if client_ca else ""))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as error:
            raise SystemExit(f"--tls-cert {cert} / --tls-key {key}: cannot load them: {error}") from None
        if client_ca:
            try:
                context.load_verify_locations(client_ca)
            except (OSError, ssl.SSLError) as error:
                raise SystemExit(f"--tls-client-ca {client_ca}: cannot load it: {error}") from None
        return cls(cert, key, client_ca)

    def uvicorn_options(self) -> dict:
        options = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca:
            options.update(ssl_ca_certs=self.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        return options

    def peer_context(self) -> ssl.SSLContext:
        """How this replica calls its fleet peers: it trusts the client CA (an mTLS fleet's own)
        or its own certificate (one certificate shared by every replica), and shows its certificate."""
        context = ssl.create_default_context(cafile=self.client_ca or self.cert)
        context.check_hostname = False  # peers are addressed by IP; the certificate is what is checked
        context.load_cert_chain(self.cert, self.key)
        return context

    def peer_grpc_credentials(self) -> grpc.ChannelCredentials:
        """peer_context's trust and certificate, for gRPC hops."""
        return grpc.ssl_channel_credentials(Path(self.client_ca or self.cert).read_bytes(), Path(self.key).read_bytes(),
                                            Path(self.cert).read_bytes())

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=Path(self.client_ca).read_bytes() if self.client_ca else None,
            require_client_auth=bool(self.client_ca),
        )


# --- Start-up ----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def log_front_doors(settings: "ServerSettings", tokens: Tokens, tls: TLS | None) -> None:
    """Say how the doors are closed; warn when anyone on the network may load code."""
    if not tokens.admin and not is_loopback(settings.host):
        log.warning(
            "listening on %s without an admin token: anyone who can reach ports %d (REST) and %d (gRPC) can "
            "load, unload and replace models, and loading a model runs the code it brings. Set --admin-token "
            "or --admin-token-file (FLEETSERVE_ADMIN_TOKEN, FLEETSERVE_ADMIN_TOKEN_FILE).",
            settings.host, settings.http_port, settings.grpc_port)
    closed = [what for what, token in (("control routes need the admin token", tokens.admin),
                                       ("inference needs the data token", tokens.data)) if token]
    if closed or tls is not None:
        tls_text = "off" if tls is None else "on, client certificates required" if tls.client_ca else "on"
        log.info("front doors: %s; TLS %s", "; ".join(closed) or "no token", tls_text)
