"""The SYNC server's bookkeeping in batches, on a real database (PoolStore, sql/connections.sql).

Many handshakes at once share their secret lookups and connection records;
the tests check that each still gets its own answer and record, in order, and
that a batch written late or a device removed meanwhile does no harm.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from pushsync import queries
from pushsync.dispatcher.nodes import PoolStore
from pushsync.dispatcher.records import Pending
from pushsync.listener.connection import KeyRefused
from tests.support.dispatching import (
    SECRET,
    WRONG,
    connections_of,
    dispatching,
    enqueue,
)
from tests.support.dispatching import session as open_device
from tests.support.plans import most_loops, most_rows, run_plan

Stores = Callable[[str], Awaitable[PoolStore]]
MANY = 300


def add_fleet(db: psycopg.Connection, count: int, prefix: str = "d") -> list[str]:
    ids = [f"{prefix}-{n}" for n in range(count)]
    db.execute(
        "INSERT INTO pushsync.devices (device_id, secret) SELECT id, %s FROM unnest(%s::text[]) id",
        (SECRET, ids),
    )
    return ids


def held(db: psycopg.Connection) -> dict[str, tuple[str, str]]:
    rows = db.execute("SELECT device_id, owner, peer FROM pushsync.sync_connections").fetchall()
    return {device: (owner, peer) for device, owner, peer in rows}


@pytest_asyncio.fixture
async def stores(dsn: str) -> AsyncIterator[Stores]:
    async with AsyncExitStack() as stack:

        async def make(owner: str) -> PoolStore:
            store = PoolStore(dsn, owner)
            await store.pool.open(wait=True)
            stack.push_async_callback(store.close)
            return store

        yield make


def hold_writes(store: PoolStore) -> asyncio.Event:
    """Make ``store``'s record batches wait for the event returned before writing."""
    gate = asyncio.Event()
    write = store._write_records

    async def held_write(batch: Pending) -> None:
        await gate.wait()
        await write(batch)

    store.records._write = held_write
    return gate


@pytest.mark.asyncio
async def test_many_connections_at_once_are_recorded_in_a_few_batches(
    db: psycopg.Connection, stores: Stores
) -> None:
    ids = add_fleet(db, MANY)
    rid = enqueue(db, ids[7])
    db.execute(
        "UPDATE pushsync.outbox SET state = 'sent', next_attempt_at = now() + interval '1 hour'"
    )
    store = await stores("a")

    await asyncio.gather(*(store.connected(d, f"192.0.2.1:{n}") for n, d in enumerate(ids)))

    assert held(db) == {d: ("a", f"192.0.2.1:{n}") for n, d in enumerate(ids)}
    assert store.records.batches <= 3  # the first alone, then the rest together
    due = db.execute(
        "SELECT next_attempt_at <= now() FROM pushsync.outbox WHERE request_id = %s", (rid,)
    ).fetchone()
    assert due == (True,)  # what the device missed goes down the new connection
    seen = db.execute(
        "SELECT count(*) FROM pushsync.devices WHERE last_seen_at IS NOT NULL"
    ).fetchone()
    assert seen == (MANY,)

    await asyncio.gather(*(store.disconnected(d, f"192.0.2.1:{n}") for n, d in enumerate(ids)))
    assert held(db) == {}


@pytest.mark.asyncio
async def test_a_late_batch_does_not_take_back_a_device_that_moved_on(
    db: psycopg.Connection, stores: Stores
) -> None:
    """Dispatcher a's record of a connection, written after the device connected to b
    (a batch held up), leaves b's record; a's disconnection then removes nothing of b's."""
    add_fleet(db, 1)
    a, b = await stores("a"), await stores("b")
    gate = hold_writes(a)
    late = asyncio.create_task(a.connected("d-0", "192.0.2.1:1000"))
    await asyncio.sleep(0.05)  # a's batch is waiting; the device moves to b meanwhile
    await b.connected("d-0", "192.0.2.2:2000")
    gate.set()
    await asyncio.wait_for(late, 10)
    assert held(db) == {"d-0": ("b", "192.0.2.2:2000")}
    await a.disconnected("d-0", "192.0.2.1:1000")
    assert held(db) == {"d-0": ("b", "192.0.2.2:2000")}


