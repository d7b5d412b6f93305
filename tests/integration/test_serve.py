"""serve(settings): everything the settings ask for is started, and stopped on leaving."""

from __future__ import annotations

import asyncio
import socket

import psycopg
import pytest

from pushsync.dispatcher.daemon import DispatcherSettings, serve
from pushsync.testing import RecordingGateway
from tests.support.dispatching import add_device, enqueue, outbox_row, set_address
from tests.support.waiting import until_async

LOOPBACK = "127.0.0.1:0"


def refused(address: tuple[str, int]) -> bool:
    """Whether a TCP connection to ``address`` is refused (nothing listens there)."""
    with socket.socket() as probe:
        return probe.connect_ex(address) != 0


@pytest.mark.asyncio
async def test_serve_starts_what_the_settings_ask_for_and_stops_it(
    db: psycopg.Connection, dsn: str
) -> None:
    settings = DispatcherSettings(
        dsn=dsn,
        owner="served",
        udp_listen=LOOPBACK,
        sync_listen=LOOPBACK,
        metrics_listen=LOOPBACK,
        poll_interval=0.2,
    )
    async with serve(settings) as running:
        await until_async(lambda: running.dispatcher.health()[0], "the dispatcher to connect")
        assert running.sync_address is not None
        assert running.metrics_address is not None
        assert running.udp_address is not None
        sync_address, metrics_address = running.sync_address, running.metrics_address
        assert not refused(sync_address)
        assert not refused(metrics_address)
        assert set(running.dispatcher.gateways) == {"udp", "sync"}
        assert running.store is running.dispatcher.store
        assert db.execute("SELECT owner FROM pushsync.dispatchers").fetchall() == [("served",)]
    assert running.finished.done()
    assert refused(sync_address)
    assert refused(metrics_address)
    assert db.execute("SELECT count(*) FROM pushsync.dispatchers").fetchone() == (0,)


@pytest.mark.asyncio
async def test_serve_without_servers_sends_through_an_injected_gateway(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    set_address(db, "truck-1", "udp", "192.0.2.1:9")
    recording = RecordingGateway("udp")
    settings = DispatcherSettings(dsn=dsn, udp_listen=None, sync_listen=None, poll_interval=0.2)
    async with serve(settings, gateways={"udp": recording}) as running:
        assert (running.connections, running.udp, running.metrics) == (None, None, None)
        request_id = enqueue(db)
        await until_async(lambda: outbox_row(db, request_id)[0] == "sent", "the send")
    assert [item.request_id for item in recording.items] == [request_id]


@pytest.mark.asyncio
async def test_stop_ends_the_dispatcher_before_the_block_does(dsn: str) -> None:
    settings = DispatcherSettings(dsn=dsn, udp_listen=None, sync_listen=None)
    async with serve(settings) as running:
        await until_async(lambda: running.dispatcher.health()[0], "the dispatcher to connect")
        running.stop()
        await asyncio.wait_for(running.stopped(), 10)
        assert running.finished.done()
        assert running.finished.exception() is None
