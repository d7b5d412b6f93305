"""PostgreSQL fails over to a synchronous standby in the middle of a burst: nothing is lost.

A primary and a streaming standby from the same server binaries: the standby
is made with ``pg_basebackup -R`` and named in the primary's
``synchronous_standby_names`` with ``synchronous_commit = on``, so a commit
is reported only once the standby has it. Everything that talks to the
database uses one multi-host DSN, ``host=A,B port=PA,PB
target_session_attrs=read-write``: the schema and rules are migrated through
it, ``pushsync dispatch`` and ``pushsync status`` run with it, and the
application writes jobs through it (a watched table, one notification per job
through a rule; a batch whose commit failed is written again, unless it turns
out to have committed). Two listeners run a ``socket`` action per message, one
taking its messages by UDP, one over SYNC; a third device runs ``pushsync
sync`` against the dispatcher.

When 40 % of the burst is written the primary is stopped in *immediate* mode
(a crash: no checkpoint, connections cut) and the standby is promoted, as a
failover manager (Patroni, pg_auto_failover) would. Triggers and the outbox
are ordinary tables, replicated physically: nothing pushsync needs stays
behind on the old primary.

What must hold: the dispatcher reconnects to the new primary by itself and
never exits; every job is on the new primary (none acknowledged before the
kill is lost) with exactly one notification; each is confirmed and each
device's action ran exactly once per job of its crew; the SYNC device keeps
its connection to the dispatcher throughout; after the failover
``pushsync sync`` brings the device every job of its publication and
``pushsync status`` sees the dispatcher alive. Reported: the time from the
kill to the promotion, to ``/healthz`` ok, to the first confirmation recorded
and the first action after the promotion, to the first action of a job
written after the kill (so, necessarily, on the new primary), and to every
notification confirmed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import port_for
import psycopg
import pytest
from psycopg import sql
from pytest_postgresql.executors import PostgreSQLExecutor

from pushsync import generator, schema
from tests.reliability.harness import (
    JOBS_RULES,
    JOBS_SCHEMA,
    Device,
    JobWriter,
    Knobs,
    Processes,
    Report,
    exactly_once,
    job_notifications,
    of_device,
)
from tests.support.cli import clean_env, start
from tests.support.collector import Collector, collecting
from tests.support.keys import write_key
from tests.support.metrics import http_get, scrape
from tests.support.postgres import (
    crash,
    pg_ctl_path,
    prepare_datadir,
    start_postgres,
    wrapper_info,
)
from tests.support.waiting import until

ROWS = 400
RATE = 400.0
BATCH = 20
KILL_AT = 0.4
"""Part of the burst written when the primary is killed."""

SERVER = (
    "-c fsync=off -c max_connections=100 -c listen_addresses=127.0.0.1 "
    "-c wal_level=replica -c max_wal_senders=4 -c wal_keep_size=128MB -c hot_standby=on"
)
"""Both servers. fsync off is safe here: only the server process is killed, never the
machine, and what the standby acknowledged is in the operating system's cache."""

STANDBY_NAME = "standby"

PUBLICATION = """\
publications:
  - name: office
    tables:
      - table: public.jobs
        download: SELECT j.* FROM public.jobs j WHERE j.crew = 0
"""
"""What ``pushsync sync`` fetches: every job of crew 0."""
OFFICE = bytes(range(32))
"""The secret of ``office-1``, the device that runs ``pushsync sync``."""


