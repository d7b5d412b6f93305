"""The dispatcher's store on a real database: claim, leases, resend, finish, connections.

Every test of the store runs twice: on one async connection (the daemon's
loops) and on a connection pool (:class:`PoolStore`, the SYNC server's).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg.rows import dict_row

from pushsync.dispatcher.nodes import PoolStore
from pushsync.dispatcher.outbox import ConnectionExecutor, OutboxStore, query
from tests.integration import trucking
from tests.integration.trucking import add_devices

LEASE = timedelta(seconds=30)
LEASE_RAN_OUT = (
    "lease_expires_at = now() - interval '1 second', next_attempt_at = now() - interval '1 second'"
)
"""A claimed row whose lease has run out: the claim set both to the lease's end."""

Stores = Callable[[str], Awaitable[OutboxStore]]


def enqueue(
    db: psycopg.Connection,
    device_id: str = "truck-1",
    *,
    rule: str = "r",
    priority: str = "normal",
    ttl: str = "1 hour",
    coalescing: bool = True,
) -> uuid.UUID:
    row = db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, priority, coalescing, "
        "expires_at, resend_every) "
        "VALUES (%s, %s, 'sync', 'go', %s, %s, now() + %s::interval, '5 minutes') "
        "RETURNING request_id",
        (rule, device_id, priority, coalescing, ttl),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def get(db: psycopg.Connection, request_id: uuid.UUID) -> dict[str, Any]:
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT *, lease_expires_at - now() AS lease_left, "
            "next_attempt_at - now() AS due_in FROM pushsync.outbox WHERE request_id = %s",
            (request_id,),
        )
        row = cur.fetchone()
    assert row is not None
    return row


def set_row(db: psycopg.Connection, request_id: uuid.UUID, assignment: str) -> None:
    db.execute(f"UPDATE pushsync.outbox SET {assignment} WHERE request_id = %s", (request_id,))


def states(db: psycopg.Connection) -> list[tuple[str, str, str, int]]:
    rows = db.execute(
        "SELECT device_id, state, content, coalesced FROM pushsync.outbox "
        "ORDER BY device_id, state, content"
    ).fetchall()
    return [tuple(r) for r in rows]


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    add_devices(db, "truck-1", "truck-2")
    return db


@pytest_asyncio.fixture(params=["connection", "pool"])
async def stores(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[Stores]:
    """Makes the store of a dispatcher (its owner given), each on its own connection or pool."""

    async with AsyncExitStack() as stack:

        async def make(owner: str) -> OutboxStore:
            if request.param == "pool":
                pooled = PoolStore(dsn, owner, lease=LEASE)
                await pooled.pool.open(wait=True)
                stack.push_async_callback(pooled.close)
                return pooled
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            stack.push_async_callback(conn.close)
            return OutboxStore(ConnectionExecutor(conn), owner, lease=LEASE)

        yield make


@pytest_asyncio.fixture
async def store(stores: Stores) -> OutboxStore:
    """Dispatcher ``a``'s store."""
    return await stores("a")


# --------------------------------------------------------------------------- claim


@pytest.mark.asyncio
async def test_claim_moves_pending_to_sending_with_what_a_sender_needs(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    db = fleet
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) VALUES "
        "('truck-1', 'udp', 'tracking', '198.51.100.1:5001'), "
        "('truck-1', 'udp', 'manual', '192.0.2.7:5001'), "
        "('truck-1', 'email', 'tracking', 't1@example.com')"
    )
    rid = enqueue(db)
    other = enqueue(db, "truck-2")

    claimed = {c.request_id: c for c in await store.claim(10)}

    assert set(claimed) == {rid, other}
    one = claimed[rid]
    assert (one.rule, one.device_id, one.subject, one.content) == ("r", "truck-1", "sync", "go")
    assert (one.priority, one.gateway, one.attempts) == ("normal", "auto", 1)
    assert one.secret == b"0123456789abcdef"
    assert one.udp_address == "192.0.2.7:5001"  # manual beats tracking
    assert one.email_address == "t1@example.com"
    assert (claimed[other].udp_address, claimed[other].email_address) == (None, None)
    row = get(db, rid)
    assert (row["state"], row["lease_owner"], row["attempts"]) == ("sending", "a", 1)
    assert timedelta(seconds=25) < row["lease_left"] <= LEASE
    assert row["due_in"] == row["lease_left"]  # out of the due rows until the lease ends
    assert await (await stores("b")).claim(10) == []


