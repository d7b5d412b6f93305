"""MQTT: a device (or anyone the broker lets write) attacks another device's topics.

Two walls, each shown alone through a real Mosquitto: the broker's ACL
(docs/operations.md, "Broker ACLs"), which keeps a device to its own ``in``
and ``ack`` topics; and the dispatcher's own checks, which hold with a broker
that lets anyone write anywhere: an ack is verified with the key of the
device whose topic it came on, must name that device, and must match a row of
that device; an announcement must be fresh. Each attack leaves the outbox row
and the device's addresses as they were.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from tests.support.dispatching import DEVICE, SECRET, add_device, outbox_row
from tests.support.mosquitto import DISPATCHER_PASSWORD, DISPATCHER_USER, Broker, device_password
from tests.support.mqtt import (
    INTRUDER,
    INTRUDER_PASSWORD,
    OTHER,
    OTHER_SECRET,
    Client,
    confirmed,
    dispatching,
    enqueue,
    mosquitto,
    on_record,
)
from tests.support.waiting import until_async

__all__ = ["mosquitto"]  # the fixture


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
    intruder = Client(mosquitto, INTRUDER, INTRUDER_PASSWORD)
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
