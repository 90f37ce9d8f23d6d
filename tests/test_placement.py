"""Placement is a pure choice over replica records: where a new copy goes, and why."""

from __future__ import annotations

import random

import pytest

from fleetserve.fleet.placement import NoPlace, choose

MiB = 1 << 20


def record(budget_mib: int, registered_mib: int, idle_mib: int = 0, models: int = 0, state: str = "ready",
           ready: bool = True, capabilities=("sklearn", "xgboost")) -> dict:
    return {"state": state, "ready": ready, "capabilities": list(capabilities),
            "memory": {"budget": budget_mib * MiB, "registered": registered_mib * MiB, "idle": idle_mib * MiB},
            "models": {f"m{number}": MiB for number in range(models)}}


def picks(replicas: dict, cost: int, requirements=("sklearn",), times: int = 400) -> set[str]:
    rng = random.Random(7)
    return {choose(replicas, list(requirements), cost, rng=rng)[0] for _ in range(times)}


def test_a_copy_goes_where_most_room_is_and_among_equals_at_random():
    replicas = {"roomy": record(100, 10), "as-roomy": record(100, 12), "full": record(100, 80)}
    assert picks(replicas, 5 * MiB) == {"roomy", "as-roomy"}  # 90 and 88 free: equals; 20 free is not


def test_only_replicas_not_draining_with_the_capabilities_qualify_starting_ones_too():
    replicas = {"draining": record(100, 0, state="draining"), "no-xgboost": record(100, 0, capabilities=("sklearn",)),
                "starting": record(100, 50, ready=False), "able": record(100, 50)}
    assert picks(replicas, MiB, requirements=("xgboost",)) == {"able", "starting"}
    target, candidates = choose(replicas, ["xgboost"], MiB)
    assert sorted(candidate.replica for candidate in candidates) == ["able", "starting"]
    with pytest.raises(NoPlace, match=r"no ready replica with capabilities \['gpu'\]"):
        choose(replicas, ["gpu"], MiB)


def test_where_nothing_fits_a_replica_whose_idle_copies_would_free_enough_is_chosen():
    replicas = {"busy": record(100, 95), "idle": record(100, 95, idle_mib=30)}
    assert picks(replicas, 20 * MiB) == {"idle"}
    with pytest.raises(NoPlace, match=r"no replica has room for 41943040 bytes \(the most: idle with 5242880 free"):
        choose(replicas, [], 40 * MiB)


def test_among_equally_roomy_replicas_the_one_with_fewest_models_wins():
    replicas = {"crowded": record(100, 10, models=8), "sparse": record(100, 10, models=1)}
    assert picks(replicas, MiB) == {"sparse"}


def test_excluded_replicas_are_never_chosen():
    replicas = {"a": record(100, 0), "b": record(100, 50)}
    assert choose(replicas, [], MiB, exclude={"a"})[0] == "b"


def test_loads_under_way_count_as_taken():
    replicas = {"a": record(100, 10), "b": record(100, 30)}
    assert choose(replicas, [], MiB)[0] == "a"
    assert choose(replicas, [], MiB, loading={"a": 40 * MiB})[0] == "b"  # a's 50 MiB taken to b's 30
