"""The machine facts a dispatch benchmark prints before its figures.

Figures from two machines differ by the CPU and by the disk: how long one
durable flush takes bounds how often PostgreSQL can commit with
``synchronous_commit=on`` and how fast it writes WAL. So each run says how
many CPUs it had and measures the flush where the server keeps its data.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

FLUSHES = 100
"""8 KiB write + fdatasync pairs timed."""
BLOCK = b"\0" * 8192


def fsync_latency(directory: Path, flushes: int = FLUSHES) -> float:
    """Median seconds of one 8 KiB write followed by ``fdatasync`` of a file in
    ``directory``: what one WAL flush costs there, about."""
    times: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory, prefix="fsync-probe-") as probe:
        fd = probe.fileno()
        for _ in range(flushes):
            started = time.perf_counter()
            os.write(fd, BLOCK)
            os.fdatasync(fd)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def data_directory(conn: psycopg.Connection) -> Path:
    """Where the server keeps its files (the benchmark's user is a superuser)."""
    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    return Path(str(row[0]))


def facts(conn: psycopg.Connection) -> dict[str, object]:
    """CPU count and the fsync latency next to the server's data directory."""
    where = data_directory(conn).parent
    return {
        "cpus": os.cpu_count(),
        "fsync_ms": round(fsync_latency(where) * 1000, 3),
        "fsync_dir": str(where),
    }


def describe(found: dict[str, object]) -> str:
    return (
        f"{found['cpus']} CPUs; fsync (8 KiB write + fdatasync, median of {FLUSHES}) "
        f"{found['fsync_ms']} ms in {found['fsync_dir']}"
    )
