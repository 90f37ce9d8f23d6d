"""Where a model's copy goes: a pure choice over the replicas' records, so it is tested without etcd.

A replica qualifies when it is in the fleet and not draining (one still starting too: its
repository's models are placed before it turns ready), and its capabilities cover the model's
requirements. Among those, the copy goes where it fits best: the most memory left under the
replica's registered budget, then (nowhere fits as it is) the most that dropping its idle models
would free, then the fewest models. Replicas within CLOSE of the best are equals, and the copy
goes to one of them at random, so that many cold models asked for at once spread out.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

CLOSE = 0.10  # of the best candidate's room: replicas this near the best are equals


@dataclass
class Candidate:
    replica: str
    free: int  # bytes left under its registered budget
    idle: int  # bytes its idle models would free if dropped
    models: int
    fits: bool

    def describe(self) -> dict[str, Any]:
        return {"replica": self.replica, "free_bytes": self.free, "idle_bytes": self.idle, "models": self.models,
                "fits": self.fits}


class NoPlace(Exception):
    """No replica can take the model; the message says why."""


def candidates(replicas: dict[str, dict[str, Any]], requirements: list[str], cost: int,
               exclude: set[str] = frozenset(), loading: dict[str, int] | None = None) -> list[Candidate]:
    found = []
    for replica_id, record in replicas.items():
        if replica_id in exclude or record.get("state") != "ready":
            continue
        if not set(requirements) <= set(record.get("capabilities") or ()):
            continue
        memory = record.get("memory") or {}
        free = int(memory.get("budget", 0)) - int(memory.get("registered", 0)) - (loading or {}).get(replica_id, 0)
        idle = int(memory.get("idle", 0))
        found.append(Candidate(replica_id, free, idle, len(record.get("models") or ()), fits=free >= cost))
    return found


def choose(replicas: dict[str, dict[str, Any]], requirements: list[str], cost: int, exclude: set[str] = frozenset(),
           loading: dict[str, int] | None = None, rng: random.Random | None = None) -> tuple[str, list[Candidate]]:
    """The replica a new copy goes to, and the candidates it was chosen from. `loading`: bytes
    of loads under way on each replica, not yet in its record."""
    found = candidates(replicas, requirements, cost, exclude, loading)
    if not found:
        needs = f" with capabilities {sorted(requirements)}" if requirements else ""
        raise NoPlace(f"no ready replica{needs} in the fleet")
    room = [candidate for candidate in found if candidate.fits or candidate.free + candidate.idle >= cost]
    if not room:
        best = max(found, key=lambda candidate: candidate.free + candidate.idle)
        raise NoPlace(f"no replica has room for {cost} bytes (the most: {best.replica} with {best.free} free "
                      f"and {best.idle} idle)")
    fitting = [candidate for candidate in room if candidate.fits] or room
    best = max(fitting, key=lambda candidate: (candidate.free + candidate.idle, -candidate.models))
    margin = CLOSE * max(best.free + best.idle, 1)
    close = [candidate for candidate in fitting if candidate.free + candidate.idle >= best.free + best.idle - margin]
    fewest = min(candidate.models for candidate in close)
    close = [candidate for candidate in close if candidate.models <= fewest + 1]
    return (rng or random).choice(close).replica, found
