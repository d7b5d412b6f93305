"""Instructions a bulk INSERT executes, counted by valgrind: a busy machine cannot blur them.

Wall time and even CPU time move by ±10 % when other processes share the CPUs,
which hides differences of a few per cent. The number of instructions the server
executes for a statement does not depend on them. This module builds the
benchmark database on a server of its own, stops it, and runs ``postgres
--single`` under ``valgrind --tool=cachegrind`` (no cache simulation) twice per
variant: the same warm-up alone, then the warm-up followed by the measured bulk
INSERT. The difference is the statement's own count, start-up and warm-up
(loading the trigger function, caching its plans) left out.

Used by ``--diagnose`` when valgrind is installed (Debian: ``apt-get install
valgrind``); about 20 s of CPU per variant at 100,000 rows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from psycopg import sql

from bench.trigger_overhead import database
from bench.trigger_overhead.database import Variant
from tests.support.postgres import start_postgres, wrapper_info

WARM_UP_ROWS = 1000
_REFS = re.compile(r"I\s+refs:\s+([\d,]+)")


def valgrind() -> str | None:
    return shutil.which("valgrind")


def _statement(variant: Variant, rows: int) -> str:
    return (
        f"INSERT INTO bench.{variant.table} (account_id, status, amount, note) "  # noqa: S608  our own table names
        f"SELECT 1 + g % 1000, 'closed', (g % 100001) / 100.0, 'bulk' "
        f"FROM generate_series(1, {int(rows)}) AS g"
    )


def _single_user(
    tool: str, bindir: Path, datadir: Path, options: dict[str, str], script: str
) -> int:
    """Instructions of one ``postgres --single`` session running ``script`` (one line each)."""
    settings = [
        arg
        for name, value in options.items()
        if name not in ("listen_addresses", "max_connections")
        for arg in ("-c", f"{name}={value}")
    ]
    command = [
        tool,
        "--tool=cachegrind",
        "--cache-sim=no",
        "--cachegrind-out-file=/dev/null",
        str(bindir / "postgres"),
        "--single",
        "-D",
        str(datadir),
        *settings,
        database.DBNAME,
    ]
    user = wrapper_info().user
    if user is not None:  # PostgreSQL does not run as root
        command = ["runuser", "-u", user, "--", *command]
    proc = subprocess.run(
        command, input=script, capture_output=True, text=True, check=False, timeout=1800
    )
    found = _REFS.search(proc.stderr)
    if proc.returncode != 0 or found is None or "ERROR:" in proc.stdout:
        raise RuntimeError(
            f"postgres --single under valgrind failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return int(found.group(1).replace(",", ""))


def count(
    variants: Iterable[Variant],
    rows: int,
    options: dict[str, str],
    extra_files: Iterable[Path] = (),
    override_sql: Path | None = None,
) -> dict[str, int]:
    """Instructions of one bulk INSERT of ``rows`` rows, per variant."""
    tool = valgrind()
    if tool is None:
        raise RuntimeError("valgrind is not installed")
    bindir = Path(wrapper_info().pg_ctl).parent
    text = " ".join(f"-c {name}={value}" for name, value in options.items())
    counts: dict[str, int] = {}
    with start_postgres(
        dbname=database.DBNAME, postgres_options=text, create_template=False
    ) as executor:
        server = database.Server(
            host=str(executor.host), port=int(executor.port), user=str(executor.user), bindir=bindir
        )
        with server.connect("postgres") as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database.DBNAME)))
        with server.connect() as conn:
            database.prepare(conn, override_sql)
            for path in extra_files:
                with conn.transaction():
                    conn.execute(path.read_text("utf-8"))  # our own files
            conn.execute("CHECKPOINT")
        executor.stop()
        datadir = Path(executor.datadir)
        for v in variants:
            warm_up = [_statement(v, WARM_UP_ROWS), f"TRUNCATE bench.{v.table}, pushsync.outbox"]
            alone = _single_user(tool, bindir, datadir, options, "\n".join(warm_up) + "\n")
            measured = [*warm_up, _statement(v, rows)]
            total = _single_user(tool, bindir, datadir, options, "\n".join(measured) + "\n")
            counts[v.name] = total - alone
    return counts
