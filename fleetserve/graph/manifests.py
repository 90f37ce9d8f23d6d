"""Seldon Core 2 manifests, as users already write them: `kind: Model | Pipeline | Experiment`
(multi-document YAML too; JSON is YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fleetserve.errors import InvalidInput
from fleetserve.graph.experiment import experiment_from_manifest
from fleetserve.graph.pipeline import pipeline_from_manifest
from fleetserve.runtime.repository import Found
from fleetserve.settings import ModelSettings, check_model_name, parse_quantity
from fleetserve.types import MAX_NESTING, check_nesting

SUPPORTED_KINDS = ("Model", "Pipeline", "Experiment")  # in the order they depend on each other
# replicas, minReplicas, maxReplicas: a fleet's copies of the model (fleet/models.py).
_MODEL_SPEC = {"storageUri", "requirements", "memory", "parameters", "explainer", "replicas", "minReplicas", "maxReplicas"}


def parse_manifests(text: str | bytes) -> list[dict[str, Any]]:
    """The documents of a YAML (or JSON) text, each checked to be a manifest of a supported kind."""
    try:
        documents = [document for document in yaml.safe_load_all(text) if document is not None]
    except yaml.YAMLError as error:
        raise InvalidInput(f"invalid YAML: {error}") from None
    except RecursionError:
        raise InvalidInput(f"YAML nesting depth exceeds the limit of {MAX_NESTING}") from None
    if not documents:
        raise InvalidInput("no manifests found")
    for document in documents:
        if not isinstance(document, dict):
            raise InvalidInput(f"a manifest must be a mapping, got {type(document).__name__}")
    # Every value takes at least a character of the text, unless aliases repeat it.
    check_nesting(documents, "YAML", depth=0, budget=len(text))
    for document in documents:
        kind = document.get("kind")
        if kind not in SUPPORTED_KINDS:
            raise InvalidInput(f"unsupported kind {kind!r}; this server accepts {list(SUPPORTED_KINDS)}")
        manifest_name(document)
    return documents


def manifest_name(document: dict[str, Any]) -> str:
    metadata = document.get("metadata")
    if not isinstance(metadata, dict) or "name" not in metadata:
        raise InvalidInput(f"{document.get('kind')} manifest needs metadata.name")
    return check_model_name(metadata["name"])


def model_from_manifest(document: dict[str, Any]) -> Found:
    """A `kind: Model` manifest as a model to load: its artifacts come from `spec.storageUri`."""
    name = manifest_name(document)
    where = f"Model '{name}'"
    spec = document.get("spec")
    if not isinstance(spec, dict):
        raise InvalidInput(f"{where}: spec must be a mapping")
    storage_uri = spec.get("storageUri")
    if not isinstance(storage_uri, str) or not storage_uri:
        raise InvalidInput(f"{where}: spec.storageUri must be a non-empty string")
    requirements = spec.get("requirements") or []
    if not isinstance(requirements, list) or not all(isinstance(item, str) for item in requirements):
        raise InvalidInput(f"{where}: spec.requirements must be a list of strings")
    try:
        memory = parse_quantity(spec.get("memory") or 0)
    except ValueError as error:
        raise InvalidInput(f"{where}: spec.memory: {error}") from None
    parameters = spec.get("parameters") or []
    if not isinstance(parameters, list) or not all(
        isinstance(item, dict) and isinstance(item.get("name"), str) for item in parameters
    ):
        raise InvalidInput(f"{where}: spec.parameters must be a list of {{name, value}} mappings")
    extra = {item["name"]: item.get("value") for item in parameters}
    if spec.get("explainer") is not None:
        extra.update(_explainer(where, spec["explainer"]))
        requirements = requirements if "alibi-explain" in requirements else [*requirements, "alibi-explain"]
    settings = ModelSettings(
        name=name,
        folder=Path.cwd(),
        uri=storage_uri,
        requirements=requirements,
        memory=memory,
        extra=extra,
        unknown={key: value for key, value in spec.items() if key not in _MODEL_SPEC},
        from_manifest=True,
    )
    return Found(name, [settings], manifest=document)


def parse_manifest(document: dict[str, Any]) -> Any:
    """A checked manifest (parse_manifests) as what applying it takes: a Found, Pipeline or Experiment."""
    parsers = {"Model": model_from_manifest, "Pipeline": pipeline_from_manifest, "Experiment": experiment_from_manifest}
    return parsers[document["kind"]](document)


def _explainer(where: str, explainer: Any) -> dict[str, Any]:
    """Seldon's `spec.explainer` as the alibi-explain runtime's parameters."""
    if not isinstance(explainer, dict) or not isinstance(explainer.get("type"), str):
        raise InvalidInput(f"{where}: spec.explainer must be a mapping with a type (e.g. anchor_tabular)")
    refs = {key: explainer.get(key) for key in ("modelRef", "pipelineRef") if explainer.get(key)}
    if len(refs) > 1:
        raise InvalidInput(f"{where}: spec.explainer: only one of modelRef and pipelineRef")
    if not all(isinstance(value, str) for value in refs.values()):
        raise InvalidInput(f"{where}: spec.explainer: modelRef and pipelineRef are names")
    if not refs:  # the artifact's model-settings.json may name the target
        return {"explainer_type": explainer["type"]}
    return {"explainer_type": explainer["type"], "model_ref": refs.get("modelRef"), "pipeline_ref": refs.get("pipelineRef")}
