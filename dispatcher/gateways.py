"""Gateways: how the dispatcher hands one claimed notification to one device.

Every gateway has the same narrow interface (:class:`Gateway`): a ``name`` and
``async send(item) -> SendResult``. A failed send is a result, not an
exception; ``final`` says whether trying again could help. The UDP gateway also
receives the devices' signed acks on the socket it sends from; the SMTP gateway
sends a plain-text email with the signed envelope in a header. Encoding and
verification are the pure functions of :mod:`pushsync.wire.protocol`;
``docs/protocol.md`` has the wire format.

Secrets (device secrets, the SMTP password) never appear in a log line or in a
result's error text.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import ipaddress
import logging
import re
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from datetime import datetime
from email.message import EmailMessage
from typing import Any, Final, Protocol, cast

from pushsync.dispatcher.acks import (
    AckHandler,
    AckVerifier,
    SecretFetch,
    SecretLookup,
)
from pushsync.dispatcher.outbox import Claimed
from pushsync.dispatcher.urls import parse_server_url
from pushsync.errors import UsageError
from pushsync.logs import Throttle
from pushsync.wire import protocol
from pushsync.wire.addresses import format_peer, parse_address
from pushsync.wire.limits import MAX_DATAGRAM

logger = logging.getLogger(__name__)

DEFAULT_SENDER = "pushsync"
MAX_TARGETS: Final = 100_000
"""Parsed UDP addresses kept (then forgotten all at once and parsed again)."""


# --------------------------------------------------------------------------- interface


@dataclass(frozen=True, slots=True, kw_only=True)
class SendResult:
    """What became of one send. ``final``: retrying through this gateway cannot help."""

    ok: bool
    gateway: str
    error: str | None = None
    final: bool = False


def sent(gateway: str) -> SendResult:
    return SendResult(ok=True, gateway=gateway)


def failed(gateway: str, error: str, *, final: bool) -> SendResult:
    return SendResult(ok=False, gateway=gateway, error=error, final=final)


class Gateway(Protocol):
    """Sends claimed notifications to devices."""

    name: str

    async def send(self, item: Claimed) -> SendResult: ...


def to_message(item: Claimed, sender: str = DEFAULT_SENDER) -> protocol.Message:
    """The protocol message of a claimed outbox row (times to the millisecond)."""
    return protocol.Message(
        request_id=item.request_id,
        device=item.device_id,
        subject=item.subject,
        content=item.content,
        sender=sender,
        priority=_priority(item.priority),
        created=_seconds(item.created_at, "created_at"),
        expires=_seconds(item.expires_at, "expires_at"),
    )


def _priority(text: str) -> protocol.Priority:
    for priority in protocol.PRIORITIES:
        if priority == text:
            return priority
    raise protocol.Malformed("priority must be low, normal or high")


def _seconds(moment: datetime, what: str) -> float:
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return round(moment.timestamp() * 1000) / 1000


# --------------------------------------------------------------------------- UDP


@dataclass(slots=True)
class AckStats:
    """Counters of the datagrams that arrived on the UDP gateway's socket."""

    accepted: int = 0
    dropped: int = 0
    handler_errors: int = 0
    lookups: int = 0
    """Acks whose device secret had to be fetched from the database."""