@pytest.mark.asyncio
async def test_claim_takes_high_priority_first(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    low = enqueue(fleet, rule="low", priority="low")
    normal = enqueue(fleet, rule="normal", priority="normal")
    high = enqueue(fleet, rule="high", priority="high")

    assert [c.request_id for c in await store.claim(2)] == [high, normal]
    assert [c.request_id for c in await store.claim(2)] == [low]


def test_claim_can_use_the_partial_index(fleet: psycopg.Connection) -> None:
    db = fleet
    db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, state, expires_at, resend_every) "
        "SELECT 'r' || i, 'truck-1', 'confirmed', now() + '1 hour', '5 minutes' "
        "FROM generate_series(1, 2000) AS i"
    )
    enqueue(db)
    db.execute("ANALYZE pushsync.outbox")
    with db.transaction():
        db.execute("SET LOCAL enable_seqscan = off")
        plan = db.execute(
            "EXPLAIN " + query("claim"), {"owner": "a", "limit": 10, "lease": LEASE}
        ).fetchall()
    # Either partial index over unfinished rows will do; finished rows are never read.
    text = "\n".join(r[0] for r in plan)
    assert "outbox_claim" in text or "outbox_expiry" in text, text


def test_a_claim_reads_one_batch_of_a_backlog_not_all_of_it(fleet: psycopg.Connection) -> None:
    db = fleet
    db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, priority, coalescing, expires_at, "
        "resend_every) SELECT 'r' || i, 'truck-' || (1 + i % 2), "
        "(ARRAY['low', 'normal', 'high'])[1 + i % 3], false, now() + '1 hour', '5 minutes' "
        "FROM generate_series(1, 5000) AS i"
    )
    db.execute("ANALYZE pushsync.outbox")
    with db.transaction():
        plan = db.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + query("claim"),
            {"owner": "a", "limit": 10, "lease": LEASE},
        ).fetchone()
        raise psycopg.Rollback  # EXPLAIN ANALYZE ran the claim
    assert plan is not None
    scans = list(_nodes(plan[0][0]["Plan"], "Index Scan"))
    claim = [n for n in scans if n.get("Index Name") == "outbox_claim"]
    assert claim, plan
    assert claim[0]["Actual Rows"] <= 10, claim  # in claim order: stops after the batch


def _nodes(node: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    if node.get("Node Type") == kind:
        yield node
    for child in node.get("Plans", []):
        yield from _nodes(child, kind)


@pytest.mark.asyncio
async def test_a_change_after_the_claim_gets_a_row_of_its_own(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    trucking.setup(db)
    trucking.report(db, 100, by=1)
    trucking.report(db, 100, by=1)  # folded into the pending rows
    before = [("truck-2", "pending", "disruption 100 on south", 1)]
    assert [s for s in states(db) if s[0] == "truck-2"] == before

    claimed = await store.claim(100)
    trucking.report(db, 100, by=1)

    assert {c.device_id for c in claimed} == {"truck-2", "truck-4"}
    assert [s for s in states(db) if s[0] == "truck-2"] == [
        ("truck-2", "pending", "disruption 100 on south", 0),
        ("truck-2", "sending", "disruption 100 on south", 1),
    ]


@pytest.mark.asyncio
async def test_concurrent_claims_get_disjoint_rows_and_together_all(
    fleet: psycopg.Connection, stores: Stores
) -> None:
    fleet.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, expires_at, resend_every) "
        "SELECT 'r' || i, 'truck-1', now() + '1 hour', '5 minutes' "
        "FROM generate_series(1, 500) AS i"
    )
    got: dict[str, list[uuid.UUID]] = {"a": [], "b": []}

    async def work(store: OutboxStore) -> None:
        while batch := await store.claim(50):
            got[store.owner].extend(c.request_id for c in batch)

    both = [await stores(owner) for owner in got]
    await asyncio.wait_for(asyncio.gather(*(work(store) for store in both)), 30)

    assert not set(got["a"]) & set(got["b"])
    assert len(got["a"]) + len(got["b"]) == 500
    owners = fleet.execute(
        "SELECT lease_owner, count(*) FROM pushsync.outbox WHERE state = 'sending' "
        "GROUP BY lease_owner"
    ).fetchall()
    assert dict(owners) == {k: len(v) for k, v in got.items() if v}


