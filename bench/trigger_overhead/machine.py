"""The machine facts that explain the figures: CPUs, load, fsync and commit latency.

Measured at the start of a run, on the benchmark's own server, and printed with
the results: a ratio read without them cannot be compared with another machine's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from bench import machine
from bench.machine import FSYNC_BLOCK

FSYNC_WRITES = 100
COMMITS = 100


@dataclass(frozen=True, slots=True)
class Facts:
    cpus: int
    usable_cpus: int
    load_average: tuple[float, float, float]
    fsync_ms: float
    fsync_dir: str
    commit_ms: float

    def lines(self) -> list[str]:
        one, five, fifteen = self.load_average
        return [
            f"machine: {self.cpus} CPUs ({self.usable_cpus} usable by this process), "
            f"load average {one:.2f} {five:.2f} {fifteen:.2f}",
            f"  fsync latency {self.fsync_ms:.3f} ms (median of {FSYNC_WRITES} "
            f"{FSYNC_BLOCK}-byte write+fsync in {self.fsync_dir})",
            f"  commit latency {self.commit_ms:.3f} ms with synchronous_commit=on "
            f"(median of {COMMITS} one-row transactions: the server's WAL flush)",
        ]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def commit_latency(conn: psycopg.Connection, commits: int = COMMITS) -> float:
    """Median milliseconds of a one-row transaction whose commit waits for its WAL flush."""
    conn.execute("CREATE TABLE IF NOT EXISTS public.pushsync_commit_probe (n integer)")
    conn.execute("SET synchronous_commit = on")
    times = []
    try:
        for n in range(commits):
            started = time.perf_counter()
            conn.execute("INSERT INTO public.pushsync_commit_probe VALUES (%s)", (n,))
            times.append(time.perf_counter() - started)
    finally:
        conn.execute("RESET synchronous_commit")
        conn.execute("DROP TABLE public.pushsync_commit_probe")
    return statistics.median(times) * 1e3


def measure(conn: psycopg.Connection) -> Facts:
    """Facts of this machine and of the server behind ``conn`` (autocommit, superuser)."""
    # Next to the data directory: the same file system as the server's WAL.
    directory = machine.data_directory(conn).parent
    return Facts(
        cpus=machine.cpus(),
        usable_cpus=machine.usable_cpus(),
        load_average=machine.load(),
        fsync_ms=machine.fsync_ms(directory, FSYNC_WRITES),
        fsync_dir=str(directory),
        commit_ms=commit_latency(conn),
    )
