"""A bounded soak: a steady stream of notifications while listeners come and go.

For 30 s times the scale, the application inserts jobs at 200 rows/s times the scale (at most
500/s: a 10-minute soak at 500/s is ``--reliability-scale 20``); a rule makes
one notification per job for one of four devices. Two devices listen on SYNC
and UDP (their UDP address tracked through SYNC), two on UDP only (a manual
address). Every few seconds one listener is stopped and, a moment later,
started again, in turn. Each handler's action sends ``$device $request_id`` to
a TCP socket of the test (the ``socket`` action), which counts them: a
process per message, at this rate, would soak the machine instead of the
system under test.

What must hold: the outbox's unfinished rows (pending, sending, sent) stay
below what a few seconds of traffic make, sampled throughout; the
dispatcher's resident memory at the end and at its highest is within 10 % of
what it was after the first third; when the writing stops everything drains:
every notification is confirmed and each ran its action exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.reliability.harness import (
    Device,
    JobWriter,
    Knobs,
    ListenerProcess,
    Processes,
    Report,
    Sampler,
    exactly_once,
    install_jobs,
    job_notifications,
    missing_runs,
    of_device,
    percentile,
)
from tests.support.collector import Collector, collecting
from tests.support.waiting import until

SECONDS = 30.0
RATE = 200.0
MAX_RATE = 500.0
BATCH_SECONDS = 0.05
"""The writer commits this many seconds' worth of rows per transaction."""
RESEND = "2s"
RESTART_EVERY = 4.0
DOWN = 1.5
"""Seconds a stopped listener stays stopped."""
DEPTH_SECONDS = 3.0
"""The unfinished rows may be at most this many seconds of traffic."""
RSS_GROWTH = 1.10


@pytest.fixture
def collector() -> Iterator[Collector]:
    with collecting() as server:
        yield server


def unfinished(db: psycopg.Connection) -> int:
    row = db.execute(
        "SELECT count(*) FROM pushsync.outbox WHERE state IN ('pending', 'sending', 'sent')"
    ).fetchone()
    return int(row[0]) if row else 0


def written(db: psycopg.Connection) -> int:
    """Notifications of the rule so far, finished or not."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM pushsync.outbox WHERE rule = 'job_posted') "
        "+ (SELECT count(*) FROM pushsync.outbox_history WHERE rule = 'job_posted')"
    ).fetchone()
    return int(row[0]) if row else 0


def test_soak_listeners_come_and_go_depth_and_memory_stay_flat(
    db: psycopg.Connection,
    dsn: str,
    tmp_path: Path,
    knobs: Knobs,
    report: Report,
    processes: Processes,
    collector: Collector,
) -> None:
    seconds = knobs.seconds(SECONDS)
    rate = min(MAX_RATE, RATE * knobs.scale)
    total = round(seconds * rate)
    devices = [Device.make(tmp_path, name) for name in ("sync-1", "sync-2", "udp-1", "udp-2")]
    install_jobs(db, dsn, tmp_path, [d.name for d in devices], resend=RESEND)
    dispatcher = processes.dispatcher(dsn)
    sync = dispatcher.wait_address("SYNC")
    dispatcher.wait_connected()
    action = collector.address
    for device in devices:
        over_sync = device.name.startswith("sync")
        device.register(dsn, udp=not over_sync)
        device.write_config(
            udp=True,
            sync=sync if over_sync else None,
            socket_action=action,
            send="$device $request_id",
        )
    running: dict[str, ListenerProcess] = {d.name: processes.listener(d) for d in devices}
    for listener in running.values():
        listener.wait_started()

    restarts = 0
    started = time.monotonic()
    writer = JobWriter(
        dsn, len(devices), batch=max(1, round(rate * BATCH_SECONDS)), rate=rate, total=total
    )
    with (
        psycopg.connect(dsn, autocommit=True) as sampling,  # the depth sampler's own
        Sampler(lambda: float(unfinished(sampling)), 0.5) as depth,
        Sampler(lambda: float(dispatcher.rss()), 1.0) as rss,
        writer,
    ):
        turn = 0
        next_restart = started + RESTART_EVERY
        while writer.is_alive():
            writer.join(max(0.0, min(next_restart - time.monotonic(), 0.5)))
            if time.monotonic() < next_restart or not writer.is_alive():
                continue
            device = devices[turn % len(devices)]
            turn += 1
            running[device.name].stop()
            time.sleep(DOWN)
            running[device.name] = processes.listener(device)
            running[device.name].wait_started()
            restarts += 1
            next_restart = time.monotonic() + RESTART_EVERY
        wrote = time.monotonic() - started
        assert writer.error is None, writer.error
        drained = until(
            lambda: unfinished(db) == 0 and written(db) >= total,
            "the outbox to drain",
            knobs.patience(60),
            logs=[dispatcher.log, *(p.log for p in running.values())],
            every=0.1,
        )
    until(
        lambda: collector.count() >= total,
        "every action",
        knobs.patience(30),
        explain=lambda: missing_runs(
            set(job_notifications(db)),
            collector.request_ids(),
            [p.log for p in processes.listeners],
        ),
    )
    for listener in running.values():
        listener.stop()
    dispatcher.stop()

    found = job_notifications(db)
    problems = {
        d.name: exactly_once(collector.ran(d.name), of_device(found, d.name)) for d in devices
    }
    states = Counter(state for _, state in found.values())
    depths = depth.values()
    warm_at = seconds / 3
    warm = [value for at, value in rss.samples if at >= warm_at]
    assert warm, "no memory sample after the warm-up"
    rss_warm, rss_end, rss_top = warm[0], rss.samples[-1][1], max(warm)
    duplicates = sum(p.output().count("duplicate, not run again") for p in processes.listeners)
    bound = rate * DEPTH_SECONDS
    report.add(
        seconds=round(wrote, 1),
        rate_per_s=rate,
        jobs=total,
        achieved_rate_per_s=round(total / wrote, 1),
        listener_restarts=restarts,
        outbox_unfinished={
            "p50": percentile(depths, 0.5),
            "p95": percentile(depths, 0.95),
            "max": max(depths, default=0.0),
            "bound": bound,
            "samples": len(depths),
        },
        drained_after_s=round(drained, 2),
        dispatcher_rss_kib={"warm": rss_warm, "max": rss_top, "end": rss_end},
        states=dict(states),
        duplicates_dropped_by_listeners=duplicates,
        sampling_errors=depth.errors[:3] + rss.errors[:3],
    )
    assert len(found) == total
    assert states == {"confirmed": total}, states
    assert all(not p for p in problems.values()), problems
    assert max(depths, default=0.0) <= bound, depths
    assert rss_end <= rss_warm * RSS_GROWTH
    assert rss_top <= rss_warm * RSS_GROWTH
    assert processes.tracebacks() == []
    report.done()
