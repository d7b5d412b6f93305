"""Gateways over real sockets on 127.0.0.1: UDP datagrams and acks, SMTP to aiosmtpd.

No database: these tests need only the loopback interface.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from pushsync.dispatcher import gateways as g
from pushsync.dispatcher.outbox import Claimed
from pushsync.wire import protocol

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
PASSWORD = "correct horse battery staple"
WAIT = 2.0


def claimed(**changes: Any) -> Claimed:
    now = datetime.now(UTC)
    item = Claimed(
        request_id=uuid.uuid4(),
        rule="route_disruption",
        device_id="truck-17",
        subject="sync",
        content="disruption 42 on route A7",
        priority="high",
        gateway="auto",
        created_at=now,
        expires_at=now + timedelta(hours=1),
        attempts=0,
        secret=SECRET,
        udp_address=None,
        email_address="truck-17@example.org",
    )
    return replace(item, **changes)


# --------------------------------------------------------------------------- UDP


class _Inbox(asyncio.DatagramProtocol):
    """A UDP socket playing the device: queues what arrives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, addr))


class Device:
    def __init__(self, transport: asyncio.DatagramTransport, inbox: _Inbox) -> None:
        self.transport = transport
        self.inbox = inbox

    @property
    def address(self) -> str:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def receive(self) -> tuple[bytes, Any]:
        return await asyncio.wait_for(self.inbox.queue.get(), WAIT)


