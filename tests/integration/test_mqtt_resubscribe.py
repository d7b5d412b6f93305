"""A refused subscription to the acks is asked for again, on the same connection.

NATS refuses an MQTT subscription while its JetStream cannot create the
consumer behind it (a node lost, a leader being elected: the three-node test
in tests/reliability/test_nats_cluster.py); the refusal passes. Here a real
nats-server (one node, MQTT and JetStream) refuses it by its permissions,
which are then changed and reloaded (SIGHUP): the dispatcher's gateway must
get its subscription, and the acks, without a new connection. (Mosquitto
grants any subscription and filters what it delivers, so it cannot show this.)
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest

from pushsync.dispatcher.mqtt import MqttGateway, mqtt_from_url
from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from tests.support.dispatching import DEVICE, SECRET
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
            nats.grant_acks()
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
