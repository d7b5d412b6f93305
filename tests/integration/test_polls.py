"""Polls: the scheduling decision (unit) and the dispatcher running them (real Postgres)."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from pushsync.dispatcher.daemon import Dispatcher, DispatcherSettings
from pushsync.dispatcher.polls import Poll, due_polls, next_due
from pushsync.testing import RecordingGateway
from tests.integration import trucking
from tests.support.dispatching import running, set_address, states
from tests.support.waiting import until_async

LOGGER = "pushsync.dispatcher.daemon"

RULES = """\
version: 1
polls:
  - name: stale_check
    every: 1s
    query: SELECT device_id, 'sync' AS subject, 'stale' AS content FROM public.stale_devices
"""

RULES_WITH_DOOMED = (
    RULES
    + """\
  - name: doomed
    every: 1s
    query: SELECT device_id FROM public.doomed_devices
"""
)


# --------------------------------------------------------------------------- unit: due_polls


def _poll(name: str, seconds: float) -> Poll:
    return Poll(name, timedelta(seconds=seconds), f"poll__{name}")


def test_unit_never_run_polls_are_due() -> None:
    polls = [_poll("a", 60), _poll("b", 1)]
    assert due_polls(polls, {}, 0.0) == polls


def test_unit_due_once_every_has_passed_since_the_last_run() -> None:
    a, b = _poll("a", 60), _poll("b", 1)
    last = {"a": 100.0, "b": 100.0}
    assert due_polls([a, b], last, 100.5) == []
    assert due_polls([a, b], last, 101.0) == [b]  # last + every <= now: due
    assert due_polls([a, b], last, 159.9) == [b]
    assert due_polls([a, b], last, 160.0) == [a, b]


def test_unit_runs_of_polls_no_longer_listed_do_not_matter() -> None:
    assert due_polls([], {"gone": 0.0}, 10.0) == []
    assert due_polls([_poll("a", 5)], {"gone": 0.0, "a": 8.0}, 10.0) == []


def test_unit_next_due() -> None:
    a, b = _poll("a", 60), _poll("b", 1)
    assert next_due([], {}, 0.0) is None
    assert next_due([a, b], {}, 0.0) == 0.0
    assert next_due([a, b], {"a": 100.0, "b": 100.0}, 100.25) == 0.75
    assert next_due([a, b], {"a": 100.0, "b": 100.0}, 200.0) == 0.0


# --------------------------------------------------------------------------- integration helpers


def setup_polls(db: psycopg.Connection, rules: str = RULES) -> None:
    """The poll's source tables, device d1 (with a UDP address), and the rules applied."""
    db.execute("CREATE TABLE public.stale_devices (device_id text NOT NULL)")
    db.execute("CREATE TABLE public.doomed_devices (device_id text NOT NULL)")
    trucking.add_devices(db, "d1")
    set_address(db, "d1", "udp", "127.0.0.1:9")
    trucking.apply_rules(db, rules)


def outbox_rows(db: psycopg.Connection) -> list[tuple[str, str, str, str]]:
    found = db.execute(
        "SELECT rule, device_id, content, state FROM pushsync.outbox ORDER BY created_at"
    )
    return [(r[0], r[1], r[2], r[3]) for r in found.fetchall()]


class CountingDispatcher(Dispatcher):
    """A dispatcher that counts the poll runs it finished, whatever each run found."""

    finished_runs = 0

    async def _run_poll(self, conn: psycopg.AsyncConnection[Any], poll: Poll) -> None:
        await super()._run_poll(conn, poll)
        self.finished_runs += 1


def dispatcher(dsn: str, udp: RecordingGateway) -> CountingDispatcher:
    """A dispatcher whose fallback claim is slow: a quick send means the poll woke it."""
    return CountingDispatcher(
        DispatcherSettings(
            dsn=dsn, poll_interval=30.0, housekeeping_interval=30.0, polls_reload_interval=0.2
        ),
        {"udp": udp},
    )


def messages(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.name == LOGGER and text in r.getMessage())


# --------------------------------------------------------------------------- integration