class UdpGateway:
    """Sends one signed datagram per message; receives acks on the same socket.

    Create it with :meth:`bind` (or attach a transport yourself with
    :meth:`attach`); :meth:`close` closes the socket.
    """

    def __init__(
        self,
        *,
        secret_for: SecretLookup,
        on_ack: AckHandler,
        fetch_secret: SecretFetch | None = None,
        sender: str = DEFAULT_SENDER,
        limit: int = MAX_DATAGRAM,
        name: str = "udp",
    ) -> None:
        self.name = name
        self.sender = sender
        self.limit = limit
        self.stats = AckStats()
        self._on_ack = on_ack
        self._acks = AckVerifier(
            secret_for=secret_for,
            fetch_secret=fetch_secret,
            accept=self._accept,
            drop=self._drop,
            stats=self.stats,
            limit=limit,
        )
        self._transport: asyncio.DatagramTransport | None = None
        self._targets: dict[str, tuple[Any, ...]] = {}
        """Socket addresses of the IP-literal addresses sent to, by address text."""
        self._log = Throttle(logger)
        """Anyone can send datagrams: at most one line per kind of drop and interval."""

    @classmethod
    async def bind(
        cls,
        local_addr: tuple[str, int] | None = None,
        *,
        sock: socket.socket | None = None,
        secret_for: SecretLookup,
        on_ack: AckHandler,
        fetch_secret: SecretFetch | None = None,
        sender: str = DEFAULT_SENDER,
        limit: int = MAX_DATAGRAM,
    ) -> UdpGateway:
        """A gateway on a new socket bound to ``local_addr``, or on the given ``sock``.

        Acks are verified with ``secret_for`` (no I/O); when it does not know the
        device, ``fetch_secret`` (if given) asks the database, at most
        :data:`~pushsync.dispatcher.acks.MAX_LOOKUPS` at a time.
        """
        gateway = cls(
            secret_for=secret_for,
            on_ack=on_ack,
            fetch_secret=fetch_secret,
            sender=sender,
            limit=limit,
        )
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _AckProtocol(gateway), local_addr=local_addr, sock=sock
        )
        enlarge_receive_buffer(transport)
        return gateway

    def attach(self, transport: asyncio.DatagramTransport) -> None:
        """Send through ``transport`` from now on."""
        self._transport = transport

    @property
    def local_address(self) -> tuple[str, int]:
        """The (host, port) the socket is bound to."""
        if self._transport is None:
            raise RuntimeError("the UDP gateway has no socket")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    async def send(self, item: Claimed) -> SendResult:
        result = self.send_now(item)
        if result is not None:
            return result
        # A host name: resolved through getaddrinfo, in a thread.
        data = self._encode(item)
        if isinstance(data, SendResult):
            return data
        return await self._send_datagram(data, str(item.udp_address))

    def send_now(self, item: Claimed) -> SendResult | None:
        """Send at once, without waiting: what :meth:`send` does when the address is an
        IP literal (the usual case: tracked addresses are). None when the address is a
        host name that needs a lookup; then :meth:`send` does it."""
        address = item.udp_address
        if not address:
            return failed(self.name, "device has no UDP address", final=True)
        transport = self._transport
        if transport is None or transport.is_closing():
            return failed(self.name, "UDP socket is closed", final=False)
        target = self._targets.get(address)
        if target is None:
            try:
                target = self._literal_target(address, transport)
            except ValueError as exc:
                return failed(self.name, str(exc), final=True)
            if target is None:
                return None
        data = self._encode(item)
        if isinstance(data, SendResult):
            return data
        transport.sendto(data, target)
        return sent(self.name)

    def _encode(self, item: Claimed) -> bytes | SendResult:
        """The signed datagram of ``item``, or the final failure that prevents it."""
        try:
            return protocol.encode_message(
                to_message(item, self.sender), item.secret, limit=self.limit
            )
        except protocol.Oversized:
            size = protocol.encoded_size(to_message(item, self.sender))
            error = f"message too large for UDP ({size} bytes > {self.limit})"
            return failed(self.name, error, final=True)
        except protocol.ProtocolError as exc:
            return failed(self.name, f"cannot encode: {exc}", final=True)

    def _literal_target(
        self, address: str, transport: asyncio.DatagramTransport
    ) -> tuple[Any, ...] | None:
        """The socket address of ``address`` if it is an IP literal the socket can send
        to, remembered for the next datagram; None for a host name. ValueError if
        ``address`` is malformed."""
        host, port = split_address(address)
        target = _literal(host, port, transport)
        if target is not None:
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            self._targets[address] = target
        return target

    async def _send_datagram(self, data: bytes, address: str) -> SendResult:
        transport = self._transport
        if transport is None or transport.is_closing():
            return failed(self.name, "UDP socket is closed", final=False)
        try:
            host, port = split_address(address)
        except ValueError as exc:
            return failed(self.name, str(exc), final=True)
        try:
            target = await _resolve(host, port, transport)
        except OSError as exc:
            return failed(self.name, f"cannot resolve {host!r}: {exc}", final=False)
        transport.sendto(data, target)
        return sent(self.name)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._acks.close()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Verify an ack and hand it on; drop anything else. Never raises."""
        self._acks.verify(data, format_peer(addr))

    def _accept(self, ack: protocol.Ack, peer: str) -> None:
        self.stats.accepted += 1
        try:
            self._on_ack(ack, peer)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("ack handler failed for %s from %s", ack.request_id, peer)

    def _drop(self, peer: str, exc: protocol.ProtocolError) -> None:
        self.stats.dropped += 1
        self._log.warning(
            "dropped UDP datagram from %s: %s: %s",
            peer,
            type(exc).__name__,
            exc,
            key=type(exc).__name__,
        )


class _AckProtocol(asyncio.DatagramProtocol):
    """The asyncio side of :class:`UdpGateway`'s socket."""

    def __init__(self, gateway: UdpGateway) -> None:
        self.gateway = gateway

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not a DatagramTransport subclass before Python 3.13, but one in all but name.
        self.gateway.attach(cast(asyncio.DatagramTransport, transport))

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.gateway.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable for an earlier datagram: the resend covers it.
        logger.debug("UDP socket error: %s", exc)


