"""``pushsync dispatch`` and ``pushsync listen`` as real processes, and a free port.

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


def end(process: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> None:
    """Send ``sig`` to ``process`` if it still runs and reap it; killed if it has not
    ended within ``timeout`` seconds. A server's stop in the test supports."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Child:
    """A ``pushsync`` subprocess logging to a file; :meth:`stop` asks it to end cleanly."""

    def __init__(self, args: list[str], log: Path, *, cwd: Path | None = None) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [*executable(), *args],
                cwd=cwd,
                env=clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = WAIT) -> str:
        """SIGTERM, then the exit status must be 0 and the log free of tracebacks."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout)
        text = self.output()
        assert self.process.returncode == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]
        return text

    def close(self) -> None:
        """Kill it if it still runs (a test's cleanup, whatever happened)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(WAIT)


class Dispatch(Child):
    """``pushsync dispatch`` on 127.0.0.1 ports the OS picks (UDP and SYNC), plus ``options``."""

    def __init__(self, dsn: str, log: Path, *options: str, log_level: str = "info") -> None:
        listens = ["--udp-listen", "127.0.0.1:0", "--sync-listen", "127.0.0.1:0"]
        super().__init__(
            ["--log-level", log_level, "dispatch", "--dsn", dsn, *listens, *options], log
        )

    def metrics_url(self) -> str:
        """``http://HOST:PORT`` of ``--metrics``, from the log line that announces it."""
        found: list[str] = []

        def announced() -> bool:
            found.extend(re.findall(r"metrics on (http://[^/\s]+)/metrics", self.output()))
            return bool(found)

        until(announced, "the metrics address in the log", logs=[self.log])
        return found[0]

    def sync_address(self) -> str:
        """``HOST:PORT`` of the SYNC gateway, from the log line that announces it."""
        until(lambda: "SYNC gateway on " in self.output(), "the SYNC gateway", logs=[self.log])
        found: str = re.findall(r"SYNC gateway on (\S+)", self.output())[0]
        return found


class Listen(Child):
    """``pushsync listen CONFIG``, started in the config's directory."""

    def __init__(self, config: Path, log: Path, *, log_level: str = "info") -> None:
        self.config = config
        super().__init__(["--log-level", log_level, "listen", str(config)], log, cwd=config.parent)

    def wait_started(self, timeout: float = WAIT) -> None:
        """Until it says it listens; it must still run then."""
        until(
            lambda: "listening as " in self.output() or self.process.poll() is not None,
            f"the listener of {self.config}",
            timeout,
            logs=[self.log],
        )
        assert self.process.poll() is None, self.output()[-3000:]
