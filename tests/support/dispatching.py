"""The dispatcher in this process, its SYNC gateway, and what tests read of it in the database.

:func:`running` runs a :class:`~pushsync.dispatcher.daemon.Dispatcher` built by
hand for a block; :func:`dispatching` serves one with a SYNC server on
127.0.0.1:0; :func:`session` opens an authenticated device connection to it. The
database helpers register a device, write an outbox row and read rows back.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from pushsync.dispatcher.connections import ConnectionServer, ConnectionSettings
from pushsync.dispatcher.daemon import Dispatcher, serve
from pushsync.dispatcher.gateways import Gateway
from pushsync.dispatcher.settings import DispatcherSettings
from pushsync.dispatcher.sync_endpoint import SyncLimits
from pushsync.listener.connection import Session, open_session
from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from tests.support.waiting import until_async

SECRET = bytes(range(32))
"""The secret :func:`add_device` gives a device unless told otherwise."""
WRONG = bytes(range(1, 33))
"""A secret no device has."""
DEVICE = "truck-1"
WAIT = 10.0
"""Seconds a dispatcher, a connection or a read may take before the test fails."""


# --------------------------------------------------------------------------- database


def add_device(db: psycopg.Connection, device: str = DEVICE, secret: bytes = SECRET) -> None:
    db.execute("INSERT INTO pushsync.devices (device_id, secret) VALUES (%s, %s)", (device, secret))


def set_address(db: psycopg.Connection, device: str, medium: str, address: str) -> None:
    """A manual address of ``device`` for one medium (``udp``, ``email``, ...)."""
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "VALUES (%s, %s, 'manual', %s)",
        (device, medium, address),
    )


def enqueue(db: psycopg.Connection, device: str = DEVICE, *, content: str = "go") -> uuid.UUID:
    """One outbox row for ``device`` (subject ``sync``, an hour to live, resent hourly)."""
    row = db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, "
        "expires_at, resend_every) VALUES ('r', %s, 'sync', %s, false, "
        "now() + interval '1 hour', '1 hour') RETURNING request_id",
        (device, content),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def outbox_row(db: psycopg.Connection, request_id: uuid.UUID) -> tuple[Any, ...]:
    """State, gateway used, confirmation time: in the outbox or, once finished, its history."""
    row = db.execute(
        "SELECT state, gateway_used, confirmed_at FROM pushsync.outbox WHERE request_id = %s "
        "UNION ALL SELECT state, gateway_used, confirmed_at FROM pushsync.outbox_history "
        "WHERE request_id = %s",
        (request_id, request_id),
    ).fetchone()
    assert row is not None
    return tuple(row)


def states(db: psycopg.Connection) -> dict[str, int]:
    """How many outbox rows are in each state."""
    found = db.execute("SELECT state, count(*) FROM pushsync.outbox GROUP BY state").fetchall()
    return {state: count for state, count in found}


def dispatcher_listens(db: psycopg.Connection) -> bool:
    """Whether some session of this database has run LISTEN pushsync and waits."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND query = 'LISTEN pushsync' AND state = 'idle'"
    ).fetchone()
    return bool(row and row[0])


def dispatcher_connected(db: psycopg.Connection, dispatcher: Dispatcher) -> bool:
    """Whether ``dispatcher`` has connected to the database: it announced itself, which it
    does after LISTEN and after looking at which connected devices lost access meanwhile."""
    row = db.execute("SELECT FROM pushsync.dispatchers WHERE owner = %s", (dispatcher.owner,))
    return row.fetchone() is not None


# --------------------------------------------------------------------------- dispatcher


@asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[asyncio.Event]:
    """Run ``dispatcher`` for the block; stop it and wait for it (bounded) after."""
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@asynccontextmanager
async def dispatching(
    dsn: str,
    *,
    sync: ConnectionSettings | None = None,
    limits: SyncLimits | None = None,
    owner: str | None = None,
    gateways: Mapping[str, Gateway] | None = None,
) -> AsyncIterator[Dispatcher]:
    """:func:`~pushsync.dispatcher.daemon.serve`: a dispatcher with a SYNC server on
    127.0.0.1:0 and no UDP gateway (``gateways`` may bring one), running for the block."""
    settings = DispatcherSettings(
        dsn=dsn,
        owner=owner,
        udp_listen=None,
        sync_listen="127.0.0.1:0",
        sync=sync or ConnectionSettings(),
        sync_limits=limits or SyncLimits(),
        poll_interval=0.2,
        housekeeping_interval=0.5,
    )
    async with serve(settings, gateways=gateways) as started:
        # Connected, LISTENing, and past its first look at who is connected: what a
        # test changes from here on reaches the dispatcher as a notification.
        await until_async(lambda: started.dispatcher.health()[0], "the dispatcher to connect")
        yield started.dispatcher


def connections_of(dispatcher: Dispatcher) -> ConnectionServer:
    """The dispatcher's SYNC server (it has one)."""
    assert dispatcher.connections is not None
    return dispatcher.connections


def server_address(dispatcher: Dispatcher) -> Address:
    """Where the dispatcher's SYNC server listens."""
    host, port = connections_of(dispatcher).address
    return Address(host=host, port=port)


async def session(
    dispatcher: Dispatcher, secret: bytes = SECRET, device: str = DEVICE, *, subscribe: bool = True
) -> Session:
    """An authenticated connection; with ``subscribe``, the device's push connection."""
    opened = await open_session(server_address(dispatcher), device=device, secret=secret, timeout=5)
    if subscribe:
        before = connections_of(dispatcher).stats.subscribed
        opened.send(protocol.encode_subscribe())
        await until_async(
            lambda: connections_of(dispatcher).stats.subscribed > before, "the subscription", WAIT
        )
    return opened


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), WAIT)


async def shut(writer: asyncio.StreamWriter) -> None:
    """Close a raw connection, whether or not the server already has."""
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
