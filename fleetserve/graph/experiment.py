"""Seldon Core 2 Experiments: a weighted split between models (or pipelines), an optional mirror,
and sticky routes through `x-seldon-route`."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from fleetserve.errors import InvalidInput
from fleetserve.graph.pipeline import NAME, as_json, graph_manifest
from fleetserve.settings import is_model_name

RESOURCE_TYPES = ("model", "pipeline")
_SPEC_KEYS = {"default", "candidates", "mirror", "resourceType"}


@dataclass
class Experiment:
    name: str
    resource_type: str  # what the candidates and the mirror are: models or pipelines
    candidates: list[tuple[str, int]]  # (name, weight): a share of weight / total
    default: str | None  # the candidate whose own endpoint the split takes over
    mirror: str | None
    mirror_percent: float
    manifest: dict[str, Any]

    def route_entry(self, candidate: str) -> str:
        """How a candidate appears in `x-seldon-route`, as Seldon writes it."""
        return f":{candidate}.pipeline:" if self.resource_type == "pipeline" else f":{candidate}:"

    def choose(self, route: str | None) -> str:
        """The candidate a request goes to: the one its `x-seldon-route` names, else a weighted draw."""
        if route:
            entries = set(route.split(":"))
            for name, _ in self.candidates:
                if self.route_entry(name).strip(":") in entries:
                    return name
                # Seldon writes a model's entry with its version, `:iris_1:`.
                if self.resource_type == "model" and any(re.fullmatch(re.escape(name) + r"_\d+", entry) for entry in entries):
                    return name
        names, weights = zip(*self.candidates)
        return random.choices(names, weights)[0]

    def mirrors(self) -> bool:
        return self.mirror is not None and random.random() * 100 < self.mirror_percent


def experiment_from_manifest(document: dict[str, Any]) -> Experiment:
    name, spec = graph_manifest(document, "experiment", _SPEC_KEYS)
    where = f"experiment '{name}'"
    resource_type = spec.get("resourceType", "model")
    if resource_type not in RESOURCE_TYPES:
        raise InvalidInput(f"{where}: resourceType must be one of {list(RESOURCE_TYPES)}, got {resource_type!r}")
    raw_candidates = spec.get("candidates")
    if not isinstance(raw_candidates, list) or not raw_candidates:
        raise InvalidInput(f"{where}: candidates must be a non-empty list of {{name, weight}}")
    candidates: list[tuple[str, int]] = []
    for raw in raw_candidates:
        candidate = _target(raw, where, "candidate", resource_type)
        weight = raw.get("weight")
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise InvalidInput(f"{where}: candidate '{candidate}' needs a weight, a non-negative integer")
        if candidate in (existing for existing, _ in candidates):
            raise InvalidInput(f"{where}: candidate '{candidate}' appears twice")
        candidates.append((candidate, weight))
    if sum(weight for _, weight in candidates) <= 0:
        raise InvalidInput(f"{where}: the candidates' weights add up to 0; give at least one a positive weight")
    default = spec.get("default")
    if default is not None and default not in (candidate for candidate, _ in candidates):
        raise InvalidInput(f"{where}: default '{default}' must be one of the candidates {[c for c, _ in candidates]}")
    mirror, percent = None, 0.0
    if spec.get("mirror") is not None:
        raw_mirror = spec["mirror"]
        mirror = _target(raw_mirror, where, "mirror", resource_type)
        percent = raw_mirror.get("percent", 100)
        if not isinstance(percent, (int, float)) or isinstance(percent, bool) or not 0 <= percent <= 100:
            raise InvalidInput(f"{where}: mirror.percent must be a number from 0 to 100")
        if mirror in (candidate for candidate, _ in candidates):
            raise InvalidInput(f"{where}: the mirror '{mirror}' cannot also be a candidate")
    return Experiment(name, resource_type, candidates, default, mirror, float(percent), as_json(document))


def _target(raw: Any, where: str, role: str, resource_type: str) -> str:
    """A candidate's or the mirror's name (`name`, or the older `modelName`)."""
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: each {role} must be a mapping with a name")
    name = raw.get("name", raw.get("modelName"))
    if not (isinstance(name, str) and NAME.match(name) if resource_type == "pipeline" else is_model_name(name)):
        raise InvalidInput(f"{where}: {role} {name!r} is not a valid {resource_type} name")
    return name
