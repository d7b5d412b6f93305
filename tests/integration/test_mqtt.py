"""The MQTT gateway and channel through a real Mosquitto with per-device ACLs.

The dispatcher runs in this process (``serve`` with ``mqtt``), the listener
too, with its MQTT channel and a recording ``run`` action; the broker is
:mod:`tests.support.mosquitto`. Each test shows one behaviour of
docs/operations.md ("MQTT"): push → action → ack → confirmed; a device cannot
read or ack another device's topic; a broker restart mid-burst loses nothing;
a device offline gets what was published meanwhile on its return.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from pushsync.dispatcher.daemon import Running, serve
from pushsync.dispatcher.settings import DispatcherSettings
from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from tests.support.dispatching import DEVICE, SECRET, add_device, outbox_row
from tests.support.listening import listening, runs, write_config
from tests.support.mosquitto import (
    DISPATCHER_PASSWORD,
    DISPATCHER_USER,
    Broker,
    broker,
    device_password,
)
from tests.support.waiting import until_async

OTHER = "truck-2"
OTHER_SECRET = bytes(range(2, 34))
INTRUDER = "intruder"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A broker for DEVICE and OTHER, and an intruder allowed to write every topic."""
    with broker(
        tmp_path / "broker",
        [DEVICE, OTHER],
        extra_acl=f"\nuser {INTRUDER}\ntopic write #\n",
        extra_users=[(INTRUDER, "intruder-pw")],
    ) as running:
        yield running


def settings(dsn: str, mosquitto: Broker, **more: Any) -> DispatcherSettings:
    return DispatcherSettings(
        dsn=dsn,
        udp_listen=None,
        sync_listen=None,
        mqtt=mosquitto.url,
        mqtt_password=DISPATCHER_PASSWORD,
        poll_interval=0.2,
        housekeeping_interval=0.5,
        **more,
    )


@asynccontextmanager
async def dispatching(dsn: str, mosquitto: Broker) -> AsyncIterator[Running]:
    async with serve(settings(dsn, mosquitto)) as running:
        assert running.mqtt is not None
        await until_async(lambda: running.dispatcher.health()[0], "the dispatcher to connect")
        await asyncio.wait_for(running.mqtt.subscribed.wait(), 10)
        yield running


def device_config(directory: Path, mosquitto: Broker) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "mqtt.pw").write_text(device_password(DEVICE), encoding="utf-8")
    extra = f", username: {DEVICE}, password_file: mqtt.pw"
    server = Address(host="127.0.0.1", port=mosquitto.port)
    return write_config(directory, server, channel="mqtt", extra=extra)


def enqueue(
    db: psycopg.Connection, n: int = 1, *, gateway: str = "auto", resend: str = "1 hour"
) -> list[uuid.UUID]:
    rows = db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, gateway, coalescing, "
        "expires_at, resend_every) SELECT 'r', %s, 'sync', 'n' || i, %s, false, "
        "now() + interval '1 hour', %s::interval FROM generate_series(1, %s) AS i "
        "RETURNING request_id",
        (DEVICE, gateway, resend, n),
    ).fetchall()
    return [uuid.UUID(str(row[0])) for row in rows]


def confirmed(db: psycopg.Connection, ids: list[uuid.UUID]) -> int:
    return sum(outbox_row(db, request_id)[0] == "confirmed" for request_id in ids)


def on_record(db: psycopg.Connection, device: str = DEVICE) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT source, address FROM pushsync.device_addresses "
        "WHERE device_id = %s AND medium = 'mqtt'",
        (device,),
    ).fetchall()