@pytest.mark.asyncio
async def test_a_connection_gone_before_its_record_was_written_is_never_recorded(
    db: psycopg.Connection, stores: Stores
) -> None:
    add_fleet(db, 1)
    a, b = await stores("a"), await stores("b")
    await b.connected("d-0", "192.0.2.2:2000")
    gate = hold_writes(a)
    first = asyncio.create_task(a.connected("d-0", "192.0.2.9:1"))  # the batch in flight
    await asyncio.sleep(0.05)
    # Both in the next batch: the connection came and went before it was written.
    both = [
        asyncio.create_task(a.connected("d-0", "192.0.2.1:1000")),
        asyncio.create_task(a.disconnected("d-0", "192.0.2.1:1000")),
    ]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.wait_for(asyncio.gather(first, *both), 10)
    # The first (a's newer record) holds, the second never became a record.
    assert held(db) == {"d-0": ("a", "192.0.2.9:1")}


@pytest.mark.asyncio
async def test_a_device_removed_meanwhile_is_skipped_and_the_rest_of_its_batch_recorded(
    db: psycopg.Connection, stores: Stores
) -> None:
    ids = add_fleet(db, 3)
    store = await stores("a")
    gate = hold_writes(store)
    records = [
        store.connected(ids[0], "192.0.2.1:1"),
        store.connected(ids[1], "192.0.2.1:2"),
        store.track(ids[1], "198.51.100.1:5001"),
        store.track(ids[2], "198.51.100.2:5001"),
        store.connected("never-registered", "192.0.2.1:3"),
    ]
    waiting = asyncio.gather(*records)
    await asyncio.sleep(0.05)
    db.execute("DELETE FROM pushsync.devices WHERE device_id = %s", (ids[1],))
    gate.set()
    await asyncio.wait_for(waiting, 10)
    assert held(db) == {ids[0]: ("a", "192.0.2.1:1")}
    tracked = db.execute(
        "SELECT device_id, address FROM pushsync.device_addresses WHERE source = 'tracking'"
    ).fetchall()
    assert tracked == [(ids[2], "198.51.100.2:5001")]


@pytest.mark.asyncio
async def test_leaving_writes_the_records_waiting_before_removing_its_own(
    db: psycopg.Connection, stores: Stores
) -> None:
    ids = add_fleet(db, 2)
    store = await stores("a")
    await store.heartbeat(None, None)
    gate = hold_writes(store)
    waiting = asyncio.gather(
        store.track(ids[0], "198.51.100.1:5001"), store.connected(ids[1], "192.0.2.1:1")
    )
    leaving = asyncio.create_task(store.gone())
    await asyncio.sleep(0.05)
    assert not leaving.done()
    gate.set()
    await asyncio.wait_for(asyncio.gather(leaving, waiting), 10)
    tracked = db.execute("SELECT device_id FROM pushsync.device_addresses").fetchall()
    assert tracked == [(ids[0],)]  # written, not lost
    assert held(db) == {}  # and the dispatcher's records are gone with it
    assert db.execute("SELECT count(*) FROM pushsync.dispatchers").fetchone() == (0,)
    await store.connected(ids[1], "192.0.2.1:2")  # after leaving: not recorded
    assert held(db) == {}


@pytest.mark.asyncio
async def test_a_batch_written_when_the_database_is_back_after_a_deadlock_or_outage(
    db: psycopg.Connection, stores: Stores
) -> None:
    ids = add_fleet(db, 1)
    store = await stores("a")
    write = store._write_records
    failures = [psycopg.errors.DeadlockDetected("deadlock detected")]

    async def flaky(batch: Pending) -> None:
        if failures:
            raise failures.pop()
        await write(batch)

    store.records._write = flaky
    store.records._retry_first = 0.01
    await asyncio.wait_for(store.connected(ids[0], "192.0.2.1:1"), 10)
    assert held(db) == {ids[0]: ("a", "192.0.2.1:1")}


@pytest.mark.asyncio
async def test_secret_lookups_at_once_share_a_query_and_each_gets_its_own_answer(
    db: psycopg.Connection, stores: Stores
) -> None:
    ids = add_fleet(db, 40)
    db.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = %s", (ids[3],))
    db.execute("UPDATE pushsync.devices SET secret = %s WHERE device_id = %s", (WRONG, ids[4]))
    store = await stores("a")
    asked = [*ids, "nobody", ids[0]]
    answers = await asyncio.gather(*(store.secret(d) for d in asked))
    expected: list[bytes | None] = [SECRET] * len(asked)
    expected[3], expected[4], expected[-2] = None, WRONG, None
    assert answers == expected
    assert store.lookups.batches <= 3


