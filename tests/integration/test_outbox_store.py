"""The dispatcher's outbox store on a real database: claim, leases, resend, finish."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pushsync.dispatcher.outbox import OutboxStore, query
from tests.integration import trucking
from tests.integration.trucking import add_devices

LEASE = timedelta(seconds=30)


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


def test_claim_moves_pending_to_sending_with_what_a_sender_needs(fleet: psycopg.Connection) -> None:
    db = fleet
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) VALUES "
        "('truck-1', 'udp', 'tracking', '198.51.100.1:5001'), "
        "('truck-1', 'udp', 'manual', '192.0.2.7:5001'), "
        "('truck-1', 'email', 'tracking', 't1@example.com')"
    )
    rid = enqueue(db)
    other = enqueue(db, "truck-2")

    claimed = {c.request_id: c for c in OutboxStore(db, "a").claim(10, LEASE)}

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
    assert OutboxStore(db, "b").claim(10, LEASE) == []


def test_claim_takes_high_priority_first(fleet: psycopg.Connection) -> None:
    low = enqueue(fleet, rule="low", priority="low")
    normal = enqueue(fleet, rule="normal", priority="normal")
    high = enqueue(fleet, rule="high", priority="high")

    store = OutboxStore(fleet, "a")
    assert [c.request_id for c in store.claim(2, LEASE)] == [high, normal]
    assert [c.request_id for c in store.claim(2, LEASE)] == [low]


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
    assert "outbox_due" in text or "outbox_expiry" in text, text


def test_a_change_after_the_claim_gets_a_row_of_its_own(db: psycopg.Connection) -> None:
    trucking.setup(db)
    trucking.report(db, 100, by=1)
    trucking.report(db, 100, by=1)  # folded into the pending rows
    before = [("truck-2", "pending", "disruption 100 on south", 1)]
    assert [s for s in states(db) if s[0] == "truck-2"] == before

    claimed = OutboxStore(db, "a").claim(100, LEASE)
    trucking.report(db, 100, by=1)

    assert {c.device_id for c in claimed} == {"truck-2", "truck-4"}
    assert [s for s in states(db) if s[0] == "truck-2"] == [
        ("truck-2", "pending", "disruption 100 on south", 0),
        ("truck-2", "sending", "disruption 100 on south", 1),
    ]


def test_concurrent_claims_get_disjoint_rows_and_together_all(
    fleet: psycopg.Connection, dsn: str
) -> None:
    fleet.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, expires_at, resend_every) "
        "SELECT 'r' || i, 'truck-1', now() + '1 hour', '5 minutes' "
        "FROM generate_series(1, 500) AS i"
    )
    start = threading.Barrier(2)
    got: dict[str, list[uuid.UUID]] = {"a": [], "b": []}

    def work(owner: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            store = OutboxStore(conn, owner)
            start.wait(timeout=10)
            while batch := store.claim(50, LEASE):
                got[owner].extend(c.request_id for c in batch)

    threads = [threading.Thread(target=work, args=(owner,)) for owner in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)

    assert not set(got["a"]) & set(got["b"])
    assert len(got["a"]) + len(got["b"]) == 500
    owners = fleet.execute(
        "SELECT lease_owner, count(*) FROM pushsync.outbox WHERE state = 'sending' "
        "GROUP BY lease_owner"
    ).fetchall()
    assert dict(owners) == {k: len(v) for k, v in got.items() if v}


def test_an_expired_lease_is_reclaimed_a_live_one_is_not(fleet: psycopg.Connection) -> None:
    rid = enqueue(fleet)
    a, b = OutboxStore(fleet, "a"), OutboxStore(fleet, "b")
    a.claim(10, LEASE)
    assert b.claim(10, LEASE) == []

    set_row(fleet, rid, "lease_expires_at = now() - interval '1 second'")
    (again,) = b.claim(10, LEASE)

    assert (again.request_id, again.attempts) == (rid, 2)
    assert a.sent(rid, "udp") is False
    assert get(fleet, rid)["lease_owner"] == "b"
    assert b.sent(rid, "udp") is True


def test_sent_schedules_the_resend(fleet: psycopg.Connection) -> None:
    rid = enqueue(fleet)
    store = OutboxStore(fleet, "a")
    store.claim(10, LEASE)

    assert store.sent(rid, "smtp") is True
    row = get(fleet, rid)
    assert (row["state"], row["gateway_used"], row["lease_owner"]) == ("sent", "smtp", None)
    assert row["sent_at"] is not None
    assert timedelta(minutes=4) < row["due_in"] <= timedelta(minutes=5)
    assert store.sent(rid, "smtp") is False  # no longer held
    assert store.claim(10, LEASE) == []

    set_row(fleet, rid, "next_attempt_at = now() - interval '1 second'")
    (again,) = store.claim(10, LEASE)
    assert (again.request_id, again.attempts) == (rid, 2)


def test_expired_rows_are_never_claimed_and_expire_marks_them(fleet: psycopg.Connection) -> None:
    pending = enqueue(fleet, ttl="-1 second")
    sent = enqueue(fleet, rule="sent")
    lost = enqueue(fleet, rule="lost")
    held = enqueue(fleet, rule="held")
    live = enqueue(fleet, rule="live")
    store = OutboxStore(fleet, "a")
    store.claim(10, LEASE)
    store.sent(sent, "udp")
    for rid in (sent, lost, held):
        set_row(fleet, rid, "expires_at = now() - interval '1 second'")
    set_row(fleet, lost, "lease_expires_at = now() - interval '1 second'")
    set_row(fleet, sent, "next_attempt_at = now() - interval '1 second'")

    assert store.claim(10, LEASE) == []
    assert store.expire() == 3
    assert [get(fleet, r)["state"] for r in (pending, sent, lost, held, live)] == [
        "expired",
        "expired",
        "expired",
        "sending",  # its dispatcher still holds the lease
        "sending",
    ]
    assert store.expire() == 0


def test_confirm_only_by_the_recipient_and_idempotent(fleet: psycopg.Connection) -> None:
    rid = enqueue(fleet)
    waiting = enqueue(fleet, rule="waiting")
    store = OutboxStore(fleet, "a")
    store.claim(1, LEASE)
    store.sent(rid, "sync")

    assert store.confirm(waiting, "truck-1") is False  # never sent
    assert store.confirm(rid, "truck-2") is False
    assert get(fleet, rid)["state"] == "sent"
    assert store.confirm(rid, "truck-1") is True
    row = get(fleet, rid)
    assert row["state"] == "confirmed"
    assert row["confirmed_at"] is not None
    assert store.confirm(rid, "truck-1") is True
    assert get(fleet, rid)["confirmed_at"] == row["confirmed_at"]
    assert store.archive(10) == 1
    assert store.confirm(rid, "truck-1") is True
    assert store.confirm(rid, "truck-2") is False
    assert store.confirm(uuid.uuid4(), "truck-1") is False


def test_confirm_while_sending_wins_over_a_late_sent(fleet: psycopg.Connection) -> None:
    rid = enqueue(fleet)
    store = OutboxStore(fleet, "a")
    store.claim(1, LEASE)
    assert store.confirm(rid, "truck-1") is True  # the ack beat the record of the send
    assert store.sent(rid, "sync") is True
    row = get(fleet, rid)
    assert (row["state"], row["gateway_used"]) == ("confirmed", "sync")
    assert row["sent_at"] is not None and row["confirmed_at"] is not None


def test_archive_moves_finished_rows_and_leaves_the_rest(fleet: psycopg.Connection) -> None:
    finished = {enqueue(fleet, rule=s): s for s in ("confirmed", "expired", "failed")}
    for rid, state in finished.items():
        set_row(fleet, rid, f"state = '{state}'")
    left = {enqueue(fleet, rule="pending"), enqueue(fleet, rule="sent")}
    store = OutboxStore(fleet, "a")

    assert store.archive(2) == 2
    assert store.archive(2) == 1
    assert store.archive(2) == 0
    history = fleet.execute(
        "SELECT request_id, state, finished_at IS NOT NULL FROM pushsync.outbox_history"
    ).fetchall()
    assert {(uuid.UUID(str(r)), s, f) for r, s, f in history} == {
        (rid, s, True) for rid, s in finished.items()
    }
    remaining = fleet.execute("SELECT request_id FROM pushsync.outbox").fetchall()
    assert {uuid.UUID(str(r[0])) for r in remaining} == left


def test_release_gives_rows_back_unsent(fleet: psycopg.Connection) -> None:
    fresh = enqueue(fleet)
    resent = enqueue(fleet, rule="resent")
    store = OutboxStore(fleet, "a")
    store.claim(10, LEASE)
    store.sent(resent, "udp")
    set_row(fleet, resent, "next_attempt_at = now() - interval '1 second'")
    store.claim(10, LEASE)

    assert OutboxStore(fleet, "b").release([fresh, resent]) == 0  # not b's
    assert store.release([fresh, resent]) == 2

    rows = [get(fleet, r) for r in (fresh, resent)]
    assert [(r["state"], r["attempts"], r["lease_owner"]) for r in rows] == [
        ("pending", 0, None),
        ("sent", 1, None),
    ]
    assert rows[0]["coalescing"] is True
    assert {c.request_id for c in store.claim(10, LEASE)} == {fresh, resent}


def test_release_keeps_the_coalescing_index_unique(db: psycopg.Connection) -> None:
    trucking.setup(db)
    trucking.report(db, 300, by=1)  # truck-3 only
    store = OutboxStore(db, "a")
    (first,) = store.claim(10, LEASE)
    trucking.report(db, 300, by=2)  # a newer pending row for truck-3
    (second,) = store.claim(10, LEASE)
    trucking.report(db, 300, by=4)  # and a third, pending

    assert store.release([first.request_id, second.request_id]) == 2

    rows = [get(db, c.request_id) for c in (first, second)]
    assert [(r["state"], r["coalescing"]) for r in rows] == [
        ("pending", False),
        ("pending", False),
    ]
    trucking.report(db, 300, by=1)  # folds into the third row, not the released ones
    assert sorted(s[3] for s in states(db)) == [0, 0, 1]
    assert len(store.claim(10, LEASE)) == 3


def test_release_of_the_only_row_of_a_device_keeps_it_coalescing(
    db: psycopg.Connection,
) -> None:
    trucking.setup(db)
    trucking.report(db, 300, by=1)
    store = OutboxStore(db, "a")
    (first,) = store.claim(10, LEASE)
    trucking.report(db, 300, by=2)
    (second,) = store.claim(10, LEASE)

    assert store.release([first.request_id, second.request_id]) == 2
    rows = [get(db, c.request_id) for c in (first, second)]
    assert [r["coalescing"] for r in rows] == [False, True]  # the newest keeps it
    trucking.report(db, 300, by=4)
    assert get(db, second.request_id)["coalesced"] == 1


def test_failed_retries_later_or_for_good(fleet: psycopg.Connection) -> None:
    retry = enqueue(fleet)
    final = enqueue(fleet, rule="final")
    store = OutboxStore(fleet, "a")
    store.claim(10, LEASE)

    assert OutboxStore(fleet, "b").failed(retry, "not mine", final=False) is False
    assert store.failed(retry, "udp: host unreachable", final=False) is True
    assert store.failed(final, "no gateway can reach truck-1", final=True) is True
    assert store.failed(final, "again", final=True) is False

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
    assert store.claim(10, LEASE) == []


def test_claimed_addresses_are_the_effective_addresses(db: psycopg.Connection) -> None:
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
    claimed = {c.device_id: c.udp_address for c in OutboxStore(db, "a").claim(100, LEASE)}
    view: dict[str, str] = dict(
        db.execute(
            "SELECT device_id, address FROM pushsync.effective_addresses WHERE medium = 'udp'"
        ).fetchall()
    )
    assert claimed == {device: view.get(device) for device in cases}
    assert claimed["d-manual-off"] is None  # an inactive manual address still decides


def test_a_disabled_devices_rows_are_not_claimed(fleet: psycopg.Connection) -> None:
    off = enqueue(fleet, "truck-2")
    on = enqueue(fleet, "truck-1")
    fleet.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'truck-2'")
    assert [c.request_id for c in OutboxStore(fleet, "a").claim(10, LEASE)] == [on]
    assert get(fleet, off)["state"] == "pending"  # left to expire
