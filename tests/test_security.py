"""Tokens and TLS at the front doors (server/security.py), against the server as a process: the
route table checked against every route and RPC there is, then one server per configuration
(admin token; admin and data tokens; TLS on 0.0.0.0 with no token; mTLS), called with httpx,
tritonclient (http and grpc) and the CLI. Certificates are made here with `cryptography`."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from conftest import IRIS_ROWS, ROOT, Server, free_port, iris_json, spawn_server, start_server, wait_ready

ADMIN = "adm-7f3c9e1b5d2a48f6"
DATA = "dat-2b8e4c6a1f9d73e0"
# Wrong tokens, one a prefix of the right one: none of them may show up anywhere either.
WRONG = ("adm-7f3c9e1b", "wrong-token-51e2")

PIPELINE = """
apiVersion: mlops.seldon.io/v1alpha1
kind: Pipeline
metadata: {name: iris-pipe}
spec:
  steps: [{name: iris}]
  output: {steps: [iris]}
"""
EXPERIMENT = """
apiVersion: mlops.seldon.io/v1alpha1
kind: Experiment
metadata: {name: iris-split}
spec:
  candidates: [{name: iris, weight: 50}, {name: iris-copy, weight: 50}]
"""
MODEL = """
apiVersion: mlops.seldon.io/v1alpha1
kind: Model
metadata: {name: iris-copy}
spec: {storageUri: "%s", requirements: [sklearn]}
"""


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- The table ----------------------------------------------------------------------------------

def test_every_route_and_rpc_is_classified(rest_routes):
    """Every route FastAPI serves, every route the fast path serves and every RPC of both gRPC
    services has an entry, and the request matcher gives a concrete path its template's entry."""
    from fastapi.routing import APIRoute
    from grpc_health.v1 import health_pb2 as health
    from starlette.routing import Match

    from fleetserve.server import security
    from fleetserve.server.routes import FAST_PATH_ROUTES, infer_target

    assert security.unclassified_routes(rest_routes) == []
    services = [service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"], health.DESCRIPTOR.services_by_name["Health"]]
    assert security.unclassified_rpcs(services) == []
    assert {security.RPCS[f"/inference.GRPCInferenceService/{name}"] for name in ("ModelInfer", "ModelStreamInfer")} == {security.DATA}
    assert all(access == security.CONTROL for rpc, access in security.RPCS.items() if "/Repository" in rpc)

    for template in FAST_PATH_ROUTES:
        assert security.ROUTES[("POST", template)] == security.DATA
        assert infer_target(template.replace("{name}", "m").replace("{version}", "1")) is not None
    routes = [route for route in rest_routes if isinstance(route, APIRoute)]
    for route in routes:
        for method in route.methods:
            assert security.route_access(method, re.sub(r"\{\w+\}", "m", route.path)) == security.ROUTES[(method, route.path)]
        # Names that are also literal segments elsewhere: whatever serves the path (the fast path,
        # or any route Starlette could take it to) needs no more than the check demands.
        for word in ("stats", "infer", "inspect", "versions", "ready", "load", "index"):
            concrete = re.sub(r"\{\w+\}", word, route.path)
            for method in route.methods:
                demanded = security.route_access(method, concrete)
                if infer_target(concrete) is not None:
                    assert demanded == security.DATA
                    continue
                scope = {"type": "http", "method": method, "path": concrete}
                serving = [other for other in routes if other.matches(scope)[0] == Match.FULL]
                assert route in serving and all(security.ROUTES[(method, other.path)] & ~demanded == 0 for other in serving)
    assert security.route_access("GET", "/v2/pipelines/p/inspect/infer") == security.DATA | security.CONTROL
    # A path or method no route serves needs every token that is set.
    assert security.route_access("GET", "/v2/repository/index") == security.UNKNOWN
    assert security.route_access("PUT", "/v2/models/iris") == security.UNKNOWN
    assert security.route_access("GET", "/v2/models//ready") == security.UNKNOWN


def test_the_openapi_document_and_the_table_name_the_same_routes():
    """The document is generated from neither: each must name every route, and what a token may
    close is documented as answering 401 and 403."""
    from fleetserve.server import openapi, security

    assert openapi.operations() == set(security.ROUTES)
    for path, item in openapi.DOCUMENT["paths"].items():
        for method, operation in item.items():
            guarded = {"401", "403"} <= operation["responses"].keys() and "security" in operation
            assert guarded == (security.ROUTES[(method.upper(), path)] is not security.OPEN), (method, path)


def test_a_route_missing_from_the_table_refuses_to_start():
    from fastapi import FastAPI

    from fleetserve.server.security import Tokens, protect_rest

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.get("/v2/health/live")(lambda: None)
    assert protect_rest(app, app.routes, Tokens()) is app  # classified, and no token: nothing wraps it
    app.post("/v2/models/{name}/forget")(lambda name: None)
    with pytest.raises(RuntimeError, match=r"POST /v2/models/\{name\}/forget"):
        protect_rest(app, app.routes, Tokens())
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.websocket("/v2/docs/live")(lambda websocket: None)  # under an open prefix, but the check sees HTTP only
    with pytest.raises(RuntimeError, match="WEBSOCKET /v2/docs/live"):
        protect_rest(app, app.routes, Tokens())
    # FastAPI's own documentation routes, had they been left on, would have been caught too.
    with pytest.raises(RuntimeError, match="GET /openapi.json"):
        protect_rest(app, FastAPI().routes, Tokens())


# --- Certificates and servers -----------------------------------------------------------------

@dataclass
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path  # signed by another CA
    stranger_key: Path

    def context(self, client: bool = False, stranger: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if client:
            context.load_cert_chain(self.client_cert, self.client_key)
        if stranger:
            context.load_cert_chain(self.stranger_cert, self.stranger_key)
        return context


def _issue(folder: Path, name: str, subject: str, issuer: tuple | None, server: bool = False, ca: bool = False,
           peer: bool = False):
    """A certificate and its key in `folder`: a CA's, a server's (for localhost and 127.0.0.1), a
    client's, or a fleet peer's (a server's that also serves as a client to its peers)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_key, issuer_name = issuer if issuer else (key, subject_name)
    builder = (x509.CertificateBuilder().subject_name(subject_name).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if peer or not server else []
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return key, subject_name


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Certificates:
    folder = tmp_path_factory.mktemp("certificates")
    ca = _issue(folder, "ca", "fleetserve test CA", None, ca=True)
    _issue(folder, "server", "127.0.0.1", ca, server=True)
    _issue(folder, "client", "operator", ca)
    other_ca = _issue(folder, "other-ca", "another CA", None, ca=True)
    _issue(folder, "stranger", "stranger", other_ca)
    return Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                        folder / "client.key", folder / "stranger.pem", folder / "stranger.key")


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """iris from model_repo/."""
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    repo = tmp_path_factory.mktemp("security-repo")
    shutil.copytree(ROOT / "model_repo" / "iris", repo / "iris")
    return repo


@pytest.fixture(scope="module")
def repository_with_mlflow(repository, tmp_path_factory) -> Path:
    """iris, and the MLflow iris for its scoring route."""
    repo = tmp_path_factory.mktemp("security-mlflow-repo")
    for example in ("iris", "iris-mlflow"):
        shutil.copytree(ROOT / "model_repo" / example, repo / example)
    return repo


@pytest.fixture(scope="module")
def admin_server(repository, tmp_path_factory):
    """An admin token only; debug logging, so whatever the server logs about requests is there."""
    logs = tmp_path_factory.mktemp("admin-logs")
    server = start_server(repository, logs / "server.log", {"FLEETSERVE_ADMIN_TOKEN": ADMIN, "FLEETSERVE_LOG_LEVEL": "debug"})
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def data_server(repository_with_mlflow, tmp_path_factory):
    """An admin token read from a file (with a trailing newline, as secrets are mounted) and a data token."""
    logs = tmp_path_factory.mktemp("data-logs")
    (logs / "admin-token").write_text(ADMIN + "\n")
    server = start_server(repository_with_mlflow, logs / "server.log",
                          {"FLEETSERVE_ADMIN_TOKEN_FILE": str(logs / "admin-token"), "FLEETSERVE_DATA_TOKEN": DATA})
    yield server
    assert server.stop() == 0, server.log()


def start_tls_server(repository: Path, log_path: Path, certificates: Certificates, env: dict[str, str]) -> Server:
    """A TLS server, ready (asked over TLS with the test CA and the client certificate)."""
    env = {"FLEETSERVE_TLS_CERT": str(certificates.server_cert), "FLEETSERVE_TLS_KEY": str(certificates.server_key), **env}
    server = spawn_server(repository, log_path, [free_port() for _ in range(3)], env)
    return wait_ready(server, f"https://127.0.0.1:{server.http_port}/v2/health/ready", verify=certificates.context(client=True))


@pytest.fixture(scope="module")
def tls_server(repository, certificates, tmp_path_factory):
    """TLS, on every address (0.0.0.0), with no token."""
    logs = tmp_path_factory.mktemp("tls-logs")
    server = start_tls_server(repository, logs / "server.log", certificates, {"FLEETSERVE_HOST": "0.0.0.0"})
    yield server
    if server.process.poll() is None:  # the last test stops it itself
        assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def mtls_server(repository, certificates, tmp_path_factory):
    logs = tmp_path_factory.mktemp("mtls-logs")
    server = start_tls_server(repository, logs / "server.log", certificates,
                              {"FLEETSERVE_TLS_CLIENT_CA": str(certificates.ca)})
    yield server
    assert server.stop() == 0, server.log()


def fleetserve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {key: value for key, value in os.environ.items() if not key.startswith("FLEETSERVE_")}
    return subprocess.run([sys.executable, "-m", "fleetserve.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, env={**environment, **(env or {})})


def iris_input(module) -> list:
    features = module.InferInput("input-0", list(IRIS_ROWS.shape), "FP32")
    features.set_data_from_numpy(IRIS_ROWS)
    return [features]


def assert_refused(response: httpx.Response, status: int, needs: str) -> None:
    assert response.status_code == status, response.text
    assert needs in response.json()["error"]
    assert ("www-authenticate" in response.headers) == (status == 401)


# --- Admin token --------------------------------------------------------------------------------

def control_calls(repository: Path) -> list[tuple[str, str, str]]:
    """Every control route, in an order in which each succeeds once the token is right."""
    model = MODEL % (repository / "iris")
    return [
        ("POST", "/v2/repository/index", ""),
        ("POST", "/v2/repository/models/iris/unload", ""),
        ("POST", "/v2/repository/models/iris/load", ""),
        ("POST", "/v2/manifests", model),
        ("POST", "/v2/pipelines", PIPELINE),
        ("POST", "/v2/experiments", EXPERIMENT),
        ("DELETE", "/v2/experiments/iris-split", ""),
        ("DELETE", "/v2/pipelines/iris-pipe", ""),
        ("DELETE", "/v2/manifests", model),
    ]


def test_control_routes_need_the_admin_token(admin_server, repository):
    calls = control_calls(repository)
    with httpx.Client(base_url=admin_server.url, timeout=60) as http:
        for method, path, body in calls:
            refused = http.request(method, path, content=body, headers={"x-request-id": "r-1"})
            assert_refused(refused, 401, "needs the admin token")
            assert refused.headers["www-authenticate"].startswith("Bearer") and refused.headers["x-request-id"] == "r-1"
            assert_refused(http.request(method, path, content=body, headers={"Authorization": f"Basic {ADMIN}"}), 401,
                           "malformed Authorization header")
            assert_refused(http.request(method, path, content=body, headers=bearer(WRONG[0])), 403, "needs the admin token")
        # Nothing refused had any effect: iris is still loaded, nothing was applied.
        assert http.get("/v2/models/iris/ready").status_code == 200
        assert http.get("/v2/pipelines").json() == [] and http.get("/v2/models/iris-copy").status_code == 404
        for method, path, body in calls:
            answer = http.request(method, path, content=body, headers=bearer(ADMIN))
            assert answer.status_code == 200, (method, path, answer.text)
        # The scheme is case-insensitive; the keep-alive connection survived every refusal.
        assert http.post("/v2/repository/index", headers={"authorization": f"bearer {ADMIN}"}).status_code == 200
        assert http.get("/v2/pipelines/any/inspect").status_code == 401  # other clients' tensors


def test_inference_and_reads_stay_open_with_only_an_admin_token(admin_server):
    with httpx.Client(base_url=admin_server.url, timeout=30) as http:
        assert http.post("/v2/models/iris/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
        assert http.post("/v2/models/iris/versions/1/infer", json=iris_json()).status_code == 200
        assert http.post("/v2/models/iris/invocations", json={"inputs": IRIS_ROWS.tolist()}).status_code == 404  # not MLflow
        for path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/iris", "/v2/models/iris/ready",
                     "/v2/models/iris/config", "/v2/models/iris/stats", "/v2/pipelines", "/v2/experiments", "/metrics"):
            assert http.get(path).status_code == 200, path
    assert httpx.get(f"http://127.0.0.1:{admin_server.metrics_port}/metrics").status_code == 200
    result = triton_http.InferenceServerClient(admin_server.http_address).infer("iris", iris_input(triton_http))
    assert result.as_numpy("predict").tolist() == [0, 2]
    client = triton_grpc.InferenceServerClient(admin_server.grpc_address)
    assert client.infer("iris", iris_input(triton_grpc)).as_numpy("predict").tolist() == [0, 2]
    assert client.is_server_ready() and client.get_model_metadata("iris").name == "iris"
    with grpc.insecure_channel(admin_server.grpc_address) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert check.status == health_pb2.HealthCheckResponse.SERVING


def grpc_code(call) -> grpc.StatusCode:
    with pytest.raises(InferenceServerException) as raised:
        call()
    return raised.value.status()


def test_grpc_repository_rpcs_need_the_admin_token(admin_server):
    client = triton_grpc.InferenceServerClient(admin_server.grpc_address)
    for call in (client.get_model_repository_index, lambda **kw: client.unload_model("iris", **kw),
                 lambda **kw: client.load_model("iris", **kw)):
        ready = client.is_model_ready("iris")
        assert grpc_code(call) == "StatusCode.UNAUTHENTICATED"
        assert grpc_code(lambda: call(headers={"authorization": f"Bearer {WRONG[1]}"})) == "StatusCode.PERMISSION_DENIED"
        assert grpc_code(lambda: call(headers={"authorization": ADMIN})) == "StatusCode.UNAUTHENTICATED"  # no scheme
        assert client.is_model_ready("iris") == ready  # nothing refused took effect
        call(headers={"authorization": f"Bearer {ADMIN}"})
    assert client.is_model_ready("iris")  # unloaded, then loaded again
    # An RPC the server does not implement still needs the token before it says so.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(admin_server.grpc_address))
    with pytest.raises(grpc.RpcError) as raised:
        stub.SystemSharedMemoryStatus(service_pb2.SystemSharedMemoryStatusRequest())
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_cli_sends_the_admin_token(admin_server, tmp_path):
    url = ("--url", admin_server.url)
    refused = fleetserve("status", *url)  # it lists the repository
    assert refused.returncode == 1 and "needs the admin token" in refused.stdout
    assert "does not open this route" in fleetserve("unload", "iris", *url, "--token", WRONG[1]).stdout
    with_token = {"FLEETSERVE_ADMIN_TOKEN": ADMIN}
    for action in ("unload", "load"):
        done = fleetserve(action, "iris", *url, env=with_token)
        assert done.returncode == 0, done.stdout
    (tmp_path / "token").write_text(f"  {ADMIN}\n")
    status = fleetserve("status", *url, env={"FLEETSERVE_ADMIN_TOKEN_FILE": str(tmp_path / "token")})
    assert status.returncode == 0 and "READY" in status.stdout, status.stdout


def test_tokens_never_reach_logs_or_metrics(admin_server, data_server):
    """After successful and refused calls with every token, right and wrong (the tests before
    made more), neither the logs nor /metrics hold any of them."""
    for server in (admin_server, data_server):
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for token in (ADMIN, DATA, *WRONG):
                http.post("/v2/repository/index", headers=bearer(token))
                http.post("/v2/models/iris/infer", json=iris_json(), headers=bearer(token))
                http.post("/v2/models/no-such-model/infer", json=iris_json(), headers=bearer(token))
                http.post("/v2/repository/models/no-such-model/load", headers=bearer(token))
            exposed = http.get("/metrics", headers=bearer(ADMIN)).text
        exposed += httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
        for token in (ADMIN, DATA, *WRONG):
            assert token not in server.log() and token not in exposed


# --- Data token ---------------------------------------------------------------------------------

def test_data_token_closes_inference(data_server):
    with httpx.Client(base_url=data_server.url, timeout=60) as http:
        assert http.post("/v2/pipelines", content=PIPELINE, headers=bearer(ADMIN)).status_code == 200
        columns = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
        mlflow_body = {"dataframe_split": {"columns": columns, "data": IRIS_ROWS.tolist()}}
        for path, body in (("/v2/models/iris/infer", iris_json()), ("/v2/models/iris/versions/1/infer", iris_json()),
                           ("/v2/pipelines/iris-pipe/infer", iris_json()), ("/v2/models/iris-mlflow/invocations", mlflow_body)):
            assert_refused(http.post(path, json=body), 401, "needs the data token or the admin token")
            assert_refused(http.post(path, json=body, headers=bearer(WRONG[1])), 403, "needs the data token")
            for token in (DATA, ADMIN):
                answer = http.post(path, json=body, headers=bearer(token))
                assert answer.status_code == 200, (path, answer.text)
                document = answer.json()
                assert (document["predictions"] if "predictions" in document else document["outputs"][0]["data"]) == [0, 2]
        # The data token opens inference only; health and metadata need none.
        assert_refused(http.post("/v2/repository/index", headers=bearer(DATA)), 403, "needs the admin token")
        assert_refused(http.get("/v2/pipelines/iris-pipe/inspect", headers=bearer(DATA)), 403, "needs the admin token")
        assert http.get("/v2/pipelines/iris-pipe/inspect", headers=bearer(ADMIN)).status_code == 200
        for path in ("/v2/health/ready", "/v2", "/v2/models/iris", "/v2/models/iris-mlflow/ping", "/metrics"):
            assert http.get(path).status_code == 200, path
        assert http.delete("/v2/pipelines/iris-pipe", headers=bearer(ADMIN)).status_code == 200

    client = triton_http.InferenceServerClient(data_server.http_address)
    with pytest.raises(InferenceServerException, match="needs the data token"):
        client.infer("iris", iris_input(triton_http))
    assert client.infer("iris", iris_input(triton_http), headers=bearer(DATA)).as_numpy("predict").tolist() == [0, 2]
    assert client.is_server_ready() and client.get_model_metadata("iris")["name"] == "iris"


def test_grpc_data_token(data_server):
    client = triton_grpc.InferenceServerClient(data_server.grpc_address)
    assert grpc_code(lambda: client.infer("iris", iris_input(triton_grpc))) == "StatusCode.UNAUTHENTICATED"
    assert grpc_code(lambda: client.infer("iris", iris_input(triton_grpc), headers={"authorization": f"Bearer {WRONG[1]}"})) \
        == "StatusCode.PERMISSION_DENIED"
    for token in (DATA, ADMIN):
        answer = client.infer("iris", iris_input(triton_grpc), headers={"authorization": f"Bearer {token}"})
        assert answer.as_numpy("predict").tolist() == [0, 2]
    assert client.is_server_live() and client.get_model_metadata("iris").name == "iris"
    assert grpc_code(lambda: client.get_model_repository_index(headers={"authorization": f"Bearer {DATA}"})) \
        == "StatusCode.PERMISSION_DENIED"
    assert len(client.get_model_repository_index(headers={"authorization": f"Bearer {ADMIN}"}).models) == 2  # iris, iris-mlflow

    # A stream is refused as a whole, and served with the token.
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(data_server.grpc_address))
    request = service_pb2.ModelInferRequest(model_name="iris")
    request.inputs.add(name="input-0", datatype="FP32", shape=list(IRIS_ROWS.shape))
    request.raw_input_contents.append(IRIS_ROWS.tobytes())
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.ModelStreamInfer(iter([request])))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED and "data token" in raised.value.details()
    answers = list(stub.ModelStreamInfer(iter([request, request]), metadata=(("authorization", f"Bearer {DATA}"),)))
    assert [np.frombuffer(answer.infer_response.raw_output_contents[0], np.int64).tolist() for answer in answers] == [[0, 2]] * 2


def test_cli_infer_sends_the_data_token(data_server):
    body = str(iris_json()).replace("'", '"')
    url = ("--url", data_server.url)
    assert "needs the data token" in fleetserve("infer", "iris", body, *url).stdout
    assert fleetserve("infer", "iris", body, *url, env={"FLEETSERVE_DATA_TOKEN": DATA}).returncode == 0
    assert fleetserve("infer", "iris", body, *url, env={"FLEETSERVE_ADMIN_TOKEN": ADMIN}).returncode == 0  # admin opens it too


# --- Exposure warning and refusals at start -----------------------------------------------------

WARNING = "without an admin token: anyone who can reach"


def test_non_loopback_without_admin_token_warns(tls_server, admin_server, data_server):
    log = tls_server.log()
    line = next(line for line in log.splitlines() if WARNING in line)
    assert "WARNING" in line and "0.0.0.0" in line and "runs the code" in line and "--admin-token" in line
    assert WARNING not in admin_server.log() and WARNING not in data_server.log()  # loopback, or a token


def test_is_loopback():
    from fleetserve.server.security import is_loopback

    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "fe80::1", "example.com", "")))


def test_cert_without_key_refuses_to_start(tmp_path, certificates):
    started = fleetserve("start", str(tmp_path), "--tls-cert", str(certificates.server_cert), "--http-port", str(free_port()))
    assert started.returncode == 1
    assert "TLS needs both --tls-cert (FLEETSERVE_TLS_CERT) and --tls-key (FLEETSERVE_TLS_KEY)" in started.stderr


@pytest.mark.parametrize("settings, message", [
    ({"tls_key": "key.pem"}, "TLS needs both --tls-cert"),
    ({"tls_client_ca": "ca.pem"}, "TLS needs both --tls-cert"),
    ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "cannot load them"),
    ({"admin_token_file": "/nonexistent/token"}, "--admin-token-file (FLEETSERVE_ADMIN_TOKEN_FILE): cannot read"),
    ({"admin_token": "a", "admin_token_file": "/etc/hostname"}, "are both set"),
    ({"data_token": "has space"}, "printable ASCII"),
    ({"data_token_file": "EMPTY"}, "is empty"),
])
def test_bad_security_settings_refuse(settings, message, tmp_path, certificates):
    from fleetserve.server.security import TLS, Tokens
    from fleetserve.settings import ServerSettings

    if settings.get("data_token_file") == "EMPTY":
        (tmp_path / "empty").write_text("\n")
        settings = {"data_token_file": str(tmp_path / "empty")}
    with pytest.raises(SystemExit, match=re.escape(message)):
        Tokens.from_settings(ServerSettings(**settings))
        TLS.from_settings(ServerSettings(**settings))
    assert TLS.from_settings(ServerSettings(tls_client_ca=str(certificates.ca), tls_cert=str(certificates.server_cert),
                                            tls_key=str(certificates.server_key))).client_ca == str(certificates.ca)


# --- TLS ----------------------------------------------------------------------------------------

def test_tls_with_each_client(tls_server, certificates):
    base = f"https://127.0.0.1:{tls_server.http_port}"
    answer = httpx.post(f"{base}/v2/models/iris/infer", json=iris_json(), verify=certificates.context())
    assert answer.json()["outputs"][0]["data"] == [0, 2]
    assert "fleetserve_infer_requests_total" in httpx.get(
        f"https://localhost:{tls_server.metrics_port}/metrics", verify=certificates.context()).text
    client = triton_http.InferenceServerClient(tls_server.http_address, ssl=True, ssl_options={"ca_certs": str(certificates.ca)})
    assert client.infer("iris", iris_input(triton_http)).as_numpy("predict").tolist() == [0, 2]
    client = triton_grpc.InferenceServerClient(tls_server.grpc_address, ssl=True, root_certificates=str(certificates.ca))
    assert client.infer("iris", iris_input(triton_grpc)).as_numpy("predict").tolist() == [0, 2]


def test_plain_text_and_untrusted_clients_are_refused(tls_server):
    for port in (tls_server.http_port, tls_server.metrics_port):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/v2/health/live")
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # the system's CAs do not know ours
            httpx.get(f"https://127.0.0.1:{port}/v2/health/live")
    client = triton_grpc.InferenceServerClient(tls_server.grpc_address)
    assert grpc_code(client.is_server_live) == "StatusCode.UNAVAILABLE"


def test_cli_with_the_ca(tls_server, certificates):
    url = ("--url", f"https://127.0.0.1:{tls_server.http_port}")
    assert fleetserve("status", *url, "--ca", str(certificates.ca)).returncode == 0
    refused = fleetserve("status", *url)
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr


def test_mutual_tls(mtls_server, certificates):
    for port in (mtls_server.http_port, mtls_server.metrics_port):
        path = "/metrics" if port == mtls_server.metrics_port else "/v2/health/live"
        for context in (certificates.context(), certificates.context(stranger=True)):
            with pytest.raises(httpx.TransportError):
                httpx.get(f"https://127.0.0.1:{port}{path}", verify=context)
        assert httpx.get(f"https://127.0.0.1:{port}{path}", verify=certificates.context(client=True)).status_code == 200

    http = triton_http.InferenceServerClient(mtls_server.http_address, ssl=True, ssl_options={
        "ca_certs": str(certificates.ca), "certfile": str(certificates.client_cert), "keyfile": str(certificates.client_key)})
    assert http.infer("iris", iris_input(triton_http)).as_numpy("predict").tolist() == [0, 2]
    anonymous = triton_grpc.InferenceServerClient(mtls_server.grpc_address, ssl=True, root_certificates=str(certificates.ca))
    assert grpc_code(anonymous.is_server_live) == "StatusCode.UNAVAILABLE"
    client = triton_grpc.InferenceServerClient(mtls_server.grpc_address, ssl=True, root_certificates=str(certificates.ca),
                                               private_key=str(certificates.client_key),
                                               certificate_chain=str(certificates.client_cert))
    assert client.infer("iris", iris_input(triton_grpc)).as_numpy("predict").tolist() == [0, 2]

    url = ("--url", f"https://127.0.0.1:{mtls_server.http_port}")
    assert fleetserve("status", *url, "--ca", str(certificates.ca)).returncode != 0
    assert fleetserve("status", *url, "--cert", str(certificates.client_cert), "--key", str(certificates.client_key),
                      env={"FLEETSERVE_CA": str(certificates.ca)}).returncode == 0
    assert fleetserve("status", *url, env={"FLEETSERVE_CA": str(certificates.ca), "FLEETSERVE_CLIENT_CERT": str(certificates.client_cert),
                                           "FLEETSERVE_CLIENT_KEY": str(certificates.client_key)}).returncode == 0


def test_sigterm_does_not_wait_for_idle_tls_clients(tls_server, certificates):
    """A pooled client holds an idle keep-alive connection and reads nothing: closing TLS politely
    would wait 30 s for its close_notify. The server exits as fast as without TLS. Last: it stops
    the server."""
    import socket

    context = certificates.context()
    with context.wrap_socket(socket.create_connection(("127.0.0.1", tls_server.http_port)), server_hostname="127.0.0.1") as idle:
        idle.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert tls_server.stop(timeout=60) == 0
        assert time.monotonic() - started < 15, tls_server.log()
