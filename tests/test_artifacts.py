"""The artifact cache against real servers on loopback, no mocks: moto's S3 server and Python's
own HTTP server (fsspec lists its folders from the index page's links).

How s3:// is pointed at a local server: fsspec's `FSSPEC_S3_ENDPOINT_URL` works, but fsspec reads
FSSPEC_* variables once, when it is first imported; so it belongs in the server's environment at
start (test_fsspec_endpoint_variable_in_a_new_process checks exactly that), and setting it later in
a running process does nothing unless `fsspec.config.set_conf_env(fsspec.config.conf)` runs again.
botocore's `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL` for every AWS service) is read whenever a
client is made, so the in-process fixture below uses that.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import BUCKET, free_port
from fleetserve.errors import ModelLoadError
from fleetserve.runtime import artifacts
from fleetserve.runtime.artifacts import ArtifactCache, is_remote

# A small model folder: two files, one in a sub-folder.
MODEL = {"model.joblib": b"\x00joblib-bytes\xff", "sub/meta.json": b'{"classes": 3}'}
SINGLE = b"\x01single-file\xfe"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- S3 (the `s3` fixture, moto on loopback, is in conftest.py) ---------------------------------


def upload_model(s3) -> str:
    """Uploads MODEL under a fresh prefix (the S3 server is shared); returns the folder's URI."""
    prefix = f"{uuid.uuid4().hex[:8]}/iris"
    for name, data in MODEL.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)
    return f"s3://{BUCKET}/{prefix}"


def remove_remote(s3, uri: str) -> None:
    prefix = uri.removeprefix(f"s3://{BUCKET}/")
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)


def test_s3_folder(s3, tmp_path):
    uri = upload_model(s3)
    path = ArtifactCache(tmp_path).fetch(uri)
    assert path.parent == tmp_path and path.name.startswith("s3___models_")
    assert tree(path) == MODEL


def test_s3_single_file(s3, tmp_path):
    key = f"{uuid.uuid4().hex[:8]}/model.bin"
    s3.put_object(Bucket=BUCKET, Key=key, Body=SINGLE)
    path = ArtifactCache(tmp_path).fetch(f"s3://{BUCKET}/{key}")
    assert path.name == "model.bin" and path.read_bytes() == SINGLE
    assert path.parent.parent == tmp_path and list(path.parent.iterdir()) == [path]


def test_second_fetch_and_restart_use_the_cached_copy(s3, tmp_path):
    uri = upload_model(s3)
    first = ArtifactCache(tmp_path).fetch(uri)
    remove_remote(s3, uri)
    assert ArtifactCache(tmp_path).fetch(uri) == first  # a new cache on the same root: a restart
    assert tree(first) == MODEL


def test_trailing_slash_is_the_same_entry(s3, tmp_path):
    uri = upload_model(s3)
    cache = ArtifactCache(tmp_path)
    path = cache.fetch(uri + "/")
    remove_remote(s3, uri)
    assert cache.fetch(uri) == path and os.listdir(tmp_path) == [path.name]


def test_s3_missing_key_fails_and_leaves_nothing(s3, tmp_path):
    uri = f"s3://{BUCKET}/no/such/model.bin"
    with pytest.raises(ModelLoadError, match="no/such/model.bin") as caught:
        ArtifactCache(tmp_path).fetch(uri)
    assert uri in caught.value.message and "FileNotFoundError" in caught.value.message
    assert os.listdir(tmp_path) == []


def test_delete(s3, tmp_path):
    uri = upload_model(s3)
    cache = ArtifactCache(tmp_path)
    path = cache.fetch(uri)
    cache.delete(uri + "/")
    assert not path.exists() and os.listdir(tmp_path) == []
    cache.delete(uri)  # absent: no-op
    remove_remote(s3, uri)
    with pytest.raises(ModelLoadError):  # really gone: the next fetch goes to the (emptied) remote
        cache.fetch(uri)


def test_fsspec_endpoint_variable_in_a_new_process(s3, tmp_path):
    """FSSPEC_S3_ENDPOINT_URL, set in the environment the server starts with, reaches s3fs."""
    uri = upload_model(s3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
    env["FSSPEC_S3_ENDPOINT_URL"] = s3.endpoint
    code = "import sys; from fleetserve.runtime.artifacts import ArtifactCache; print(ArtifactCache(sys.argv[1]).fetch(sys.argv[2]))"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), uri], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert tree(Path(done.stdout.strip())) == MODEL


# --- HTTP ---------------------------------------------------------------------------------------


