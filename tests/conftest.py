"""The server under test runs as a real process on loopback, over a repository of real models:
the README's examples plus models trained here for the cases they do not cover."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
import xgboost
from sklearn.datasets import load_diabetes, load_iris
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression, LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024
# Small enough that the oversized-body test is quick, large enough for a >4 MiB gRPC message.
MAX_MESSAGE_SIZE = 16 * MIB

ECHO_MODEL = '''
from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Echo(Runtime):
    """Returns every input unchanged, renamed output-N."""

    def predict(self, request):
        outputs = [Tensor(f"output-{i}", t.data) for i, t in enumerate(request.inputs)]
        return self.response(outputs, request)
'''

FAILING_MODEL = '''
from fleetserve.runtime.base import Runtime


class Failing(Runtime):
    def predict(self, request):
        raise RuntimeError("this model always fails")
'''

CODEC_MODEL = '''
from fleetserve.codecs import decode_tensor, encode_tensor
from fleetserve.runtime.base import Runtime


class CodecProbe(Runtime):
    """Decodes each input by its content type, re-encodes it, and says what Python type it saw."""

    def predict(self, request):
        outputs = []
        for tensor in request.inputs:
            value = decode_tensor(tensor)
            outputs.append(encode_tensor(tensor.name, value, tensor.content_type))
            first = value[0] if len(value) else None
            outputs.append(encode_tensor(f"{tensor.name}-type", [type(first).__name__]))
        return self.response(outputs, request)
'''

MISBEHAVING_MODEL = '''
import numpy as np

from fleetserve.runtime.base import Runtime
from fleetserve.types import Tensor


class Misbehaving(Runtime):
    """Misbehaves as its input's name says."""

    def predict(self, request):
        how = request.inputs[0].name
        if how == "exit":
            raise SystemExit("the model called exit()")
        if how == "list":
            return self.response([Tensor("out", [1.0])], request)
        if how == "parameters":  # a response parameter no encoder can write
            response = self.response([Tensor("out", np.ones(1))], request)
            response.parameters["when"] = object()
            return response
        if how == "structured":  # a parameter with structure, as a detector's meta may hold
            response = self.response([Tensor("out", np.ones(1))], request)
            response.parameters["window"] = {"sizes": [10, 20], "online": True}
            return response
        if how == "complex":
            return self.response([Tensor("out", np.ones(1, dtype=complex))], request)
        if how == "big-endian":
            return self.response([Tensor("out", np.array([1.5, -2.5], dtype=">f8"))], request)
        return None
'''

PACKAGED_MODEL = '''
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fleetserve.codecs import encode_tensor
from fleetserve.runtime.base import Runtime

from . import helpers


@dataclass
class Answer:  # a dataclass in a model module needs the module registered in sys.modules
    value: str


class Packaged(Runtime):
    def predict(self, request):
        return self.response([encode_tensor("which", [Answer(helpers.WHICH).value])], request)
'''

BROKEN_LOAD_MODEL = '''
from fleetserve.runtime.base import Runtime


class BrokenLoad(Runtime):
    def load(self):
        raise OSError("weights file is corrupt")
