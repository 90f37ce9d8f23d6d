"""Safe code loading, with the server as a process, moto's S3 and a local HTTP server.

Two servers, one per configuration: "guarded" (an allow list, a 64 KiB download cap, remote code
refused) and "open" (no allow list, --allow-remote-code, a 3 s download deadline). Remote custom
code is refused unless allowed; storage outside the allow list (and /dev, /proc, /sys always) is
refused with 400; downloads keep to the allowed prefixes across redirects, time out and stop at
the cap; archives unpack with unsafe members refused; a failed download leaves nothing in the
cache; credentials written in a storageUri show nowhere.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import stat
import tarfile
import threading
import time
import uuid
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from conftest import BUCKET, ECHO_MODEL, http_client, iris_json, repository_index, running_server, write_settings
from fleetserve.errors import ModelLoadError
from fleetserve.runtime.artifacts import _unpack
from fleetserve.runtimes import resolve_runtime
from fleetserve.settings import ModelSettings

MAX_DOWNLOAD = 64 * 1024
BIG = 200 * 1024  # past the guarded server's cap
SECRET = "sEcReT-hunter2"
KEY_ID = "AKIAFAKEKEYID"
# A runtime file that must never be imported: it would shadow the builtin sklearn runtime.
SHADOW = "raise RuntimeError('the artifact shadowed a builtin runtime')\n"


def iris_artifact(folder: Path) -> Path:
    """An MLServer artifact folder: an iris classifier and its model-settings.json."""
    folder.mkdir(parents=True, exist_ok=True)
    features, labels = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(features, labels), folder / "model.joblib")
    write_settings(folder, {"implementation": "sklearn", "parameters": {"uri": "./model.joblib"}})
    return folder


def custom_artifact(folder: Path) -> Path:
    """A custom runtime: its code ships in the folder."""
    write_settings(folder, {"implementation": "echo_model.Echo"})
    (folder / "echo_model.py").write_text(ECHO_MODEL)
    return folder


def tar_member(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if data else None)


def build_archives(folder: Path, iris: Path) -> None:
    """A good model as .tar.gz and .zip, and archives whose members would land outside their folder."""
    folder.mkdir()
    with tarfile.open(folder / "good.tar.gz", "w:gz") as tar:
        for path in iris.iterdir():
            tar.add(path, arcname=path.name)
    with zipfile.ZipFile(folder / "good.zip", "w") as zipped:
        for path in iris.iterdir():
            zipped.write(path, path.name)
    unsafe_tars = {
        "traversal.tar.gz": dict(name="../escaped.txt", data=b"x"),
        "absolute.tar": dict(name="/tmp/escaped.txt", data=b"x"),
        "symlink.tar.gz": dict(name="link", type=tarfile.SYMTYPE, linkname="../../../../etc/passwd"),
        "hardlink.tar": dict(name="hard", type=tarfile.LNKTYPE, linkname="../escaped.txt"),
        "device.tar": dict(name="zero", type=tarfile.CHRTYPE, devmajor=1, devminor=5),
        "bomb.tar.gz": dict(name="zeros.bin", data=bytes(BIG)),  # a few hundred bytes packed
    }
    for name, member in unsafe_tars.items():
        with tarfile.open(folder / name, "w:gz" if name.endswith("gz") else "w") as tar:
            tar.add(iris / "model.joblib", arcname="model.joblib")
            tar_member(tar, **member)
    with tarfile.open(folder / "chained-links.tar", "w") as tar:  # a/b/c -> .., a/b/c/d -> ../..: d is outside
        tar_member(tar, "a/b", type=tarfile.DIRTYPE)
        tar_member(tar, "a/b/c", type=tarfile.SYMTYPE, linkname="..")
        tar_member(tar, "a/b/c/d", type=tarfile.SYMTYPE, linkname="../..")
        tar_member(tar, "a/b/c/d/escaped.txt", b"x")
    for name, member in {"traversal.zip": "../escaped.txt", "absolute.zip": "/escaped.txt"}.items():
        with zipfile.ZipFile(folder / name, "w") as zipped:
            zipped.writestr(zipfile.ZipInfo(member), b"x")  # ZipInfo: written as named, not sanitised
    with zipfile.ZipFile(folder / "symlink.zip", "w") as zipped:
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zipped.writestr(link, "/etc/passwd")


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder, plus redirects, a stalled body, a trickled body and a body of no announced size."""

    def log_message(self, *args):
        pass

    def redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self):
        path = self.path
        try:
            if path.startswith("/www/redirect-in/"):  # within the allowed prefix
                return self.redirect("/www/iris/model.joblib")
            if path.startswith("/www/redirect-out/"):  # the same file, through another host name
                return self.redirect(f"http://localhost:{self.server.server_address[1]}/www/iris/model.joblib")
            if path.startswith("/www/loop/"):
                return self.redirect(f"/www/loop/{int(path.rsplit('/', 1)[1]) + 1}")
            if path.startswith(("/www/stall/", "/www/trickle/")):
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"start")
                self.wfile.flush()
                for _ in range(100):  # 20 s at most, then the connection closes
                    time.sleep(0.2)
                    if path.startswith("/www/trickle/"):
                        self.wfile.write(b".")
                        self.wfile.flush()
                return
            if path.startswith("/www/unsized/"):  # no Content-Length: the body ends when the connection does
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                for _ in range(BIG // 8192):
                    self.wfile.write(bytes(8192))
                self.close_connection = True
                return
        except OSError:  # the client gave up (a broken pipe, a reset), as it should
            return
        super().do_GET()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("safe-loading")
    iris = iris_artifact(root / "www" / "iris")
    (root / "www" / "big").mkdir()
    (root / "www" / "big" / "model.joblib").write_bytes(bytes(BIG))
    build_archives(root / "www" / "archives", iris)
    iris_artifact(root / "outside" / "iris")
    custom_artifact(root / "allowed" / "custom")
    return root


@pytest.fixture(scope="module")
def web(files):
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(files)))
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def upload(s3, folder: Path, prefix: str) -> str:
    for path in folder.rglob("*"):
        if path.is_file():
            s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.relative_to(folder).as_posix()}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def guarded(files, web, s3, tmp_path_factory):
    """An allow list (HTTP under /www/, S3 under models/safe, a local folder), a 64 KiB cap, no remote code.
    Its repository holds a custom runtime: local code."""
    repository = tmp_path_factory.mktemp("guarded-repo")
    custom_artifact(repository / "echo")
    cache = tmp_path_factory.mktemp("guarded-cache")
    env = {
        "FLEETSERVE_CACHE_DIR": str(cache),
        "FLEETSERVE_ALLOWED_STORAGE": f"{web.base}/www/, s3://{BUCKET}/safe ,{files / 'allowed'}",
        "FLEETSERVE_MAX_DOWNLOAD_SIZE": "64Ki",
    }
    with running_server(repository, tmp_path_factory.mktemp("logs") / "guarded.log", env) as server:
        server.cache = cache
        yield server


