"""Gateways without the network: message mapping, the recording fake, SMS addresses, refusals."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pushsync.dispatcher import gateways as g
from pushsync.dispatcher.outbox import Claimed
from pushsync.errors import UsageError
from pushsync.testing import RecordingGateway
from pushsync.wire import protocol
from pushsync.wire.addresses import format_peer
from pushsync.wire.limits import MAX_DATAGRAM

SECRET = bytes(range(32))
CREATED = datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)

ITEM = Claimed(
    request_id=uuid.UUID("6f1c2d3e-4b5a-4697-8877-665544332211"),
    rule="route_disruption",
    device_id="truck-17",
    subject="sync",
    content="disruption 42 on route A7",
    priority="high",
    gateway="auto",
    created_at=CREATED,
    expires_at=CREATED + timedelta(hours=1),
    attempts=0,
    secret=SECRET,
    udp_address="127.0.0.1:5001",
    email_address="truck-17@example.org",
)


class FakeTransport(asyncio.DatagramTransport):
    """Records datagrams instead of sending them."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent.append((bytes(data), addr))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def udp_gateway() -> tuple[g.UdpGateway, FakeTransport]:
    gateway = g.UdpGateway(secret_for=lambda device: None, on_ack=lambda ack, peer: None)
    transport = FakeTransport()
    gateway.attach(transport)
    return gateway, transport


def test_to_message_maps_the_claimed_row() -> None:
    msg = g.to_message(ITEM)
    assert msg == protocol.Message(
        request_id=ITEM.request_id,
        device="truck-17",
        subject="sync",
        content="disruption 42 on route A7",
        sender="pushsync",
        priority="high",
        created=1_700_000_000.123,
        expires=1_700_003_600.123,
    )


def test_to_message_sender_and_round_trip() -> None:
    msg = g.to_message(ITEM, sender="ops")
    decoded = protocol.decode_message(protocol.encode_message(msg, SECRET), SECRET, now=msg.created)
    assert decoded == msg
    assert decoded.sender == "ops"


def test_to_message_refuses_unknown_priority_and_naive_times() -> None:
    with pytest.raises(protocol.Malformed):
        g.to_message(replace(ITEM, priority="urgent"))
    with pytest.raises(ValueError, match="timezone"):
        g.to_message(replace(ITEM, created_at=CREATED.replace(tzinfo=None)))


@pytest.mark.asyncio
async def test_recording_gateway_records_and_succeeds() -> None:
    gateway = RecordingGateway("udp")
    result = await gateway.send(ITEM)
    assert result == g.SendResult(ok=True, gateway="udp", error=None, final=False)
    assert gateway.items == [ITEM]


@pytest.mark.asyncio
async def test_recording_gateway_fails_when_told() -> None:
    gateway = RecordingGateway("sync", fail_with="not connected")
    second = replace(ITEM, request_id=uuid.uuid4())
    results = [await gateway.send(ITEM), await gateway.send(second)]
    assert [r.ok for r in results] == [False, False]
    assert {r.error for r in results} == {"not connected"}
    assert not any(r.final for r in results)
    assert gateway.items == [ITEM, second]
    final = await RecordingGateway("smtp", fail_with="no", final=True).send(ITEM)
    assert final.final


def test_gateways_satisfy_the_protocol() -> None:
    fakes: list[g.Gateway] = [RecordingGateway("x"), udp_gateway()[0]]
    fakes.append(g.SmtpGateway(host="localhost", sender_address="p@example.org"))
    assert [f.name for f in fakes] == ["x", "udp", "smtp"]


@pytest.mark.parametrize(
    ("phone", "prefix", "domain", "expected"),
    [
        ("5551234567", "", "vtext.com", "5551234567@vtext.com"),
        ("+1 555-123-4567", "", "txt.example.com", "15551234567@txt.example.com"),
        ("613 555 1234", "1", "sms.Carrier.example", "16135551234@sms.carrier.example"),
        ("0049-170-1234567", "sms.", "gw.example.de", "sms.00491701234567@gw.example.de"),
    ],
)
def test_sms_address(phone: str, prefix: str, domain: str, expected: str) -> None:
    assert g.sms_address(phone, prefix, domain) == expected


@pytest.mark.parametrize(
    ("phone", "prefix", "domain"),
    [
        ("", "", "vtext.com"),
        ("12", "", "vtext.com"),
        ("555 CALL NOW", "", "vtext.com"),
        ("(555) 123", "", "vtext.com"),
        ("++15551234567", "", "vtext.com"),
        ("1234567890123456", "", "vtext.com"),
        ("5551234567", "a b", "vtext.com"),
        ("5551234567", "x@", "vtext.com"),
        ("5551234567", "", "localhost"),
        ("5551234567", "", "vtext.com\r\nBcc: x@example.org"),
    ],
)
def test_sms_address_refuses(phone: str, prefix: str, domain: str) -> None:
    with pytest.raises(UsageError):
        g.sms_address(phone, prefix, domain)


