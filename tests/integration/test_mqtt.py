"""The MQTT gateway and channel through a real Mosquitto with per-device ACLs.

The dispatcher runs in this process (``serve`` with ``mqtt``), the listener
too, with its MQTT channel and a recording ``run`` action; the broker is
:mod:`tests.support.mosquitto`. Each test shows one behaviour of
docs/operations.md ("The MQTT gateway"): push → action → ack → confirmed; a
broker restart mid-burst loses nothing; a device offline gets what was
published meanwhile on its return; dispatchers share the acks. The attacks
(another device's topics, forged acks) are in tests/security/test_mqtt_attacks.py.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import psycopg
import pytest

from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from tests.support.dispatching import DEVICE, SECRET, add_device, outbox_row
from tests.support.listening import listening, runs
from tests.support.mosquitto import Broker, device_password
from tests.support.mqtt import (
    Client,
    confirmed,
    device_config,
    dispatching,
    enqueue,
    mosquitto,
    on_record,
)
from tests.support.waiting import until_async

__all__ = ["mosquitto"]  # the fixture


@pytest.mark.asyncio
async def test_push_runs_the_action_and_the_ack_confirms(
    db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    add_device(db)
    config = device_config(tmp_path / "device", mosquitto)
    async with dispatching(dsn, mosquitto), listening(config):
        # The device's signed announcement puts its subscription on record...
        await until_async(lambda: on_record(db) == [("tracking", "on")], "the announcement")
        # ...so automatic routing, with no UDP or SYNC, goes through the broker.
        [request_id] = enqueue(db)
        await until_async(lambda: confirmed(db, [request_id]) == 1, "the confirmation")
    assert outbox_row(db, request_id)[1] == "mqtt"
    assert [run["request_id"] for run in runs(tmp_path / "device")] == [str(request_id)]


@pytest.mark.asyncio
async def test_broker_restart_mid_burst_loses_nothing_and_acts_once(
    db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    add_device(db)
    config = device_config(tmp_path / "device", mosquitto)
    async with dispatching(dsn, mosquitto), listening(config):
        await until_async(lambda: on_record(db) != [], "the announcement")
        ids = enqueue(db, 60, resend="1 second")
        await until_async(lambda: confirmed(db, ids) >= 5, "the first confirmations")
        # Killed: what it had not saved yet (sessions, queued messages) is gone.
        await asyncio.to_thread(mosquitto.restart, signal.SIGKILL)
        await until_async(lambda: confirmed(db, ids) == len(ids), "every confirmation", 30)
    done = [run["request_id"] for run in runs(tmp_path / "device")]
    assert sorted(done) == sorted(str(i) for i in ids)  # every action, each once


@pytest.mark.asyncio
async def test_a_device_away_gets_what_was_published_meanwhile_on_return(
    db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    add_device(db)
    config = device_config(tmp_path / "device", mosquitto)
    async with dispatching(dsn, mosquitto):
        async with listening(config):  # the broker now holds the device's session
            await until_async(lambda: on_record(db) != [], "the announcement")
        # Resent only after an hour: only the broker's queue can bring these.
        ids = enqueue(db, 3, resend="1 hour")
        await until_async(lambda: all(outbox_row(db, i)[0] == "sent" for i in ids), "the sends")
        assert runs(tmp_path / "device") == []
        async with listening(config):
            await until_async(lambda: confirmed(db, ids) == len(ids), "the confirmations")
    assert sorted(run["request_id"] for run in runs(tmp_path / "device")) == sorted(
        str(i) for i in ids
    )


@pytest.mark.asyncio
async def test_dispatchers_share_the_acks_each_recorded_once(
    db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    add_device(db)
    ids = enqueue(db, 20, gateway="mqtt")
    async with dispatching(dsn, mosquitto) as first, dispatching(dsn, mosquitto) as second:
        assert first.mqtt is not None
        assert second.mqtt is not None
        await until_async(lambda: all(outbox_row(db, i)[0] == "sent" for i in ids), "the sends")
        device = Client(mosquitto, DEVICE, device_password(DEVICE))
        try:
            for request_id in ids:
                ack = protocol.Ack(request_id=request_id, device=DEVICE, confirmed=1.0)
                await device.publish(
                    topics.ack_topic("pushsync", DEVICE), protocol.encode_ack(ack, SECRET)
                )
            await until_async(lambda: confirmed(db, ids) == len(ids), "the confirmations")
        finally:
            device.close()
        counts = (first.mqtt.stats.accepted, second.mqtt.stats.accepted)
    assert sum(counts) == len(ids), counts
    assert min(counts) > 0, counts  # the broker spread them: both took part
