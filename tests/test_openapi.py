"""The OpenAPI document and its page: the document describes exactly the routes the server
answers, the page works offline, and a fuzzer (schemathesis) run from the served document finds
no server error, no error body without "error", and no answer outside the document."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute
from openapi_spec_validator import validate

from conftest import ECHO_MODEL, ROOT, iris_json, running_server, write_settings
from fleetserve.server import openapi
from fleetserve.server.routes import FAST_PATH_ROUTES, infer_target

FUZZ = Path(__file__).parent / "fuzz"
DOCUMENT_PATH = "/v2/docs/dataplane.json"


def served_operations(routes: list) -> set[tuple[str, str]]:
    """(METHOD, template) of every route the REST app answers: the FastAPI routes and the fast path's."""
    assert all(isinstance(route, APIRoute) for route in routes), "a route this walk cannot read (a mount?)"
    return {(method, route.path) for route in routes for method in route.methods} | {
        ("POST", template) for template in FAST_PATH_ROUTES}


def test_document_describes_exactly_the_routes_served(rest_routes):
    """A route added without documentation (or documentation left after a route went) fails here."""
    served = served_operations(rest_routes)
    documented = openapi.operations()
    assert served - documented == set(), "routes the document does not describe"
    assert documented - served == set(), "documented routes the server does not answer"


def test_fast_path_templates_are_what_it_answers():
    for template in FAST_PATH_ROUTES:
        path = template.replace("{name}", "some-name").replace("{version}", "3")
        kind = template.split("/")[2]
        assert infer_target(path) == (kind, "some-name", "3" if "{version}" in template else None)


