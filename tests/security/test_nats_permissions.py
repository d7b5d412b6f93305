"""NATS as the MQTT broker: a device cannot read another device's messages.

The permissions of docs/operations.md give every MQTT user ``$MQTT.sub.>``,
the subjects NATS delivers QoS 1 subscriptions to; a device that asks for
them over MQTT (``$MQTT/sub/#``), for another device's topic, or for
everything, is refused each subscription and receives nothing of what the
dispatcher publishes to the other device, while that device gets it and the
intruder gets what is published on its own topic (the controls).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.nats import (
    DISPATCHER_PASSWORD,
    DISPATCHER_USER,
    Cluster,
    Node,
    cluster,
    device_password,
    mqtt_publish,
)
from tests.support.waiting import until

OWNER = "truck-1"
INTRUDER = "truck-2"
ATTEMPTS = ("$MQTT/sub/#", "$MQTT/#", f"pushsync/{OWNER}/in", "pushsync/+/in", "#")


class Session:
    """A device's MQTT session on ``node``: what its subscriptions got, and what arrived."""

    def __init__(self, node: Node, user: str) -> None:
        self.granted: dict[int, bool] = {}
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=user, clean_session=True, protocol=paho.MQTTv311
        )
        self.client.username_pw_set(user, device_password(user))
        self.client.on_subscribe = self._answered
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", node.mqtt_port, keepalive=30)
        self.client.loop_start()

    def _answered(self, _c: Any, _u: Any, mid: int, reasons: list[Any], _p: Any) -> None:
        with self._lock:
            self.granted[mid] = not any(reason.is_failure for reason in reasons)

    def _message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._lock:
            self.received.append((str(message.topic), bytes(message.payload)))

    def subscribe(self, topic: str) -> bool:
        """Whether the broker granted ``topic`` (QoS 1)."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None
        until(lambda: mid in self.granted, f"the answer to the subscription to {topic}")
        return self.granted[mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(tmp_path / "nats", [OWNER, INTRUDER], size=1) as running:
        running.make_mqtt_streams()
        yield running


def test_a_device_cannot_subscribe_to_another_devices_messages_nor_to_natss_deliveries(
    nats: Cluster,
) -> None:
    [node] = nats.nodes
    owner = Session(node, OWNER)
    intruder = Session(node, INTRUDER)
    try:
        assert owner.subscribe(f"pushsync/{OWNER}/in")
        refused = {topic: not intruder.subscribe(topic) for topic in ATTEMPTS}
        assert intruder.subscribe(f"pushsync/{INTRUDER}/in")  # its own: the control
        for device, payload in ((OWNER, b"for the owner"), (INTRUDER, b"control")):
            mqtt_publish(
                node, DISPATCHER_USER, DISPATCHER_PASSWORD, f"pushsync/{device}/in", payload
            )
        until(lambda: owner.received and intruder.received, "both messages")
    finally:
        owner.close()
        intruder.close()
    assert refused == dict.fromkeys(ATTEMPTS, True)
    assert owner.received == [(f"pushsync/{OWNER}/in", b"for the owner")]
    assert intruder.received == [(f"pushsync/{INTRUDER}/in", b"control")]
