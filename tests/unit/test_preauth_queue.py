"""Which unauthenticated connection the SYNC server closes when there are too many."""

from __future__ import annotations

from pushsync.dispatcher.connections import Waiting


def test_the_oldest_of_a_crowded_address_goes_first() -> None:
    waiting: Waiting[str] = Waiting(most=10, per_host=2)
    assert waiting.add("a1", "10.0.0.1") == []
    assert waiting.add("b1", "10.0.0.2") == []
    assert waiting.add("a2", "10.0.0.1") == []
    assert waiting.add("a3", "10.0.0.1") == ["a1"]  # not b1, older but from elsewhere
    assert "a1" not in waiting
    assert len(waiting) == 3
    assert waiting.oldest() == "b1"


def test_the_oldest_overall_goes_when_all_are_too_many() -> None:
    waiting: Waiting[str] = Waiting(most=3, per_host=3)
    for n in range(3):
        assert waiting.add(f"c{n}", f"10.0.1.{n}") == []
    assert waiting.add("new", "10.0.2.1") == ["c0"]
    assert waiting.add("newer", "10.0.2.2") == ["c1"]
    assert waiting.oldest() == "c2"


def test_both_caps_at_once_and_never_the_newcomer() -> None:
    waiting: Waiting[str] = Waiting(most=2, per_host=1)
    assert waiting.add("x", "h1") == []
    assert waiting.add("y", "h2") == []
    assert waiting.add("z", "h1") == ["x"]  # the address's cap makes room overall too
    assert waiting.add("w", "h3") == ["y"]
    assert sorted(["z", "w"]) == sorted(item for item in ("x", "y", "z", "w") if item in waiting)
    zero: Waiting[str] = Waiting(most=0, per_host=0)  # at least one is always admitted
    assert zero.add("only", "h") == []
    assert "only" in zero


def test_authenticated_or_closed_connections_leave() -> None:
    waiting: Waiting[str] = Waiting(most=2, per_host=2)
    waiting.add("a", "h")
    waiting.add("b", "h")
    waiting.discard("a")
    waiting.discard("a")  # twice: nothing
    assert waiting.add("c", "h") == []
    assert len(waiting) == 2
    assert waiting.oldest() == "b"
    waiting.discard("b")
    waiting.discard("c")
    assert len(waiting) == 0
    assert waiting.oldest() is None
