"""The machine facts a dispatch benchmark prints before its figures.

Figures from two machines differ by the CPU and by the disk: how long one
durable flush takes bounds how often PostgreSQL can commit with
``synchronous_commit=on`` and how fast it writes WAL. So each run says how
many CPUs it had and measures the flush where the server keeps its data.
"""

from __future__ import annotations

import psycopg

from bench import machine

FLUSHES = 100
"""8 KiB write + fsync rounds timed."""


def facts(conn: psycopg.Connection) -> dict[str, object]:
    """CPU count and the fsync latency next to the server's data directory."""
    where = machine.data_directory(conn).parent
    return {
        "cpus": machine.cpus(),
        "fsync_ms": round(machine.fsync_ms(where, FLUSHES), 3),
        "fsync_dir": str(where),
    }


def describe(found: dict[str, object]) -> str:
    return (
        f"{found['cpus']} CPUs; fsync (8 KiB write + fsync, median of {FLUSHES}) "
        f"{found['fsync_ms']} ms in {found['fsync_dir']}"
    )