RECEIVE_BUFFER: Final = 4 * 1024 * 1024
"""Bytes asked for the UDP socket's receive buffer: the acks of a whole batch arrive
in one burst, and the default buffer (about 200 KiB, some 250 acks) drops the rest."""


def enlarge_receive_buffer(transport: asyncio.BaseTransport) -> int:
    """Ask for :data:`RECEIVE_BUFFER` bytes of receive buffer; the size the kernel granted.

    The kernel caps the request at ``net.core.rmem_max``; raise that sysctl for
    more. Failure is not fatal: the size stays what it was.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    except OSError as exc:
        logger.debug("cannot enlarge the UDP receive buffer: %s", exc)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted


def split_address(address: str, *, lowest_port: int = 1) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` as (host, port); ValueError if malformed."""
    found = parse_address(address, lowest_port=lowest_port)
    if found is None:
        raise ValueError(f"bad UDP address {address!r}: expected HOST:PORT or [V6]:PORT")
    return found.host, found.port


def _literal(host: str, port: int, transport: asyncio.DatagramTransport) -> tuple[Any, ...] | None:
    """The socket address of ``host`` if it is an IP literal of the socket's own family
    (no lookup needed), else None."""
    sock = transport.get_extra_info("socket")
    family = sock.family if sock is not None else socket.AF_UNSPEC
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        return None
    if literal.version == 4 and family == socket.AF_INET:
        return (host, port)
    if literal.version == 6 and family == socket.AF_INET6:
        return (host, port, 0, 0)
    return None


async def _resolve(host: str, port: int, transport: asyncio.DatagramTransport) -> Any:
    """The first address of ``host`` the socket's address family can send to.

    An IP literal of the socket's own family needs no lookup (the usual case:
    tracked addresses are literals); anything else goes through getaddrinfo,
    which asyncio runs in a thread.
    """
    target = _literal(host, port, transport)
    if target is not None:
        return target
    sock = transport.get_extra_info("socket")
    family = sock.family if sock is not None else socket.AF_UNSPEC
    flags = socket.AI_V4MAPPED if family == socket.AF_INET6 else 0
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=family, type=socket.SOCK_DGRAM, flags=flags
    )
    if not infos:
        raise OSError("no address")
    return infos[0][4]


