"""One exception family. Each error carries its own status: handlers never invent one."""

from __future__ import annotations

import grpc


class FleetError(Exception):
    """Base of every error a client may see; the message is what the client reads."""

    route: str | None = None  # the `x-seldon-route` entry of the experiment candidate that failed

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    @property
    def http_status(self) -> int:
        return STATUS[type(self)][0]

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return STATUS[type(self)][1]


class InvalidInput(FleetError):
    """The request is malformed or does not fit the model."""


class NotFound(FleetError):
    """No such model, version or route."""


class ModelUnavailable(FleetError):
    """The model exists but is not ready (loading, failed, unloaded)."""


class NotReady(FleetError):
    """A pipeline or experiment whose models are not all ready."""


class PayloadTooLarge(FleetError):
    """The request body exceeds the configured limit."""


class ModelLoadError(FleetError):
    """The model could not be loaded; the reason names what went wrong."""


class InferenceError(FleetError):
    """The model itself failed while predicting (its code raised on this request)."""


class WorkerDied(FleetError):
    """The process running the model died during the predict: a crash, the server's fault rather
    than the request's (Triton answers a backend crash with INTERNAL)."""


class CapacityExceeded(FleetError):
    """Registering the model would pass the server's memory budget."""


class Busy(FleetError):
    """Every resident model is serving: none can be evicted to make room in time."""


class ServerUnavailable(FleetError):
    """The server is shutting down, or a backend it needs cannot be reached."""


class Timeout(FleetError):
    """What the server called on the client's behalf (an explainer's model) did not answer in time."""


class Unauthenticated(FleetError):
    """The route needs a token and the request carries none (or no readable `Bearer` one)."""


class PermissionDenied(FleetError):
    """The request's token does not open this route."""
class Misdirected(FleetError):
    """A fleet peer forwarded a request for a model this replica no longer has: the peer tries
    another copy (HTTP 421 Misdirected Request)."""


# gRPC trailing metadata on an error this server answered: the HTTP status it means. A fleet peer
# tells by it a peer's own answer from a broken connection.
ANSWERED = "fleetserve-status"


def answered_status(error: grpc.aio.AioRpcError) -> str | None:
    """The HTTP status a fleetserve peer named for its gRPC error; None if no fleetserve answered."""
    return dict(error.trailing_metadata() or ()).get(ANSWERED)


class Relayed(FleetError):
    """An error a fleet peer answered a forwarded gRPC request with, passed on as it came: its
    gRPC code, and the HTTP status the peer named (ANSWERED)."""

    def __init__(self, code: grpc.StatusCode, message: str, status: int = 500):
        super().__init__(message)
        self.code = code
        self.status = status

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> "Relayed":
        answered = answered_status(error) or ""
        return cls(error.code(), error.details() or "", int(answered) if answered.isdigit() else 500)

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.code


class Overloaded(FleetError):
    """The server (--max-concurrent-requests) or a model's queue (max_queue_size) is full: the
    client should retry shortly (REST answers with Retry-After). gRPC's own concurrency limit
    answers RESOURCE_EXHAUSTED too."""


class DeadlineExceeded(FleetError):
    """The request's own deadline (parameters.timeout, a gRPC deadline, or its model's
    default_timeout_microseconds) passed before its answer."""


def describe(error: BaseException) -> str:
    """What a client or an operator reads about an error: our own message, else its type and text."""
    if isinstance(error, FleetError):
        return error.message
    return f"{type(error).__name__}: {error}"


# The single table from error to (HTTP status, gRPC code).
STATUS: dict[type[FleetError], tuple[int, grpc.StatusCode]] = {
    FleetError: (500, grpc.StatusCode.INTERNAL),
    InvalidInput: (400, grpc.StatusCode.INVALID_ARGUMENT),
    NotFound: (404, grpc.StatusCode.NOT_FOUND),
    ModelUnavailable: (503, grpc.StatusCode.UNAVAILABLE),
    NotReady: (424, grpc.StatusCode.UNAVAILABLE),
    PayloadTooLarge: (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ModelLoadError: (400, grpc.StatusCode.INVALID_ARGUMENT),
    InferenceError: (400, grpc.StatusCode.INTERNAL),
    WorkerDied: (500, grpc.StatusCode.INTERNAL),
    CapacityExceeded: (400, grpc.StatusCode.RESOURCE_EXHAUSTED),
    Busy: (503, grpc.StatusCode.UNAVAILABLE),
    ServerUnavailable: (503, grpc.StatusCode.UNAVAILABLE),
    Timeout: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    Unauthenticated: (401, grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: (403, grpc.StatusCode.PERMISSION_DENIED),
    Overloaded: (503, grpc.StatusCode.RESOURCE_EXHAUSTED),
    DeadlineExceeded: (504, grpc.StatusCode.DEADLINE_EXCEEDED),
    Misdirected: (421, grpc.StatusCode.UNAVAILABLE),
}