class Handler(SimpleHTTPRequestHandler):
    """Serves a folder, records each GET, and breaks off any file named truncated.bin mid-body."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.gets.append(self.path)
        if self.path in self.server.slow:  # a file sent in 10 KiB pieces, 30 ms apart
            data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for start in range(0, len(data), 10_240):
                self.wfile.write(data[start:start + 10_240])
                self.wfile.flush()
                time.sleep(0.03)
            return
        if self.path.endswith("/truncated.bin"):
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"only the start")
            self.close_connection = True  # the socket closes 99,986 bytes short
            return
        super().do_GET()


@pytest.fixture
def http(tmp_path):
    """An HTTP server on loopback over www/: iris/ (MODEL), single.bin, and broken/ (one file cut short)."""
    www = tmp_path / "www"
    for name, data in MODEL.items():
        (www / "iris" / name).parent.mkdir(parents=True, exist_ok=True)
        (www / "iris" / name).write_bytes(data)
    (www / "single.bin").write_bytes(SINGLE)
    (www / "broken").mkdir()
    (www / "broken" / "good.txt").write_bytes(b"fine")
    (www / "broken" / "truncated.bin").write_bytes(b"")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(www)))
    server.gets, server.slow, server.www = [], set(), www
    server.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def root(tmp_path):
    return tmp_path / "cache"


def test_http_folder_and_file(http, root):
    cache = ArtifactCache(root)
    assert tree(cache.fetch(f"{http.base}/iris")) == MODEL
    single = cache.fetch(f"{http.base}/single.bin")
    assert single.name == "single.bin" and single.read_bytes() == SINGLE


def test_second_fetch_does_not_download(http, root):
    cache = ArtifactCache(root)
    folder, single = cache.fetch(f"{http.base}/iris/"), cache.fetch(f"{http.base}/single.bin")
    http.shutdown()
    http.server_close()
    assert cache.fetch(f"{http.base}/iris/") == folder and cache.fetch(f"{http.base}/single.bin") == single
    assert ArtifactCache(root).fetch(f"{http.base}/iris") == folder  # after a restart too
    assert tree(folder) == MODEL and single.read_bytes() == SINGLE


def test_concurrent_fetches_download_once(http, root):
    cache = ArtifactCache(root)
    start = threading.Barrier(8)

    def fetch(_):
        start.wait()
        return cache.fetch(f"{http.base}/iris")

    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(fetch, range(8)))
    assert len(paths) == 1 and tree(paths.pop()) == MODEL
    assert http.gets.count("/iris/model.joblib") == 1 and http.gets.count("/iris/sub/meta.json") == 1
    assert len(os.listdir(root)) == 1  # the entry; no temporary folder left


@pytest.mark.parametrize("path", ["/nothing-here", "/iris/missing.bin"])
def test_http_404_fails_and_leaves_nothing(http, root, path):
    uri = http.base + path
    with pytest.raises(ModelLoadError) as caught:
        ArtifactCache(root).fetch(uri)
    assert uri in caught.value.message
    assert os.listdir(root) == []


def test_unreachable_server_fails_and_leaves_nothing(root):
    uri = f"http://127.0.0.1:{free_port()}/iris"
    with pytest.raises(ModelLoadError) as caught:
        ArtifactCache(root).fetch(uri)
    assert uri in caught.value.message
    assert os.listdir(root) == []


@pytest.mark.parametrize("path", ["/broken", "/broken/truncated.bin"])
def test_interrupted_download_leaves_nothing(http, root, path):
    with pytest.raises(ModelLoadError, match="broken"):
        ArtifactCache(root).fetch(http.base + path)
    assert "/broken/truncated.bin" in http.gets  # it did get as far as the body
    assert os.listdir(root) == []


def test_stale_temp_folders_are_removed_at_start(http, root):
    entry = ArtifactCache(root).fetch(f"{http.base}/iris")
    stale = root / ".tmp-crashed"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "half.bin").write_bytes(b"half")
    ArtifactCache(root)
    assert os.listdir(root) == [entry.name] and tree(entry) == MODEL


# --- Local paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri, remote",
    [("s3://b/k", True), ("gs://b/k", True), ("https://h/m.bin", True), ("http://h/m/", True),
     ("/models/iris", False), ("./iris", False), ("iris/model.joblib", False), ("file:///models/iris", False)],
)
def test_is_remote(uri, remote):
    assert is_remote(uri) is remote


def test_local_paths_are_never_touched(tmp_path):
    model = tmp_path / "iris"
    model.mkdir()
    (model / "model.joblib").write_bytes(b"x")
    cache = ArtifactCache(tmp_path / "cache")
    for uri in (str(model), f"file://{model}"):
        with pytest.raises(ValueError):
            cache.fetch(uri)
        cache.delete(uri)
    assert (model / "model.joblib").read_bytes() == b"x" and os.listdir(tmp_path / "cache") == []


def test_a_slow_download_logs_its_progress(http, root, monkeypatch, caplog):
    """Past PROGRESS_EVERY seconds a download says how far it is and how fast, then that it ended."""
    monkeypatch.setattr(artifacts, "PROGRESS_EVERY", 0.2)
    big = http.www / "slow.bin"
    big.write_bytes(b"x" * 300_000)
    http.slow = {"/slow.bin"}
    with caplog.at_level(logging.INFO, logger="fleetserve.runtime.artifacts"):
        path = ArtifactCache(root).fetch(f"{http.base}/slow.bin")
    assert path.read_bytes() == big.read_bytes()
    lines = [record.getMessage() for record in caplog.records]
    progress = [line for line in lines if line.startswith(f"downloading {http.base}/slow.bin: ")]
    assert progress and all(line.endswith("/s)") and " of 293.0 KiB in " in line for line in progress), lines
    assert lines[-1].startswith(f"downloaded {http.base}/slow.bin: 293.0 KiB in "), lines


def test_a_file_announced_past_the_cap_is_refused_before_its_bytes():
    budget = artifacts._Budget(max_bytes=100, timeout=60, shown="http://example/model.bin")
    budget.branched("http://example/a.bin", "/tmp/a.bin").set_size(60)
    with pytest.raises(artifacts._Refused, match="larger than --max-download-size"):
        budget.branched("http://example/b.bin", "/tmp/b.bin").set_size(101)
    assert budget.written == 0 and budget.announced == 60