@dataclass
class Standby:
    """A streaming standby of a test's primary, run through the pg_ctl wrapper."""

    base: Path
    datadir: Path
    logfile: Path
    port: int

    def pg_ctl(self, *args: str) -> None:
        done = subprocess.run(
            [pg_ctl_path(), *args, "-D", str(self.datadir)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr, self.log_tail())

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_text(errors="replace")[-3000:]
        return ""


@contextlib.contextmanager
def standby_of(primary: PostgreSQLExecutor, port: int) -> Iterator[Standby]:
    """``pg_basebackup -R`` of ``primary`` (naming itself ``standby``), started on ``port``."""
    info = wrapper_info()
    base = Path(tempfile.mkdtemp(prefix="pushsync-standby-", dir="/tmp"))
    try:
        base.chmod(0o755)
        datadir, logfile = prepare_datadir(base)
        sockets = base / "sock"
        sockets.mkdir(mode=0o755)
        source = (
            f"host={primary.host} port={primary.port} user={primary.user} "
            f"application_name={STANDBY_NAME}"
        )
        basebackup = Path(info.bindir) / "pg_basebackup"
        if not basebackup.is_file():
            pytest.fail(f"no pg_basebackup next to {info.pg_ctl} (scripts/ensure-postgres)")
        backup = subprocess.run(
            [
                str(basebackup),
                "-d",
                source,
                "-D",
                str(datadir),
                "-R",
                "-X",
                "stream",
                "--checkpoint=fast",
                "--no-sync",
                "--no-manifest",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert backup.returncode == 0, backup.stderr
        if info.user is not None:  # root made the copy; the server runs as this user
            owner = pwd.getpwnam(info.user)
            for path in (sockets, datadir, *datadir.rglob("*")):
                os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
        standby = Standby(base, datadir, logfile, port)
        options = f"-p {port} -c unix_socket_directories={sockets} {SERVER}"
        standby.pg_ctl("start", "-w", "-t", "60", "-l", str(logfile), "-o", options)
        try:
            yield standby
        finally:
            with contextlib.suppress(AssertionError):
                standby.pg_ctl("stop", "-m", "immediate", "-w")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def first_after(db: psycopg.Connection, column: str, since: float) -> float | None:
    """Epoch seconds of the earliest ``column`` (sent_at, confirmed_at) after ``since``."""
    query = sql.SQL(
        "SELECT extract(epoch FROM min({c}))::float8 FROM (SELECT {c} FROM pushsync.outbox "
        "UNION ALL SELECT {c} FROM pushsync.outbox_history) AS t WHERE {c} > to_timestamp(%s)"
    ).format(c=sql.Identifier(column))
    row = db.execute(query, (since,)).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def finished(process: subprocess.Popen[str]) -> str:
    """Its standard output, once it has exited with status 0."""
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


def written_after(db: psycopg.Connection, since: float) -> set[uuid.UUID]:
    """Notifications whose transaction started after ``since`` (epoch seconds)."""
    rows = db.execute(
        "SELECT request_id FROM pushsync.outbox WHERE created_at > to_timestamp(%s) "
        "UNION ALL SELECT request_id FROM pushsync.outbox_history "
        "WHERE created_at > to_timestamp(%s)",
        (since, since),
    ).fetchall()
    return {uuid.UUID(str(r[0])) for r in rows}


def install(dsn: str, devices: list[Device]) -> None:
    """The application's tables, the jobs rule and the publication ``office``; the crews'
    devices, each of its own crew, the first with a UDP address; and ``office-1``, which
    may synchronize ``office``."""
    rules = generator.loads(JOBS_RULES.replace("RESEND", "2s") + PUBLICATION, "rules.yaml")
    with psycopg.connect(dsn) as db:
        db.execute(JOBS_SCHEMA)
        schema.migrate(db, generator.compile_rules(rules))
        for crew, device in enumerate(devices):
            secret = os.urandom(32)
            write_key(device.key, secret)
            db.execute(
                "INSERT INTO pushsync.devices (device_id, secret) VALUES (%s, %s)",
                (device.name, secret),
            )
            db.execute("INSERT INTO public.crews VALUES (%s, %s)", (device.name, crew))
        db.execute(
            "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
            "VALUES (%s, 'udp', 'manual', %s)",
            (devices[0].name, devices[0].udp_address),
        )
        db.execute(
            "INSERT INTO pushsync.devices (device_id, secret) VALUES ('office-1', %s)", (OFFICE,)
        )
        db.execute(
            "INSERT INTO pushsync.device_publications (device_id, publication) "
            "VALUES ('office-1', 'office')"
        )


def make_synchronous(primary: PostgreSQLExecutor, patience: float) -> None:
    """Name the standby in ``synchronous_standby_names``; wait until it is in sync."""
    where = f"user={primary.user} host={primary.host} port={primary.port} dbname=postgres"
    with psycopg.connect(where, autocommit=True) as db:
        db.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{STANDBY_NAME}'")
        db.execute("ALTER SYSTEM SET synchronous_commit = on")
        db.execute("SELECT pg_reload_conf()")

        def in_sync() -> bool:
            states = db.execute(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = %s",
                (STANDBY_NAME,),
            ).fetchall()
            return states == [("sync",)]

        until(in_sync, "the standby to stream synchronously", patience)


def test_failover_to_a_synchronous_standby_loses_nothing(
    tmp_path: Path, knobs: Knobs, report: Report, processes: Processes
) -> None:
    started = time.monotonic()
    rows = knobs.size(ROWS)
    patience = knobs.patience(60)
    with (
        start_postgres(create_template=False, postgres_options=SERVER) as primary,
        collecting() as collector,
    ):
        where = f"user={primary.user} host={primary.host} port={primary.port}"
        with psycopg.connect(f"{where} dbname=postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE pushsync")
        standby_port = port_for.get_port(None)
        assert standby_port is not None
        # Everything connects through both servers; the one that accepts writes wins.
        dsn = (
            f"host={primary.host},{primary.host} port={primary.port},{standby_port} "
            f"user={primary.user} dbname=pushsync target_session_attrs=read-write "
            "connect_timeout=2"
        )
        devices = [Device.make(tmp_path, name) for name in ("crew-0", "crew-1")]
        install(dsn, devices)
        # The dispatcher and the UDP device start while the standby is being made.
        dispatcher = processes.dispatcher(dsn, "--metrics", "127.0.0.1:0")
        action = collector.address
        send = "$device $request_id"
        devices[0].write_config(udp=True, socket_action=action, send=send)
        listeners = [processes.listener(devices[0])]
        with standby_of(primary, standby_port) as standby:
            make_synchronous(primary, patience)
            report.add(servers_ready_s=round(time.monotonic() - started, 2))
            sync_host, sync_port = dispatcher.wait_address("SYNC")
            devices[1].write_config(
                udp=False, sync=(sync_host, sync_port), heartbeat="1s", socket_action=action,
                send=send,
            )  # fmt: skip
            listeners.append(processes.listener(devices[1]))
            office = tmp_path / "office"
            office.mkdir()
            write_key(office / "office.key", OFFICE)
            config = office / "listener.yaml"
            config.write_text(
                "device: office-1\nsecret_file: office.key\nstate_dir: state\n"
                f'publication: office\nchannels:\n  sync: {{server: "{sync_host}:{sync_port}"}}\n'
                "handlers:\n  - name: h\n    subject: sync\n    action: sync\n",
                encoding="utf-8",
            )
            url = dispatcher.metrics_url()
            for listener in listeners:
                listener.wait_started()
            logs = [dispatcher.log, *(listener.log for listener in listeners)]
            until(lambda: http_get(f"{url}/healthz")[0] == 200, "/healthz ok", patience, logs=logs)
            report.add(processes_ready_s=round(time.monotonic() - started, 2))
            failover = Failover(dsn, primary, standby, collector, rows, patience, logs, url)
            failover.run(report)
            after, status = (
                start("sync", str(config), cwd=office, env=clean_env()),
                start("status", "--dsn", dsn, cwd=tmp_path, env=clean_env()),
            )
            synchronized, listed = finished(after), finished(status)
            report.add(sync_after=synchronized.strip())
            with sqlite3.connect(office / "state" / "local.db") as local:
                held = local.execute("SELECT count(*) FROM jobs").fetchone()
            assert held == failover.crew_zero, (held, failover.crew_zero)
            assert "dispatchers alive: 1" in listed, listed
            assert dispatcher.process.poll() is None, "the dispatcher exited"
            # The SYNC device kept its one connection: the database is not its business.
            assert listeners[1].output().count("sync: connected to") == 1, listeners[1].output()
            figures = scrape(url)
            for child in [*listeners, dispatcher]:  # all at once, then each must end well
                child.process.send_signal(signal.SIGTERM)
            for child in [*listeners, dispatcher]:
                child.process.wait(patience)
                assert child.process.returncode == 0, child.output()[-3000:]
            text = dispatcher.output()

    problems = {
        d.name: exactly_once(collector.ran(d.name), failover.per_device(d.name)) for d in devices
    }
    report.add(dispatcher_failed_reconnects=text.count("database connection to"))
    assert len(failover.found) == rows  # one notification per job committed, none lost
    assert all(not p for p in problems.values()), problems
    assert text.count("; listening on channel") >= 2  # the first primary, then the new one
    assert figures[("pushsync_database_up", ())] == 1
    assert processes.tracebacks() == []
    report.done()


@dataclass
class Failover:
    """The burst, the kill, the promotion, and what the new primary holds after."""

    dsn: str
    primary: PostgreSQLExecutor
    standby: Standby
    collector: Collector
    rows: int
    patience: float
    logs: list[Path]
    url: str
    found: dict[uuid.UUID, tuple[str, str]] = field(default_factory=dict)
    crew_zero: tuple[int, ...] | None = None

    def per_device(self, device: str) -> set[uuid.UUID]:
        return of_device(self.found, device)

    def run(self, report: Report) -> None:
        url, patience, logs = self.url, self.patience, self.logs
        with JobWriter(self.dsn, 2, batch=BATCH, rate=RATE, total=self.rows) as writer:
            until(
                lambda: writer.committed >= self.rows * KILL_AT,
                "the burst to be under way",
                patience,
            )
            committed_at_kill = writer.committed
            killed = time.time()
            crash(self.primary)
            dead = time.time()  # a transaction begun after this can only be on the standby
            self.standby.pg_ctl("promote", "-w", "-t", "60")
            promoted = time.time()
            healthy = until(
                lambda: http_get(f"{url}/healthz")[0] == 200,
                "/healthz ok on the new primary",
                patience,
                logs=logs,
                every=0.01,
            )
            writer.join(patience)
        assert not writer.is_alive(), writer.error
        assert writer.error is None, writer.error

        new = (
            f"host={self.primary.host} port={self.standby.port} user={self.primary.user} "
            "dbname=pushsync"
        )
        with psycopg.connect(new, autocommit=True) as db:
            assert db.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
            jobs = db.execute("SELECT count(*) FROM public.jobs").fetchone()
            assert jobs == (self.rows,), (jobs, self.rows)

            def all_confirmed() -> bool:
                found = job_notifications(db)
                return len(found) >= self.rows and all(s == "confirmed" for _, s in found.values())

            until(all_confirmed, "every notification confirmed", patience, logs=logs)
            everything = time.time() - killed
            until(lambda: self.collector.count() >= self.rows, "every action", patience)
            first_confirmation = first_after(db, "confirmed_at", promoted)
            fresh = written_after(db, dead)
            self.found = job_notifications(db)
            self.crew_zero = db.execute(
                "SELECT count(*) FROM public.jobs WHERE crew = 0"
            ).fetchone()
        first_fresh = self.collector.first(fresh)
        first_any = self.collector.first(after=promoted)

        def since_kill(at: float | None) -> float | None:
            return None if at is None else round(at - killed, 3)

        report.add(
            rows=self.rows,
            committed_when_killed=committed_at_kill,
            writer_failed_attempts=len(writer.failures),
            kill_to_promoted_s=since_kill(promoted),
            kill_to_healthz_ok_s=since_kill(promoted + healthy),
            kill_to_first_confirmation_recorded_s=since_kill(first_confirmation),
            kill_to_first_action_after_promotion_s=since_kill(first_any),
            kill_to_first_action_of_a_job_written_after_the_kill_s=since_kill(first_fresh),
            kill_to_all_confirmed_s=round(everything, 2),
        )
        assert fresh, "no job was written after the kill"
        assert first_fresh is not None
        assert first_fresh - killed < 30, "the first delivery after the failover took over 30 s"
