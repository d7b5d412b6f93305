"""A device that loses access is cut off at once: its open connections closed, no new one.

The attacker is a device owner whose device an operator has just disabled (or
removed, or given a new secret) with the real CLI: they keep their connections
open and try to go on, or reconnect at once with the key they still hold.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.listener.connection import Refused, Session, open_session
from pushsync.wire import protocol
from tests.support.cli import executable
from tests.support.dispatching import (
    DEVICE,
    SECRET,
    add_device,
    connections_of,
    dispatcher_connected,
    dispatching,
    server_address,
    session,
)
from tests.support.waiting import until_async

CUT_OFF_WITHIN = 2.0
"""Seconds from the operator's command returning to the device's connections closed."""


async def pushsync(*args: str) -> str:
    """The real CLI; its stderr. Fails the test unless it exits 0."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
    process = await asyncio.create_subprocess_exec(
        *executable(),
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return err.decode()


async def closed(opened: Session, timeout: float) -> bool:  # noqa: ASYNC109  the bound asserted on
    """Whether the server closes ``opened`` (BYE, or end of stream) within ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            frame = await opened.recv(timeout=left)
            if frame is None or frame.type == protocol.FrameType.BYE:
                return True
    except TimeoutError:
        return False
    except (ConnectionError, Refused):  # Refused: the server's BYE
        return True
    return False


def device_state(db: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Everything about the device an attack could change."""
    return [
        *db.execute(
            "SELECT device_id, secret, enabled FROM pushsync.devices ORDER BY device_id"
        ).fetchall(),
        *db.execute(
            "SELECT device_id, medium, address FROM pushsync.device_addresses ORDER BY 1, 2"
        ).fetchall(),
    ]


async def connect(dispatcher: Dispatcher) -> Session:
    return await open_session(server_address(dispatcher), device=DEVICE, secret=SECRET, timeout=5)


@pytest_asyncio.fixture
async def kept() -> AsyncIterator[list[Session]]:
    """Sessions a test opens, closed at its end whatever happened."""
    sessions: list[Session] = []
    yield sessions
    for opened in sessions:
        await opened.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("action", ["disable", "remove"])
async def test_open_connections_are_closed_and_a_new_one_refused(
    db: psycopg.Connection, dsn: str, action: str, kept: list[Session]
) -> None:
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        pushed = await session(dispatcher)  # the listener's push connection
        syncing = await session(dispatcher, subscribe=False)  # a `pushsync sync` under way
        kept += [pushed, syncing]
        assert connections_of(dispatcher).is_connected(DEVICE)

        await pushsync("device", action, DEVICE, "--dsn", dsn)
        after = device_state(db)

        assert await closed(pushed, CUT_OFF_WITHIN), "the push connection stayed open"
        assert await closed(syncing, CUT_OFF_WITHIN), "the sync connection stayed open"
        assert not connections_of(dispatcher).is_connected(DEVICE)
        with pytest.raises(Refused):
            await connect(dispatcher)  # at once: no cached secret lets it back in
        # What the device tries on its way out changes nothing.
        syncing.send(protocol.encode_track("203.0.113.9:9"))
        await asyncio.sleep(0.2)
        assert device_state(db) == after


@pytest.mark.asyncio
async def test_a_device_seen_a_moment_ago_is_refused_once_disabled(
    db: psycopg.Connection, dsn: str, kept: list[Session]
) -> None:
    """The secret read for its last connection is not reused for the next one."""
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        first = await connect(dispatcher)
        kept.append(first)
        await first.close()
        await pushsync("device", "disable", DEVICE, "--dsn", dsn)
        with pytest.raises(Refused):
            await connect(dispatcher)
        await pushsync("device", "enable", DEVICE, "--dsn", dsn)
        kept.append(await connect(dispatcher))


@pytest.mark.asyncio
async def test_a_new_secret_ends_the_sessions_of_the_old_one(
    db: psycopg.Connection, dsn: str, kept: list[Session], tmp_path: Path
) -> None:
    add_device(db)
    key = tmp_path / "new.key"
    async with dispatching(dsn) as dispatcher:
        pushed = await session(dispatcher)
        kept.append(pushed)
        said = await pushsync(
            "device", "rotate-secret", DEVICE, "--dsn", dsn, "--secret-file", str(key)
        )
        assert said.startswith(f"device {DEVICE} has a new secret; the old one is refused")
        assert await closed(pushed, CUT_OFF_WITHIN)
        with pytest.raises(Refused):
            await connect(dispatcher)
        renewed = await open_session(
            server_address(dispatcher),
            device=DEVICE,
            secret=protocol.read_secret(key.read_text()),
            timeout=5,
        )
        kept.append(renewed)  # the new secret is accepted
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


LOST = {
    "disabled": ("UPDATE pushsync.devices SET enabled = false WHERE device_id = %s", (DEVICE,)),
    "new secret": (
        "UPDATE pushsync.devices SET secret = %s WHERE device_id = %s",
        (bytes(range(2, 34)), DEVICE),
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("change", sorted(LOST))
async def test_access_lost_while_the_dispatcher_was_not_listening(
    db: psycopg.Connection, dsn: str, kept: list[Session], change: str
) -> None:
    """A notification lost with the database connection: the reconnect compares every
    connection's device and secret with the database, and closes the old key's."""
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        pushed = await session(dispatcher)
        kept.append(pushed)
        await until_async(lambda: dispatcher_connected(db, dispatcher), "the dispatcher connected")

        def lose_the_notification() -> None:
            db.execute("ALTER TABLE pushsync.devices DISABLE TRIGGER device_access_revoked")
            db.execute(*LOST[change])  # as if its NOTIFY were lost
            db.execute("ALTER TABLE pushsync.devices ENABLE TRIGGER device_access_revoked")

        # In a thread: ALTER TABLE waits for every transaction on devices, and the
        # dispatcher (on this event loop) may be in one, recording the connection.
        await asyncio.to_thread(lose_the_notification)
        assert not await closed(pushed, 0.5)  # nothing told the dispatcher yet
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query = 'LISTEN pushsync'"
        )
        assert await closed(pushed, 10.0), "the reconnect did not look at who is connected"
