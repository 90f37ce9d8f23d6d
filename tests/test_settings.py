"""model-settings.json parsing: MLServer's format as written, unknown fields kept, clear reasons."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from conftest import ROOT
from fleetserve.errors import InvalidInput, ModelLoadError
from fleetserve.runtime.repository import ModelRepository
from fleetserve.settings import ModelSettings, ServerSettings, check_model_name


def test_mlserver_settings_and_unknown_fields_kept(tmp_path):
    raw = {
        "name": "m",
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./artifacts/model.joblib", "version": "3", "extra": {"predict_fn": "predict_proba"}, "environment_tarball": "x.tar.gz"},
        "max_batch_size": 8,
        "max_batch_time": 0.01,
        "parallel_workers": 2,
        "inputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 2]}],
    }
    settings = ModelSettings.parse(raw, tmp_path, "folder")
    assert (settings.name, settings.version, settings.max_batch_size, settings.parallel_workers) == ("m", "3", 8, 2)
    assert settings.extra == {"predict_fn": "predict_proba"}
    assert settings.artifact_path == tmp_path / "artifacts" / "model.joblib"
    assert settings.unknown == {"parameters": {"environment_tarball": "x.tar.gz"}}


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ([], "must be a JSON object"),
        ({"parameters": []}, "'parameters' must be an object"),
        ({"parameters": {"extra": 1}}, "'parameters.extra' must be an object"),
        ({"requirements": "sklearn"}, "'requirements' must be a list"),
        ({"name": "../x"}, "invalid model name"),
        ({"max_batch_size": "lots"}, "lots"),
        ({"inputs": [{"datatype": "FP32"}]}, "needs at least a 'name'"),
    ],
)
def test_broken_settings_give_reasons(tmp_path, raw, fragment):
    with pytest.raises(ModelLoadError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        ModelSettings.parse(raw, tmp_path, "folder")


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".hidden", "", "a\\b"])
def test_model_names_are_validated(name):
    with pytest.raises(InvalidInput):
        check_model_name(name)


def test_repository_versions_and_folder_names(tmp_path: Path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "model-settings.json").write_text('{"implementation": "sklearn"}')
    (tmp_path / "multi" / "1").mkdir(parents=True)
    (tmp_path / "multi" / "2").mkdir()
    (tmp_path / "multi" / "model-settings.json").write_text('{"implementation": "sklearn"}')
    (tmp_path / "multi" / "2" / "model-settings.json").write_text('{"implementation": "xgboost"}')
    (tmp_path / "not-a-model").mkdir()
    found = ModelRepository(tmp_path).scan()
    assert sorted(found) == ["multi", "plain"]
    versions = {v.version: v for v in found["multi"].versions}
    assert versions["1"].implementation == "sklearn" and versions["1"].folder == tmp_path / "multi" / "1"
    assert versions["2"].implementation == "xgboost"


def test_server_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FLEETSERVE_HTTP_PORT", "9000")
    monkeypatch.setenv("FLEETSERVE_HOST", "0.0.0.0")
    settings = ServerSettings.from_env(grpc_port=9001, metrics_port=None)
    assert (settings.host, settings.http_port, settings.grpc_port, settings.metrics_port) == ("0.0.0.0", 9000, 9001, 8082)


@pytest.mark.parametrize("raw, value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                        ("0", False), ("false", False), ("no", False), ("off", False), ("", False)])
def test_boolean_settings_from_environment(monkeypatch, raw, value):
    monkeypatch.setenv("FLEETSERVE_ALLOW_REMOTE_CODE", raw)
    assert ServerSettings.from_env().allow_remote_code is value


def test_a_boolean_setting_that_is_neither_is_refused(monkeypatch):
    monkeypatch.setenv("FLEETSERVE_ALLOW_REMOTE_CODE", "maybe")
    with pytest.raises(SystemExit, match="FLEETSERVE_ALLOW_REMOTE_CODE must be true or false"):
        ServerSettings.from_env()


def test_allowed_storage_includes_the_repository_only_with_an_allow_list(tmp_path):
    assert ServerSettings(model_repository=str(tmp_path)).allowed_storage_prefixes == []
    listed = ServerSettings(model_repository=str(tmp_path), allowed_storage=" s3://models/a , /srv/models,")
    assert listed.allowed_storage_prefixes == ["s3://models/a", "/srv/models", str(tmp_path.resolve())]


def test_every_setting_has_a_flag_whose_help_names_its_variable():
    import contextlib
    import io

    from fleetserve import cli

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit):
        cli.main(["start", "--help"])
    text = " ".join(shown.getvalue().split())
    for spec in fields(ServerSettings):
        if spec.name != "model_repository":  # the positional REPO (FLEETSERVE_MODEL_REPOSITORY)
            flag, variable = "--" + spec.name.replace("_", "-"), "FLEETSERVE_" + spec.name.upper()
            assert f"{flag} " in text and variable in text, (flag, variable)


def test_mlserver_settings_json_then_its_variables_then_fleetserves(tmp_path, monkeypatch):
    (tmp_path / "settings.json").write_text(json.dumps({
        "http_port": 9100, "grpc_port": 9101, "metrics_port": 9102, "grpc_max_message_length": 1000,
        "load_models_at_startup": False, "parallel_workers": 3, "debug": True}))
    settings = ServerSettings.from_env(model_repository=str(tmp_path))
    assert (settings.http_port, settings.grpc_port, settings.metrics_port, settings.max_message_size) == (9100, 9101, 9102, 1000)
    assert settings.load_models_at_startup is False and settings.parallel_workers == 3
    monkeypatch.setenv("MLSERVER_HTTP_PORT", "9200")
    monkeypatch.setenv("MLSERVER_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("MLSERVER_LOAD_MODELS_AT_STARTUP", "true")
    settings = ServerSettings.from_env()  # the folder from MLSERVER_MODELS_DIR, its settings.json read
    assert settings.model_repository == str(tmp_path) and settings.grpc_port == 9101
    assert settings.http_port == 9200 and settings.load_models_at_startup is True
    monkeypatch.setenv("FLEETSERVE_HTTP_PORT", "9300")
    assert ServerSettings.from_env().http_port == 9300
    assert ServerSettings.from_env(http_port=9400).http_port == 9400
    monkeypatch.setenv("MLSERVER_GRPC_PORT", "eighty")
    with pytest.raises(SystemExit, match="MLSERVER_GRPC_PORT must be a number"):
        ServerSettings.from_env()
    (tmp_path / "settings.json").write_text("[1]")
    with pytest.raises(SystemExit, match="settings.json: MLServer's settings are a JSON object"):
        ServerSettings.from_env()


def test_the_shipped_json_schema_takes_every_example_and_refuses_what_the_server_refuses(repository):
    from importlib.resources import files

    import jsonschema

    schema = json.loads((files("fleetserve") / "schemas" / "model-settings.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert ModelSettings._KNOWN <= schema["properties"].keys()
    examples = [*(ROOT / "model_repo").glob("*/model-settings.json"), *repository.glob("**/model-settings.json")]
    assert len(examples) > 10
    accepted = 0
    for path in examples:
        try:  # the test repository's broken examples aside: what the server takes, the schema takes
            ModelSettings.from_file(path, path.parent.name)
        except ModelLoadError:
            continue
        accepted += 1
        assert not list(validator.iter_errors(json.loads(path.read_text()))), path
    assert accepted > 10
    for wrong in ({"max_batch_size": -1}, {"memory": "lots"}, {"warmup": [{"count": 2}]},
                  {"inputs": [{"name": "x", "datatype": "FP31"}]}):
        assert list(validator.iter_errors(wrong)), wrong