# --------------------------------------------------------------------------- SMTP


class _SmtpFailure(Exception):
    """A failed SMTP session, already described and classified."""

    def __init__(self, error: str, *, final: bool) -> None:
        super().__init__(error)
        self.error = error
        self.final = final


@dataclass(kw_only=True)
class SmtpGateway:
    """Sends each message as a plain-text email through an SMTP server.

    ``starttls`` upgrades the connection before AUTH; ``username``/``password``
    enable AUTH. The password is kept out of ``repr``, logs and error texts.
    """

    host: str
    port: int = 25
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sender_address: str
    timeout: float = 30.0
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)
    local_hostname: str | None = None
    sender: str = DEFAULT_SENDER
    name: str = "smtp"

    async def send(self, item: Claimed) -> SendResult:
        if not item.email_address:
            return failed(self.name, "device has no email address", final=True)
        try:
            mail = self.build_email(item)
        except protocol.Oversized as exc:
            return failed(self.name, f"message too large: {exc}", final=True)
        except protocol.ProtocolError as exc:
            return failed(self.name, f"cannot encode: {exc}", final=True)
        try:
            await asyncio.to_thread(self._deliver, mail, item.email_address)
        except _SmtpFailure as exc:
            error = self._scrub(exc.error)
            logger.info("SMTP send of %s failed: %s", item.request_id, error)
            return failed(self.name, error, final=exc.final)
        return sent(self.name)

    def build_email(self, item: Claimed) -> EmailMessage:
        """The email of ``item``: Subject, body and the signed envelope header."""
        if item.email_address is None:
            raise ValueError(f"{item.request_id} has no email address")
        msg = to_message(item, self.sender)
        mail = EmailMessage()
        for header, value in protocol.email_headers(msg, item.secret).items():
            mail[header] = value
        mail["From"] = self.sender_address
        mail["To"] = item.email_address
        mail["Date"] = email.utils.formatdate(msg.created, usegmt=True)
        mail["Message-ID"] = email.utils.make_msgid(
            idstring=item.request_id.hex, domain=_domain(self.sender_address)
        )
        mail.set_content(msg.content)
        return mail

    def _deliver(self, mail: EmailMessage, to: str) -> None:
        """Blocking: one SMTP session sending ``mail``; :class:`_SmtpFailure` on error."""
        try:
            with smtplib.SMTP(
                self.host, self.port, timeout=self.timeout, local_hostname=self.local_hostname
            ) as smtp:
                if self.starttls:
                    smtp.starttls(context=self.tls_context or ssl.create_default_context())
                if self.username is not None:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(mail, from_addr=self.sender_address, to_addrs=[to])
        except smtplib.SMTPRecipientsRefused as exc:
            raise _refused(exc) from None
        except smtplib.SMTPResponseException as exc:
            raise _response_failure(exc) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise _SmtpFailure(f"SMTP {type(exc).__name__}: {exc}", final=False) from None

    def _scrub(self, text: str) -> str:
        """``text`` without the password in any form AUTH sends it."""
        if not self.password:
            return text
        secrets = {self.password, _b64(self.password)}
        if self.username is not None:
            secrets.add(_b64(f"\0{self.username}\0{self.password}"))
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        return text


def _refused(exc: smtplib.SMTPRecipientsRefused) -> _SmtpFailure:
    """Permanent (5xx) refusals are final; temporary ones (4xx, e.g. greylisting) are not."""
    replies = [(code, _text(reply)) for code, reply in exc.recipients.values()]
    detail = "; ".join(f"{code} {reply}" for code, reply in replies)
    permanent = all(code >= 500 for code, _ in replies)
    return _SmtpFailure(f"recipient refused: {detail}", final=permanent)


