"""A refused subscription is asked for again, on the same connection: the dispatcher's
to the acks, a device's to its messages.

NATS refuses an MQTT subscription while its JetStream cannot create the
consumer behind it (a node lost, a leader being elected: the three-node test
in tests/reliability/test_nats_cluster.py); the refusal passes. Here a real
nats-server (one node, MQTT and JetStream) refuses it by its permissions,
which are then changed and reloaded (SIGHUP): the dispatcher's gateway must
get its subscription, and the acks, and the device's listener its own,
without a new connection. (Mosquitto
grants any subscription and filters what it delivers, so it cannot show this.)
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest

from pushsync.dispatcher.mqtt import MqttGateway, mqtt_from_url
from pushsync.listener.mqtt import MqttChannel
from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from tests.support.dispatching import DEVICE, SECRET
from tests.support.listening import listening, write_config
from tests.support.nats import DISPATCHER_PASSWORD, cluster, device_password, mqtt_publish
from tests.support.waiting import until_async


@pytest.mark.asyncio
async def test_a_refused_subscription_is_asked_again_until_granted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pushsync.dispatcher.mqtt")
    acks: list[uuid.UUID] = []
    with cluster(tmp_path / "nats", [DEVICE], size=1, acks=False) as nats:
        [node] = nats.nodes
        gateway = MqttGateway(
            mqtt_from_url(node.url("group=none"), password=DISPATCHER_PASSWORD),
            secret_for={DEVICE: SECRET}.get,
            on_ack=lambda ack, _peer: acks.append(ack.request_id),
        )
        await gateway.start()
        try:
            await until_async(lambda: "refused the subscription" in caplog.text, "the refusal")
            assert not gateway.subscribed.is_set()
            nats.grant()
            await asyncio.wait_for(gateway.subscribed.wait(), 30)
            request_id = uuid.uuid4()
            ack = protocol.Ack(request_id=request_id, device=DEVICE, confirmed=1.0)
            await asyncio.to_thread(
                mqtt_publish,
                node,
                DEVICE,
                device_password(DEVICE),
                topics.ack_topic("pushsync", DEVICE),
                protocol.encode_ack(ack, SECRET),
            )
            await until_async(lambda: acks == [request_id], "the ack")
        finally:
            await gateway.close()
    assert caplog.text.count("MQTT: connected to") == 1  # one connection throughout
    assert "disconnected" not in caplog.text


@pytest.mark.asyncio
async def test_a_device_refused_its_subscription_asks_again_until_granted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pushsync.listener.mqtt")
    with cluster(tmp_path / "nats", [DEVICE], size=1, inboxes=False) as nats:
        [node] = nats.nodes
        directory = tmp_path / "device"
        directory.mkdir()
        (directory / "mqtt.pw").write_text(device_password(DEVICE), encoding="utf-8")
        server = Address(host="127.0.0.1", port=node.mqtt_port)
        extra = f", username: {DEVICE}, password_file: mqtt.pw"
        config = write_config(directory, server, channel="mqtt", extra=extra)
        async with listening(config) as listener:
            [channel] = [c for c in listener.channels if isinstance(c, MqttChannel)]
            await until_async(lambda: "refused the subscription" in caplog.text, "the refusal")
            assert not channel.connected.is_set()
            nats.grant()
            await asyncio.wait_for(channel.connected.wait(), 30)
            assert channel.connections == 1  # granted on the first connection
    assert "lost the connection" not in caplog.text
