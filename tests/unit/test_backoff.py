"""The listener's reconnection backoff: capped, jittered, and private in its randomness."""

from __future__ import annotations

import random

from pushsync.listener.connection import Backoff


def test_delays_double_up_to_the_cap_with_half_to_full_jitter() -> None:
    backoff = Backoff(first=0.5, most=4.0)
    nominal = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for expected in nominal:
        delay = backoff.next()
        assert expected * 0.5 <= delay <= expected
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5


def test_jitter_leaves_the_shared_random_state_alone() -> None:
    """A reconnecting listener in a thread must not move the ``random`` module's state:
    a program embedding it (or a property test drawing data meanwhile) relies on it."""
    before = random.getstate()
    backoff = Backoff()
    for _ in range(10):
        backoff.next()
    assert random.getstate() == before
