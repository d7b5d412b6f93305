"""Log output helpers: the throttle that keeps floods out of the log."""

from __future__ import annotations

import logging

import pytest

from pushsync.logs import Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_and_interval_then_the_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = Clock()
    throttle = Throttle(logging.getLogger("flood"), 10.0, clock=clock)
    for n in range(1000):  # one kind: the format string, whatever the arguments
        throttle.warning("dropped datagram from %s: %s", f"10.0.0.{n % 250}:{n}", "Malformed")
    assert [r.getMessage() for r in caplog.records] == [
        "dropped datagram from 10.0.0.0:0: Malformed"
    ]
    throttle.warning("another kind")
    clock.now = 10.0
    throttle.warning("dropped datagram from %s: %s", "10.0.0.9:9", "BadSignature")
    assert [r.getMessage() for r in caplog.records][1:] == [
        "another kind",
        "dropped datagram from 10.0.0.9:9: BadSignature (999 more suppressed)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_keys_and_what_is_held_back_goes_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    throttle = Throttle(logging.getLogger("flood"), 10.0, clock=Clock())
    assert throttle.info("a %s", 1, key="k")
    assert not throttle.info("b %s", 2, key="k")  # same key, other text: same kind
    assert throttle.info("b %s", 3, key="other")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "a 1"),
        (logging.DEBUG, "b 2"),
        (logging.INFO, "b 3"),
    ]


def test_a_level_that_is_off_counts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    throttle = Throttle(logging.getLogger("flood"), 10.0, clock=Clock())
    assert not throttle.info("quiet")
    assert throttle.warning("loud")
    assert [r.getMessage() for r in caplog.records] == ["loud"]
