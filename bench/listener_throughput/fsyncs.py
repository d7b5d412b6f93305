"""``--fsyncs``: count the listener's real fsync and fdatasync calls with ``strace``.

The table's commits per message come from the listener's own count of dedupe
commits; this checks it against the kernel's view: ``strace -f -c`` attached to
the listener for one more run. SQLite in WAL mode with ``synchronous=FULL`` syncs
the WAL once per commit, and the WAL and the database file again at each
checkpoint (every 1,000 pages), so the count is a little above the commits.
strace stops the process at every system call, so that run's rate is not a figure.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

CALLS = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", re.MULTILINE)


def strace() -> str | None:
    """The path of the strace program, if installed."""
    return shutil.which("strace")


class FsyncCounter:
    """strace attached to process ``pid`` (all its threads), counting fsync and fdatasync."""

    def __init__(self, pid: int, out: Path) -> None:
        program = strace()
        if program is None:
            raise RuntimeError("strace is not installed")
        self.out = out
        self.process = subprocess.Popen(
            [program, "-f", "-c", "-e", "trace=fsync,fdatasync", "-p", str(pid), "-o", str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        line = self.process.stderr.readline()  # "strace: Process N attached", once attached
        if "attached" not in line:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"strace could not attach to pid {pid}: {line.strip()}")

    def stop(self) -> int:
        """Detach; the number of fsync and fdatasync calls seen."""
        self.process.send_signal(signal.SIGINT)
        self.process.communicate(timeout=30)
        return sum(
            int(calls)
            for calls, name in CALLS.findall(self.out.read_text())
            if name in ("fsync", "fdatasync")
        )

    def close(self) -> None:
        """Detach if still attached (after a failed run); the count is lost."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=30)
