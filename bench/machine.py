"""The machine facts every benchmark prints beside its figures: one way to measure each.

Figures from two machines differ by the CPUs, by the load when the run
started and by the disk: how long one durable flush takes bounds how often
PostgreSQL can commit with ``synchronous_commit=on`` (and a listener that
commits once per message). Each benchmark says which of these it prints and
how; they all measure them here.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psycopg

FSYNC_BLOCK = 8192
"""Bytes written before each fsync: one PostgreSQL page, one WAL block."""


def fsync_seconds(directory: Path, rounds: int, block: int = FSYNC_BLOCK) -> list[float]:
    """Seconds each of ``rounds`` rounds took: ``block`` bytes appended to a new file in
    ``directory``, then ``fsync``. The file is removed afterwards."""
    data = b"\0" * block
    samples: list[float] = []
    with tempfile.NamedTemporaryFile(dir=directory, prefix="pushsync-fsync-probe-") as file:
        fd = file.fileno()
        for _ in range(rounds):
            started = time.perf_counter()
            os.write(fd, data)
            os.fsync(fd)
            samples.append(time.perf_counter() - started)
    return samples


def fsync_ms(directory: Path, rounds: int, block: int = FSYNC_BLOCK) -> float:
    """Median milliseconds of one round of :func:`fsync_seconds`."""
    return statistics.median(fsync_seconds(directory, rounds, block)) * 1000


def data_directory(conn: psycopg.Connection) -> Path:
    """Where the server behind ``conn`` keeps its files (the benchmark's user is a superuser)."""
    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    return Path(str(row[0]))


def cpus() -> int:
    return os.cpu_count() or 0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0))


def load() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages now."""
    return os.getloadavg()


def python() -> str:
    return sys.version.split()[0]


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


__all__ = [
    "FSYNC_BLOCK",
    "cpu_seconds",
    "cpus",
    "data_directory",
    "fsync_ms",
    "fsync_seconds",
    "load",
    "python",
    "usable_cpus",
]