@pytest.mark.asyncio
async def test_poll_sends_and_is_not_queued_again_until_confirmed(
    db: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    udp = RecordingGateway("udp")
    db.execute("CREATE TABLE public.stale_devices (device_id text NOT NULL)")
    trucking.add_devices(db, "d1")
    set_address(db, "d1", "udp", "127.0.0.1:9")
    db.execute("INSERT INTO public.stale_devices VALUES ('d1'), ('not-registered')")
    async with running(dispatcher(dsn, udp)):
        await until_async(lambda: messages(caplog, "polls: none") == 1, "the first poll list")
        trucking.apply_rules(db, RULES)  # migrated while running: picked up on reload
        await until_async(lambda: len(udp.items) == 1, "the poll's notification")
        [item] = udp.items
        assert (item.rule, item.device_id, item.subject, item.content) == (
            "stale_check",
            "d1",
            "sync",
            "stale",
        )
        await until_async(lambda: states(db) == {"sent": 1}, "the send recorded")

        # Sent, unconfirmed: the poll runs again every second but queues nothing.
        idle = messages(caplog, "poll stale_check queued nothing")
        await until_async(
            lambda: messages(caplog, "poll stale_check queued nothing") >= idle + 2,
            "two more runs of the poll",
        )
        assert outbox_rows(db) == [("stale_check", "d1", "stale", "sent")]
        assert len(udp.items) == 1

        # Confirmed: the next run queues it again.
        db.execute("UPDATE pushsync.outbox SET state = 'confirmed', confirmed_at = now()")
        await until_async(lambda: len(udp.items) == 2, "the notification queued again")
    assert messages(caplog, "poll stale_check failed") == 0


@pytest.mark.asyncio
async def test_a_failing_poll_is_logged_and_the_others_go_on(
    db: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    setup_polls(db, RULES_WITH_DOOMED)
    db.execute("DROP TABLE public.doomed_devices")
    db.execute("INSERT INTO public.stale_devices VALUES ('d1')")
    udp = RecordingGateway("udp")
    async with running(dispatcher(dsn, udp)):
        await until_async(
            lambda: messages(caplog, "poll doomed failed") >= 2, "doomed to fail twice"
        )
        await until_async(lambda: len(udp.items) == 1, "the other poll's notification")
    assert [i.rule for i in udp.items] == ["stale_check"]
    [failure, *_] = [r for r in caplog.records if "poll doomed failed" in r.getMessage()]
    assert failure.levelno == logging.ERROR
    assert "doomed_devices" in failure.getMessage()  # the database's reason
    assert [r[0] for r in outbox_rows(db)] == ["stale_check"]


@pytest.mark.asyncio
async def test_a_poll_another_dispatcher_runs_is_skipped(
    db: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    setup_polls(db)
    db.execute("INSERT INTO public.stale_devices VALUES ('d1')")
    udp = RecordingGateway("udp")
    skipped = "poll stale_check is running in another dispatcher"
    # ``other`` plays a dispatcher in the middle of running the poll: it holds the
    # poll's transaction-level advisory lock until its transaction ends.
    with psycopg.connect(dsn) as other:
        other.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended('pushsync.poll:' || %s, 0))",
            ("stale_check",),
        )
        async with running(dispatcher(dsn, udp)):
            await until_async(lambda: messages(caplog, skipped) >= 2, "two skipped runs")
            assert outbox_rows(db) == []
            assert udp.items == []
            other.rollback()  # its transaction ends: the lock is free
            await until_async(lambda: len(udp.items) == 1, "the poll run once the lock is free")
    assert outbox_rows(db) == [("stale_check", "d1", "stale", "sent")]


@pytest.mark.asyncio
async def test_two_dispatchers_queue_a_poll_once(db: psycopg.Connection, dsn: str) -> None:
    setup_polls(db)
    db.execute("INSERT INTO public.stale_devices VALUES ('d1')")
    first, second = RecordingGateway("udp"), RecordingGateway("udp")
    one, other = dispatcher(dsn, first), dispatcher(dsn, second)
    async with running(one), running(other):
        await until_async(lambda: states(db) == {"sent": 1}, "the poll's notification sent")
        since = one.finished_runs, other.finished_runs
        await until_async(
            lambda: one.finished_runs >= since[0] + 2 and other.finished_runs >= since[1] + 2,
            "both dispatchers to run the poll twice more",
        )
    assert outbox_rows(db) == [("stale_check", "d1", "stale", "sent")]
    assert len(first.items) + len(second.items) == 1
