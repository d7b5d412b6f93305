"""The benchmark's server and database: settings, setup, and the two measurements."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pushsync import generator, schema
from tests.support.postgres import start_postgres, wrapper_info

HERE = Path(__file__).resolve().parent
RULES_FILE = HERE / "rules.yaml"
SCHEMA_FILE = HERE / "schema.sql"
ROWLEVEL_FILE = HERE / "rowlevel.sql"
FLOOR_FILE = HERE / "floor.sql"
DBNAME = "bench"


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    table: str  # in schema bench
    description: str


VARIANTS: tuple[Variant, ...] = (
    Variant("none", "orders_none", "no trigger (baseline)"),
    Variant("nomatch", "orders_nomatch", "generated, 1 rule, `when` false for every row"),
    Variant("nobody", "orders_nobody", "generated, 1 rule, no `when`, recipients find nobody"),
    Variant("floor", "orders_floor", "hand-written statement trigger, `nobody`'s join (its floor)"),
    Variant("match4", "orders_match4", "generated, 1 rule, every row -> 4 devices, coalescing"),
    Variant(
        "rowlevel", "orders_rowlevel", "hand-written FOR EACH ROW, to_jsonb(NEW) -> event table"
    ),
    Variant("rules20", "orders_rules20", "generated, 20 rules on the table, none true"),
)
BY_NAME = {v.name: v for v in VARIANTS}

# Settings that matter for the numbers, read back from the server and printed.
SHOWN_SETTINGS = (
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_level",
    "shared_buffers",
    "work_mem",
    "max_wal_size",
    "checkpoint_timeout",
    "autovacuum",
    "jit",
    "jit_above_cost",
)


def server_options(*, fsync: bool, extra: dict[str, str]) -> dict[str, str]:
    """Durable-ish settings: fsync and full-page writes on, commits not waited for.

    autovacuum is off only to keep background work out of the timings; every
    measurement starts from a TRUNCATEd table and a CHECKPOINT instead. WAL and
    checkpoint limits are high so that no checkpoint starts during a measurement.
    """
    options = {
        "fsync": "on" if fsync else "off",
        "synchronous_commit": "off",
        "full_page_writes": "on",
        "shared_buffers": "512MB",
        "max_wal_size": "8GB",
        "checkpoint_timeout": "1h",
        "autovacuum": "off",
        "max_connections": "50",
        "listen_addresses": "127.0.0.1",
    }
    options.update(extra)
    return options


@dataclass(frozen=True, slots=True)
class Server:
    host: str
    port: int
    user: str
    bindir: Path

    def connect(self, dbname: str = DBNAME, *, autocommit: bool = True) -> psycopg.Connection:
        return psycopg.connect(
            host=self.host, port=self.port, user=self.user, dbname=dbname, autocommit=autocommit
        )


@contextmanager
def running_server(options: dict[str, str]) -> Iterator[Server]:
    """A throwaway server with ``options`` and an empty database ``bench``."""
    bindir = Path(wrapper_info().pg_ctl).parent
    text = " ".join(f"-c {name}={value}" for name, value in options.items())
    with start_postgres(dbname=DBNAME, postgres_options=text, create_template=False) as ex:
        server = Server(host=str(ex.host), port=int(ex.port), user=str(ex.user), bindir=bindir)
        with server.connect("postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
        yield server


def settings(conn: psycopg.Connection) -> dict[str, str]:
    rows = conn.execute(
        "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name",
        (list(SHOWN_SETTINGS),),
    ).fetchall()
    return {str(name): str(value) for name, value in rows}


@dataclass(frozen=True, slots=True)
class Setup:
    rules_sql: str
    rules_sha256: str
    rule_count: int
    accounts: int


def _run_file(conn: psycopg.Connection, path: Path) -> None:
    with conn.transaction():
        conn.execute(path.read_text("utf-8"))  # our own file


def prepare(conn: psycopg.Connection, override_sql: Path | None) -> Setup:
    """Base schema, benchmark tables, compiled rules, the hand-written triggers."""
    schema.migrate(conn)
    _run_file(conn, SCHEMA_FILE)
    rules = generator.load(RULES_FILE)
    rules_sql = generator.compile_rules(rules, "bench/trigger_overhead/rules.yaml")
    schema.migrate(conn, rules_sql)
    _run_file(conn, ROWLEVEL_FILE)
    _run_file(conn, FLOOR_FILE)
    if override_sql is not None:
        _run_file(conn, override_sql)
    row = conn.execute("SELECT count(DISTINCT account_id) FROM bench.watchers").fetchone()
    assert row is not None
    return Setup(
        rules_sql=rules_sql,
        rules_sha256=hashlib.sha256(rules_sql.encode()).hexdigest(),
        rule_count=len(rules.rules),
        accounts=int(row[0]),
    )


def _table(variant: Variant) -> sql.Composed:
    return sql.SQL("bench.{}").format(sql.Identifier(variant.table))


def reset(conn: psycopg.Connection, variant: Variant, *, checkpoint: bool = True) -> None:
    """Empty the variant's table and everything triggers write; then CHECKPOINT.

    Every measurement so starts from the same state: empty table and outbox,
    no dirty buffers, and the next checkpoint far away.
    """
    conn.execute(
        sql.SQL("TRUNCATE {}, pushsync.outbox, bench.events RESTART IDENTITY").format(
            _table(variant)
        )
    )
    if checkpoint:
        conn.execute("CHECKPOINT")


def bulk_statement(variant: Variant) -> sql.Composed:
    """One INSERT of %s rows: accounts 1..1000, status 'closed', amounts 0..1000.00."""
    return sql.SQL(
        "INSERT INTO {} (account_id, status, amount, note) "
        "SELECT 1 + g %% 1000, 'closed', (g %% 100001) / 100.0, 'bulk' "
        "FROM generate_series(1, %s) AS g"
    ).format(_table(variant))


def backend_cpu(conn: psycopg.Connection) -> float | None:
    """Seconds of CPU the server process behind ``conn`` has run so far; None if unknown.

    Read from Linux's /proc/PID/schedstat (nanoseconds on a CPU, world-readable).
    Unlike wall time it leaves out the time the process waited for a CPU that
    other processes held, so it stays steady on a busy machine.
    """
    pid = conn.info.backend_pid
    try:
        text = Path(f"/proc/{pid}/schedstat").read_text("ascii")
    except OSError:
        return None
    return int(text.split()[0]) / 1e9


@dataclass(frozen=True, slots=True)
class BulkResult:
    seconds: float  # wall time, client-side
    cpu_seconds: float | None  # the server process's CPU time, if it can be read


def bulk_insert(conn: psycopg.Connection, variant: Variant, rows: int) -> BulkResult:
    """One bulk INSERT in its own transaction (autocommit): wall time and server CPU time."""
    reset(conn, variant)
    statement = bulk_statement(variant)
    cpu_before = backend_cpu(conn)
    started = time.perf_counter()
    conn.execute(statement, (rows,))
    seconds = time.perf_counter() - started
    cpu_after = backend_cpu(conn)
    if cpu_before is None or cpu_after is None:
        return BulkResult(seconds, None)
    return BulkResult(seconds, cpu_after - cpu_before)


def single_row_statement(variant: Variant, account: str, cents: str) -> str:
    return (
        f"INSERT INTO bench.{variant.table} (account_id, status, amount, note) "  # noqa: S608  a pgbench script: a variant's table, pgbench variables
        f"VALUES ({account}, 'closed', {cents} / 100.0, 'pgbench');"
    )


def pgbench_script(variant: Variant, accounts: int) -> str:
    """pgbench script: one single-row INSERT with a random account and amount."""
    return (
        f"\\set account random(1, {accounts})\n"
        "\\set cents random(0, 100000)\n"
        f"{single_row_statement(variant, ':account', ':cents')}\n"
    )


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    tps: float
    transactions: int
    failed: int
    latency_ms: float


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_TPS_ANY = re.compile(r"^tps = ([0-9.]+)", re.M)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)


def parse_pgbench(output: str) -> PgbenchResult:
    tps = _TPS.search(output) or _TPS_ANY.search(output)
    done = _DONE.search(output)
    if tps is None or done is None:
        raise RuntimeError(f"cannot find tps in pgbench output:\n{output}")
    failed = _FAILED.search(output)
    latency = _LATENCY.search(output)
    return PgbenchResult(
        tps=float(tps.group(1)),
        transactions=int(done.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        latency_ms=float(latency.group(1)) if latency else float("nan"),
    )


@dataclass(frozen=True, slots=True)
class Pgbench:
    server: Server
    script_dir: Path
    clients: int
    threads: int
    seconds: int
    protocol: str

    def command(self, script: Path) -> list[str]:
        return [
            str(self.server.bindir / "pgbench"),
            "-h",
            self.server.host,
            "-p",
            str(self.server.port),
            "-U",
            self.server.user,
            "-n",
            "-c",
            str(self.clients),
            "-j",
            str(self.threads),
            "-T",
            str(self.seconds),
            "-M",
            self.protocol,
            "-f",
            str(script),
            DBNAME,
        ]

    def describe(self) -> str:
        return (
            f"pgbench -n -c {self.clients} -j {self.threads} -T {self.seconds} "
            f"-M {self.protocol} -f <one single-row INSERT>"
        )

    def run(self, conn: psycopg.Connection, variant: Variant, accounts: int) -> PgbenchResult:
        script = self.script_dir / f"{variant.name}.sql"
        if not script.exists():
            script.write_text(pgbench_script(variant, accounts), "utf-8")
        reset(conn, variant)
        proc = subprocess.run(
            self.command(script),
            capture_output=True,
            text=True,
            check=False,
            timeout=self.seconds + 120,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"pgbench failed for {variant.name} (exit {proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return parse_pgbench(proc.stdout)


def count(conn: psycopg.Connection, query: str, *params: Any) -> int:
    row = conn.execute(query, params or None).fetchone()
    assert row is not None
    return int(row[0])


def outbox_rows(conn: psycopg.Connection) -> int:
    return count(conn, "SELECT count(*) FROM pushsync.outbox")


def event_rows(conn: psycopg.Connection) -> int:
    return count(conn, "SELECT count(*) FROM bench.events")


def triggers_on(conn: psycopg.Connection, variant: Variant) -> list[str]:
    """``name (row|statement)`` of the triggers on the variant's table."""
    rows = conn.execute(
        "SELECT tgname, CASE WHEN tgtype & 1 = 1 THEN 'row' ELSE 'statement' END "
        "FROM pg_trigger WHERE tgrelid = %s::regclass AND NOT tgisinternal ORDER BY tgname",
        (f"bench.{variant.table}",),
    ).fetchall()
    return [f"{name} ({level})" for name, level in rows]


# What one single-row INSERT of account 1 must write, per variant.
EXPECTED_SINGLE = {
    "none": (0, 0),
    "nomatch": (0, 0),
    "nobody": (0, 0),
    "floor": (0, 0),
    "match4": (4, 0),
    "rowlevel": (0, 1),
    "rules20": (0, 0),
}


def sanity_single(conn: psycopg.Connection, variant: Variant) -> tuple[int, int]:
    """(outbox rows, event rows) after one single-row INSERT, rolled back afterwards."""
    reset(conn, variant, checkpoint=False)
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(single_row_statement(variant, "1", "12345"))
            return outbox_rows(conn), event_rows(conn)
    finally:
        reset(conn, variant, checkpoint=False)
