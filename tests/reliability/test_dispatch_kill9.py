"""Three kill -9s of ``pushsync dispatch`` with notifications in flight: each action runs once.

2,000 rows (times the scale: 10,000 at scale 5) for three devices are written
in one transaction. Each device runs the real listener (``pushsync listen``,
UDP channel) whose handler runs a small program appending the request id to a
file. The dispatcher is killed with SIGKILL three times at random points of
the run and started again each time: first part-way through a batch (after a
random number of rows claimed, while some are leased), then at two points
drawn over the run's progress (rows claimed at least once, plus rows
confirmed), which fall while rows are being claimed and sent or while acks
are coming back to a socket that dies with the process. The CLI has no
``--lease`` option, so the dead dispatcher's leases are moved into the past by
SQL, as their 30 s running out would do.

Delivery is at least once (rows whose acks went to the dead dispatcher are
sent again at their next resend); the listener's dedupe store turns that into
exactly once for the action. What must hold: every row ends ``confirmed``, and
every device's file holds each of its request ids exactly once.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from pathlib import Path

import psycopg

from tests.reliability.harness import (
    Device,
    DispatcherProcess,
    Knobs,
    Processes,
    Report,
    confirmed_ids,
    enqueue,
    exactly_once,
    outbox_states,
)
from tests.support.waiting import until

ROWS = 2000
DEVICES = 3
KILLS = 2
"""Kills at random points of the run's progress, after the first one (mid-batch)."""
RESEND = 3.0
"""Seconds between resends of an unconfirmed row. Acks sent to a killed dispatcher
are lost, so its rows wait this long; much shorter, and the listeners' backlog of
actions (each a process) is flooded with copies of messages they have not acked yet."""
BATCH = "100"
"""Rows claimed at a time: small enough that a kill lands part-way through the run."""


def progress(db: psycopg.Connection) -> int:
    """Rows claimed at least once plus rows confirmed: 0 at the start, twice the rows at the end.

    Kill points spread over this range fall both while rows are being claimed
    and sent (leases held) and while acks are coming back (acks lost with the
    dead dispatcher's socket).
    """
    row = db.execute(
        "SELECT (SELECT count(*) FROM pushsync.outbox WHERE attempts > 0) "
        "+ (SELECT count(*) FROM pushsync.outbox WHERE state = 'confirmed') "
        "+ 2 * (SELECT count(*) FROM pushsync.outbox_history)"
    ).fetchone()
    return int(row[0]) if row else 0


def leased(db: psycopg.Connection) -> tuple[int, int]:
    """Rows claimed at least once, and rows leased right now (``sending``)."""
    row = db.execute(
        "SELECT count(*) FILTER (WHERE attempts > 0), count(*) FILTER (WHERE state = 'sending') "
        "FROM pushsync.outbox"
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def kill_points(rng: random.Random, rows: int, after: int) -> list[int]:
    """One random point in each of ``KILLS`` equal parts of the progress range from a little
    after ``after`` to 95 % of the whole."""
    low, high = after + rows // 20, rows * 2 * 19 // 20
    width = max(1, (high - low) // KILLS)
    return [rng.randint(low + k * width, low + (k + 1) * width - 1) for k in range(KILLS)]


def test_three_kill_9s_every_notification_delivered_each_action_once(
    db: psycopg.Connection,
    dsn: str,
    tmp_path: Path,
    knobs: Knobs,
    report: Report,
    processes: Processes,
) -> None:
    rows = knobs.size(ROWS)
    rng = random.Random(knobs.seed)
    devices = [Device.make(tmp_path, f"truck-{i}") for i in range(1, DEVICES + 1)]
    for device in devices:
        device.register(dsn)
        device.write_config(udp=True)
    listeners = [processes.listener(device) for device in devices]
    for listener in listeners:
        listener.wait_started()

    expected = enqueue(db, [d.name for d in devices], rows, resend=RESEND)
    ids: set[uuid.UUID] = set().union(*expected.values())
    assert len(ids) == rows

    patience = knobs.patience(60)
    logs = [listener.log for listener in listeners]
    started = time.monotonic()
    dispatcher = processes.dispatcher(dsn, "--batch", BATCH)
    kills: list[dict[str, object]] = []
    # The first kill lands part-way through a batch: once a random number of rows
    # has been claimed, as soon as some are leased (or when all are claimed).
    first = rng.randint(rows // 10, rows * 7 // 10)

    def mid_batch() -> bool:
        claimed, sending = leased(db)
        return (claimed >= first and sending > 0) or claimed >= rows

    until(mid_batch, f"{first} rows claimed, some leased", patience, logs=logs, every=0.002)

    def kill_and_restart(running: DispatcherProcess, point: object) -> DispatcherProcess:
        assert running.process.poll() is None, running.output()[-3000:]
        running.kill()
        killed = time.monotonic()
        at = progress(db)
        states = outbox_states(db)
        aged = db.execute(
            "UPDATE pushsync.outbox SET lease_expires_at = now() - interval '1 millisecond', "
            "next_attempt_at = now() - interval '1 millisecond' "
            "WHERE state = 'sending'"
        ).rowcount
        ran = sum(len(d.ran()) for d in devices)
        restarted = processes.dispatcher(dsn, "--batch", BATCH)
        restarted.wait_connected(patience)
        kills.append(
            {
                "point": point,
                "progress_at_kill": at,
                "states": states,
                "leased_rows_aged": aged,
                "actions_run": ran,
                "restart_to_connected_s": round(time.monotonic() - killed, 2),
            }
        )
        return restarted

    dispatcher = kill_and_restart(dispatcher, f"mid-batch, after {first} claimed")
    after = int(str(kills[-1]["progress_at_kill"]))
    for point in kill_points(rng, rows, after):

        def reached(point: int = point, running: DispatcherProcess = dispatcher) -> bool:
            return progress(db) >= point or running.process.poll() is not None

        until(reached, f"progress {point} of {2 * rows}", patience, logs=[dispatcher.log, *logs])
        dispatcher = kill_and_restart(dispatcher, point)

    confirmed_after = until(
        lambda: confirmed_ids(db) >= ids,
        "every row confirmed",
        patience,
        logs=[dispatcher.log, *logs],
    )
    # A row is confirmed as soon as a copy is acked, possibly while the first
    # copy's action still runs: wait until every action has recorded its id.
    until(
        lambda: sum(len(d.ran()) for d in devices) >= rows,
        "every action to run",
        patience,
        logs=logs,
    )
    total = time.monotonic() - started
    for listener in listeners:
        listener.stop()
    dispatcher.stop()

    problems = {d.name: exactly_once(d.ran(), expected[d.name]) for d in devices}
    states = outbox_states(db)
    attempts = Counter(
        int(n)
        for (n,) in db.execute(
            "SELECT attempts FROM pushsync.outbox UNION ALL "
            "SELECT attempts FROM pushsync.outbox_history"
        ).fetchall()
    )
    duplicates = sum(
        listener.output().count("duplicate, not run again") for listener in processes.listeners
    )
    report.add(
        rows=rows,
        devices=DEVICES,
        kills=kills,
        seconds_to_all_confirmed_and_run=round(total, 2),
        confirmed_s_after_last_restart=round(confirmed_after, 2),
        final_states=states,
        attempts_histogram=dict(sorted(attempts.items())),
        duplicates_dropped_by_listeners=duplicates,
    )
    assert all(not p for p in problems.values()), problems
    assert states == {"confirmed": rows}, states
    assert processes.tracebacks() == []
    report.done()
