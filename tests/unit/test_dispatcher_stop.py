"""The dispatcher's loops return when asked to stop, whatever they were doing at that moment."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import pytest

from pushsync.dispatcher.daemon import Dispatcher, DispatcherSettings
from pushsync.wire import protocol
from tests.support.waiting import until_async


class StoppedWhileConfirming:
    """An outbox whose ``confirm_many`` lets the stop request (SIGTERM) in while it runs."""

    def __init__(self, stop: asyncio.Event, relayed: Callable[[], bool]) -> None:
        self.stop = stop
        self.relayed = relayed
        self.confirmed: list[uuid.UUID] = []

    async def confirm_many(self, acks: list[tuple[uuid.UUID, str]]) -> set[uuid.UUID]:
        self.stop.set()
        await until_async(self.relayed, "the stop relay to wake the loops", 5)
        self.confirmed.extend(request_id for request_id, _ in acks)
        return {request_id for request_id, _ in acks}


@pytest.mark.asyncio
async def test_a_stop_while_an_ack_is_recorded_ends_the_confirm_loop() -> None:
    dispatcher = Dispatcher(DispatcherSettings(dsn="host=127.0.0.1 dbname=unused"))
    stop = asyncio.Event()
    store = StoppedWhileConfirming(stop, relayed=dispatcher._wake.is_set)
    relay = asyncio.create_task(dispatcher._relay_stop(stop))
    ack = protocol.Ack(request_id=uuid.uuid4(), device="dev-1", confirmed=time.time())
    dispatcher.on_ack(ack, "127.0.0.1:9")
    try:
        loop = dispatcher._confirm_loop(store, stop)  # type: ignore[arg-type]
        await asyncio.wait_for(loop, 5.0)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
    assert store.confirmed == [ack.request_id]