@pytest.mark.asyncio
async def test_handshakes_sharing_a_lookup_still_refuse_the_wrong_unknown_and_disabled(
    db: psycopg.Connection, dsn: str
) -> None:
    """Over real sockets, all at once: one refusal each, every good device welcomed and
    recorded, and their lookups shared."""
    good = add_fleet(db, 30)
    add_fleet(db, 1, prefix="off")
    db.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'off-0'")
    async with dispatching(dsn) as dispatcher:
        bad = [(good[0], WRONG), ("nobody", SECRET), ("off-0", SECRET)]
        attempts = [open_device(dispatcher, device=d) for d in good[1:]]
        attempts += [open_device(dispatcher, secret=s, device=d) for d, s in bad]
        results = await asyncio.wait_for(asyncio.gather(*attempts, return_exceptions=True), 30)
        opened = results[: len(good) - 1]
        refused = results[len(good) - 1 :]
        assert [type(r) for r in refused] == [KeyRefused] * 3
        server = connections_of(dispatcher)
        assert server.stats.refused == 3
        assert sorted(server.by_device) == sorted(good[1:])
        assert dispatcher.store.lookups.batches < len(attempts)
        await dispatcher.store.records.flush()
        assert set(held(db)) == set(good[1:])
        for session in opened:
            assert not isinstance(session, BaseException)
            await session.close("bye")


def test_records_carry_the_time_of_the_connection_not_of_the_batch(
    db: psycopg.Connection, dsn: str
) -> None:
    """The guard in sql/connections.sql compares ``connected_at``: it must be the
    dispatcher's time of the connection, which a record written later keeps."""
    add_fleet(db, 1)
    since = datetime.now(UTC) - timedelta(minutes=5)

    async def record() -> None:
        store = PoolStore(dsn, "a")
        await store.pool.open(wait=True)
        try:
            await store.records.connected("d-0", "192.0.2.1:1", since)
        finally:
            await store.close()

    asyncio.run(record())
    row = db.execute("SELECT connected_at FROM pushsync.sync_connections").fetchone()
    assert row is not None
    assert abs(row[0] - since) < timedelta(milliseconds=1)


def test_no_part_of_a_batch_record_runs_more_often_than_the_batch_has_rows(
    db: psycopg.Connection, dsn: str
) -> None:
    """psycopg prepares a statement after a few runs, and a generic plan guesses ten
    devices a batch. Joined with a CTE, the outbox's sent rows were once planned as a
    nested loop that read the CTE once per sent row: one batch of 5,000 reconnecting
    devices took 24.6 s. Here 500 of 2,000 devices connected elsewhere reconnect, with
    4,000 sent rows in the outbox (2 a device): no part of the plan, custom or generic,
    may run more times than the batch's devices have rows (1,000), nor read more rows
    than the outbox holds."""
    devices = add_fleet(db, 2_000)
    db.execute(
        "INSERT INTO pushsync.dispatchers (owner, host, pid, alive_until)"
        " VALUES ('gone', 'h', 1, now() - interval '1 minute')"
    )
    db.execute(
        "INSERT INTO pushsync.sync_connections (device_id, owner, peer, connected_at)"
        " SELECT d, 'gone', '127.0.0.1:1', now() - interval '1 hour' FROM unnest(%s::text[]) d",
        (devices,),
    )
    db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, expires_at, resend_every, coalescing,"
        " next_attempt_at) SELECT 'r', d, now() + interval '1 hour', interval '5 minutes',"
        " false, now() - interval '1 minute' FROM unnest(%s::text[]) d, generate_series(1, 2)",
        (devices,),
    )
    # Analyzed while every row was due; then they are sent, to be resent later: the
    # statistics still say that nothing waits for a later resend (as after a burst).
    db.execute("ANALYZE pushsync.outbox, pushsync.sync_connections")
    db.execute(
        "UPDATE pushsync.outbox SET state = 'sent', sent_at = now(),"
        " next_attempt_at = now() + interval '5 minutes'"
    )
    batch = devices[:500]
    params: dict[str, Any] = {
        "owner": "here",
        "host": "h",
        "pid": 2,
        "alive_for": "15 seconds",
        "device_ids": batch,
        "peers": ["127.0.0.1:2"] * len(batch),
        "since": [datetime.now(UTC)] * len(batch),
        "addresses": ["127.0.0.1:3"] * len(batch),
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, file in (
            ("connected", "connections.sql"),
            ("due_now", "dispatcher.sql"),  # in the same transaction, after it
            ("tracked", "connections.sql"),
            ("disconnected", "connections.sql"),
        ):
            for generic in (False, True):
                plan = run_plan(conn, queries.get(name, file), params, generic=generic)
                assert most_loops(plan) <= 2 * len(batch), (name, generic, "\n".join(plan))
                # At most one read of the outbox (4,000 rows), never one per device.
                assert most_rows(plan) <= 4_000, (name, generic, "\n".join(plan))