class Client:
    """A bare paho client: what a misbehaving device (or intruder) does on the broker."""

    def __init__(self, mosquitto: Broker, user: str, password: str) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.subscribed = 0
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"{user}-raw", protocol=paho.MQTTv311
        )
        self.client.username_pw_set(user, password)
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, m.payload))
        self.client.on_subscribe = self._granted
        self.client.connect("127.0.0.1", mosquitto.port)
        self.client.loop_start()

    def _granted(self, *_args: Any) -> None:
        self.subscribed += 1

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    async def publish(self, topic: str, data: bytes) -> None:
        info = self.client.publish(topic, data, qos=1)
        await asyncio.to_thread(info.wait_for_publish, 10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


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
async def test_a_device_cannot_read_or_ack_another_devices_topic(
    db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    """The broker's ACL: truck-2 neither receives truck-1's messages nor gets an ack onto
    truck-1's topic. Each refusal is shown against a control that passes on the same
    connection afterwards (a broker delivers one connection's messages in order)."""
    add_device(db)
    add_device(db, OTHER, OTHER_SECRET)
    [request_id] = enqueue(db, gateway="mqtt")
    other = Client(mosquitto, OTHER, device_password(OTHER))
    watcher = Client(mosquitto, DISPATCHER_USER, DISPATCHER_PASSWORD)
    try:
        watcher.subscribe(topics.acks_filter("pushsync"))
        other.subscribe(topics.in_topic("pushsync", DEVICE))
        other.subscribe(topics.in_topic("pushsync", OTHER))
        await until_async(lambda: other.subscribed == 2 and watcher.subscribed == 1)
        async with dispatching(dsn, mosquitto):
            await until_async(lambda: outbox_row(db, request_id)[0] == "sent", "the send")
            await watcher.publish(topics.in_topic("pushsync", OTHER), b"control")
            await until_async(lambda: other.received != [], "the control message")
            assert other.received == [(topics.in_topic("pushsync", OTHER), b"control")]
            # Holding the victim's key does not help either: the broker drops a
            # publish to a topic its user may not write.
            ack = protocol.Ack(request_id=request_id, device=DEVICE, confirmed=1.0)
            await other.publish(
                topics.ack_topic("pushsync", DEVICE), protocol.encode_ack(ack, SECRET)
            )
            await other.publish(topics.ack_topic("pushsync", OTHER), b"control")
            await until_async(lambda: watcher.received != [], "the control ack")
            assert watcher.received == [(topics.ack_topic("pushsync", OTHER), b"control")]
            assert outbox_row(db, request_id)[0] == "sent"
    finally:
        other.close()
        watcher.close()


@pytest.mark.asyncio
async def test_forged_acks_and_stale_announcements_change_nothing(
    db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    """Through a broker that lets anyone write anywhere: the dispatcher's own checks."""
    add_device(db)
    add_device(db, OTHER, OTHER_SECRET)
    [request_id] = enqueue(db, gateway="mqtt")
    intruder = Client(mosquitto, INTRUDER, "intruder-pw")
    try:
        async with dispatching(dsn, mosquitto) as running:
            assert running.mqtt is not None
            await until_async(lambda: outbox_row(db, request_id)[0] == "sent", "the send")
            now = running.mqtt.stats
            ack = protocol.Ack(request_id=request_id, device=DEVICE, confirmed=1.0)
            forged = [
                # wrong key
                (DEVICE, protocol.encode_ack(ack, OTHER_SECRET)),
                # the other device's genuine ack of this request, on its own topic
                (
                    OTHER,
                    protocol.encode_ack(
                        protocol.Ack(request_id=request_id, device=OTHER, confirmed=1.0),
                        OTHER_SECRET,
                    ),
                ),
                # a genuine ack of the victim, put on the other device's topic
                (OTHER, protocol.encode_ack(ack, SECRET)),
                # an announcement a day old, replayed
                (
                    OTHER,
                    protocol.encode_ack(
                        protocol.Ack(request_id=topics.ANNOUNCEMENT, device=OTHER, confirmed=1.0),
                        OTHER_SECRET,
                    ),
                ),
                (DEVICE, b"not an envelope"),
            ]
            dropped = now.dropped
            for device, data in forged:
                await intruder.publish(topics.ack_topic("pushsync", device), data)
            # The genuine-but-wrong-device ack is verified, then matches no row of that device.
            await until_async(lambda: now.dropped - dropped >= len(forged) - 1, "the drops")
            assert outbox_row(db, request_id)[0] == "sent"
            assert on_record(db, OTHER) == []
            # The real ack, last, is what confirms it.
            await intruder.publish(
                topics.ack_topic("pushsync", DEVICE), protocol.encode_ack(ack, SECRET)
            )
            await until_async(lambda: confirmed(db, [request_id]) == 1, "the genuine ack")
    finally:
        intruder.close()


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
