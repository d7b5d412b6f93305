"""The MQTT pieces without a broker: ``--mqtt`` URLs, topics, announcements, acks received."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from pushsync.dispatcher.mqtt import MqttGateway, describe_mqtt, mqtt_from_url
from pushsync.errors import UsageError
from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from tests.support.waiting import until_async

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))


def test_a_url_with_everything() -> None:
    settings = mqtt_from_url(
        "mqtts://dispatch%40eu@broker.example.com:9883?client_id=d-1&prefix=fleet/eu&group=eu",
        password="pw",
        ca_file="ca.pem",
    )
    assert (settings.host, settings.port, settings.tls) == ("broker.example.com", 9883, True)
    assert (settings.username, settings.password) == ("dispatch@eu", "pw")
    assert (settings.client_id, settings.prefix, settings.group) == ("d-1", "fleet/eu", "eu")
    assert settings.ca_file == "ca.pem"
    assert "pw" not in repr(settings)
    assert "pw" not in describe_mqtt(settings)
    assert "$share/eu/fleet/eu/+/ack" in describe_mqtt(settings)


@pytest.mark.parametrize(
    ("url", "port", "tls"),
    [("mqtt://b.example", 1883, False), ("mqtts://b.example", 8883, True)],
)
def test_default_ports(url: str, port: int, tls: bool) -> None:
    settings = mqtt_from_url(url)
    assert (settings.port, settings.tls, settings.username, settings.client_id) == (
        port,
        tls,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("url", "options", "says"),
    [
        ("http://b.example", {}, "expected mqtt://… or mqtts://…, not 'http'"),
        ("mqtt://b.example:99999", {}, "bad port"),
        ("mqtt://:1883", {}, "a host is needed"),
        ("mqtt://b.example/topic", {}, "no path"),
        ("mqtt://b.example?qos=2", {}, "unknown option 'qos'"),
        ("mqtt://b.example?client_id=", {}, "client_id must not be empty"),
        ("mqtt://b.example?prefix=a/%2B/b", {}, "bad MQTT topic prefix"),
        ("mqtt://b.example?prefix=%24SYS", {}, "bad MQTT topic prefix"),
        ("mqtt://b.example?group=a/b", {}, "bad group"),
        ("mqtt://:secret@b.example", {}, "a password needs a user"),
        ("mqtt://u@b.example", {"ca_file": "ca.pem"}, "need an mqtts:// broker"),
        ("mqtts://u@b.example", {"cert_file": "c.pem"}, "go together"),
    ],
)
def test_bad_urls_say_what_is_wrong_never_the_password(
    url: str, options: dict[str, str], says: str
) -> None:
    with pytest.raises(UsageError, match=says.replace("+", r"\+").replace("$", r"\$")) as caught:
        mqtt_from_url(url, **options)
    assert "secret" not in str(caught.value)


def test_group_none_is_a_plain_subscription() -> None:
    settings = mqtt_from_url("mqtt://b.example?group=none")
    assert settings.group is None
    assert describe_mqtt(settings).endswith("acks through pushsync/+/ack")


def test_topics() -> None:
    assert topics.in_topic("pushsync", "truck-7") == "pushsync/truck-7/in"
    assert topics.ack_topic("fleet/eu", "truck-7") == "fleet/eu/truck-7/ack"
    assert topics.acks_filter("pushsync", "g") == "$share/g/pushsync/+/ack"
    assert topics.acks_filter("pushsync") == "pushsync/+/ack"
    assert topics.device_of_ack_topic("pushsync", "pushsync/truck-7/ack") == "truck-7"
    assert topics.device_of_ack_topic("fleet/eu", "fleet/eu/truck-7/ack") == "truck-7"
    for topic in ("pushsync/truck-7/in", "pushsync/a/b/ack", "pushsync//ack", "other/t/ack"):
        assert topics.device_of_ack_topic("pushsync", topic) is None


def test_an_announcement_counts_for_five_minutes_either_way() -> None:
    now = 1_000_000.0
    assert topics.fresh(now - 299, now)
    assert topics.fresh(now + 299, now)
    assert not topics.fresh(now - 301, now)
    assert not topics.fresh(now + 301, now)


class Received:
    """A gateway that is never started: :meth:`MqttGateway.ack_received` alone."""

    def __init__(self) -> None:
        self.acks: list[tuple[uuid.UUID, str]] = []
        self.announced: list[str] = []
        secrets = {"truck-1": SECRET, "truck-2": OTHER}
        self.gateway = MqttGateway(
            mqtt_from_url("mqtt://b.example"),
            secret_for=secrets.get,
            on_ack=lambda ack, _peer: self.acks.append((ack.request_id, ack.device)),
            on_announce=self.announced.append,
        )


def envelope(device: str, secret: bytes, request_id: uuid.UUID, when: float = 1.0) -> bytes:
    return protocol.encode_ack(
        protocol.Ack(request_id=request_id, device=device, confirmed=when), secret
    )


@pytest.mark.asyncio
async def test_acks_are_verified_against_the_topics_device() -> None:
    received = Received()
    request_id = uuid.uuid4()
    good = envelope("truck-1", SECRET, request_id)
    received.gateway.ack_received("pushsync/truck-1/ack", envelope("truck-1", OTHER, request_id))
    received.gateway.ack_received("pushsync/truck-2/ack", good)  # truck-1's ack, wrong topic
    received.gateway.ack_received("pushsync/truck-1/ack", b"PS\x01A")
    received.gateway.ack_received("pushsync/truck-1/in", good)
    received.gateway.ack_received("pushsync/truck-3/ack", envelope("truck-3", SECRET, request_id))
    await asyncio.sleep(0)
    assert received.acks == []
    assert received.gateway.stats.dropped == 5
    received.gateway.ack_received("pushsync/truck-1/ack", good)
    assert received.acks == [(request_id, "truck-1")]


@pytest.mark.asyncio
async def test_an_announcement_is_recorded_only_when_fresh() -> None:
    received = Received()
    stale = envelope("truck-2", OTHER, topics.ANNOUNCEMENT, time.time() - 3600)
    received.gateway.ack_received("pushsync/truck-2/ack", stale)
    assert received.announced == []
    fresh = envelope("truck-2", OTHER, topics.ANNOUNCEMENT, time.time())
    received.gateway.ack_received("pushsync/truck-2/ack", fresh)
    assert received.announced == ["truck-2"]
    assert received.acks == []  # an announcement confirms nothing


@pytest.mark.asyncio
async def test_a_failing_secret_lookup_drops_the_ack_and_raises_nothing() -> None:
    """paho calls ack_received from its network loop: an exception there would end it."""

    def broken(device: str) -> bytes | None:
        raise KeyError(device)

    acks: list[protocol.Ack] = []
    gateway = MqttGateway(
        mqtt_from_url("mqtt://b.example"),
        secret_for=broken,
        on_ack=lambda ack, _peer: acks.append(ack),
    )
    gateway.ack_received("pushsync/truck-1/ack", envelope("truck-1", SECRET, uuid.uuid4()))
    assert acks == []
    assert gateway.stats.dropped == 1


@pytest.mark.asyncio
async def test_acks_from_unknown_devices_are_looked_up_at_most_64_at_a_time() -> None:
    started: list[str] = []
    release = asyncio.Event()

    async def fetch(device: str) -> bytes | None:
        started.append(device)
        await release.wait()
        return SECRET

    acks: list[str] = []
    gateway = MqttGateway(
        mqtt_from_url("mqtt://b.example"),
        secret_for=lambda _device: None,
        fetch_secret=fetch,
        on_ack=lambda ack, _peer: acks.append(ack.device),
    )
    for n in range(70):
        device = f"truck-{n}"
        gateway.ack_received(f"pushsync/{device}/ack", envelope(device, SECRET, uuid.uuid4()))
    await asyncio.sleep(0)
    assert len(started) == 64
    assert gateway.stats.dropped == 6
    release.set()
    await until_async(lambda: len(acks) == 64, "the looked-up acks")
    assert sorted(acks) == sorted(started)
    assert gateway.stats.lookups == 64
