"""Real processes for the reliability suite: dispatchers, listeners, devices, figures.

Everything here starts the installed ``pushsync`` console script as a
subprocess (:class:`DispatcherProcess` builds on ``Dispatch`` of
``tests/support/processes.py``): processes log to files, never to pipes that
could fill up and block them, and the tests read those logs for the addresses
the processes picked and for what they did.

A :class:`Device` is a directory with a key file, a listener config and the
file its action appends request ids to; :class:`ListenerProcess` runs
``pushsync listen`` on it. Request ids the action recorded are the ground
truth for "each action ran exactly once".
"""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from tests.support.cli import run_cli
from tests.support.processes import Dispatch, Listen, free_udp_port
from tests.support.waiting import until

__all__ = [
    "JOBS_RULES",
    "JOBS_SCHEMA",
    "RECORDER",
    "Device",
    "DispatcherProcess",
    "JobWriter",
    "Knobs",
    "ListenerProcess",
    "LogTail",
    "Processes",
    "Report",
    "Sampler",
    "confirmed_ids",
    "enqueue",
    "exactly_once",
    "install_jobs",
    "missing_runs",
    "outbox_states",
    "percentile",
    "quiet",
    "rss_kib",
]

RECORDER = """\
import sys
with open(sys.argv[1], "a", encoding="ascii") as out:
    out.write(sys.argv[2] + "\\n")
"""
"""The ``run`` action's program: append the request id (one write, O_APPEND) to a file.
Started as ``python -S`` to keep each run to a few milliseconds."""


# --------------------------------------------------------------------------- knobs, figures


@dataclass(frozen=True, slots=True)
class Knobs:
    """How big this run is (``scale``), its random seed, and where figures go."""

    scale: float
    seed: int
    report: Path | None

    def size(self, at_scale_one: int, *, least: int = 1) -> int:
        """``at_scale_one`` times the scale, rounded, at least ``least``."""
        return max(least, round(at_scale_one * self.scale))

    def seconds(self, at_scale_one: float) -> float:
        """A duration that grows with the scale."""
        return at_scale_one * self.scale

    def patience(self, at_scale_one: float) -> float:
        """A timeout: never shorter than at scale 1, longer for bigger runs."""
        return at_scale_one * max(1.0, self.scale)


class Report:
    """A test's figures: each printed as it is added, all written as JSON at the end."""

    def __init__(self, test: str, knobs: Knobs) -> None:
        self.test = test
        self.figures: dict[str, Any] = {"scale": knobs.scale, "seed": knobs.seed}
        self.complete = False
        print(f"\n[{test}] scale {knobs.scale:g}, seed {knobs.seed}")

    def add(self, **figures: Any) -> None:
        for name, value in figures.items():
            self.figures[name] = value
            print(f"[{self.test}] {name}: {value}")

    def done(self) -> None:
        """Every assertion held: the figures describe a complete run."""
        self.complete = True


# --------------------------------------------------------------------------- helpers


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS`` of /proc/PID/status), in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def confirmed_ids(db: psycopg.Connection) -> set[uuid.UUID]:
    """Rows confirmed, in the outbox or moved to its history."""
    rows = db.execute(
        "SELECT request_id FROM pushsync.outbox WHERE state = 'confirmed' "
        "UNION ALL SELECT request_id FROM pushsync.outbox_history WHERE state = 'confirmed'"
    ).fetchall()
    return {uuid.UUID(str(row[0])) for row in rows}


def enqueue(
    db: psycopg.Connection,
    device_ids: list[str],
    n: int,
    *,
    resend: float,
    ttl: float = 3600.0,
    rule: str = "bulk",
) -> dict[str, set[uuid.UUID]]:
    """``n`` outbox rows spread over the devices in one transaction, with the NOTIFY a
    trigger sends; the request ids per device. ``resend`` and ``ttl`` in seconds."""
    with db.transaction():
        rows = db.execute(
            "INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, "
            "expires_at, resend_every) "
            "SELECT %(rule)s, (%(devices)s::text[])[1 + n %% cardinality(%(devices)s::text[])], "
            "'sync', 'row ' || n, false, now() + make_interval(secs => %(ttl)s), "
            "make_interval(secs => %(resend)s) "
            "FROM generate_series(1, %(n)s) AS n RETURNING request_id, device_id",
            {"rule": rule, "devices": device_ids, "n": n, "ttl": ttl, "resend": resend},
        ).fetchall()
        db.execute("SELECT pg_notify('pushsync', '')")
    found: dict[str, set[uuid.UUID]] = {device: set() for device in device_ids}
    for request_id, device_id in rows:
        found[str(device_id)].add(uuid.UUID(str(request_id)))
    return found


