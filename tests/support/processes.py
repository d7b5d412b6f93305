"""``pushsync dispatch`` as a real process, and a free port for one.

Processes log to files, never to pipes that could fill up and block them; the
tests read those logs for the addresses the processes picked and what they did.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from pathlib import Path

from tests.support.cli import clean_env, executable
from tests.support.waiting import WAIT, until


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that nothing is bound to right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Dispatch:
    """``pushsync dispatch`` as a subprocess, logging to a file (a pipe could fill and block it)."""

    def __init__(self, dsn: str, log: Path, *options: str, log_level: str = "info") -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *executable(),
                    "--log-level",
                    log_level,
                    "dispatch",
                    "--dsn",
                    dsn,
                    "--udp-listen",
                    "127.0.0.1:0",
                    "--sync-listen",
                    "127.0.0.1:0",
                    *options,
                ],
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def metrics_url(self) -> str:
        """``http://HOST:PORT`` of ``--metrics``, from the log line that announces it."""
        found: list[str] = []

        def announced() -> bool:
            found.extend(re.findall(r"metrics on (http://[^/\s]+)/metrics", self.output()))
            return bool(found)

        until(announced, "the metrics address in the log", logs=[self.log])
        return found[0]

    def stop(self) -> str:
        """SIGTERM, then the exit status must be 0 and the log free of tracebacks."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(WAIT)
        text = self.output()
        assert self.process.returncode == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        return text

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)
