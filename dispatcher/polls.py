"""Polls: run the rules file's ``polls:`` on their schedule.

``pushsync migrate`` compiles each poll into a function registered in
``pushsync.rules``; the dispatcher re-reads that list (:func:`list_polls`),
asks :func:`due_polls` which are due, and runs each with :func:`run_poll`.
How polls behave with several dispatchers is in ``docs/operations.md``
("Several dispatchers"); the poll function itself in ``docs/rules.md`` ("Polls").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import class_row

from pushsync.dispatcher.outbox import query

AsyncConn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class Poll:
    """A registered poll: its name, how often it runs, and its function in schema pushsync."""

    name: str
    every: timedelta
    function_name: str


def due_polls(polls: Iterable[Poll], last_runs: Mapping[str, float], now: float) -> list[Poll]:
    """The polls due at ``now``, in the order given.

    ``last_runs`` maps a poll's name to when it last ran, and ``now`` is on the
    same clock, in seconds (the daemon uses ``time.monotonic()``). A poll is due
    when it never ran or ``last run + every <= now``.

    Last runs are kept in memory, per dispatcher: with N dispatchers a poll
    runs up to N times per ``every`` (never at once: :func:`run_poll` locks),
    and a restarted dispatcher runs every poll at once. Storing last runs in
    the database would make it at most once per ``every``; that needs a schema
    change.
    """
    return [
        poll
        for poll in polls
        if (last := last_runs.get(poll.name)) is None or last + poll.every.total_seconds() <= now
    ]


def next_due(polls: Iterable[Poll], last_runs: Mapping[str, float], now: float) -> float | None:
    """Seconds from ``now`` until the next poll is due (0 if one is due); None without polls."""
    waits = [
        0.0
        if (last := last_runs.get(poll.name)) is None
        else max(0.0, last + poll.every.total_seconds() - now)
        for poll in polls
    ]
    return min(waits, default=None)


async def list_polls(conn: AsyncConn) -> list[Poll]:
    """The polls registered in ``pushsync.rules``, by name."""
    async with conn.cursor(row_factory=class_row(Poll)) as cur:
        await cur.execute(query("list_polls"))
        return await cur.fetchall()


async def run_poll(conn: AsyncConn, poll: Poll) -> int | None:
    """Run ``poll`` once: how many outbox rows it wrote, or None if another dispatcher is.

    One transaction: take the poll's advisory lock (without waiting; keyed on
    ``hashtextextended('pushsync.poll:' || name, 0)``), then call its function,
    by its name from ``pushsync.rules`` as a quoted identifier
    (``psycopg.sql.Identifier``), never pasted into SQL as text. ``conn`` must
    be an autocommit connection that nothing else uses meanwhile (statements
    of other tasks would join the transaction). A failing poll rolls back and
    raises.
    """
    call = sql.SQL(query("run_poll")).format(function=sql.Identifier(poll.function_name))
    async with conn.transaction():
        cur = await conn.execute(query("lock_poll"), {"name": poll.name})
        locked = await cur.fetchone()
        if not (locked and locked[0]):
            return None
        cur = await conn.execute(call)
        row = await cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0


__all__ = ["Poll", "due_polls", "list_polls", "next_due", "run_poll"]