@pytest.mark.asyncio
async def test_udp_refuses_oversized_without_sending() -> None:
    gateway, transport = udp_gateway()
    big = replace(ITEM, content="x" * MAX_DATAGRAM)
    result = await gateway.send(big)
    size = protocol.encoded_size(g.to_message(big))
    assert result == g.SendResult(
        ok=False,
        gateway="udp",
        error=f"message too large for UDP ({size} bytes > 1200)",
        final=True,
    )
    assert transport.sent == []


@pytest.mark.asyncio
async def test_udp_device_without_address_is_final() -> None:
    gateway, transport = udp_gateway()
    result = await gateway.send(replace(ITEM, udp_address=None))
    assert result == g.SendResult(
        ok=False, gateway="udp", error="device has no UDP address", final=True
    )
    assert transport.sent == []


@pytest.mark.asyncio
async def test_udp_malformed_address_is_final() -> None:
    gateway, transport = udp_gateway()
    result = await gateway.send(replace(ITEM, udp_address="no-port"))
    assert not result.ok
    assert result.final
    assert transport.sent == []


@pytest.mark.asyncio
async def test_udp_without_socket_is_not_final() -> None:
    gateway = g.UdpGateway(secret_for=lambda device: None, on_ack=lambda ack, peer: None)
    result = await gateway.send(ITEM)
    assert result == g.SendResult(ok=False, gateway="udp", error="UDP socket is closed")


@pytest.mark.asyncio
async def test_smtp_device_without_address_is_final() -> None:
    gateway = g.SmtpGateway(host="127.0.0.1", port=1, sender_address="p@example.org")
    result = await gateway.send(replace(ITEM, email_address=None))
    assert result == g.SendResult(
        ok=False, gateway="smtp", error="device has no email address", final=True
    )


@pytest.mark.asyncio
async def test_smtp_refuses_oversized_without_connecting() -> None:
    gateway = g.SmtpGateway(host="127.0.0.1", port=1, sender_address="p@example.org")
    result = await gateway.send(replace(ITEM, content="x" * MAX_DATAGRAM))
    assert not result.ok
    assert result.final
    assert result.error is not None
    assert "too large" in result.error


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:5001", ("127.0.0.1", 5001)),
        ("[::1]:5001", ("::1", 5001)),
        ("truck-17.example.org:9", ("truck-17.example.org", 9)),
    ],
)
def test_split_address(address: str, expected: tuple[str, int]) -> None:
    assert g.split_address(address) == expected


@pytest.mark.parametrize("address", ["", "host", ":5001", "host:0", "host:65536", "host:x"])
def test_split_address_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="bad UDP address"):
        g.split_address(address)


def test_format_peer() -> None:
    assert format_peer(("127.0.0.1", 9)) == "127.0.0.1:9"
    assert format_peer(("::1", 9, 0, 0)) == "[::1]:9"


def test_smtp_repr_hides_password() -> None:
    gateway = g.SmtpGateway(
        host="localhost", sender_address="p@example.org", username="u", password="hunter2"
    )
    assert "hunter2" not in repr(gateway)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example", ("mail.example", 25, False, None, "pushsync@mail.example")),
        (
            "smtp+starttls://bot%40x@mail.example?from=Bot%20%3Cbot@x.example%3E",
            ("mail.example", 587, True, "bot@x", "Bot <bot@x.example>"),
        ),
        ("SMTP://mail.example:2525/", ("mail.example", 2525, False, None, "pushsync@mail.example")),
    ],
)
def test_smtp_url(url: str, expected: tuple[object, ...]) -> None:
    gateway = g.smtp_from_url(url)
    found = (gateway.host, gateway.port, gateway.starttls, gateway.username)
    assert (*found, gateway.sender_address) == expected


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://mail.example", "--smtp: expected smtp://… or smtp+starttls://…, not 'http'"),
        ("smtp://mail.example:99999", "--smtp: bad port"),
        ("smtp://:25", "--smtp: a host is needed"),
        ("smtp://mail.example/inbox", "--smtp: no path"),
        ("smtp://mail.example?to=x@y.example", "--smtp: unknown option 'to' (known: from)"),
        ("smtp://mail.example?from=nobody", "--smtp: from='nobody' is not an email address"),
        ("smtp://:secret@mail.example", "--smtp: a password needs a user: smtp://USER@HOST"),
    ],
)
def test_bad_smtp_urls_say_what_is_wrong_never_the_password(url: str, says: str) -> None:
    with pytest.raises(UsageError) as caught:
        g.smtp_from_url(url)
    assert str(caught.value).startswith(says)
    assert "secret" not in str(caught.value)


def test_an_smtp_password_file_wins_over_the_url() -> None:
    gateway = g.smtp_from_url("smtp://bot:in-url@mail.example", password="from-file")
    assert gateway.password == "from-file"
    assert "from-file" not in repr(gateway)
    assert "in-url" not in repr(gateway)
