"""The dispatcher's batch statements stay linear in the batch whatever the planner
knows of the outbox (sql/dispatcher.sql: sent_many, failed_many, confirm_many).

A burst lands in an outbox that autovacuum analyzed while it was empty: until
the next ANALYZE the planner believes it holds a handful of rows. Planned on
that, failed_many once read its batch (an unnest of 500 request ids) again for
every outbox row, 4 s a batch at 40,000 rows. Each statement now finds its rows
by primary key; run on 4,000 outbox rows with a batch of 500, no part of its
plan, custom (an unprepared statement, or psycopg's first runs) or generic (a
prepared statement after five runs), may run more times than the batch has rows,
nor read more rows than the outbox holds: a plan may read the outbox once (at
4,000 rows a scan costs less than 500 lookups), never once per row of the batch.
A join of the batch with itself row by row (500 x 500) once took three quarters
of sent_many's time on statistics taken while every row was pending.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from pushsync.dispatcher.outbox import query
from tests.integration.trucking import add_devices
from tests.support.plans import most_loops, most_rows, run_plan

ROWS = 4_000
BATCH = 500


@pytest.fixture(params=["analyzed empty", "analyzed pending"])
def stale(
    dsn: str, request: pytest.FixtureRequest
) -> tuple[psycopg.Connection[Any], list[uuid.UUID]]:
    """ROWS rows being sent, in an outbox analyzed while it was empty, or while every
    row was still pending (a burst analyzed before the dispatcher claimed it)."""
    conn = psycopg.connect(dsn, autocommit=True)
    add_devices(conn, "truck-1")
    if request.param == "analyzed empty":
        conn.execute("ANALYZE pushsync.outbox")
    rows = conn.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, expires_at, resend_every, coalescing)"
        " SELECT 'r', 'truck-1', now() + interval '1 hour', interval '5 minutes', false"
        " FROM generate_series(1, %s) RETURNING request_id",
        (ROWS,),
    ).fetchall()
    if request.param == "analyzed pending":
        conn.execute("ANALYZE pushsync.outbox")
    conn.execute("UPDATE pushsync.outbox SET state = 'sending', lease_owner = 'me'")
    return conn, [row[0] for row in rows]


@pytest.mark.parametrize("name", ["sent_many", "failed_many", "confirm_many"])
def test_a_batch_is_never_read_again_per_outbox_row(
    stale: tuple[psycopg.Connection[Any], list[uuid.UUID]], name: str
) -> None:
    conn, ids = stale
    batch = ids[:BATCH]
    params = {
        "owner": "me",
        "request_ids": batch,
        "gateways": ["udp"] * BATCH,
        "errors": ["udp: refused"] * BATCH,
        "finals": [False] * BATCH,
        "device_ids": ["truck-1"] * BATCH,
    }
    with conn:
        for generic in (False, True):
            plan = run_plan(conn, query(name), params, generic=generic)
            assert most_loops(plan) <= BATCH, "\n".join(plan)
            assert most_rows(plan) <= ROWS, "\n".join(plan)


DEVICES = 100


def test_a_claim_planned_without_statistics_reads_each_row_once(dsn: str) -> None:
    """A burst lands before any ANALYZE of the outbox: the planner guesses a few rows
    and may read and sort every unfinished row for each claim. That is one pass over
    the outbox per claim, and must stay one: no part of the claim's plan may read the
    outbox again for each row, custom or generic. (The benchmark
    bench/dispatch_throughput is what shows the cost of such a plan: the device and
    connection tests written as lookups per row once made it 150 ms a claim.)"""
    conn = psycopg.connect(dsn, autocommit=True)
    with conn:
        conn.execute(
            "INSERT INTO pushsync.devices (device_id, secret)"
            " SELECT 'dev-' || i, '\\x00112233445566778899aabbccddeeff'::bytea"
            " FROM generate_series(1, %s::int) AS i",
            (DEVICES,),
        )
        conn.execute(
            "INSERT INTO pushsync.dispatchers (owner, host, pid, alive_until)"
            " VALUES ('me', 'h', 1, now() + interval '1 hour')"
        )
        conn.execute(
            "INSERT INTO pushsync.outbox (rule, device_id, expires_at, resend_every, coalescing)"
            " SELECT 'r', 'dev-' || (1 + i %% %s::int), now() + interval '1 hour',"
            " interval '5 minutes', false FROM generate_series(1, %s::int) AS i",
            (DEVICES, ROWS),
        )
        params = {"owner": "me", "limit": BATCH, "lease": timedelta(seconds=30)}
        for generic in (False, True):
            plan = run_plan(conn, query("claim"), params, generic=generic)
            assert "rows=500 " in plan[0], "\n".join(plan)  # the whole batch claimed
            # One pass over the outbox (its index also holds the entries of the
            # custom run's rolled-back claim), never one pass per row.
            assert most_rows(plan) <= 2 * ROWS, "\n".join(plan)