'''


def write_settings(folder: Path, settings: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model-settings.json").write_text(json.dumps(settings))


def build_repository(repo: Path) -> Path:
    """The README's example models, plus models trained here for the cases they leave out."""
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True)
    for example in ("iris", "iris-xgboost", "text-stats"):
        shutil.copytree(ROOT / "model_repo" / example, repo / example, ignore=shutil.ignore_patterns("__pycache__"))

    features, labels = load_iris(return_X_y=True)
    diabetes_x, diabetes_y = load_diabetes(return_X_y=True)

    # A regressor: it has no predict_proba.
    write_settings(repo / "diabetes", {"implementation": "mlserver_sklearn.SKLearnModel"})
    joblib.dump(LinearRegression().fit(diabetes_x, diabetes_y), repo / "diabetes" / "model.joblib")

    # predict_proba as the default output, pickled rather than joblib'd.
    write_settings(repo / "iris-proba", {"implementation": "sklearn", "parameters": {"extra": {"predict_fn": "predict_proba"}}})
    joblib.dump(LogisticRegression(max_iter=1000).fit(features, labels), repo / "iris-proba" / "model.pkl")

    # A transformer: no predict, so its one method is its default output.
    write_settings(repo / "iris-pca", {"implementation": "sklearn"})
    joblib.dump(PCA(n_components=2).fit(features), repo / "iris-pca" / "model.joblib")

    # Two versions sharing one model-settings.json; version 2 is the default.
    write_settings(repo / "versioned", {"implementation": "sklearn", "keep_me": {"unknown": True}})
    for version, model in ((1, LogisticRegression(max_iter=1000)), (2, LinearRegression())):
        (repo / "versioned" / str(version)).mkdir()
        joblib.dump(model.fit(features, labels), repo / "versioned" / str(version) / "model.joblib")

    # An xgboost regressor in UBJSON, and a classifier under a .bst name, picked by `requirements`.
    write_settings(repo / "diabetes-xgb", {"implementation": "xgboost", "parameters": {"uri": "./model.ubj"}})
    xgboost.XGBRegressor(n_estimators=10).fit(diabetes_x, diabetes_y).save_model(repo / "diabetes-xgb" / "model.ubj")
    write_settings(repo / "iris-xgb-bst", {"requirements": ["xgboost"]})
    booster = xgboost.XGBClassifier(n_estimators=10).fit(features, labels).get_booster()
    (repo / "iris-xgb-bst" / "model.bst").write_bytes(booster.save_raw("ubj"))

    write_settings(repo / "echo", {"implementation": "echo_model.Echo"})
    (repo / "echo" / "echo_model.py").write_text(ECHO_MODEL)
    write_settings(repo / "codec", {"implementation": "codec_model.CodecProbe"})
    (repo / "codec" / "codec_model.py").write_text(CODEC_MODEL)
    write_settings(repo / "misbehaving", {"implementation": "misbehaving_model.Misbehaving"})
    (repo / "misbehaving" / "misbehaving_model.py").write_text(MISBEHAVING_MODEL)
    # Two models, each with its own `helpers.py`: each must see its own.
    for which in ("a", "b"):
        write_settings(repo / f"packaged-{which}", {"implementation": "model.Packaged"})
        (repo / f"packaged-{which}" / "model.py").write_text(PACKAGED_MODEL)
        (repo / f"packaged-{which}" / "helpers.py").write_text(f"WHICH = {which!r}\n")
    write_settings(repo / "failing", {"implementation": "failing_model.Failing"})
    (repo / "failing" / "failing_model.py").write_text(FAILING_MODEL)

    # Models that cannot load: the server must keep serving the others and say why.
    (repo / "bad-json").mkdir()
    (repo / "bad-json" / "model-settings.json").write_text("{not json")
    write_settings(repo / "bad-load", {"implementation": "broken_model.BrokenLoad"})
    (repo / "bad-load" / "broken_model.py").write_text(BROKEN_LOAD_MODEL)
    write_settings(repo / "needs-gpu", {"requirements": ["sklearn", "tensorrt"]})
    return repo


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this run: the kernel may offer a port it
    just gave, so three asked for in a row could be the same one."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path
    log_path: Path
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def spawn_server(repository: Path, log_path: Path, ports: list[int], extra_env: dict[str, str] | None = None,
                 ports_in_env: bool = False, args: tuple[str, ...] = (), launcher: tuple[str, ...] = (),
                 host: str = "127.0.0.1") -> Server:
    """Starts `fleetserve start` (with `args`) without waiting; ports as flags, or as FLEETSERVE_* variables.
    `launcher` runs it (`ip netns exec NS`, say), and `host` is where it is reached."""
    env = {**os.environ, "FLEETSERVE_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_SIZE), **(extra_env or {})}
    command = [*launcher, sys.executable, "-m", "fleetserve.cli", "start", str(repository), *args]
    names = ("http-port", "grpc-port", "metrics-port")
    if ports_in_env:
        env.update({f"FLEETSERVE_{name.replace('-', '_').upper()}": str(port) for name, port in zip(names, ports)})
    else:
        command += [item for name, port in zip(names, ports) for item in (f"--{name}", str(port))]
    process = subprocess.Popen(command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return Server(process, *ports, repository, log_path, host)


def start_server(repository: Path, log_path: Path, extra_env: dict[str, str] | None = None,
                 ports_in_env: bool = False, args: tuple[str, ...] = (), launcher: tuple[str, ...] = (),
                 host: str = "127.0.0.1") -> Server:
    """A server that answers ready, on fresh ports."""
    ports = [free_port() for _ in range(3)]
    return wait_ready(spawn_server(repository, log_path, ports, extra_env, ports_in_env, args, launcher, host))


def wait_ready(server: Server, url: str | None = None, **httpx_options) -> Server:
    """The server once `url` (its readiness, by default) answers 200; killed if it never does."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(url or f"{server.url}/v2/health/ready", timeout=1, **httpx_options).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.process.kill()
    raise RuntimeError(f"server did not become ready:\n{server.log()}")


@contextlib.contextmanager
def running_server(repository: Path, log_path: Path, extra_env: dict[str, str] | None = None,
                   args: tuple[str, ...] = ()):
    """A server for the block; it must stop cleanly (exit 0) on SIGTERM afterwards."""
    server = start_server(repository, log_path, extra_env, args=args)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            assert server.stop() == 0, server.log()


@contextlib.contextmanager
def http_client(server: Server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


@contextlib.contextmanager
def manifests_applied(http: httpx.Client, manifests: str):
    """Manifests applied for the block's length, deleted after."""
    applied = http.post("/v2/manifests", content=manifests)
    assert applied.status_code == 200, applied.text
    try:
        yield
    finally:
        http.request("DELETE", "/v2/manifests", content=manifests)


def repository_index(http: httpx.Client) -> dict[str, dict]:
    """The repository index by model name."""
    return {entry["name"]: entry for entry in http.post("/v2/repository/index").json()}


def index_without(module: str, models: list[Path], tmp_path: Path) -> dict[str, dict]:
    """The repository index of a server serving copies of `models` with `module` unimportable, as
    if it were not installed."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / f"{module}.py").write_text(f"raise ImportError(\"No module named '{module}'\")\n")
    for folder in models:
        shutil.copytree(folder, tmp_path / "repo" / folder.name)
    with running_server(tmp_path / "repo", tmp_path / "server.log", {"PYTHONPATH": str(blocked)}) as server, \
            http_client(server) as client:
        return repository_index(client)


BUCKET = "models"


@pytest.fixture(scope="session")
def s3():
    """moto's S3 server on a free loopback port, with the environment pointing boto/s3fs at it
    (botocore reads AWS_ENDPOINT_URL_S3 whenever it makes a client; servers started from the tests
    inherit it)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.setenv(name, "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        client.endpoint = endpoint
        yield client
    server.stop()


@pytest.fixture(scope="session")
def rest_routes(tmp_path_factory) -> list:
    """The routes of the REST app, built in this process: once, since a server registers its metrics."""
    from fleetserve.server.app import FleetServer
    from fleetserve.server.rest import build_rest_app
    from fleetserve.settings import ServerSettings

    return build_rest_app(FleetServer(ServerSettings(model_repository=str(tmp_path_factory.mktemp("no-models"))))).app.routes


@pytest.fixture(scope="session")
def repository(tmp_path_factory) -> Path:
    return build_repository(tmp_path_factory.mktemp("model_repo"))


@pytest.fixture(scope="session")
def server(repository, tmp_path_factory):
    with running_server(repository, tmp_path_factory.mktemp("logs") / "server.log") as server:
        yield server


@pytest.fixture
def http(server):
    with http_client(server) as client:
        yield client


def x_body(x: np.ndarray, **extra) -> dict:
    """A V2 JSON request with one FP64 input named `x`."""
    return {"inputs": [{"name": "x", "datatype": "FP64", "shape": list(x.shape), "data": x.ravel().tolist()}], **extra}


def outputs_of(response: httpx.Response) -> dict[str, list]:
    """A successful JSON answer's outputs, by name."""
    assert response.status_code == 200, response.text
    return {output["name"]: output["data"] for output in response.json()["outputs"]}


IRIS_ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def iris_json(rows: np.ndarray = IRIS_ROWS, **extra) -> dict:
    return {"inputs": [{"name": "input-0", "datatype": "FP32", "shape": list(rows.shape), "data": rows.tolist()}], **extra}
