"""PostgreSQL crashes in the middle of a burst of writes: nothing is lost, and how fast it recovers.

The application writes jobs (a watched table, one notification per job
through a rule applied by ``pushsync migrate``) at 500 rows/s in small
transactions; 1,500 rows at scale 1. When 40 % are written, PostgreSQL is
stopped in *immediate* mode — no checkpoint, the next start replays the WAL,
as after a crash (``tests/integration/test_dispatch_crash.py`` covers the fast
shutdown) — left down for a second, and started again on the same port. The
writer retries its failed transaction as an application would. Three real
listeners (UDP) run an action per message; ``pushsync dispatch`` runs
throughout.

What must hold: every job committed has exactly one notification (the trigger
wrote it in the same transaction: none for a write that failed, none lost in
the crash); each is confirmed; each device's action ran exactly once per job of
its crew; the dispatcher never exits and says healthy again. Reported: the
outage, the writer's failed attempts, and after the restart how long until
``/healthz`` is ok, the first confirmation, and the last one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.reliability.harness import (
    Device,
    JobWriter,
    Knobs,
    Processes,
    Report,
    exactly_once,
    install_jobs,
    job_notifications,
    of_device,
    quiet,
)
from tests.support.cli import run_cli
from tests.support.metrics import http_get, scrape
from tests.support.postgres import OwnServer, crash, start_postgres
from tests.support.waiting import until

ROWS = 1500
RATE = 500.0
BATCH = 25
DEVICES = 3
CRASH_AT = 0.4
"""Part of the burst written when PostgreSQL goes down."""
DOWN = 1.0
"""Seconds PostgreSQL stays down: the dispatcher's reconnects fail meanwhile."""


DURABLE = "-c max_connections=200 -c listen_addresses=127.0.0.1"
"""Unlike the suite's other servers, fsync and synchronous commit stay on: with
synchronous_commit=off a crash may lose transactions already reported committed."""


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    """A durable PostgreSQL server of this test's own (it is crashed), migrated."""
    with start_postgres(create_template=False, postgres_options=DURABLE) as executor:
        where = f"host={executor.host} port={executor.port} user={executor.user}"
        with psycopg.connect(f"{where} dbname=postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE pushsync")
        server = OwnServer(executor, f"{where} dbname=pushsync")
        migrated = run_cli("migrate", "--dsn", server.dsn)
        assert migrated.returncode == 0, migrated.stderr
        yield server


def test_postgres_crash_mid_burst_loses_nothing_and_recovers(
    own_server: OwnServer,
    tmp_path: Path,
    knobs: Knobs,
    report: Report,
    processes: Processes,
) -> None:
    rows = knobs.size(ROWS)
    patience = knobs.patience(60)
    dsn = own_server.dsn
    db = own_server.connect()
    devices = [Device.make(tmp_path, f"crew-{i}") for i in range(DEVICES)]
    install_jobs(db, dsn, tmp_path, [d.name for d in devices], resend="2s")
    for device in devices:
        device.register(dsn)
        device.write_config(udp=True)
    listeners = [processes.listener(device) for device in devices]
    for listener in listeners:
        listener.wait_started()
    dispatcher = processes.dispatcher(dsn, "--metrics", "127.0.0.1:0")
    url = dispatcher.metrics_url()
    logs = [dispatcher.log, *(listener.log for listener in listeners)]
    until(lambda: http_get(f"{url}/healthz")[0] == 200, "/healthz ok", patience, logs=logs)

    with JobWriter(dsn, DEVICES, batch=BATCH, rate=RATE, total=rows) as writer:
        until(lambda: writer.committed >= rows * CRASH_AT, "the burst to be under way", patience)
        db.close()
        actions_before = sum(len(d.ran()) for d in devices)
        down = time.monotonic()
        crash(own_server.executor)
        stop_seconds = time.monotonic() - down
        written_before = writer.committed
        until(
            lambda: http_get(f"{url}/healthz")[0] == 503, "/healthz to say 503", patience, logs=logs
        )
        time.sleep(max(0.0, down + DOWN - time.monotonic()))
        own_server.executor.start()
        up = time.monotonic()
        healthy = until(
            lambda: http_get(f"{url}/healthz")[0] == 200, "/healthz ok again", patience, logs=logs
        )
        writer.join(patience)
    assert not writer.is_alive(), writer.error
    assert writer.error is None, writer.error
    written = time.monotonic() - up

    db = own_server.connect()
    jobs = db.execute("SELECT count(*) FROM public.jobs").fetchone()
    assert jobs == (rows,), (jobs, rows)

    def all_confirmed() -> bool:
        found = job_notifications(db)
        return len(found) >= rows and all(state == "confirmed" for _, state in found.values())

    until(all_confirmed, "every notification confirmed", patience, logs=logs)
    everything = time.monotonic() - up
    until(lambda: sum(len(d.ran()) for d in devices) >= rows, "every action", patience, logs=logs)
    row = db.execute(
        "SELECT extract(epoch FROM min(confirmed_at) - pg_postmaster_start_time())::float8 "
        "FROM (SELECT confirmed_at FROM pushsync.outbox UNION ALL "
        "SELECT confirmed_at FROM pushsync.outbox_history) AS c "
        "WHERE confirmed_at > pg_postmaster_start_time()"
    ).fetchone()
    first_confirmation = row[0] if row else None
    assert dispatcher.process.poll() is None, "the dispatcher exited"
    figures = scrape(url)
    # Copies resent before the confirmations were recorded are still being taken
    # and acked: let that settle, then stop everything.
    settled = quiet(logs, 1.0, patience)
    stopping = time.monotonic()
    for listener in listeners:
        listener.stop()
    text = dispatcher.stop()
    stopped = time.monotonic() - stopping

    found = job_notifications(db)
    problems = {d.name: exactly_once(d.ran(), of_device(found, d.name)) for d in devices}
    duplicates = sum(listener.output().count("duplicate, not run again") for listener in listeners)
    reconnects = text.count("database connection to")
    db.close()
    report.add(
        rows=rows,
        written_before_crash=written_before,
        actions_run_before_crash=actions_before,
        immediate_stop_seconds=round(stop_seconds, 2),
        down_seconds=round(up - down, 2),
        writer_failed_attempts=len(writer.failures),
        dispatcher_failed_reconnects=reconnects,
        healthz_ok_after_restart_s=round(healthy, 2),
        first_confirmation_after_postmaster_start_s=(
            None if first_confirmation is None else round(first_confirmation, 2)
        ),
        burst_written_after_restart_s=round(written, 2),
        all_confirmed_after_restart_s=round(everything, 2),
        duplicates_dropped_by_listeners=duplicates,
        settled_s=round(settled, 2),
        processes_stopped_s=round(stopped, 2),
        confirmations_metric=figures[("pushsync_confirmations_total", ())],
    )
    assert len(found) == rows  # one notification per committed job, none for failed writes
    assert all(not p for p in problems.values()), problems
    assert reconnects >= 1  # it saw the outage
    assert figures[("pushsync_database_up", ())] == 1
    assert processes.tracebacks() == []
    report.done()
