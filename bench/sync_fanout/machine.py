"""The machine facts that explain a run of the connection benchmarks.

Printed first, so that figures from two machines can be compared: the CPUs
(the devices, the dispatchers and PostgreSQL share them), the load when the
run started, how long an fsync takes where PostgreSQL keeps its data (each
commit of connection records waits for one unless ``synchronous_commit`` is
off), and the limits that cap how many connections one process can hold.
"""

from __future__ import annotations

import resource
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import machine

FSYNC_ROUNDS = 50


@dataclass(frozen=True, slots=True)
class Machine:
    cpus: int
    usable_cpus: int
    load: tuple[float, float, float]
    python: str
    fsync_ms: float
    """Median of :data:`FSYNC_ROUNDS` rounds of one block written then fsync()ed."""
    fsync_dir: str
    nofile_soft: int
    nofile_hard: int
    """The file-descriptor limits of this process (the dispatchers and devices inherit them)."""
    ephemeral_ports: str
    somaxconn: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def summary(facts: dict[str, Any]) -> str:
    """The machine line of a report, from :meth:`Machine.to_json`."""
    load = " ".join(f"{x:.2f}" for x in facts["load"])
    return (
        f"machine: {facts['cpus']} CPUs ({facts['usable_cpus']} usable), load average {load}; "
        f"fsync {facts['fsync_ms']:.3f} ms in {facts['fsync_dir']}; "
        f"open files per process {facts['nofile_soft']} (hard {facts['nofile_hard']})"
    )


def measure(directory: Path | None = None) -> Machine:
    """This machine's facts; the fsync latency is measured in ``directory`` (default: the
    temporary directory, where the benchmarks' PostgreSQL keeps its data)."""
    where = directory or Path(tempfile.gettempdir())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return Machine(
        cpus=machine.cpus(),
        usable_cpus=machine.usable_cpus(),
        load=machine.load(),
        python=machine.python(),
        fsync_ms=machine.fsync_ms(where, FSYNC_ROUNDS),
        fsync_dir=str(where),
        nofile_soft=soft,
        nofile_hard=hard,
        ephemeral_ports=_sysctl("net/ipv4/ip_local_port_range").replace("\t", "-"),
        somaxconn=_sysctl("net/core/somaxconn"),
    )


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return "?"


def raise_nofile() -> int:
    """Raise this process's soft file-descriptor limit to its hard limit (the children
    started afterwards inherit it); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


__all__ = ["Machine", "measure", "raise_nofile", "summary"]
