"""The machine facts that explain the figures: CPUs, load, fsync and commit latency.

Measured at the start of a run, on the benchmark's own server, and printed with
the results: a ratio read without them cannot be compared with another machine's.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg

FSYNC_WRITES = 100
FSYNC_BLOCK = 8192
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


def fsync_latency(directory: Path, writes: int = FSYNC_WRITES) -> float:
    """Median milliseconds of one block written at the end of a file, then fsync()ed."""
    path = directory / f"pushsync-fsync-probe-{os.getpid()}"
    block = b"\0" * FSYNC_BLOCK
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(writes):
            os.write(fd, block)
            started = time.perf_counter()
            os.fsync(fd)
            times.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return statistics.median(times) * 1e3


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
    row = conn.execute("SELECT current_setting('data_directory')").fetchone()
    assert row is not None
    # Next to the data directory: the same file system as the server's WAL.
    directory = Path(str(row[0])).parent
    return Facts(
        cpus=os.cpu_count() or 0,
        usable_cpus=len(os.sched_getaffinity(0)),
        load_average=os.getloadavg(),
        fsync_ms=fsync_latency(directory),
        fsync_dir=str(directory),
        commit_ms=commit_latency(conn),
    )