def test_document_is_valid_openapi():
    validate(openapi.DOCUMENT)
    assert openapi.DOCUMENT["openapi"].startswith("3.0.")  # what the bundled Swagger UI renders
    for path, item in openapi.DOCUMENT["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["$ref"] == f"#/components/responses/{status}", (method, path, status)


def test_served_document(http):
    response = http.get("/v2/docs/dataplane.json")
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    assert response.json() == openapi.DOCUMENT


def test_docs_page_works_offline(http):
    page = http.get("/v2/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "://" not in html, "the page must not load anything from another host"
    assert '"validatorUrl": null' in html  # Swagger UI would otherwise send the document to swagger.io
    assert "url: '/v2/docs/dataplane.json'" in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert set(assets) == {f"/v2/docs/{name}" for name in openapi.DOCS_ASSETS}
    for url in assets:
        asset = http.get(url)
        assert asset.status_code == 200 and len(asset.content) > 0, url
        assert asset.headers["content-type"].split(";")[0] == openapi.DOCS_ASSETS[url.rsplit("/", 1)[1]]


def test_method_not_allowed_names_every_method_of_the_path(http):
    """A path's methods may be spread over several routes; Allow lists them all."""
    for path, allowed in (("/v2/pipelines", "GET, POST"), ("/v2/manifests", "DELETE, POST"),
                          ("/v2/experiments/some-name", "DELETE, GET"), ("/v2/health/live", "GET"),
                          ("/v2/models/iris/infer", "POST")):
        response = http.request("PUT", path)
        assert response.status_code == 405 and response.headers["allow"] == allowed, path
        assert response.json() == {"error": "Method Not Allowed"}


FUZZ_MANIFESTS = """
apiVersion: mlops.seldon.io/v1alpha1
kind: Pipeline
metadata: {name: iris-pipeline}
spec:
  steps: [{name: iris}]
  output: {steps: [iris]}
---
apiVersion: mlops.seldon.io/v1alpha1
kind: Experiment
metadata: {name: iris-experiment}
spec:
  candidates: [{name: iris, weight: 50}, {name: echo, weight: 50}]
"""


@pytest.fixture(scope="module")
def fuzz_repository(tmp_path_factory) -> Path:
    """A small repository of its own: the fuzzer unloads and deletes what it finds. The names are
    the document's examples, so generated requests reach real models, a pipeline and an experiment."""
    subprocess.run([sys.executable, str(ROOT / "model_repo" / "build.py")], check=True, capture_output=True)
    repo = tmp_path_factory.mktemp("fuzz_repo")
    for example in ("iris", "iris-mlflow"):
        shutil.copytree(ROOT / "model_repo" / example, repo / example)
    write_settings(repo / "echo", {"implementation": "echo_model.Echo"})
    (repo / "echo" / "echo_model.py").write_text(ECHO_MODEL)
    return repo


# Each setup: the server's extra environment, and the headers every fuzzed request carries.
FUZZ_SETUPS = [
    pytest.param({}, {}, id="open"),
    # Tokens on: every request passes the guard (the admin token opens every route).
    pytest.param({"FLEETSERVE_ADMIN_TOKEN": "fuzz-admin", "FLEETSERVE_DATA_TOKEN": "fuzz-data"},
                 {"Authorization": "Bearer fuzz-admin"}, id="tokens"),
]
# Operations that take away what the others need (models, the pipeline, the experiment) run last,
# so the others reach loaded models.
DESTRUCTIVE = r"^(DELETE .*|POST .*/unload)$"


@pytest.mark.parametrize("server_env, headers", FUZZ_SETUPS)
def test_fuzzing_from_the_document(fuzz_repository, tmp_path, server_env, headers):
    """Every operation, a bounded and reproducible set of cases each (tests/fuzz/schemathesis.toml):
    no 5xx but 503/504, every error `{"error": ...}`, statuses, headers and bodies as documented.
    The server lives through it, still serves a good request, and stops cleanly."""
    with running_server(fuzz_repository, tmp_path / "server.log", server_env) as server:
        with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
            assert http.post("/v2/manifests", content=FUZZ_MANIFESTS).status_code == 200
            started = time.monotonic()
            tested, checks = _fuzz(server.url, headers, tmp_path / "others.ndjson", "--exclude-name-regex", DESTRUCTIVE)
            assert server.process.poll() is None, server.log()
            more, more_checks = _fuzz(server.url, headers, tmp_path / "destructive.ndjson", "--include-name-regex", DESTRUCTIVE)
            # Every operation but the document itself, which the fuzzer loads rather than tests.
            assert tested | more == {f"{method} {path}" for method, path in openapi.operations()} - {f"GET {DOCUMENT_PATH}"}
            assert "error_body_is_json_with_error" in checks & more_checks  # our own check ran (tests/fuzz/checks.py)
            assert server.process.poll() is None, server.log()
            assert http.get("/v2/health/live").status_code == 200
            assert http.post("/v2/repository/models/iris/load").status_code == 200  # the fuzzer may have unloaded it
            answer = http.post("/v2/models/iris/infer", json=iris_json())
            assert answer.status_code == 200 and answer.json()["outputs"][0]["data"] == [0, 2]
        assert "unexpected error" not in server.log()
        print(f"fuzzed {len(tested | more)} operations in {time.monotonic() - started:.0f} s")


def _fuzz(url: str, headers: dict[str, str], report: Path, *selection: str) -> tuple[set[str], set[str]]:
    """Runs schemathesis on the selected operations of the served document; the operations that
    ran cases and the checks that ran, read from its NDJSON events."""
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(FUZZ / "schemathesis.toml"),
               "run", f"{url}{DOCUMENT_PATH}", "--no-color", "--report", "ndjson", "--report-ndjson-path", str(report),
               *selection, *(item for name, value in headers.items() for item in ("--header", f"{name}: {value}"))]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=report.parent,
                         env={**os.environ, "SCHEMATHESIS_HOOKS": str(FUZZ / "checks.py")})
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    tested, checks = set(), set()
    for line in report.read_text().splitlines():
        finished = json.loads(line).get("ScenarioFinished", {})
        recorder = finished.get("recorder", {})
        if recorder.get("cases"):  # a skipped scenario (an operation with no examples) has none
            if finished["phase"] != "stateful":  # sequences of operations, under one label of their own
                tested.add(recorder["label"])
            checks |= {check["name"] for results in recorder.get("checks", {}).values() for check in results}
    return tested, checks
