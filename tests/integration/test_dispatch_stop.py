"""SIGTERM stops ``pushsync dispatch`` with status 0 within seconds, whatever the database does.

A service manager sends SIGKILL to a daemon that ignores SIGTERM for too long,
with its leases still held. The dispatcher therefore drains for at most
``STOP_TIMEOUT`` seconds, then cancels what still waits on the database, and
exits at the latest at ``EXIT_DEADLINE``. Each test stops a real dispatcher
process in one state of the database: up and idle, up but blocking every
claim, refusing connections, and accepting TCP connections without ever
answering (a host that is unreachable in practice).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from pushsync.dispatcher.daemon import EXIT_DEADLINE, STOP_TIMEOUT
from tests.support.dispatching import dispatcher_listens
from tests.support.processes import Dispatch
from tests.support.waiting import until

BOUND = STOP_TIMEOUT + 4.0
"""What "within seconds" means here: the drain, then the cancelled loops and the
pool get two seconds each. Well below :data:`EXIT_DEADLINE`, the last resort."""


def stop_within(dispatch: Dispatch, seconds: float) -> tuple[float, str]:
    """SIGTERM; the seconds until exit (status 0, no traceback) and the log."""
    started = time.monotonic()
    text = dispatch.stop()
    took = time.monotonic() - started
    assert took < seconds, f"took {took:.1f}s to stop\n{text[-3000:]}"
    return took, text


def test_bound_is_below_the_hard_deadline() -> None:
    assert BOUND < EXIT_DEADLINE


def test_stops_at_once_when_idle(dsn: str, tmp_path: Path, db: psycopg.Connection) -> None:
    dispatch = Dispatch(dsn, tmp_path / "dispatch.log")
    try:
        until(lambda: dispatcher_listens(db), "the dispatcher to LISTEN", logs=[dispatch.log])
        took, text = stop_within(dispatch, BOUND)
    finally:
        dispatch.close()
    assert "stopping now" not in text  # a clean drain, not the cancellation
    assert took < STOP_TIMEOUT
    assert db.execute("SELECT count(*) FROM pushsync.dispatchers").fetchone() == (0,)


def test_stops_while_every_claim_waits_on_a_lock(
    dsn: str, tmp_path: Path, db: psycopg.Connection
) -> None:
    """The server is up but the send loop's claim never returns: cancelled after the drain."""
    dispatch = Dispatch(dsn, tmp_path / "dispatch.log")
    try:
        with claims_blocked(dsn, db, dispatch):
            took, text = stop_within(dispatch, BOUND)
    finally:
        dispatch.close()
    assert "stopping now" in text
    assert took >= STOP_TIMEOUT  # it did try to drain first


def test_a_second_interrupt_leaves_without_waiting(
    dsn: str, tmp_path: Path, db: psycopg.Connection
) -> None:
    """Ctrl-C says what the stop waits for; Ctrl-C again leaves at once (status 1)."""
    dispatch = Dispatch(dsn, tmp_path / "dispatch.log")
    try:
        with claims_blocked(dsn, db, dispatch):
            started = time.monotonic()
            dispatch.process.send_signal(signal.SIGINT)
            until(
                lambda: "SIGINT: stopping" in dispatch.output(),
                "the first stop",
                logs=[dispatch.log],
            )
            dispatch.process.send_signal(signal.SIGINT)
            status = dispatch.process.wait(BOUND)
            took = time.monotonic() - started
    finally:
        dispatch.close()
    text = dispatch.output()
    assert status == 1, text[-3000:]
    assert took < STOP_TIMEOUT  # it did not wait for the drain
    assert (
        f"SIGINT: stopping: sends under way (an SMTP session, say) get {STOP_TIMEOUT:.0f}s to "
        f"finish, leaving takes {EXIT_DEADLINE:.0f}s at most; Ctrl-C again leaves at once"
    ) in text
    assert "SIGINT again: leaving now, without waiting for sends under way" in text
    assert "Traceback" not in text


def test_stops_while_the_database_refuses_connections(tmp_path: Path) -> None:
    port = free_port()
    dispatch = Dispatch(f"host=127.0.0.1 port={port} user=nobody dbname=none", tmp_path / "d.log")
    try:
        until(
            lambda: "failed (attempt 2)" in dispatch.output(),
            "two failed attempts",
            logs=[dispatch.log],
        )
        took, _ = stop_within(dispatch, BOUND)
    finally:
        dispatch.close()
    assert took < STOP_TIMEOUT


def test_stops_while_the_database_never_answers(tmp_path: Path, silent: Silent) -> None:
    """TCP connects, the startup packet is never answered: connecting hangs."""
    dsn = f"host=127.0.0.1 port={silent.port} user=nobody dbname=none connect_timeout=600"
    dispatch = Dispatch(dsn, tmp_path / "d.log")
    try:
        until(
            lambda: "starting" in dispatch.output(), "the dispatcher to start", logs=[dispatch.log]
        )
        until(silent.spoken_to, "the startup packet, which is never answered", logs=[dispatch.log])
        stop_within(dispatch, BOUND)
    finally:
        dispatch.close()


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def claims_blocked(dsn: str, db: psycopg.Connection, dispatch: Dispatch) -> Iterator[None]:
    """The block runs while the dispatcher's claim waits on a lock of the whole outbox."""
    until(lambda: dispatcher_listens(db), "the dispatcher to LISTEN", logs=[dispatch.log])
    with psycopg.connect(dsn) as blocker:
        blocker.execute("LOCK TABLE pushsync.outbox IN ACCESS EXCLUSIVE MODE")
        until(lambda: claim_waiting(db), "a claim to wait on the lock", logs=[dispatch.log])
        yield
        blocker.rollback()


def claim_waiting(db: psycopg.Connection) -> bool:
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE '%pushsync.outbox%'"
    ).fetchone()
    return bool(row and row[0])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Silent:
    """A port that accepts connections and never sends a byte; the connections it holds."""

    port: int
    held: list[socket.socket] = field(default_factory=list)

    def spoken_to(self) -> bool:
        """Whether a client connected and sent something, which is waiting unanswered."""
        for conn in list(self.held):
            with contextlib.suppress(BlockingIOError):
                if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                    return True
        return False


@pytest.fixture
def silent() -> Iterator[Silent]:
    """A port that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    silent = Silent(int(server.getsockname()[1]))
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            silent.held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield silent
    done.set()
    thread.join(5)
    for conn in silent.held:
        conn.close()
    server.close()