def outbox_states(db: psycopg.Connection) -> dict[str, int]:
    """Rows per state, outbox and history together."""
    rows = db.execute(
        "SELECT state, count(*) FROM (SELECT state FROM pushsync.outbox "
        "UNION ALL SELECT state FROM pushsync.outbox_history) AS s GROUP BY state"
    ).fetchall()
    return {str(state): int(n) for state, n in rows}


class LogTail:
    """Reads a growing log file line by line, from where it stopped last time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[str]:
        try:
            with self.path.open("rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        return [line.decode("utf-8", errors="replace") for line in complete]


class Sampler:
    """Calls ``probe`` every ``every`` seconds in a thread; keeps (seconds since start, value)."""

    def __init__(self, probe: Callable[[], float], every: float) -> None:
        self.probe = probe
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self.probe()
            except Exception as exc:  # a probe failing (database restarting) is noted, not fatal
                self.errors.append(f"{type(exc).__name__}: {exc}")
            else:
                self.samples.append((time.monotonic() - self._started, value))
            self._stop.wait(self.every)

    def values(self, since: float = 0.0) -> list[float]:
        return [value for at, value in self.samples if at >= since]


def quiet(logs: Iterable[Path], seconds: float, timeout: float) -> float:
    """Wait until none of ``logs`` has grown for ``seconds`` (at most ``timeout``); how long."""
    started = time.monotonic()
    sizes: list[int] = []
    since = started
    while time.monotonic() - started < timeout:
        now = [path.stat().st_size if path.exists() else 0 for path in logs]
        if now != sizes:
            sizes, since = now, time.monotonic()
        elif time.monotonic() - since >= seconds:
            break
        time.sleep(0.05)
    return time.monotonic() - started


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


# --------------------------------------------------------------------------- processes


class DispatcherProcess(Dispatch):
    """``pushsync dispatch --udp-listen 127.0.0.1:0 --sync-listen 127.0.0.1:0 [options]``."""

    def __init__(self, dsn: str, log: Path, *options: str, log_level: str = "info") -> None:
        super().__init__(dsn, log, *options, log_level=log_level)
        self._tail = LogTail(log)
        self._seen: list[str] = []

    def _announced(self, pattern: str) -> str | None:
        self._seen.extend(self._tail.new_lines())
        for line in self._seen:
            found = re.search(pattern, line)
            if found:
                return found.group(1)
        return None

    def wait_address(self, gateway: str, timeout: float = 30.0) -> tuple[str, int]:
        """(host, port) of the ``SYNC`` or ``UDP`` gateway, from its log line."""
        pattern = rf"{gateway} gateway on (\S+)"
        until(
            lambda: self._announced(pattern) is not None or self.process.poll() is not None,
            f"the {gateway} gateway's address",
            timeout,
            logs=[self.log],
        )
        text = self._announced(pattern)
        assert text is not None, self.output()[-3000:]
        host, _, port = text.rpartition(":")
        return host, int(port)

    def wait_connected(self, timeout: float = 30.0) -> None:
        """Until the dispatcher has its database connection (its log says so)."""
        until(
            lambda: self._announced(r"(connected to .*)") is not None,
            "the dispatcher's database connection",
            timeout,
            logs=[self.log],
        )

    def rss(self) -> int:
        return rss_kib(self.process.pid)

    def kill(self) -> None:
        """kill -9, and reap it."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)


class ListenerProcess(Listen):
    """``pushsync listen CONFIG``, started in the config's directory, logging to ``log``."""

    def rss(self) -> int:
        return rss_kib(self.process.pid)


@dataclass
class Processes:
    """Starts dispatchers and listeners with numbered logs in ``logs``; kills what is left."""

    logs: Path
    dispatchers: list[DispatcherProcess] = field(default_factory=list)
    listeners: list[ListenerProcess] = field(default_factory=list)

    def dispatcher(self, dsn: str, *options: str, log_level: str = "info") -> DispatcherProcess:
        log = self.logs / f"dispatch-{len(self.dispatchers) + 1}.log"
        self.dispatchers.append(DispatcherProcess(dsn, log, *options, log_level=log_level))
        return self.dispatchers[-1]

    def listener(self, device: Device, *, log_level: str = "info") -> ListenerProcess:
        """``log_level="debug"`` also logs each line a flood's throttle holds back."""
        log = self.logs / f"listen-{device.name}-{len(self.listeners) + 1}.log"
        self.listeners.append(ListenerProcess(device.config, log, log_level=log_level))
        return self.listeners[-1]

    def all(self) -> list[ListenerProcess | DispatcherProcess]:
        return [*self.listeners, *self.dispatchers]

    def close(self) -> None:
        for process in self.all():
            process.close()

    def tracebacks(self) -> list[str]:
        """Logs of every process started that show a traceback."""
        return [
            str(p.log)
            for p in self.all()
            if p.log.exists() and "Traceback" in p.log.read_text(errors="replace")
        ]


