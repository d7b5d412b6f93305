"""Devices that are away: back before ``ttl`` they get everything once, after ``ttl`` nothing.

Outbox rows are written directly with short delivery settings, then the
devices' listeners come up later:

* ``back-udp`` (UDP channel, manual UDP address) and ``back-sync`` (SYNC
  channel only, no UDP address: while away nothing can reach it) are away for
  longer than ``resend_every`` (1 s) but shorter than ``ttl`` (6 s). The
  dispatcher keeps trying — datagrams into a closed port, or "no gateway" —
  and when they return everything is delivered, each action once: by a
  resend over UDP, or at once down the new SYNC connection;
* ``gone-udp`` and ``gone-sync`` are away for longer than ``ttl`` (3 s): their
  rows end ``expired`` and nothing reaches them after they return.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg

from tests.reliability.harness import Device, Knobs, Processes, Report, enqueue, exactly_once
from tests.support.waiting import until

RESEND = 1.0
BACK_TTL = 6.0
GONE_TTL = 3.0
AWAY = 2.5
"""Seconds the returning devices stay away: more than RESEND, less than BACK_TTL."""
ROWS = 10
"""Rows per device (times the scale)."""


def rows_of(db: psycopg.Connection, rule: str) -> dict[uuid.UUID, dict[str, object]]:
    found = db.execute(
        "SELECT request_id, device_id, state, attempts, gateway_used, last_error, "
        "confirmed_at < expires_at AS in_time, "
        "extract(epoch FROM confirmed_at)::float8 AS confirmed "
        "FROM pushsync.outbox WHERE rule = %(rule)s UNION ALL "
        "SELECT request_id, device_id, state, attempts, gateway_used, last_error, "
        "confirmed_at < expires_at, extract(epoch FROM confirmed_at)::float8 "
        "FROM pushsync.outbox_history WHERE rule = %(rule)s",
        {"rule": rule},
    ).fetchall()
    keys = ("device", "state", "attempts", "gateway", "error", "in_time", "confirmed")
    return {uuid.UUID(str(r[0])): dict(zip(keys, r[1:], strict=True)) for r in found}


def test_away_less_than_ttl_delivered_on_return_longer_never(
    db: psycopg.Connection,
    dsn: str,
    tmp_path: Path,
    knobs: Knobs,
    report: Report,
    processes: Processes,
) -> None:
    per_device = knobs.size(ROWS)
    back_udp, back_sync, gone_udp, gone_sync = (
        Device.make(tmp_path, name) for name in ("back-udp", "back-sync", "gone-udp", "gone-sync")
    )
    back_udp.register(dsn)
    gone_udp.register(dsn)
    back_sync.register(dsn, udp=False)
    gone_sync.register(dsn, udp=False)
    dispatcher = processes.dispatcher(dsn)
    sync = dispatcher.wait_address("SYNC")
    dispatcher.wait_connected()
    back_udp.write_config(udp=True)
    gone_udp.write_config(udp=True)
    back_sync.write_config(udp=False, sync=sync)
    gone_sync.write_config(udp=False, sync=sync)
    logs = [dispatcher.log]

    written = time.time()
    back = enqueue(
        db,
        [back_udp.name, back_sync.name],
        2 * per_device,
        resend=RESEND,
        ttl=BACK_TTL,
        rule="back",
    )
    gone = enqueue(
        db,
        [gone_udp.name, gone_sync.name],
        2 * per_device,
        resend=RESEND,
        ttl=GONE_TTL,
        rule="gone",
    )
    time.sleep(max(0.0, written + AWAY - time.time()))
    while_away = rows_of(db, "back")
    returned = time.time()
    coming_back = [processes.listener(back_udp), processes.listener(back_sync)]
    for listener in coming_back:
        listener.wait_started()
    logs += [listener.log for listener in coming_back]

    def back_confirmed() -> bool:
        return all(row["state"] == "confirmed" for row in rows_of(db, "back").values())

    delivered = until(back_confirmed, "the returning devices' rows confirmed", 30, logs=logs)
    until(
        lambda: len(back_udp.ran()) + len(back_sync.ran()) >= 2 * per_device,
        "their actions",
        30,
        logs=logs,
    )

    # The others come back once their rows' ttl has passed, and stay a while.
    time.sleep(max(0.0, written + GONE_TTL + 0.5 - time.time()))
    too_late = [processes.listener(gone_udp), processes.listener(gone_sync)]
    for listener in too_late:
        listener.wait_started()
    logs += [listener.log for listener in too_late]
    expired_after = until(
        lambda: all(row["state"] == "expired" for row in rows_of(db, "gone").values()),
        "the late devices' rows to expire",
        30,
        logs=logs,
    )
    time.sleep(3 * RESEND)  # long enough for resends, had there been any
    gone_sync_connected = db.execute(
        "SELECT count(*) FROM pushsync.sync_connections WHERE device_id = %s", (gone_sync.name,)
    ).fetchone()
    for listener in [*coming_back, *too_late]:
        listener.stop()
    dispatcher.stop()

    final_back = rows_of(db, "back")
    final_gone = rows_of(db, "gone")
    report.add(
        rows_per_device=per_device,
        attempts_while_away={
            name: sorted(
                {int(str(r["attempts"])) for r in while_away.values() if r["device"] == name}
            )
            for name in (back_udp.name, back_sync.name)
        },
        errors_while_away=sorted({str(r["error"]) for r in while_away.values() if r["error"]}),
        away_seconds=round(returned - written, 2),
        confirmed_after_return_s=round(delivered, 2),
        gateways_used={
            name: sorted({str(r["gateway"]) for r in final_back.values() if r["device"] == name})
            for name in (back_udp.name, back_sync.name)
        },
        late_rows_expired_after_return_s=round(expired_after, 2),
        late_rows_attempts=sorted({int(str(r["attempts"])) for r in final_gone.values()}),
    )
    assert exactly_once(back_udp.ran(), back[back_udp.name]) == {}
    assert exactly_once(back_sync.ran(), back[back_sync.name]) == {}
    assert all(row["in_time"] for row in final_back.values())
    assert all(float(str(row["confirmed"])) > returned for row in final_back.values())
    # While away, each was tried more than once (resent every second).
    assert all(int(str(r["attempts"])) >= 2 for r in while_away.values()), while_away
    assert {str(r["gateway"]) for r in final_back.values() if r["device"] == back_sync.name} == {
        "sync"
    }
    assert gone_udp.ran() == []
    assert gone_sync.ran() == []
    assert {str(r["state"]) for r in final_gone.values()} == {"expired"}
    assert len(final_gone) == 2 * per_device
    assert set(final_gone) == set().union(*gone.values())
    assert gone_sync_connected == (1,)  # it was connected, and still got nothing
    assert processes.tracebacks() == []
    report.done()
