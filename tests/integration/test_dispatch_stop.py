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

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pushsync.dispatcher.daemon import EXIT_DEADLINE, STOP_TIMEOUT
from tests.integration.test_dispatch_crash import Dispatch, listening, until

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
        until(lambda: listening(db), "the dispatcher to LISTEN", log=dispatch)
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
        until(lambda: listening(db), "the dispatcher to LISTEN", log=dispatch)
        with psycopg.connect(dsn) as blocker:
            blocker.execute("LOCK TABLE pushsync.outbox IN ACCESS EXCLUSIVE MODE")
            until(lambda: claim_waiting(db), "a claim to wait on the lock", log=dispatch)
            took, text = stop_within(dispatch, BOUND)
            blocker.rollback()
    finally:
        dispatch.close()
    assert "stopping now" in text
    assert took >= STOP_TIMEOUT  # it did try to drain first


def test_stops_while_the_database_refuses_connections(tmp_path: Path) -> None:
    port = free_port()
    dispatch = Dispatch(f"host=127.0.0.1 port={port} user=nobody dbname=none", tmp_path / "d.log")
    try:
        until(
            lambda: "failed (attempt 2)" in dispatch.output(), "two failed attempts", log=dispatch
        )
        took, _ = stop_within(dispatch, BOUND)
    finally:
        dispatch.close()
    assert took < STOP_TIMEOUT


def test_stops_while_the_database_never_answers(tmp_path: Path, silent: int) -> None:
    """TCP connects, the startup packet is never answered: connecting hangs."""
    dsn = f"host=127.0.0.1 port={silent} user=nobody dbname=none connect_timeout=600"
    dispatch = Dispatch(dsn, tmp_path / "d.log")
    try:
        until(lambda: "starting" in dispatch.output(), "the dispatcher to start", log=dispatch)
        time.sleep(0.5)  # it is now waiting for the server's answer
        stop_within(dispatch, BOUND)
    finally:
        dispatch.close()


# --------------------------------------------------------------------------- helpers


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


@pytest.fixture
def silent() -> Iterator[int]:
    """A port that accepts connections and never sends a byte."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
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
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    done.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()