# --------------------------------------------------------------------------- devices


@dataclass
class Device:
    """A device's directory: key file, listener config, and what its action recorded.

    ``udp_port`` is fixed when the device is made, so that the address given
    to ``pushsync device add --udp`` stays right across listener restarts.
    """

    name: str
    home: Path
    udp_port: int = field(default_factory=free_udp_port)

    @property
    def key(self) -> Path:
        return self.home / f"{self.name}.key"

    @property
    def config(self) -> Path:
        return self.home / "listener.yaml"

    @property
    def ran_file(self) -> Path:
        return self.home / "ran.txt"

    @property
    def udp_address(self) -> str:
        return f"127.0.0.1:{self.udp_port}"

    @classmethod
    def make(cls, root: Path, name: str) -> Device:
        home = root / name
        home.mkdir(parents=True)
        (home / "record.py").write_text(RECORDER, encoding="utf-8")
        return cls(name, home)

    def register(self, dsn: str, *, udp: bool = True) -> None:
        """``pushsync device add NAME --dsn DSN [--udp ADDRESS] --secret-file KEY``."""
        args = ["device", "add", self.name, "--dsn", dsn, "--secret-file", str(self.key)]
        if udp:
            args += ["--udp", self.udp_address]
        added = run_cli(*args)
        assert added.returncode == 0, added.stderr

    def write_config(
        self,
        *,
        udp: bool = True,
        sync: tuple[str, int] | None = None,
        maildir: bool = False,
        socket_action: tuple[str, int] | None = None,
        send: str = "$request_id",
        heartbeat: str = "5s",
    ) -> Path:
        """A listener config: the channels asked for, one catch-all handler.

        The action runs :data:`RECORDER` on the request id, unless ``socket_action``
        names a TCP (host, port) to send ``send`` to instead.
        """
        channels = ""
        if udp:
            channels += f'  udp: {{bind: "{self.udp_address}"}}\n'
        if sync is not None:
            channels += f'  sync: {{server: "{sync[0]}:{sync[1]}", heartbeat: {heartbeat}}}\n'
        if maildir:
            channels += "  maildir: {path: Maildir}\n"
        if socket_action is not None:
            host, port = socket_action
            action = f'{{socket: {{host: "{host}", port: {port}, send: "{send}"}}}}'
        else:
            argv = [sys.executable, "-S", str(self.home / "record.py"), str(self.ran_file)]
            action = f"{{run: {json.dumps([*argv, '$request_id'])}, timeout: 60s}}"
        self.config.write_text(
            f"device: {self.name}\n"
            f"secret_file: {self.key.name}\n"
            "state_dir: state\n"
            f"channels:\n{channels}"
            "handlers:\n"
            "  - name: record\n"
            f"    action: {action}\n",
            encoding="utf-8",
        )
        return self.config

    def ran(self) -> list[str]:
        """Request ids the action recorded, in order, repeats included."""
        if not self.ran_file.exists():
            return []
        return self.ran_file.read_text(encoding="ascii").split()


def exactly_once(recorded: Iterable[str], expected: set[uuid.UUID]) -> dict[str, Any]:
    """Compare what actions recorded with the ids expected; the differences, empty if none."""
    counts = Counter(recorded)
    wanted = {str(i) for i in expected}
    problems: dict[str, Any] = {}
    twice = {i: n for i, n in counts.items() if n > 1}
    if twice:
        problems["ran more than once"] = dict(list(twice.items())[:10]) | {"count": len(twice)}
    missing = wanted - set(counts)
    if missing:
        problems["never ran"] = [*sorted(missing)[:10], f"({len(missing)} in all)"]
    unexpected = set(counts) - wanted
    if unexpected:
        problems["ran but not expected"] = [*sorted(unexpected)[:10], f"({len(unexpected)})"]
    return problems


def missing_runs(
    expected: Iterable[uuid.UUID], recorded: Iterable[str], logs: Iterable[Path]
) -> str:
    """For a failure message: the request ids no action recorded, and log lines naming them."""
    missing = sorted({str(i) for i in expected} - set(recorded))
    sample = missing[:5]
    lines = [
        f"{path.name}: {line}"
        for path in logs
        if path.exists()
        for line in path.read_text(errors="replace").splitlines()
        if any(m in line for m in sample)
    ]
    return f"{len(missing)} never ran, e.g. {sample}; log lines naming them: {lines[:12]}"


# --------------------------------------------------------------------------- a watched table