@pytest.fixture(scope="module")
def open_server(s3, tmp_path_factory):
    """No allow list; flags: --allow-remote-code and a 3 s download deadline. Its repository has a
    model whose model-settings.json names /proc/self/environ as its uri."""
    repository = tmp_path_factory.mktemp("open-repo")
    write_settings(repository / "proc-uri", {"implementation": "sklearn", "parameters": {"uri": "/proc/self/environ"}})
    cache = tmp_path_factory.mktemp("open-cache")
    with running_server(repository, tmp_path_factory.mktemp("logs") / "open.log", {"FLEETSERVE_CACHE_DIR": str(cache)},
                        args=("--allow-remote-code", "--download-timeout", "3")) as server:
        server.cache = cache
        yield server


def manifest(name: str, uri: str, requirements: tuple[str, ...] = ("sklearn",)) -> str:
    return json.dumps({"apiVersion": "mlops.seldon.io/v1alpha1", "kind": "Model", "metadata": {"name": name},
                       "spec": {"storageUri": uri, "requirements": list(requirements)}})


def apply(server, name: str, uri: str, requirements: tuple[str, ...] = ("sklearn",)):
    with http_client(server) as http:
        return http.post("/v2/manifests", content=manifest(name, uri, requirements))


def refused(server, name: str, uri: str, fragment: str, requirements: tuple[str, ...] = ("sklearn",)) -> str:
    """Applies a manifest that must fail with 400 naming `fragment`, leaving the cache as it was."""
    before = sorted(os.listdir(server.cache))
    answer = apply(server, name, uri, requirements)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert fragment in error, error
    assert sorted(os.listdir(server.cache)) == before, "a failed download left something in the cache"
    return error


