"""Each attempt to send is recorded in the statement that records its outcome.

``attempt_log`` (sql/0012_attempt_log.sql) keeps, per notification, the last
16 attempts: when, through which gateway, and what came of it. The
statements that record sends and failures append to it (sql/dispatcher.sql),
and archiving carries it into the history.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from pushsync import schema
from pushsync.dispatcher.outbox import ConnectionExecutor, OutboxStore, query
from tests.integration.trucking import add_devices


def enqueue(db: psycopg.Connection, device_id: str = "truck-1") -> uuid.UUID:
    row = db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, "
        "expires_at, resend_every) "
        "VALUES ('r', %s, 'sync', 'go', false, now() + interval '1 hour', '5 minutes') "
        "RETURNING request_id",
        (device_id,),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def attempt_log(db: psycopg.Connection, request_id: uuid.UUID) -> list[dict[str, Any]]:
    row = db.execute(
        "SELECT attempt_log FROM pushsync.outbox WHERE request_id = %s", (request_id,)
    ).fetchone()
    assert row is not None
    return list(row[0])


def due_now(db: psycopg.Connection) -> None:
    db.execute("UPDATE pushsync.outbox SET next_attempt_at = now()")


@pytest_asyncio.fixture
async def store(db: psycopg.Connection, dsn: str) -> AsyncIterator[OutboxStore]:
    add_devices(db, "truck-1", "truck-2", "truck-3")
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) VALUES "
        "('truck-1', 'udp', 'manual', '192.0.2.7:5001'), "
        "('truck-2', 'email', 'manual', 't2@example.com')"
    )
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield OutboxStore(ConnectionExecutor(conn), "a")
    finally:
        await conn.close()


@pytest.mark.asyncio
async def test_each_send_records_its_time_and_gateway(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    by_udp, by_smtp, by_sync = (enqueue(db, d) for d in ("truck-1", "truck-2", "truck-3"))
    claimed = {c.request_id for c in await store.claim(10)}
    assert claimed == {by_udp, by_smtp, by_sync}
    assert await store.sent_many([(by_udp, "udp"), (by_smtp, "smtp")]) == {by_udp, by_smtp}
    assert await store.sent(by_sync, "sync")

    for request_id, gateway in ((by_udp, "udp"), (by_smtp, "smtp"), (by_sync, "sync")):
        (attempt,) = attempt_log(db, request_id)
        assert (attempt.pop("gateway"), attempt.pop("outcome")) == (gateway, "sent")
        sent_at = db.execute(
            "SELECT sent_at FROM pushsync.outbox WHERE request_id = %s", (request_id,)
        ).fetchone()
        assert sent_at is not None
        assert datetime.fromisoformat(attempt.pop("at")) == sent_at[0]
        assert attempt == {}  # no error


def test_the_recording_statements_append_without_a_function_call_per_row(
    db: psycopg.Connection,
) -> None:
    """pushsync.attempt_logged is inlined: declared IMMUTABLE, or given an argument the
    planner does not inline, it would be called once per row of each batch."""
    for name in ("sent", "sent_many", "failed_many"):
        plan = db.execute(
            f"EXPLAIN VERBOSE {query(name)}",
            {
                "owner": "a",
                "request_id": uuid.uuid4(),
                "request_ids": [uuid.uuid4()],
                "gateway": "udp",
                "gateways": ["udp"],
                "errors": ["e"],
                "finals": [False],
            },
        ).fetchall()
        text = "\n".join(row[0] for row in plan)
        assert "attempt_log" in text, name
        assert "attempt_logged" not in text, (name, text)


@pytest.mark.asyncio
async def test_failures_and_resends_are_recorded_in_order_with_their_errors(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    request_id = enqueue(db)
    await store.claim(10)
    assert await store.failed(request_id, "udp: no route to host", final=False)
    due_now(db)
    await store.claim(10)
    assert await store.sent_many([(request_id, "udp")]) == {request_id}
    due_now(db)
    await store.claim(10)
    assert await store.failed(request_id, "udp: refused; smtp: 550 no such user", final=True)

    log = attempt_log(db, request_id)
    assert [(a["outcome"], a.get("gateway"), a.get("error")) for a in log] == [
        ("retry", None, "udp: no route to host"),
        ("sent", "udp", None),
        ("failed", None, "udp: refused; smtp: 550 no such user"),
    ]
    times = [datetime.fromisoformat(a["at"]) for a in log]
    assert times == sorted(times)
    row = db.execute(
        "SELECT attempts, state FROM pushsync.outbox WHERE request_id = %s", (request_id,)
    ).fetchone()
    assert row == (3, "failed")


@pytest.mark.asyncio
async def test_a_send_recorded_by_a_dispatcher_that_lost_the_lease_is_not_logged(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    request_id = enqueue(db)
    await store.claim(10)
    db.execute("UPDATE pushsync.outbox SET lease_owner = 'b'")
    assert await store.sent_many([(request_id, "udp")]) == set()
    assert not await store.failed(request_id, "udp: timed out", final=False)
    assert attempt_log(db, request_id) == []


@pytest.mark.asyncio
async def test_the_log_keeps_the_last_16_attempts(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    request_id = enqueue(db)
    for n in range(20):
        due_now(db)
        assert [c.request_id for c in await store.claim(10)] == [request_id]
        assert await store.failed(request_id, f"udp: try {n}", final=False)
    log = attempt_log(db, request_id)
    assert [a["error"] for a in log] == [f"udp: try {n}" for n in range(4, 20)]


@pytest.mark.asyncio
async def test_archiving_carries_the_log_into_the_history_and_the_roll_ups_still_count(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    request_id = enqueue(db)
    await store.claim(10)
    await store.sent_many([(request_id, "udp")])
    assert await store.confirm(request_id, "truck-1")
    log = attempt_log(db, request_id)
    db.execute("UPDATE pushsync.outbox SET lease_expires_at = NULL")
    assert await store.archive(100) == 1
    row = db.execute(
        "SELECT attempt_log, state FROM pushsync.outbox_history WHERE request_id = %s",
        (request_id,),
    ).fetchone()
    assert row == (log, "confirmed")
    counts: dict[str, int] = dict(
        db.execute(
            "SELECT kind, sum(n)::int FROM pushsync.flow_minutes WHERE rule = 'r' GROUP BY kind"
        ).fetchall()
    )
    assert counts == {"written": 1, "sent": 1, "confirmed": 1}


@pytest.mark.asyncio
async def test_applying_the_migration_again_keeps_every_log(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    fresh, tried = enqueue(db), enqueue(db, "truck-2")
    await store.claim(10)
    await store.failed(tried, "udp: timed out", final=False)
    (migration,) = [m for m in schema.migrations() if m.version == 12]
    db.execute(migration.sql)
    assert attempt_log(db, fresh) == []  # a row written before has an empty log, not NULL
    assert [a["error"] for a in attempt_log(db, tried)] == ["udp: timed out"]
