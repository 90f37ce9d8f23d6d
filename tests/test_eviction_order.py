"""Which resident models make room: the least recently used idle ones, passing over one whose
reload would cost far more than the others' (DeviceMemory.victims, pure books, no server)."""

from __future__ import annotations

from dataclasses import dataclass

from fleetserve.runtime.memory import DeviceMemory

MiB = 1 << 20


@dataclass(eq=False)
class Version:
    name: str
    reload_seconds: float = 0.01
    in_flight: int = 0
    state: str = "READY"
    version: str | None = None
    device: str = "cpu"
    declared: int = MiB
    measured: int = 0
    estimated: int = 0

    @property
    def cost(self) -> int:
        return self.declared


def books_with(*versions: Version) -> DeviceMemory:
    """A 4 MiB device with `versions` resident, the first the least recently used."""
    books = DeviceMemory("cpu", 4 * MiB, 0)
    books.register(list(versions))
    for version in versions:
        books.mark_resident(version)
    return books


def names(victims) -> list[str]:
    return [version.name for version in victims]


def test_the_least_recently_used_idle_models_go_first():
    oldest, busy, newer, newest = Version("oldest"), Version("busy", in_flight=1), Version("newer"), Version("newest")
    books = books_with(oldest, busy, newer, newest)
    assert names(books.victims(MiB)) == ["oldest"]
    assert names(books.victims(2 * MiB)) == ["oldest", "newer"]  # the busy one is never taken
    assert books.victims(4 * MiB) is None  # only a busy model could make that room
    assert books.victims(0) == []


def test_a_model_that_reloads_slowly_is_passed_over_while_cheap_ones_can_make_room():
    transformer = Version("transformer", reload_seconds=6.0)
    books = books_with(transformer, Version("a"), Version("b"), Version("c"))
    assert names(books.victims(MiB)) == ["a"]
    assert names(books.victims(3 * MiB)) == ["a", "b", "c"]
    assert names(books.victims(4 * MiB)) == ["a", "b", "c", "transformer"]  # last, when nothing else will do


def test_similar_reload_costs_leave_the_order_to_recency():
    slow, slower = Version("slow", reload_seconds=2.0), Version("slower", reload_seconds=5.0)
    assert names(books_with(slow, slower, Version("quick", reload_seconds=0.5)).victims(2 * MiB)) == ["slow"]
    assert names(books_with(slower, slow).victims(3 * MiB)) == ["slower"]  # under 10x the cheapest: no weighing