def _response_failure(exc: smtplib.SMTPResponseException) -> _SmtpFailure:
    """A 5xx refusal of the message itself is final; of the sender or AUTH it is not.

    A refused sender or failed login is the gateway's configuration, not this
    message: an operator can fix it, and the message may still go through.
    """
    message_refused = isinstance(exc, smtplib.SMTPDataError) and exc.smtp_code >= 500
    what = "message refused" if message_refused else type(exc).__name__
    return _SmtpFailure(
        f"SMTP {what}: {exc.smtp_code} {_text(exc.smtp_error)}", final=message_refused
    )


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _domain(address: str) -> str:
    _, _, domain = email.utils.parseaddr(address)[1].rpartition("@")
    return domain or "localhost"


# --------------------------------------------------------------------------- SMS by email

_PHONE_SEPARATORS = re.compile(r"[\s-]")
_PHONE = re.compile(r"\+?[0-9]{3,15}\Z")
_PREFIX = re.compile(r"[A-Za-z0-9._+-]*\Z")
_DOMAIN = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+\Z")


def sms_address(phone: str, carrier_prefix: str, carrier_domain: str) -> str:
    """``<prefix><phone>@<domain>``: the address a carrier turns into an SMS.

    As MobiLink's carrier properties ``sms_email_user_prefix`` and
    ``sms_email_domain``. Spaces and dashes in ``phone`` are removed, and so is
    a leading ``+`` (carriers' gateways take digits); UsageError if the result
    is not 3 to 15 digits, or the prefix or domain cannot be part of an address.
    """
    number = _PHONE_SEPARATORS.sub("", phone)
    if not _PHONE.match(number):
        raise UsageError(f"bad phone number {phone!r}: expected digits, optionally a leading +")
    if not _PREFIX.match(carrier_prefix):
        raise UsageError(f"bad carrier prefix {carrier_prefix!r}")
    if not _DOMAIN.match(carrier_domain):
        raise UsageError(f"bad carrier domain {carrier_domain!r}")
    return f"{carrier_prefix}{number.removeprefix('+')}@{carrier_domain.lower()}"


# --------------------------------------------------------------------------- --smtp URL

SMTP_SCHEMES: Final = {"smtp": False, "smtp+starttls": True}


def smtp_from_url(url: str, *, password: str | None = None) -> SmtpGateway:
    """The SMTP gateway ``--smtp`` describes.

    ``smtp://[USER@]HOST[:PORT]?from=ADDRESS`` — plain SMTP (port 25 by
    default); ``smtp+starttls://…`` upgrades with STARTTLS first (port 587 by
    default). ``from`` is the envelope and header sender (default
    ``pushsync@HOST``). The password comes from ``password`` (the daemon reads
    ``--smtp-password-file``) or, discouraged because command lines are
    visible to other users, from the URL. UsageError naming what is wrong;
    the message never repeats the password.
    """
    try:
        found = parse_server_url(
            url,
            schemes=SMTP_SCHEMES,
            options=("from",),
            form="smtp://[USER@]HOST[:PORT][?from=ADDRESS]",
            password=password,
        )
    except UsageError as exc:
        raise UsageError(f"--smtp: {exc}") from None
    sender = found.options.get("from", f"pushsync@{found.host}")
    if "@" not in email.utils.parseaddr(sender)[1]:
        raise UsageError(f"--smtp: from={sender!r} is not an email address")
    starttls = SMTP_SCHEMES[found.scheme]
    return SmtpGateway(
        host=found.host,
        port=found.port or (587 if starttls else 25),
        starttls=starttls,
        username=found.username,
        password=found.password,
        sender_address=sender,
    )


def describe_smtp(gateway: SmtpGateway) -> str:
    """For log lines: scheme, user, host and port — never the password."""
    scheme = "smtp+starttls" if gateway.starttls else "smtp"
    user = f"{gateway.username}@" if gateway.username else ""
    return f"{scheme}://{user}{gateway.host}:{gateway.port} from {gateway.sender_address}"