def serves_iris(server, name: str) -> None:
    with http_client(server) as http:
        answer = http.post(f"/v2/models/{name}/infer", json=iris_json())
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [0, 2]


def serves_echo(server, name: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [2], "data": [4, 2]}]}
    with http_client(server) as http:
        answer = http.post(f"/v2/models/{name}/infer", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["outputs"][0]["data"] == [4, 2]


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


# --- Remote code ------------------------------------------------------------------------------


def test_remote_custom_code_is_refused(guarded, s3, files):
    uri = upload(s3, files / "allowed" / "custom", fresh("safe/custom"))
    error = refused(guarded, "remote-custom", uri, "--allow-remote-code", requirements=("python",))
    assert "came with its artifacts from remote storage" in error and uri in error
    with http_client(guarded) as http:
        entry = repository_index(http)["remote-custom"]
    assert entry["state"] == "UNAVAILABLE" and "--allow-remote-code" in entry["reason"]


def test_remote_custom_code_loads_with_allow_remote_code(open_server, s3, files):
    uri = upload(s3, files / "allowed" / "custom", fresh("open/custom"))
    answer = apply(open_server, "remote-custom", uri, requirements=("python",))
    assert answer.status_code == 200, answer.text
    serves_echo(open_server, "remote-custom")
    assert "--allow-remote-code without --allowed-storage" in open_server.log()


def test_local_custom_code_still_loads(guarded, files):
    serves_echo(guarded, "echo")  # from the repository
    answer = apply(guarded, "local-custom", str(files / "allowed" / "custom"), requirements=("python",))
    assert answer.status_code == 200, answer.text
    serves_echo(guarded, "local-custom")


def test_builtin_runtime_from_remote_storage_loads_and_is_never_shadowed(guarded, s3, files, tmp_path):
    """Pickles are trusted as documented; a file in the artifacts named like a builtin runtime's
    module is not imported in its place."""
    artifact = iris_artifact(tmp_path / "iris")
    (artifact / "fleetserve" / "runtimes").mkdir(parents=True)
    (artifact / "fleetserve" / "runtimes" / "sklearn.py").write_text(SHADOW)
    uri = upload(s3, artifact, fresh("safe/iris"))
    answer = apply(guarded, "remote-iris", uri)
    assert answer.status_code == 200, answer.text
    serves_iris(guarded, "remote-iris")


def test_code_in_the_download_cache_is_remote_code(tmp_path):
    """A local storageUri that names a cache entry (downloaded earlier for a builtin runtime) is remote code too."""
    downloads = tmp_path / "cache"
    entry = custom_artifact(downloads / "s3___models_x-12345678")
    settings = ModelSettings(name="m", folder=entry, implementation="echo_model.Echo", uri=str(entry))
    with pytest.raises(ModelLoadError, match="--allow-remote-code"):
        resolve_runtime(settings, ["python"], downloads)
    assert resolve_runtime(settings, ["python"], None).__name__ == "Echo"
    local = custom_artifact(tmp_path / "local")
    assert resolve_runtime(ModelSettings(name="m", folder=local, implementation="echo_model.Echo"), [], downloads)


# --- Allowed storage --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["outside", "dotdot", "bucket-boundary", "other-host", "path-boundary"])
def test_storage_outside_the_allow_list_is_refused(guarded, web, s3, files, case):
    uri = {
        "outside": str(files / "outside" / "iris"),
        "dotdot": f"{files / 'allowed'}/../outside/iris",
        "bucket-boundary": upload(s3, files / "outside" / "iris", "safe-evil/iris"),  # s3://models/safe admits only safe/...
        "other-host": f"http://localhost:{web.server_address[1]}/www/iris",
        "path-boundary": f"{web.base}/www-private/iris",
    }[case]
    error = refused(guarded, f"outside-{case}", uri, "is outside the allowed storage")
    assert f"{web.base}/www/" in error and "--allowed-storage" in error, "the error names the prefixes"


@pytest.mark.parametrize("uri", ["/proc/self", "/dev/zero", "file:///sys/kernel", "/dev/../proc/self/root/etc"])
def test_system_paths_are_always_refused(guarded, open_server, uri):
    for server in (guarded, open_server):
        refused(server, "system", uri, "models never come from /dev, /proc or /sys")


def test_system_path_in_a_repository_model_settings(open_server):
    with http_client(open_server) as http:
        entry = repository_index(http)["proc-uri"]
    assert entry["state"] == "UNAVAILABLE" and "/dev, /proc or /sys" in entry["reason"]


def test_artifact_settings_cannot_point_outside_the_artifacts(guarded, s3, tmp_path):
    artifact = iris_artifact(tmp_path / "escape")
    write_settings(artifact, {"implementation": "sklearn", "parameters": {"uri": "/etc/hostname"}})
    refused(guarded, "escape", upload(s3, artifact, fresh("safe/escape")), "points outside them")


# --- HTTP(S) downloads ------------------------------------------------------------------------


def test_redirects_are_followed_only_within_the_allowed_prefixes(guarded, web):
    answer = apply(guarded, "redirected", f"{web.base}/www/redirect-in/model.joblib")
    assert answer.status_code == 200, answer.text
    serves_iris(guarded, "redirected")
    error = refused(guarded, "redirected-out", f"{web.base}/www/redirect-out/model.joblib", "leaves the allowed storage")
    assert f"http://localhost:{web.server_address[1]}/www/iris/model.joblib" in error


def test_redirects_are_capped_without_an_allow_list(open_server, web):
    refused(open_server, "loop", f"{web.base}/www/loop/0", "more than 5 redirects")


@pytest.mark.parametrize("route, fragment", [("stall", "timed out"), ("trickle", "took longer than --download-timeout (3 s)")])
def test_slow_servers_time_out(open_server, web, route, fragment):
    started = time.monotonic()
    refused(open_server, f"slow-{route}", f"{web.base}/www/{route}/model.joblib", fragment)
    assert time.monotonic() - started < 15


@pytest.mark.parametrize("source", ["content-length", "unsized", "s3"])
def test_downloads_past_the_size_cap_are_refused(guarded, web, s3, files, source):
    uri = {
        "content-length": f"{web.base}/www/big/model.joblib",
        "unsized": f"{web.base}/www/unsized/model.joblib",
        "s3": upload(s3, files / "www" / "big", fresh("safe/big")),
    }[source]
    refused(guarded, f"big-{source}", uri, f"larger than --max-download-size ({MAX_DOWNLOAD:,} bytes)")


# --- Archives ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["good.tar.gz", "good.zip"])
def test_archives_unpack_into_the_cache(guarded, web, name):
    model = "archived-" + name.replace(".", "-")
    answer = apply(guarded, model, f"{web.base}/www/archives/{name}")
    assert answer.status_code == 200, answer.text
    serves_iris(guarded, model)
    entry = next(path for path in guarded.cache.iterdir() if name.replace(".", "_") in path.name.replace(".", "_"))
    assert sorted(os.listdir(entry)) == ["model-settings.json", "model.joblib"], "unpacked, the archive not kept"


UNSAFE_TARS = [
    ("traversal.tar.gz", "'../escaped.txt': it would land outside the folder"),
    ("absolute.tar", "'/tmp/escaped.txt': an absolute path"),
    ("symlink.tar.gz", "'link': a link that points outside the folder"),
    ("hardlink.tar", "'hard': a link that points outside the folder"),
    ("device.tar", "'zero': a device or other special file"),
    ("bomb.tar.gz", f"unpacks to more than --max-download-size ({MAX_DOWNLOAD:,} bytes)"),
]


@pytest.mark.parametrize("name, fragment", [
    *UNSAFE_TARS,
    ("chained-links.tar", "has an unsafe member 'a/b/c/d"),
    ("traversal.zip", "a member outside its folder: '../escaped.txt'"),
    ("absolute.zip", "a member outside its folder: '/escaped.txt'"),
    ("symlink.zip", "has a link: 'link'"),
])
def test_unsafe_archives_are_refused(guarded, web, files, name, fragment):
    refused(guarded, "unsafe-" + name.replace(".", "-"), f"{web.base}/www/archives/{name}", fragment)
    assert not list(files.parent.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()


NO_LINKS = "a link (refused where this Python's tarfile has no extraction filters)"


@pytest.mark.parametrize("name, fragment", [
    ("good.tar.gz", None),
    *[(name, NO_LINKS if "link" in name else fragment) for name, fragment in UNSAFE_TARS],
    ("chained-links.tar", NO_LINKS),
])
def test_without_tarfiles_filters_the_same_members_are_refused(files, tmp_path, monkeypatch, name, fragment):
    """A Python before 3.11.4 (Debian 12's 3.11.2) has no tarfile filters: the same refusals hold,
    and every link is refused (a chain of them, each harmless alone, would lead outside)."""
    monkeypatch.delattr(tarfile, "data_filter")
    target = tmp_path / "unpacked"
    if fragment is None:
        _unpack(files / "www" / "archives" / name, target, MAX_DOWNLOAD)
        assert sorted(os.listdir(target)) == ["model-settings.json", "model.joblib"]
        assert all(oct(path.stat().st_mode & 0o777) == "0o644" for path in target.iterdir())
        return
    with pytest.raises(Exception, match=re.escape(fragment)):
        _unpack(files / "www" / "archives" / name, target, MAX_DOWNLOAD)
    assert not list(tmp_path.rglob("escaped.txt")) and not Path("/tmp/escaped.txt").exists()


# --- Credentials ------------------------------------------------------------------------------


def test_credentials_in_a_storage_uri_show_nowhere(guarded, web):
    host = web.base.removeprefix("http://")
    working = f"http://{KEY_ID}:{SECRET}@{host}/www/iris"
    answer = apply(guarded, "with-credentials", working)
    assert answer.status_code == 200, answer.text
    serves_iris(guarded, "with-credentials")
    errors = [
        refused(guarded, "s3-credentials", f"s3://{KEY_ID}:{SECRET}@{BUCKET}/safe/none", "cannot download"),
        refused(guarded, "http-credentials", f"http://{KEY_ID}:{SECRET}@{host}/www/missing", "cannot download"),
    ]
    assert "s3://***@models/safe/none" in errors[0] and f"http://***@{host}/www/missing" in errors[1]
    with http_client(guarded) as http:
        index = http.post("/v2/repository/index").text
        metrics = http.get("/metrics").text
    shown = {"errors": "\n".join(errors), "index": index, "metrics": metrics, "log": guarded.log(),
             "cache": "\n".join(os.listdir(guarded.cache))}
    assert "s3-credentials" in index and "http-credentials" in index
    for where, text in shown.items():
        assert SECRET not in text and KEY_ID not in text, f"the credentials show in the {where}"