@pytest.mark.asyncio
async def test_an_expired_lease_is_reclaimed_a_live_one_is_not(
    fleet: psycopg.Connection, stores: Stores
) -> None:
    rid = enqueue(fleet)
    a, b = await stores("a"), await stores("b")
    await a.claim(10)
    assert await b.claim(10) == []

    set_row(fleet, rid, LEASE_RAN_OUT)
    (again,) = await b.claim(10)

    assert (again.request_id, again.attempts) == (rid, 2)
    assert await a.sent(rid, "udp") is False
    assert get(fleet, rid)["lease_owner"] == "b"
    assert await b.sent(rid, "udp") is True


@pytest.mark.asyncio
async def test_claimed_addresses_are_the_effective_addresses(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    """The claim's own lookup agrees with pushsync.effective_addresses in every combination."""
    cases = {
        "d-none": [],
        "d-track": [("tracking", "10.0.0.1:1", True)],
        "d-track-off": [("tracking", "10.0.0.1:1", False)],
        "d-manual": [("manual", "10.0.0.2:2", True)],
        "d-both": [("tracking", "10.0.0.1:1", True), ("manual", "10.0.0.2:2", True)],
        "d-manual-off": [("tracking", "10.0.0.1:1", True), ("manual", "10.0.0.2:2", False)],
        "d-track-off-manual": [("tracking", "10.0.0.1:1", False), ("manual", "10.0.0.2:2", True)],
    }
    add_devices(db, *cases)
    for device, rows in cases.items():
        for source, address, active in rows:
            db.execute(
                "INSERT INTO pushsync.device_addresses "
                "(device_id, medium, source, address, active) VALUES (%s, 'udp', %s, %s, %s)",
                (device, source, address, active),
            )
        enqueue(db, device)
    claimed = {c.device_id: c.udp_address for c in await store.claim(100)}
    view: dict[str, str] = dict(
        db.execute(
            "SELECT device_id, address FROM pushsync.effective_addresses WHERE medium = 'udp'"
        ).fetchall()
    )
    assert claimed == {device: view.get(device) for device in cases}
    assert claimed["d-manual-off"] is None  # an inactive manual address still decides


@pytest.mark.asyncio
async def test_a_disabled_devices_rows_are_not_claimed(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    off = enqueue(fleet, "truck-2")
    on = enqueue(fleet, "truck-1")
    fleet.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'truck-2'")
    assert [c.request_id for c in await store.claim(10)] == [on]
    assert get(fleet, off)["state"] == "pending"  # left to expire


@pytest.mark.asyncio
async def test_claim_device_takes_what_the_device_has_not_confirmed_due_or_not(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    pending = enqueue(fleet, rule="pending")
    high = enqueue(fleet, rule="high", priority="high")
    not_due = enqueue(fleet, rule="not due")
    confirmed = enqueue(fleet, rule="confirmed")
    expired = enqueue(fleet, rule="expired", ttl="-1 second")
    held = enqueue(fleet, rule="held")
    lapsed = enqueue(fleet, rule="lapsed")
    elsewhere = enqueue(fleet, "truck-2")
    set_row(fleet, not_due, "state = 'sent', next_attempt_at = now() + interval '1 hour'")
    set_row(fleet, confirmed, "state = 'confirmed'")
    other_lease = "state = 'sending', lease_owner = 'b', lease_expires_at = now() + {}"
    set_row(fleet, held, other_lease.format("interval '1 minute'"))
    set_row(fleet, lapsed, other_lease.format("interval '-1 second'"))

    claimed = await store.claim_device("truck-1", 10)

    assert claimed[0].request_id == high
    assert {c.request_id for c in claimed} == {pending, high, not_due, lapsed}
    first = claimed[0]
    assert (first.device_id, first.attempts, first.secret) == ("truck-1", 1, b"0123456789abcdef")
    assert (first.udp_address, first.email_address) == (None, None)
    row = get(fleet, not_due)
    assert (row["state"], row["lease_owner"]) == ("sending", "a")
    assert timedelta(seconds=25) < row["lease_left"] <= LEASE
    left = [get(fleet, r)["state"] for r in (confirmed, expired, elsewhere)]
    assert left == ["confirmed", "pending", "pending"]
    assert get(fleet, held)["lease_owner"] == "b"
    assert await store.claim_device("truck-1", 10) == []
    assert await (await stores("b")).claim_device("truck-2", 10) != []


@pytest.mark.asyncio
async def test_claim_device_takes_at_most_limit(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    rows = [enqueue(fleet, rule=f"r{i}") for i in range(3)]
    first = await store.claim_device("truck-1", 2)
    second = await store.claim_device("truck-1", 2)
    assert (len(first), len(second)) == (2, 1)
    assert {c.request_id for c in first + second} == set(rows)


# --------------------------------------------------------------------------- sent, failed


@pytest.mark.asyncio
async def test_sent_schedules_the_resend(fleet: psycopg.Connection, store: OutboxStore) -> None:
    rid = enqueue(fleet)
    await store.claim(10)

    assert await store.sent(rid, "smtp") is True
    row = get(fleet, rid)
    assert (row["state"], row["gateway_used"], row["lease_owner"]) == ("sent", "smtp", None)
    assert row["sent_at"] is not None
    assert timedelta(minutes=4) < row["due_in"] <= timedelta(minutes=5)
    assert await store.sent(rid, "smtp") is False  # no longer held
    assert await store.claim(10) == []

    set_row(fleet, rid, "next_attempt_at = now() - interval '1 second'")
    (again,) = await store.claim(10)
    assert (again.request_id, again.attempts) == (rid, 2)


@pytest.mark.asyncio
async def test_sent_many_records_each_send_through_its_own_gateway(
    fleet: psycopg.Connection, stores: Stores
) -> None:
    a, b = await stores("a"), await stores("b")
    udp = enqueue(fleet, rule="udp")
    sync = enqueue(fleet, rule="sync")
    acked = enqueue(fleet, rule="acked")
    lost = enqueue(fleet, rule="lost")
    await a.claim(10)
    assert await a.confirm(acked, "truck-1") is True  # the ack beat the record of the send
    set_row(fleet, lost, LEASE_RAN_OUT)
    await b.claim(10)  # takes over the lapsed lease
    never = enqueue(fleet, rule="never claimed")

    sends = [(udp, "udp"), (sync, "sync"), (acked, "sync"), (lost, "udp"), (never, "udp")]
    assert await a.sent_many(sends) == {udp, sync, acked}

    rows = {rid: get(fleet, rid) for rid, _ in sends}
    seen = {rid: (r["state"], r["gateway_used"], r["lease_owner"]) for rid, r in rows.items()}
    assert seen == {
        udp: ("sent", "udp", None),
        sync: ("sent", "sync", None),
        acked: ("confirmed", "sync", None),
        lost: ("sending", None, "b"),
        never: ("pending", None, None),
    }
    for rid in (udp, sync):
        assert rows[rid]["sent_at"] is not None
        assert timedelta(minutes=4) < rows[rid]["due_in"] <= timedelta(minutes=5)
    assert rows[acked]["sent_at"] is not None
    assert rows[acked]["confirmed_at"] is not None
    assert await a.sent_many([(udp, "udp")]) == set()  # no longer held
    assert await a.sent_many([(acked, "udp")]) == {acked}  # confirmed stays so
    assert get(fleet, acked)["gateway_used"] == "sync"  # the first send recorded wins
    assert await a.sent_many([]) == set()


@pytest.mark.asyncio
async def test_failed_retries_later_or_for_good(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    retry = enqueue(fleet)
    final = enqueue(fleet, rule="final")
    await store.claim(10)

    assert await (await stores("b")).failed(retry, "not mine", final=False) is False
    assert await store.failed(retry, "udp: host unreachable", final=False) is True
    assert await store.failed(final, "no gateway can reach truck-1", final=True) is True
    assert await store.failed(final, "again", final=True) is False

    row = get(fleet, retry)
    assert (row["state"], row["last_error"], row["lease_owner"]) == (
        "sent",
        "udp: host unreachable",
        None,
    )
    assert row["sent_at"] is None
    assert timedelta(minutes=4) < row["due_in"] <= timedelta(minutes=5)
    row = get(fleet, final)
    assert (row["state"], row["last_error"]) == ("failed", "no gateway can reach truck-1")
    assert await store.claim(10) == []


@pytest.mark.asyncio
async def test_a_failure_of_a_device_connected_elsewhere_meanwhile_is_due_at_once(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    """The device reconnected to dispatcher b while a held the row: b's connection record
    made due what was waiting (`due_now`), but this row was still being sent by a. When
    a records that it could not reach the device, the row is due at once, for b."""
    rid = enqueue(fleet)
    await store.claim(10)
    b = await stores("b")
    await b.connected("truck-1", "192.0.2.1:4000")
    assert await b.claim(10) == []  # a holds it

    assert await store.failed(rid, "no gateway can reach device truck-1", final=False)

    assert get(fleet, rid)["due_in"] <= timedelta(0)
    assert await store.claim(10) == []  # left to b, which holds the connection
    (again,) = await b.claim(10)
    assert again.request_id == rid


# --------------------------------------------------------------------- expire, confirm, archive


@pytest.mark.asyncio
async def test_expired_rows_are_never_claimed_and_expire_marks_them(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    pending = enqueue(fleet, ttl="-1 second")
    sent = enqueue(fleet, rule="sent")
    lost = enqueue(fleet, rule="lost")
    held = enqueue(fleet, rule="held")
    live = enqueue(fleet, rule="live")
    await store.claim(10)
    await store.sent(sent, "udp")
    for rid in (sent, lost, held):
        set_row(fleet, rid, "expires_at = now() - interval '1 second'")
    set_row(fleet, lost, LEASE_RAN_OUT)
    set_row(fleet, sent, "next_attempt_at = now() - interval '1 second'")

    assert await store.claim(10) == []
    assert await store.expire() == 3
    assert [get(fleet, r)["state"] for r in (pending, sent, lost, held, live)] == [
        "expired",
        "expired",
        "expired",
        "sending",  # its dispatcher still holds the lease
        "sending",
    ]
    assert await store.expire() == 0


@pytest.mark.asyncio
async def test_confirm_only_by_the_recipient_and_idempotent(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    rid = enqueue(fleet)
    waiting = enqueue(fleet, rule="waiting")
    await store.claim(1)
    await store.sent(rid, "sync")

    assert await store.confirm(waiting, "truck-1") is False  # never sent
    assert await store.confirm(rid, "truck-2") is False
    assert get(fleet, rid)["state"] == "sent"
    assert await store.confirm(rid, "truck-1") is True
    row = get(fleet, rid)
    assert row["state"] == "confirmed"
    assert row["confirmed_at"] is not None
    assert await store.confirm(rid, "truck-1") is True
    assert get(fleet, rid)["confirmed_at"] == row["confirmed_at"]
    assert await store.archive(10) == 1
    assert await store.confirm(rid, "truck-1") is True
    assert await store.confirm(rid, "truck-2") is False
    assert await store.confirm(uuid.uuid4(), "truck-1") is False


@pytest.mark.asyncio
async def test_confirm_of_a_row_expired_or_failed_is_false_and_changes_nothing(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    finished = {enqueue(fleet, rule=s): s for s in ("expired", "failed")}
    for rid, state in finished.items():
        set_row(fleet, rid, f"state = '{state}'")
    for rid, state in finished.items():
        assert await store.confirm(rid, "truck-1") is False
        assert (get(fleet, rid)["state"], get(fleet, rid)["confirmed_at"]) == (state, None)


@pytest.mark.asyncio
async def test_confirm_while_sending_wins_over_a_late_sent(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    rid = enqueue(fleet)
    await store.claim(1)
    assert await store.confirm(rid, "truck-1") is True  # the ack beat the record of the send
    assert await store.sent(rid, "sync") is True
    row = get(fleet, rid)
    assert (row["state"], row["gateway_used"]) == ("confirmed", "sync")
    assert row["sent_at"] is not None
    assert row["confirmed_at"] is not None


@pytest.mark.asyncio
async def test_a_row_confirmed_before_its_send_is_recorded_is_archived_only_after_it(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    rid = enqueue(fleet)
    await store.claim(1)
    assert await store.confirm_many([(rid, "truck-1")]) == {rid}  # the ack beat the record
    row = get(fleet, rid)
    assert (row["state"], row["lease_owner"]) == ("confirmed", "a")
    assert await store.archive(10) == 0  # its send is not recorded yet
    assert await store.sent_many([(rid, "udp")]) == {rid}
    assert await store.archive(10) == 1
    (sent_at, gateway) = fleet.execute(
        "SELECT sent_at, gateway_used FROM pushsync.outbox_history WHERE request_id = %s", (rid,)
    ).fetchone() or (None, None)
    assert sent_at is not None
    assert gateway == "udp"


@pytest.mark.asyncio
async def test_confirm_many_confirms_each_recipients_sent_rows_in_one_statement(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    sent = enqueue(fleet, rule="sent")
    sending = enqueue(fleet, rule="sending")
    other = enqueue(fleet, "truck-2", rule="other device")
    archived = enqueue(fleet, rule="archived")
    await store.claim(10)
    assert await store.sent_many([(sent, "udp"), (other, "udp"), (archived, "udp")]) == {
        sent,
        other,
        archived,
    }
    assert await store.confirm_many([(archived, "truck-1")]) == {archived}
    assert await store.archive(10) == 1
    never = enqueue(fleet, rule="never sent")
    expired = enqueue(fleet, rule="expired")
    set_row(fleet, expired, "state = 'expired'")

    def stored(rid: uuid.UUID) -> dict[str, Any]:
        return {k: v for k, v in get(fleet, rid).items() if k not in ("lease_left", "due_in")}

    before = {rid: stored(rid) for rid in (other, never, expired)}

    acks = [
        (sent, "truck-1"),
        (sending, "truck-1"),
        (sent, "truck-1"),  # the same ack twice
        (other, "truck-1"),  # another device's row
        (archived, "truck-1"),  # confirmed before, archived since
        (never, "truck-1"),
        (expired, "truck-1"),
        (uuid.uuid4(), "truck-1"),
    ]
    assert await (await stores("b")).confirm_many(acks) == {sent, sending, archived}
    assert [get(fleet, rid)["state"] for rid in (sent, sending)] == ["confirmed", "confirmed"]
    assert {rid: stored(rid) for rid in before} == before  # unchanged
    first = get(fleet, sent)["confirmed_at"]
    assert await store.confirm_many([(sent, "truck-1")]) == {sent}
    assert get(fleet, sent)["confirmed_at"] == first
    assert await store.confirm_many([]) == set()


@pytest.mark.asyncio
async def test_sent_then_claim_records_one_batch_and_claims_the_next_in_one_transaction(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    first = [enqueue(fleet, rule=f"first {i}") for i in range(3)]
    claimed = await store.claim(3)
    assert {c.request_id for c in claimed} == set(first)
    second = [enqueue(fleet, rule=f"second {i}") for i in range(2)]
    taken = enqueue(fleet, rule="taken")
    await (await stores("b")).claim(1)  # the oldest of the rest: another dispatcher's now
    assert get(fleet, second[0])["lease_owner"] == "b"

    recorded, more = await store.sent_then_claim([(rid, "udp") for rid in first], 10)
    assert recorded == set(first)
    assert {c.request_id for c in more} == {second[1], taken}
    assert [get(fleet, rid)["state"] for rid in first] == ["sent"] * 3
    assert await store.sent_then_claim([], 10) == (set(), [])

    # A failing claim takes the record with it: nothing is half done.
    with pytest.raises(psycopg.errors.DivisionByZero):
        await store.executor.fetch_pair(
            (query("sent_many"), store._sends([(c.request_id, "udp") for c in more])),
            ("SELECT 1 / 0", {}),
            dict_row,
        )
    assert [get(fleet, c.request_id)["state"] for c in more] == ["sending", "sending"]


@pytest.mark.asyncio
async def test_archive_moves_finished_rows_and_leaves_the_rest(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    finished = {enqueue(fleet, rule=s): s for s in ("confirmed", "expired", "failed")}
    for rid, state in finished.items():
        set_row(fleet, rid, f"state = '{state}'")
    left = {enqueue(fleet, rule="pending"), enqueue(fleet, rule="sent")}

    assert await store.archive(2) == 2
    assert await store.archive(2) == 1
    assert await store.archive(2) == 0
    history = fleet.execute(
        "SELECT request_id, state, finished_at IS NOT NULL FROM pushsync.outbox_history"
    ).fetchall()
    assert {(uuid.UUID(str(r)), s, f) for r, s, f in history} == {
        (rid, s, True) for rid, s in finished.items()
    }
    remaining = fleet.execute("SELECT request_id FROM pushsync.outbox").fetchall()
    assert {uuid.UUID(str(r[0])) for r in remaining} == left


# --------------------------------------------------------------------------- mine, release


@pytest.mark.asyncio
async def test_mine_is_what_this_owner_holds(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    rows = [enqueue(fleet, rule=f"r{i}") for i in range(3)]
    await store.claim(10)
    await store.sent(rows[0], "udp")

    assert await store.mine() == set(rows[1:])
    assert await (await stores("b")).mine() == set()


@pytest.mark.asyncio
async def test_rows_held_before_a_reconnect_are_found_and_released(
    fleet: psycopg.Connection, stores: Stores
) -> None:
    """As the daemon does on a new connection: ``mine``, then ``release``."""
    rows = {enqueue(fleet, rule=f"r{i}") for i in range(3)}
    await (await stores("a")).claim(10)  # then the connection drops
    again = await stores("a")

    held = await again.mine()
    assert held == rows
    assert await again.release(held) == 3
    assert await again.mine() == set()
    assert {(get(fleet, r)["state"], get(fleet, r)["attempts"]) for r in rows} == {("pending", 0)}
    assert {c.request_id for c in await (await stores("b")).claim(10)} == rows


@pytest.mark.asyncio
async def test_release_gives_rows_back_unsent(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    fresh = enqueue(fleet)
    resent = enqueue(fleet, rule="resent")
    await store.claim(10)
    await store.sent(resent, "udp")
    set_row(fleet, resent, "next_attempt_at = now() - interval '1 second'")
    await store.claim(10)

    assert await (await stores("b")).release([fresh, resent]) == 0  # not b's
    assert await store.release([fresh, resent]) == 2

    rows = [get(fleet, r) for r in (fresh, resent)]
    assert [(r["state"], r["attempts"], r["lease_owner"]) for r in rows] == [
        ("pending", 0, None),
        ("sent", 1, None),
    ]
    assert rows[0]["coalescing"] is True
    assert {c.request_id for c in await store.claim(10)} == {fresh, resent}


@pytest.mark.asyncio
async def test_release_keeps_the_coalescing_index_unique(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    trucking.setup(db)
    trucking.report(db, 300, by=1)  # truck-3 only
    (first,) = await store.claim(10)
    trucking.report(db, 300, by=2)  # a newer pending row for truck-3
    (second,) = await store.claim(10)
    trucking.report(db, 300, by=4)  # and a third, pending

    assert await store.release([first.request_id, second.request_id]) == 2

    rows = [get(db, c.request_id) for c in (first, second)]
    assert [(r["state"], r["coalescing"]) for r in rows] == [
        ("pending", False),
        ("pending", False),
    ]
    trucking.report(db, 300, by=1)  # folds into the third row, not the released ones
    assert sorted(s[3] for s in states(db)) == [0, 0, 1]
    assert len(await store.claim(10)) == 3


@pytest.mark.asyncio
async def test_release_of_the_only_row_of_a_device_keeps_it_coalescing(
    db: psycopg.Connection, store: OutboxStore
) -> None:
    trucking.setup(db)
    trucking.report(db, 300, by=1)
    (first,) = await store.claim(10)
    trucking.report(db, 300, by=2)
    (second,) = await store.claim(10)

    assert await store.release([first.request_id, second.request_id]) == 2
    rows = [get(db, c.request_id) for c in (first, second)]
    assert [r["coalescing"] for r in rows] == [False, True]  # the newest keeps it
    trucking.report(db, 300, by=4)
    assert get(db, second.request_id)["coalesced"] == 1


# --------------------------------------------------------------------------- devices, dispatchers


@pytest.mark.asyncio
async def test_secret_only_of_an_enabled_device_and_revoked_lists_the_others(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    fleet.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'truck-2'")

    assert await store.secret("truck-1") == b"0123456789abcdef"
    assert await store.secret("truck-2") is None
    assert await store.secret("truck-9") is None
    held = [("truck-1", None), ("truck-2", None), ("truck-9", None)]
    assert sorted(await store.revoked(held)) == ["truck-2", "truck-9"]
    assert await store.revoked([]) == []
    # a connection authenticated with a secret the device no longer has
    now = b"0123456789abcdef"
    assert await store.revoked([("truck-1", now)]) == []
    assert await store.revoked([("truck-1", b"an older secret!"), ("truck-1", now)]) == ["truck-1"]


@pytest.mark.asyncio
async def test_a_connected_device_is_left_to_its_dispatcher_while_it_lives(
    fleet: psycopg.Connection, store: OutboxStore, stores: Stores
) -> None:
    rid = enqueue(fleet)
    b = await stores("b")
    await b.claim(10)
    await b.sent(rid, "udp")  # due again in 5 minutes

    await store.connected("truck-1", "192.0.2.1:4000")

    held = fleet.execute("SELECT owner, peer FROM pushsync.sync_connections").fetchall()
    assert held == [("a", "192.0.2.1:4000")]
    assert get(fleet, rid)["due_in"] <= timedelta(0)  # due now, down the new connection
    row = fleet.execute(
        "SELECT last_seen_at IS NOT NULL FROM pushsync.devices WHERE device_id = 'truck-1'"
    ).fetchone()
    assert row == (True,)
    assert await b.claim(10) == []  # a is alive (registered by the connection)
    (mine,) = await store.claim(10)
    assert mine.request_id == rid

    await store.disconnected("truck-1", "192.0.2.1:5000")  # not this connection
    assert fleet.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone() == (1,)
    await store.disconnected("truck-1", "192.0.2.1:4000")
    assert fleet.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone() == (0,)


@pytest.mark.asyncio
async def test_heartbeat_registers_this_dispatcher_and_gone_removes_it(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    await store.heartbeat("192.0.2.1:2439", "192.0.2.1:5000")
    await store.connected("truck-1", "192.0.2.2:4000")

    row = fleet.execute(
        "SELECT owner, sync_address, udp_address, alive_until > now() FROM pushsync.dispatchers"
    ).fetchone()
    assert row == ("a", "192.0.2.1:2439", "192.0.2.1:5000", True)
    await store.gone()
    assert fleet.execute("SELECT count(*) FROM pushsync.dispatchers").fetchone() == (0,)
    assert fleet.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone() == (0,)


@pytest.mark.asyncio
async def test_track_records_the_reported_udp_endpoint(
    fleet: psycopg.Connection, store: OutboxStore
) -> None:
    await store.track("truck-1", "198.51.100.1:5001")
    await store.track("truck-9", "198.51.100.9:5001")  # no such device: nothing

    rows = fleet.execute(
        "SELECT device_id, medium, source, address FROM pushsync.device_addresses"
    ).fetchall()
    assert rows == [("truck-1", "udp", "tracking", "198.51.100.1:5001")]