class Acks:
    """What the gateway's on_ack callback was given."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[protocol.Ack, str]] = asyncio.Queue()

    def __call__(self, ack: protocol.Ack, peer: str) -> None:
        self.queue.put_nowait((ack, peer))

    async def next(self) -> tuple[protocol.Ack, str]:
        return await asyncio.wait_for(self.queue.get(), WAIT)


def secret_for(device: str) -> bytes | None:
    return SECRET if device == "truck-17" else None


@pytest_asyncio.fixture
async def device() -> AsyncIterator[Device]:
    loop = asyncio.get_running_loop()
    transport, inbox = await loop.create_datagram_endpoint(_Inbox, local_addr=("127.0.0.1", 0))
    yield Device(transport, inbox)
    transport.close()


@pytest_asyncio.fixture
async def acks() -> Acks:
    return Acks()


@pytest_asyncio.fixture
async def udp(acks: Acks) -> AsyncIterator[g.UdpGateway]:
    gateway = await g.UdpGateway.bind(("127.0.0.1", 0), secret_for=secret_for, on_ack=acks)
    yield gateway
    gateway.close()


def ack_bytes(item: Claimed, *, device: str = "truck-17", secret: bytes = SECRET) -> bytes:
    ack = protocol.Ack(request_id=item.request_id, device=device, confirmed=time.time())
    return protocol.encode_ack(ack, secret)


@pytest.mark.asyncio
async def test_udp_datagram_reaches_the_device_signed(udp: g.UdpGateway, device: Device) -> None:
    item = claimed(udp_address=device.address)
    result = await udp.send(item)
    assert result == g.SendResult(ok=True, gateway="udp")
    data, addr = await device.receive()
    assert addr[1] == udp.local_address[1]
    msg = protocol.decode_message(data, SECRET, time.time())
    assert msg == g.to_message(item)
    assert (msg.request_id, msg.device, msg.subject, msg.content, msg.priority) == (
        item.request_id,
        "truck-17",
        "sync",
        "disruption 42 on route A7",
        "high",
    )
    with pytest.raises(protocol.BadSignature):
        protocol.decode_message(data, OTHER, time.time())


@pytest.mark.asyncio
async def test_udp_resolves_host_names(udp: g.UdpGateway, device: Device) -> None:
    port = device.transport.get_extra_info("sockname")[1]
    item = claimed(udp_address=f"localhost:{port}")
    assert (await udp.send(item)).ok
    data, _ = await device.receive()
    assert protocol.decode_message(data, SECRET, time.time()).request_id == item.request_id


@pytest.mark.asyncio
async def test_udp_ipv6(acks: Acks) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    loop = asyncio.get_running_loop()
    try:
        transport, inbox = await loop.create_datagram_endpoint(_Inbox, local_addr=("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    gateway = await g.UdpGateway.bind(("::1", 0), secret_for=secret_for, on_ack=acks)
    try:
        port = transport.get_extra_info("sockname")[1]
        item = claimed(udp_address=f"[::1]:{port}")
        assert (await gateway.send(item)).ok
        data, _ = await asyncio.wait_for(inbox.queue.get(), WAIT)
        assert protocol.decode_message(data, SECRET, time.time()).request_id == item.request_id
    finally:
        gateway.close()
        transport.close()


@pytest.mark.asyncio
async def test_udp_ack_reaches_on_ack(udp: g.UdpGateway, device: Device, acks: Acks) -> None:
    item = claimed(udp_address=device.address)
    await udp.send(item)
    _, gateway_addr = await device.receive()
    device.transport.sendto(ack_bytes(item), gateway_addr)
    ack, peer = await acks.next()
    assert ack.request_id == item.request_id
    assert ack.device == "truck-17"
    assert peer == device.address
    assert (udp.stats.accepted, udp.stats.dropped) == (1, 0)


@pytest.mark.asyncio
async def test_udp_drops_bad_acks_and_keeps_working(
    udp: g.UdpGateway, device: Device, acks: Acks, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    item = claimed(udp_address=device.address)
    target = udp.local_address
    bad = [
        b"garbage",
        ack_bytes(item, secret=OTHER),  # forged: signed with another secret
        ack_bytes(item, device="truck-99", secret=OTHER),  # a device with no secret here
        protocol.encode_message(g.to_message(item), SECRET),  # a message, not an ack
    ]
    for data in bad:
        device.transport.sendto(data, target)
    device.transport.sendto(ack_bytes(item), target)  # loopback keeps the order
    ack, _ = await acks.next()
    assert ack.request_id == item.request_id
    assert acks.queue.empty()
    assert (udp.stats.accepted, udp.stats.dropped) == (1, len(bad))
    drops = [r for r in caplog.records if r.name == g.__name__ and "dropped" in r.message]
    assert len(drops) == len(bad)
    assert {r.message.split(": ")[1] for r in drops} == {
        "Malformed",
        "BadSignature",
        "UnknownDevice",
    }
    for secret in (SECRET, OTHER):
        assert secret.hex() not in caplog.text
    # still sending and receiving afterwards
    assert (await udp.send(item)).ok
    await device.receive()
    device.transport.sendto(ack_bytes(item), target)
    assert (await acks.next())[0].request_id == item.request_id


@pytest.mark.asyncio
async def test_udp_lookup_and_handler_errors_are_contained(device: Device) -> None:
    arrived = Acks()
    calls = 0

    def flaky(ack: protocol.Ack, peer: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        arrived(ack, peer)

    def lookup(device_id: str) -> bytes | None:
        if device_id == "truck-17":
            return SECRET
        raise KeyError(device_id)

    gateway = await g.UdpGateway.bind(("127.0.0.1", 0), secret_for=lookup, on_ack=flaky)
    try:
        item = claimed(udp_address=device.address)
        for data in (ack_bytes(item, device="truck-99"), ack_bytes(item), ack_bytes(item)):
            device.transport.sendto(data, gateway.local_address)
        await arrived.next()
        assert gateway.stats == g.AckStats(accepted=2, dropped=1, handler_errors=1)
    finally:
        gateway.close()


# --------------------------------------------------------------------------- SMTP


class _Controller(Controller):
    """aiosmtpd's threaded controller, on the port the OS picked for port 0.

    aiosmtpd 1.4 connects to ``self.port`` to check that the server answers,
    which fails for port 0; learn the real port first.
    """

    def _trigger_server(self) -> None:
        assert isinstance(self.server, asyncio.Server)
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()  # type: ignore[no-untyped-call]  # untyped in aiosmtpd 1.4


class MailSink:
    """An aiosmtpd handler that keeps every message and refuses ``refused@…``."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, EmailMessage]] = []
        self.logins: list[tuple[bytes, bytes]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address.startswith("refused@"):
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.original_content, bytes)
        mail = message_from_bytes(envelope.original_content, policy=policy.default)
        assert isinstance(mail, EmailMessage)
        self.messages.append((envelope, mail))
        return "250 Message accepted"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password))
        ok = data.login == b"pushsync" and data.password == PASSWORD.encode()
        return AuthResult(success=ok, handled=False)