JOBS_SCHEMA = """\
CREATE TABLE public.crews (
    device_id text PRIMARY KEY,
    crew      integer NOT NULL
);
CREATE TABLE public.jobs (
    job_id    bigserial PRIMARY KEY,
    crew      integer NOT NULL,
    batch     uuid NOT NULL,
    posted_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX jobs_batch ON public.jobs (batch);
"""
"""An application's tables: each job is for one crew, each device belongs to one crew."""

JOBS_RULES = """\
version: 1
defaults:
  ttl: 1h
  resend_every: RESEND
  coalesce: false
rules:
  - name: job_posted
    table: public.jobs
    on: [insert]
    recipients: SELECT c.device_id FROM public.crews c WHERE c.crew = new.crew
    subject: job
    content: "job {new.job_id} for crew {new.crew}"
"""
"""One notification per job, to the devices of its crew."""


def install_jobs(
    db: psycopg.Connection, dsn: str, directory: Path, devices: list[str], *, resend: str
) -> None:
    """The jobs tables, a crew per device, and the rule, applied with ``pushsync migrate``."""
    db.execute(JOBS_SCHEMA)
    for crew, device in enumerate(devices):
        db.execute("INSERT INTO public.crews VALUES (%s, %s)", (device, crew))
    rules = directory / "rules.yaml"
    rules.write_text(JOBS_RULES.replace("RESEND", resend), encoding="utf-8")
    migrated = run_cli("migrate", "--dsn", dsn, str(rules))
    assert migrated.returncode == 0, migrated.stderr


def job_notifications(db: psycopg.Connection) -> dict[uuid.UUID, tuple[str, str]]:
    """Every notification of the jobs rule, in the outbox or archived: request id ->
    (device, state)."""
    rows = db.execute(
        "SELECT request_id, device_id, state FROM pushsync.outbox WHERE rule = 'job_posted' "
        "UNION ALL SELECT request_id, device_id, state FROM pushsync.outbox_history "
        "WHERE rule = 'job_posted'"
    ).fetchall()
    return {uuid.UUID(str(r[0])): (str(r[1]), str(r[2])) for r in rows}


def of_device(found: dict[uuid.UUID, tuple[str, str]], device: str) -> set[uuid.UUID]:
    """The request ids of ``device`` among :func:`job_notifications`."""
    return {request_id for request_id, (d, _) in found.items() if d == device}


class JobWriter(threading.Thread):
    """The application: inserts jobs in transactions of ``batch`` rows at ``rate`` rows/s.

    It survives the database going away as an application should: a batch whose
    transaction failed is written again once a connection works, unless it turns
    out to have committed after all (each batch carries its own uuid). It stops
    after ``total`` rows, or when :meth:`finish` is called. As a context manager
    it starts on entry and is stopped and joined on exit.
    """

    def __init__(self, dsn: str, crews: int, *, batch: int, rate: float, total: int) -> None:
        super().__init__(name="job writer", daemon=True)
        self.dsn = dsn
        self.crews = crews
        self.batch = batch
        self.rate = rate
        self.total = total
        self.committed = 0
        self.failures: list[str] = []
        self.error: BaseException | None = None
        self._finish = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None

    def finish(self) -> None:
        self._finish.set()

    def __enter__(self) -> JobWriter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop writing (if it has not finished) and wait for the thread."""
        self.finish()
        self.join(30)

    def run(self) -> None:
        try:
            self._write_all()
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            if self._conn is not None:
                self._conn.close()

    def _write_all(self) -> None:
        started = time.monotonic()
        while self.committed < self.total and not self._finish.is_set():
            due = started + self.committed / self.rate
            if (wait := due - time.monotonic()) > 0:
                self._finish.wait(wait)
            size = min(self.batch, self.total - self.committed)
            self._write(uuid.uuid4(), size)
            self.committed += size

    def _write(self, tag: uuid.UUID, size: int) -> None:
        uncertain = False
        while True:
            try:
                conn = self._connection()
                if uncertain and conn.execute(
                    "SELECT EXISTS (SELECT 1 FROM public.jobs WHERE batch = %s)", (tag,)
                ).fetchone() == (True,):
                    return  # the commit went through before the connection broke
                with conn.transaction():
                    conn.execute(
                        "INSERT INTO public.jobs (crew, batch) "
                        "SELECT (%s + n) %% %s, %s FROM generate_series(1, %s) AS n",
                        (self.committed, self.crews, tag, size),
                    )
                return
            except psycopg.OperationalError as exc:
                self.failures.append(str(exc).strip().splitlines()[0] if str(exc) else "")
                uncertain = True
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
                time.sleep(0.05)

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=2)
        return self._conn
