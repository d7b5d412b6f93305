"""The machine facts that explain the figures: CPUs, load, and how long an fsync takes.

The listener's dedupe store syncs its file once per commit, so the fsync
latency of the state directory's filesystem bounds a listener that commits
once per message at ``1 / latency`` messages/s; the benchmark prints it next to
the commits per message it measured.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from bench import machine

FSYNC_SAMPLES = 50
FSYNC_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class Machine:
    cpus: int
    load: tuple[float, float, float]
    """The 1, 5 and 15 minute load averages when the run started."""
    python: str
    filesystem: str
    fsync_ms: float
    """Median of :data:`FSYNC_SAMPLES` write-and-fsync rounds of one 4 KiB block."""
    fsync_p90_ms: float

    def describe(self) -> str:
        load = ", ".join(f"{x:.2f}" for x in self.load)
        return (
            f"machine: {self.cpus} CPUs, load {load}, python {self.python}; "
            f"state dir on {self.filesystem}: fsync {self.fsync_ms:.2f} ms median, "
            f"p90 {self.fsync_p90_ms:.2f} ms (one fsync per message would cap a listener "
            f"at {1000 / self.fsync_ms:,.0f} msgs/s)"
        )


def measure(directory: Path) -> Machine:
    """The facts of this machine, the fsync latency measured in ``directory``."""
    samples = machine.fsync_seconds(directory, FSYNC_SAMPLES, FSYNC_BLOCK)
    deciles = statistics.quantiles(samples, n=10)
    return Machine(
        cpus=machine.cpus(),
        load=machine.load(),
        python=machine.python(),
        filesystem=fs_type(directory),
        fsync_ms=statistics.median(samples) * 1000,
        fsync_p90_ms=deciles[-1] * 1000,
    )


def fs_type(path: Path) -> str:
    """The filesystem type ``path`` lives on (longest mount prefix in /proc/mounts)."""
    best, kind = "", "?"
    resolved = str(path.resolve())
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in lines:
        parts = line.split()
        if (
            len(parts) >= 3
            and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/"))
            and len(parts[1]) >= len(best)
        ):
            best, kind = parts[1], parts[2]
    return kind


__all__ = ["Machine", "fs_type", "measure"]
