"""The processes the benchmark starts: UDP receiver, ``pushsync dispatch``, pgqueuer worker.

Each is started with the interpreter running the benchmark, its output read
line by line with a timeout; each is stopped with SIGTERM and waited for.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import cpu_seconds

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECEIVER = HERE / "receiver.py"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSYNC_", "PGQUEUER_"))}


class Proc:
    """A child process whose stdout is read in lines; stderr goes to ``log`` (or nowhere)."""

    def __init__(self, argv: list[str], what: str, log: Path | None = None) -> None:
        self.what = what
        self.log = log
        self._buffer = b""
        err = log.open("wb") if log is not None else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                bufsize=0,
            )
        finally:
            if log is not None and not isinstance(err, int):
                err.close()

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def line(self, timeout: float) -> str:
        """The next line of stdout; RuntimeError after ``timeout`` s or if the process ended."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.what}: no output within {timeout:.0f} s{self._tail()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(
                        f"{self.what} ended (exit {self.process.wait()}){self._tail()}"
                    )
                self._buffer += chunk
        text, _, self._buffer = self._buffer.partition(b"\n")
        return text.decode()

    def expect(self, prefix: str, timeout: float) -> list[str]:
        """Wait for a line starting with ``prefix``; its other words."""
        while True:
            words = self.line(timeout).split()
            if words and words[0] == prefix:
                return words[1:]

    def wait_log(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until the stderr log matches ``pattern``."""
        assert self.log is not None
        deadline = time.monotonic() + timeout
        while True:
            found = pattern.search(self.log.read_text(errors="replace"))
            if found:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.what} did not get ready{self._tail()}")
            time.sleep(0.02)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise RuntimeError(f"{self.what} did not stop on SIGTERM") from None
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        lines = self.log.read_text(errors="replace").splitlines()[-20:]
        return f"\n--- {self.log} ---\n" + "\n".join(lines)


def receiver(mode: str, arg: str) -> tuple[Proc, int]:
    """``receiver.py MODE ARG`` and the port it listens on."""
    proc = Proc([sys.executable, str(RECEIVER), mode, arg], "UDP receiver")
    (port,) = proc.expect("port", 30)
    return proc, int(port)


DISPATCHER_READY = re.compile(r"listening on channel 'pushsync'")


def dispatcher(dsn: str, batch: int, log: Path, *, profile: Path | None = None) -> Proc:
    """``pushsync dispatch`` (as ``python -m pushsync``), UDP only, once it LISTENs.

    ``python -m pushsync`` runs the same ``main`` as the console script; it is
    used so that ``--profile`` can run it under cProfile.
    """
    module = ["-m", "pushsync"]
    if profile is not None:
        module = ["-m", "cProfile", "-o", str(profile), *module]
    argv = [
        sys.executable,
        *module,
        "dispatch",
        "--dsn",
        dsn,
        "--udp-listen",
        "127.0.0.1:0",
        "--sync-listen",
        "off",
        "--batch",
        str(batch),
    ]
    proc = Proc(argv, "pushsync dispatch", log)
    proc.wait_log(DISPATCHER_READY, 60)
    return proc


def pgqueuer_worker(
    dsn: str,
    mode: str,
    arg: str,
    *,
    batch: int,
    consumers: int,
    driver: str,
    uvloop: bool,
    log: Path,
) -> Proc:
    """The pgqueuer worker process, once its LISTEN works."""
    argv = [
        sys.executable,
        "-m",
        "bench.dispatch_throughput.pgqueuer_proc",
        "--dsn",
        dsn,
        "--batch",
        str(batch),
        "--consumers",
        str(consumers),
        "--driver",
        driver,
        *(["--uvloop"] if uvloop else []),
        mode,
        arg,
    ]
    proc = Proc(argv, "pgqueuer worker", log)
    proc.expect("ready", 60)
    return proc