@pytest.fixture
def sink() -> MailSink:
    return MailSink()


def start_server(sink: MailSink, **kwargs: Any) -> _Controller:
    controller = _Controller(sink, hostname="127.0.0.1", port=0, **kwargs)
    controller.start()
    return controller


@pytest.fixture
def smtp_server(sink: MailSink) -> Iterator[_Controller]:
    controller = start_server(sink)
    yield controller
    controller.stop()


@pytest.fixture
def auth_server(sink: MailSink) -> Iterator[_Controller]:
    controller = start_server(
        sink, authenticator=sink.authenticate, auth_require_tls=False, auth_required=False
    )
    yield controller
    controller.stop()


def smtp_gateway(port: int, **kwargs: Any) -> g.SmtpGateway:
    return g.SmtpGateway(
        host="127.0.0.1",
        port=port,
        sender_address="pushsync@dispatch.example.org",
        timeout=WAIT,
        local_hostname="dispatcher.test",
        **kwargs,
    )


@pytest.mark.asyncio
async def test_smtp_mail_is_signed_and_readable(smtp_server: _Controller, sink: MailSink) -> None:
    item = claimed(subject="route  changed", content="take A7\nthen B2 — ok 😀")
    result = await smtp_gateway(smtp_server.port).send(item)
    assert result == g.SendResult(ok=True, gateway="smtp")
    [(envelope, mail)] = sink.messages
    assert envelope.mail_from == "pushsync@dispatch.example.org"
    assert envelope.rcpt_tos == ["truck-17@example.org"]
    assert mail["To"] == "truck-17@example.org"
    assert mail["From"] == "pushsync@dispatch.example.org"
    assert mail["Subject"] == "route changed"
    assert mail["Message-ID"].endswith("@dispatch.example.org>")
    body = mail.get_content()
    assert body.replace("\r\n", "\n").rstrip("\n") == "take A7\nthen B2 — ok 😀"
    assert mail.get_content_type() == "text/plain"
    msg = protocol.message_from_email(
        mail["Subject"], body, mail[protocol.ENVELOPE_HEADER], SECRET, time.time()
    )
    assert msg == g.to_message(item)
    with pytest.raises(protocol.BadSignature):
        protocol.message_from_email(
            mail["Subject"], body, mail[protocol.ENVELOPE_HEADER], OTHER, time.time()
        )


@pytest.mark.asyncio
async def test_smtp_auth_uses_the_password_and_never_logs_it(
    auth_server: _Controller, sink: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway = smtp_gateway(auth_server.port, username="pushsync", password=PASSWORD)
    assert (await gateway.send(claimed())).ok
    assert sink.logins == [(b"pushsync", PASSWORD.encode())]
    assert len(sink.messages) == 1

    wrong = smtp_gateway(auth_server.port, username="pushsync", password="not " + PASSWORD)
    result = await wrong.send(claimed())
    assert not result.ok
    assert not result.final
    assert result.error is not None
    assert "535" in result.error
    assert PASSWORD not in result.error
    assert len(sink.messages) == 1
    for text in (PASSWORD, g._b64(PASSWORD), g._b64(f"\0pushsync\0{PASSWORD}")):
        assert text not in caplog.text


@pytest.mark.asyncio
async def test_smtp_refused_recipient_is_final(smtp_server: _Controller, sink: MailSink) -> None:
    item = claimed(email_address="refused@example.org")
    result = await smtp_gateway(smtp_server.port).send(item)
    assert not result.ok
    assert result.final
    assert result.error == "recipient refused: 550 5.1.1 no such mailbox"
    assert sink.messages == []


@pytest.mark.asyncio
async def test_smtp_server_down_is_not_final() -> None:
    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        result = await smtp_gateway(bound.getsockname()[1]).send(claimed())
    assert not result.ok
    assert not result.final
    assert result.error is not None
    assert "ConnectionRefusedError" in result.error


@pytest.mark.asyncio
async def test_smtp_silent_server_times_out_not_final() -> None:
    with socket.socket() as silent:  # accepts connections, never greets
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        gateway = replace(smtp_gateway(silent.getsockname()[1]), timeout=0.2)
        result = await gateway.send(claimed())
    assert not result.ok
    assert not result.final
    assert result.error is not None
    assert "timed out" in result.error
