"""Models whose artifacts live elsewhere (s3://, http://), through the server: downloaded once
into the disk cache, reloaded from it after eviction, reused after a restart, deleted on unload."""

from __future__ import annotations

import functools
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import joblib
import pytest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from conftest import BUCKET, http_client, iris_json, running_server
from test_memory import apply, constant_model, delete, model_manifest


@pytest.fixture(scope="module")
def iris_folder(tmp_path_factory):
    """An MLServer artifact folder: the model and a model-settings.json naming it differently."""
    folder = tmp_path_factory.mktemp("iris-artifact")
    features, labels = load_iris(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=1000).fit(features, labels), folder / "model.joblib")
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "name-inside-the-artifact",
        "implementation": "sklearn",
        "parameters": {"uri": "./model.joblib"},
        "inputs": [{"name": "input-0", "datatype": "FP32", "shape": [-1, 4]}],
    }))
    return folder


def upload(s3, folder, prefix: str) -> str:
    for path in folder.iterdir():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"s3://{BUCKET}/{prefix}"


def remove(s3, prefix: str) -> None:
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", []):
        s3.delete_object(Bucket=BUCKET, Key=item["Key"])


def cached_entries(cache) -> list[str]:
    return sorted(path.name for path in cache.iterdir())


def test_s3_model_lifecycle(s3, iris_folder, tmp_path):
    uri = upload(s3, iris_folder, "lifecycle/iris")
    cache = tmp_path / "cache"
    env = {"FLEETSERVE_CACHE_DIR": str(cache), "FLEETSERVE_MEMORY_LIMIT": "10Mi", "FLEETSERVE_OVERCOMMIT_PERCENT": "100"}
    manifest = model_manifest("iris-s3", uri)
    repository = tmp_path / "repo"
    repository.mkdir()
    constant_model(tmp_path / "other", 7)

    with running_server(repository, tmp_path / "first.log", env) as server, http_client(server) as http:
        applied = apply(server, manifest)
        assert applied.returncode == 0, applied.stdout
        # The manifest's name wins over the one in the artifact's model-settings.json, whose
        # implementation and declared inputs still apply.
        assert http.post("/v2/models/iris-s3/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
        assert http.get("/v2/models/iris-s3").json()["inputs"][0]["name"] == "input-0"
        assert len(cached_entries(cache)) == 1

        # Another 8 MiB model evicts it; the files stay, and the next request reloads from them
        # even with the bucket emptied.
        assert apply(server, model_manifest("other", tmp_path / "other")).returncode == 0
        remove(s3, "lifecycle/iris")
        assert http.post("/v2/repository/index").json()[0]["resident"] is False
        assert http.post("/v2/models/iris-s3/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]

    # A restart finds the complete cached copy: no download needed.
    with running_server(repository, tmp_path / "second.log", env) as server, http_client(server) as http:
        assert apply(server, manifest).returncode == 0
        assert http.post("/v2/models/iris-s3/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
        # Deleting the model deletes its files.
        assert delete(server, manifest).returncode == 0
        assert cached_entries(cache) == []
        assert http.post("/v2/models/iris-s3/infer", json=iris_json()).status_code == 404  # deleted: gone


def test_missing_s3_artifacts_fail_the_load_clearly(s3, tmp_path):
    repository = tmp_path / "repo"
    repository.mkdir()
    with running_server(repository, tmp_path / "server.log", {"FLEETSERVE_CACHE_DIR": str(tmp_path / "cache")}) as server:
        result = apply(server, model_manifest("ghost", f"s3://{BUCKET}/no/such/model"))
        assert result.returncode == 1
        assert "cannot download s3://models/no/such/model" in json.loads(result.stdout)["error"]
        assert list((tmp_path / "cache").iterdir()) == []


def test_http_storage(iris_folder, tmp_path):
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(iris_folder.parent))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    repository = tmp_path / "repo"
    repository.mkdir()
    cache = tmp_path / "cache"
    try:
        with running_server(repository, tmp_path / "server.log", {"FLEETSERVE_CACHE_DIR": str(cache)}) as server, \
                http_client(server) as http:
            uri = f"http://127.0.0.1:{httpd.server_address[1]}/{iris_folder.name}"
            # Two models on one artifact folder, named with and without a trailing slash: one cache entry.
            applied = apply(server, model_manifest("iris-http", uri + "/") + "---\n" + model_manifest("twin", uri))
            assert applied.returncode == 0, applied.stdout
            assert http.post("/v2/models/iris-http/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
            assert len(cached_entries(cache)) == 1
            assert delete(server, model_manifest("twin", uri)).returncode == 0
            assert len(cached_entries(cache)) == 1, "deleting one model removed files another still uses"
            # Files lost behind the server's back are downloaded again when needed.
            shutil.rmtree(cache / cached_entries(cache)[0])
            assert http.post("/v2/repository/models/iris-http/unload").status_code == 200
            assert http.post("/v2/repository/models/iris-http/load").status_code == 200
            assert http.post("/v2/models/iris-http/infer", json=iris_json()).json()["outputs"][0]["data"] == [0, 2]
    finally:
        httpd.shutdown()
