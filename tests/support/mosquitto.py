"""A real Mosquitto broker for a test, with passwords and the per-device ACL of docs/operations.md.

:class:`Broker` writes a password file (``mosquitto_passwd``), the ACL (the
dispatcher publishes to every ``in`` topic and reads every ``ack`` topic; each
device reads only its own ``in`` and writes only its own ``ack``, through
``pattern … %u``), and a configuration with persistence, then runs
``mosquitto`` on a free port of 127.0.0.1 (mosquitto cannot be given port 0).
As root it keeps running as root (``user``), so it can read the test's
private folder. ``scripts/ensure-mosquitto`` installs the broker.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.processes import end

DISPATCHER_USER = "dispatcher"
DISPATCHER_PASSWORD = "dispatcher-secret"
START_TIMEOUT = 10.0

ACL = """\
# The dispatchers: publish every device's messages, read every device's acks.
user {dispatcher}
topic write {prefix}/+/in
topic read {prefix}/+/ack

# Each device (user name = device id): its own messages in, its own acks out.
pattern read {prefix}/%u/in
pattern write {prefix}/%u/ack
"""


def binary(name: str) -> str:
    """The path of a mosquitto program; skips the test with how to install it if missing."""
    bindir = os.environ.get("PUSHSYNC_MOSQUITTO_BINDIR")
    for folder in (bindir, "/usr/sbin", "/usr/bin"):
        if folder and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: run scripts/ensure-mosquitto (make test does)")
    return found


def device_password(device: str) -> str:
    return f"pw-{device}"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Broker:
    """One Mosquitto on 127.0.0.1 for ``devices`` and the dispatcher user."""

    def __init__(
        self,
        folder: Path,
        devices: Iterable[str],
        *,
        prefix: str = "pushsync",
        extra_acl: str = "",
        extra_users: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.folder = folder
        self.prefix = prefix
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        self.log = folder / "mosquitto.log"
        self._write_passwords(
            [(DISPATCHER_USER, DISPATCHER_PASSWORD)]
            + [(device, device_password(device)) for device in devices]
            + list(extra_users)
        )
        acl = ACL.format(dispatcher=DISPATCHER_USER, prefix=prefix) + extra_acl
        (folder / "acl").write_text(acl, encoding="utf-8")

    def _write_passwords(self, users: list[tuple[str, str]]) -> None:
        plain = self.folder / "passwd"
        plain.write_text("".join(f"{user}:{password}\n" for user, password in users))
        plain.chmod(0o600)
        # -U hashes every password of a plain user:password file in place.
        subprocess.run([binary("mosquitto_passwd"), "-U", str(plain)], check=True)

    @property
    def url(self) -> str:
        """``--mqtt`` for the dispatcher (its password goes through a file or the settings)."""
        return f"mqtt://{DISPATCHER_USER}@127.0.0.1:{self.port}"

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _config(self) -> Path:
        config = self.folder / "mosquitto.conf"
        config.write_text(
            f"""\
per_listener_settings false
listener {self.port} 127.0.0.1
allow_anonymous false
password_file {self.folder / "passwd"}
acl_file {self.folder / "acl"}
persistence true
persistence_location {self.folder / "data"}/
autosave_interval 1
max_inflight_messages 1000
max_queued_messages 100000
log_dest file {self.log}
log_type error
log_type warning
log_type notice
log_type information
user {getpass.getuser()}
""",
            encoding="utf-8",
        )
        return config

    def start(self) -> None:
        """Start on a free port (the same port again after :meth:`stop`); wait until it accepts."""
        fixed = self.port != 0
        for _ in range(1 if fixed else 5):  # another process may take a free port first
            if not fixed:
                self.port = free_tcp_port()
            logged_before = self.log.stat().st_size if self.log.exists() else 0
            self.process = subprocess.Popen(
                [binary("mosquitto"), "-c", str(self._config())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._wait_accepting(logged_before):
                return
            self.process.kill()
            self.process.wait()
        pytest.fail(f"mosquitto did not start on port {self.port}:\n{self.tail()}")

    def _wait_accepting(self, logged_before: int) -> bool:
        """Until this mosquitto says it runs (so it bound the port: nothing else answers
        there) and accepts a connection; False if it exited or took too long."""
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            if self._said_running(logged_before):
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
                ):
                    return True
            time.sleep(0.02)
        return False

    def _said_running(self, logged_before: int) -> bool:
        if not self.log.exists():
            return False
        with self.log.open("rb") as log:
            log.seek(logged_before)
            return b" running" in log.read()

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop the broker (SIGTERM saves its sessions; SIGKILL loses what was not saved)."""
        process, self.process = self.process, None
        end(process, sig, START_TIMEOUT)

    def restart(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop, then start again on the same port."""
        self.stop(sig)
        self.start()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


@contextlib.contextmanager
def broker(folder: Path, devices: Iterable[str], **options: Any) -> Iterator[Broker]:
    """A started :class:`Broker` (``options`` as :class:`Broker` takes them) for the block."""
    running = Broker(folder, devices, **options)
    running.start()
    try:
        yield running
    finally:
        running.stop()
