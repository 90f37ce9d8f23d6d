"""The `fleetserve` command-line client against the running server."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT, iris_json


def fleetserve(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fleetserve.cli", *args, "--url", server.url],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )


def test_status_lists_models_and_reasons(server):
    status = fleetserve(server, "status")
    assert status.returncode == 0, status.stderr
    assert "server: ready" in status.stdout
    lines = {line.split()[0]: line for line in status.stdout.splitlines()[1:]}
    assert "READY" in lines["iris"]
    assert "UNAVAILABLE" in lines["bad-load"] and "corrupt" in lines["bad-load"]


def test_infer(server):
    result = fleetserve(server, "infer", "iris", json.dumps(iris_json()))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["outputs"][0]["data"] == [0, 2]
    failed = fleetserve(server, "infer", "no-such-model", json.dumps(iris_json()))
    assert failed.returncode == 1 and "not found" in json.loads(failed.stdout)["error"]


def test_without_a_server_one_line_says_so():
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    for command in (["status"], ["infer", "iris", "{}"], ["apply", "-f", "-"], ["fleet"]):
        result = subprocess.run([sys.executable, "-m", "fleetserve.cli", *command, "--url", url], input="",
                                capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert result.returncode == 2 and result.stdout == "", result
        assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"no fleetserve at {url}")


def test_version():
    result = subprocess.run([sys.executable, "-m", "fleetserve.cli", "--version"], capture_output=True, text=True,
                            cwd=ROOT, timeout=60)
    from fleetserve import __version__
    assert result.returncode == 0 and result.stdout.strip() == f"fleetserve {__version__}"
