"""What the MQTT tests share: a broker fixture, the dispatcher and listener set up for it,
outbox rows and what became of them, and a bare paho client for misbehaving parties.

The broker is :mod:`tests.support.mosquitto`; the dispatcher runs in the test's
process (``serve`` with ``mqtt``), the listener too (:mod:`tests.support.listening`).
"""

from __future__ import annotations

import asyncio
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
from pushsync.wire.addresses import Address
from tests.support.dispatching import DEVICE, outbox_row
from tests.support.listening import write_config
from tests.support.mosquitto import DISPATCHER_PASSWORD, Broker, broker, device_password
from tests.support.waiting import until_async

OTHER = "truck-2"
OTHER_SECRET = bytes(range(2, 34))
INTRUDER = "intruder"
INTRUDER_PASSWORD = "intruder-pw"


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A broker for DEVICE and OTHER, and an intruder allowed to write every topic."""
    with broker(
        tmp_path / "broker",
        [DEVICE, OTHER],
        extra_acl=f"\nuser {INTRUDER}\ntopic write #\n",
        extra_users=[(INTRUDER, INTRUDER_PASSWORD)],
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
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
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
