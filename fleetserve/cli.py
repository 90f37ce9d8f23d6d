"""`fleetserve start | status | infer | apply | delete | load | unload | pipeline | experiment`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from fleetserve import __version__
from fleetserve.settings import ServerSettings, read_secret


def _start(args: argparse.Namespace) -> int:
    from fleetserve.server.app import run

    # Every start flag is a ServerSettings field of the same name; unset flags leave the
    # FLEETSERVE_* variables and defaults in charge.
    flags = {field.name for field in dataclasses.fields(ServerSettings)} & vars(args).keys()
    settings = ServerSettings.from_env(**{name: getattr(args, name) for name in flags})
    return run(settings)


def _boolean(raw: str) -> bool:
    if raw.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"true or false, not {raw!r}")
    return raw.lower() == "true"


def _client(args: argparse.Namespace, inference: bool = False):
    """An HTTP client for the server at --url, sending the token the command needs: --token, else
    (for inference) FLEETSERVE_DATA_TOKEN[_FILE], else FLEETSERVE_ADMIN_TOKEN[_FILE]."""
    import ssl

    import httpx

    def from_env(flag: str) -> str:
        variable = "FLEETSERVE_" + flag.replace("-", "_").upper()
        return read_secret(os.environ.get(variable, ""), os.environ.get(variable + "_FILE", ""), flag)

    token = args.token or (inference and from_env("data-token")) or from_env("admin-token")
    verify: ssl.SSLContext | bool = True
    if args.ca or args.cert:
        try:
            verify = ssl.create_default_context(cafile=args.ca or None)
            if args.cert:
                verify.load_cert_chain(args.cert, args.key or None)
        except (OSError, ssl.SSLError) as error:
            raise SystemExit(f"cannot load --ca / --cert / --key: {error}") from None
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return httpx.Client(base_url=args.url, timeout=args.timeout, headers=headers, verify=verify)


def _print_or_fail(response) -> int:
    try:
        document = response.json()
    except ValueError:
        document = {"error": response.text}
    print(json.dumps(document, indent=2))
    return 0 if response.is_success else 1


def _status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ready = client.get("/v2/health/ready")
        print(f"server: {'ready' if ready.is_success else 'not ready'} at {args.url}")
        listed = client.post("/v2/repository/index")
    if not listed.is_success:  # e.g. 401: the index needs the admin token
        return _print_or_fail(listed)
    index = listed.json()
    width = max((len(entry["name"]) for entry in index), default=4)
    for entry in index:
        version = entry.get("version", "-")
        reason = f"  {entry['reason']}" if entry.get("reason") else ""
        print(f"{entry['name']:<{width}}  {version:>4}  {entry['state']:<11}{reason}")
    return 0 if ready.is_success else 1


def _infer(args: argparse.Namespace) -> int:
    body = sys.stdin.read() if args.data == "-" else args.data
    path = f"/v2/models/{args.model}" + (f"/versions/{args.version}" if args.version else "") + "/infer"
    with _client(args, inference=True) as client:
        return _print_or_fail(client.post(path, content=body, headers={"Content-Type": "application/json"}))


def _manifests(method: str):
    def command(args: argparse.Namespace) -> int:
        try:
            text = sys.stdin.read() if args.file == "-" else open(args.file).read()
        except OSError as error:
            print(json.dumps({"error": f"cannot read {args.file}: {error.strerror}"}, indent=2))
            return 1
        with _client(args) as client:
            response = client.request(method, "/v2/manifests", content=text, headers={"Content-Type": "application/yaml"})
        return _print_or_fail(response)

    return command


def _pipeline(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "list":
            return _print_or_fail(client.get("/v2/pipelines"))
        if not args.target:
            print(json.dumps({"error": f"pipeline {args.action} needs a pipeline name"}, indent=2))
            return 1
        name, _, narrower = args.target.partition(".")
        if args.action == "status":
            return _print_or_fail(client.get(f"/v2/pipelines/{name}"))
        path = f"/v2/pipelines/{name}/inspect" + (f"/{narrower}" if narrower else "")
        return _print_or_fail(client.get(path, params={"limit": args.limit} if args.limit else None))


def _experiment(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_or_fail(client.get("/v2/experiments" + (f"/{args.name}" if args.name else "")))


def _fleet(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return _print_or_fail(client.get("/v2/fleet" + (f"/models/{args.model}" if args.model else "")))


def _repository(action: str):
    def command(args: argparse.Namespace) -> int:
        with _client(args) as client:
            return _print_or_fail(client.post(f"/v2/repository/models/{args.model}/{action}"))

    return command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetserve", description="A multi-model V2 inference server.")
    parser.add_argument("--version", action="version", version=f"fleetserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    start = commands.add_parser("start", help="serve every model in a repository folder")
    start.add_argument("model_repository", nargs="?", default=os.environ.get("FLEETSERVE_MODEL_REPOSITORY"))
    start.add_argument("--host", help="address to bind (default 127.0.0.1; FLEETSERVE_HOST)")
    start.add_argument("--http-port", type=int, help="REST port (default 8080; FLEETSERVE_HTTP_PORT)")
    start.add_argument("--grpc-port", type=int, help="gRPC port (default 8081; FLEETSERVE_GRPC_PORT)")
    start.add_argument("--metrics-port", type=int, help="Prometheus port (default 8082; FLEETSERVE_METRICS_PORT)")
    start.add_argument("--max-message-size", type=int, help="largest request in bytes (FLEETSERVE_MAX_MESSAGE_SIZE)")
    start.add_argument("--log-level", help="debug, info, warning, error (FLEETSERVE_LOG_LEVEL)")
    start.add_argument("--log-format", choices=("text", "json"),
                       help="text, or json: one JSON document a line (default text; FLEETSERVE_LOG_FORMAT)")
    start.add_argument("--access-log", action="store_true", default=None,
                       help="one line per request: method and path or RPC, status, model, milliseconds, bytes, "
                            "request id, client (FLEETSERVE_ACCESS_LOG)")
    start.add_argument("--memory-limit", help="memory for resident models: bytes or 512Mi, 4Gi (FLEETSERVE_MEMORY_LIMIT)")
    start.add_argument("--overcommit-percent", type=float,
                       help="registered models may exceed the limit by this (default 10; FLEETSERVE_OVERCOMMIT_PERCENT)")
    start.add_argument("--inline-predict-us", type=float,
                       help="run predicts faster than this many microseconds on the event loop (default 200; 0: never; "
                            "FLEETSERVE_INLINE_PREDICT_US)")
    start.add_argument("--inference-threads", type=int,
                       help="worker threads for framework calls; one model holds at most half (default 8; "
                            "FLEETSERVE_INFERENCE_THREADS)")
    start.add_argument("--shutdown-grace", type=float,
                       help="seconds SIGTERM waits for requests in flight (default 30; FLEETSERVE_SHUTDOWN_GRACE)")
    start.add_argument("--eviction-wait", type=float,
                       help="seconds a load waits for a busy model to be evictable, then 503 (default 30; "
                            "FLEETSERVE_EVICTION_WAIT)")
    start.add_argument("--cache-dir", help="where remote artifacts are downloaded (FLEETSERVE_CACHE_DIR)")
    start.add_argument("--state-dir", help="where applied manifests are kept, to be applied again at start (FLEETSERVE_STATE_DIR)")
    start.add_argument("--etcd", help="etcd client URLs, comma-separated: this server joins a fleet (FLEETSERVE_ETCD)")
    start.add_argument("--fleet", help="the fleet's name, prefixing its etcd keys (default 'default'; FLEETSERVE_FLEET)")
    start.add_argument("--advertise-host", help="the address peers reach this replica at (FLEETSERVE_ADVERTISE_HOST)")
    start.add_argument("--replica-id", help="this replica's id in the fleet (default the host name; FLEETSERVE_REPLICA_ID)")
    start.add_argument("--capabilities", help="comma-separated; replaces the default capabilities (FLEETSERVE_CAPABILITIES)")
    start.add_argument("--extra-capabilities",
                       help="comma-separated; added to the capabilities (FLEETSERVE_EXTRA_CAPABILITIES)")
    start.add_argument("--triton-url",
                       help="gRPC address of a Triton server (explicit model control) for GPU models (FLEETSERVE_TRITON_URL)")
    start.add_argument("--triton-repository", help="a model repository folder Triton also reads (else files go in load "
                                                   "requests; FLEETSERVE_TRITON_REPOSITORY)")
    start.add_argument("--gpu-memory-limit",
                       help="memory for models resident in Triton: bytes or 16Gi (default: no limit; FLEETSERVE_GPU_MEMORY_LIMIT)")
    start.add_argument("--admin-token", help="required on routes that change or reveal the repository (FLEETSERVE_ADMIN_TOKEN)")
    start.add_argument("--admin-token-file", help="a file holding the admin token (FLEETSERVE_ADMIN_TOKEN_FILE)")
    start.add_argument("--data-token", help="required on inference routes; the admin token opens them too (FLEETSERVE_DATA_TOKEN)")
    start.add_argument("--data-token-file", help="a file holding the data token (FLEETSERVE_DATA_TOKEN_FILE)")
    start.add_argument("--tls-cert", help="PEM certificate: REST, gRPC and metrics serve TLS (FLEETSERVE_TLS_CERT)")
    start.add_argument("--tls-key", help="PEM private key of --tls-cert (FLEETSERVE_TLS_KEY)")
    start.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed, mTLS (FLEETSERVE_TLS_CLIENT_CA)")
    start.add_argument("--allow-remote-code", action="store_true", default=None,
                       help="import custom runtimes that come with remote artifacts (FLEETSERVE_ALLOW_REMOTE_CODE)")
    start.add_argument("--allowed-storage",
                       help="comma-separated prefixes every storageUri / uri must start with (default: any; "
                            "FLEETSERVE_ALLOWED_STORAGE)")
    start.add_argument("--download-timeout", type=float,
                       help="seconds one model's download may take (default 1800; FLEETSERVE_DOWNLOAD_TIMEOUT)")
    start.add_argument("--max-download-size",
                       help="largest download or unpacked archive: bytes or 512Mi, 10Gi (default 10Gi; "
                            "FLEETSERVE_MAX_DOWNLOAD_SIZE)")
    start.add_argument("--max-concurrent-requests", type=int,
                       help="requests in flight at once, REST and gRPC; past it 503 + Retry-After / RESOURCE_EXHAUSTED "
                            "(default 64 per core, at least 256; 0: no limit; FLEETSERVE_MAX_CONCURRENT_REQUESTS)")
    start.add_argument("--request-head-timeout", type=float,
                       help="seconds a client may take to send a request's headers before it is disconnected "
                            "(default 10; 0: no limit; FLEETSERVE_REQUEST_HEAD_TIMEOUT)")
    start.add_argument("--request-body-timeout", type=float,
                       help="seconds a client may take to send a request's body (default 60; 0: no limit; "
                            "FLEETSERVE_REQUEST_BODY_TIMEOUT)")
    start.add_argument("--load-models-at-startup", type=_boolean, metavar="true|false",
                       help="load the repository's models at start (default true; else through the repository API; "
                            "FLEETSERVE_LOAD_MODELS_AT_STARTUP, MLSERVER_LOAD_MODELS_AT_STARTUP)")
    start.add_argument("--parallel-workers", type=int,
                       help="worker processes of a custom runtime whose settings do not say (default 1; 0: in the "
                            "server process; FLEETSERVE_PARALLEL_WORKERS, MLSERVER_PARALLEL_WORKERS)")
    start.set_defaults(run=_start)

    def client_command(name: str, help_text: str, run) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--url", default=os.environ.get("FLEETSERVE_URL", "http://127.0.0.1:8080"))
        sub.add_argument("--timeout", type=float, default=60.0)
        sub.add_argument("--token", help="bearer token (default FLEETSERVE_ADMIN_TOKEN[_FILE]; for infer FLEETSERVE_DATA_TOKEN first)")
        sub.add_argument("--ca", default=os.environ.get("FLEETSERVE_CA"), help="CA that signed the server's certificate (FLEETSERVE_CA)")
        sub.add_argument("--cert", default=os.environ.get("FLEETSERVE_CLIENT_CERT"), help="client certificate for mTLS (FLEETSERVE_CLIENT_CERT)")
        sub.add_argument("--key", default=os.environ.get("FLEETSERVE_CLIENT_KEY"), help="its private key (FLEETSERVE_CLIENT_KEY)")
        sub.set_defaults(run=run)
        return sub

    client_command("status", "show server readiness and every model's state", _status)
    infer = client_command("infer", "send a V2 JSON inference request", _infer)
    infer.add_argument("model")
    infer.add_argument("data", help="the JSON request body, or - to read it from stdin")
    infer.add_argument("--version")
    for name, method, help_text in (
        ("apply", "POST", "apply Seldon Core 2 manifests (kind: Model, Pipeline, Experiment)"),
        ("delete", "DELETE", "delete what Seldon Core 2 manifests applied"),
    ):
        client_command(name, help_text, _manifests(method)).add_argument(
            "-f", "--file", required=True, help="a YAML file (several documents allowed), or - for stdin"
        )
    pipeline = client_command("pipeline", "list pipelines, show one's status, or inspect its recent messages", _pipeline)
    pipeline.add_argument("action", choices=("list", "status", "inspect"))
    pipeline.add_argument("target", nargs="?", help="NAME, or for inspect NAME[.STEP[.inputs|outputs[.TENSOR]]]")
    pipeline.add_argument("--limit", type=int, help="inspect: the last N messages per step (default all kept, 10)")
    client_command("experiment", "list experiments, or show one with its traffic so far", _experiment).add_argument(
        "name", nargs="?")
    client_command("fleet", "show the fleet's replicas (address, capabilities, memory, models, state), or one "
                   "model's copies and why each is where it is", _fleet).add_argument("model", nargs="?")
    for action in ("load", "unload"):
        client_command(action, f"{action} a model through the repository API", _repository(action)).add_argument("model")

    args = parser.parse_args(argv)
    if args.run is _start:
        return args.run(args)
    import httpx

    try:
        return args.run(args)
    except httpx.TimeoutException:
        print(f"fleetserve at {args.url} did not answer within {args.timeout:g}s", file=sys.stderr)
    except httpx.ConnectError as error:
        print(f"no fleetserve at {args.url} ({error}): start one with `fleetserve start`, or give --url "
              "(FLEETSERVE_URL)", file=sys.stderr)
    except httpx.TransportError as error:  # TLS refused, a connection broken mid-answer...
        print(f"fleetserve at {args.url}: {type(error).__name__}: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
