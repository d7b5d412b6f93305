"""The listener's channels: how signed envelopes reach :class:`~pushsync.listener.runtime.Listener`.

Each channel is a thin shell around :mod:`pushsync.listener.protocol`: it turns
what arrived into a verified :class:`~pushsync.listener.protocol.Message` (or a
counted, logged rejection) and hands it to the listener's ``handle``. Nothing a
peer sends can raise out of a channel.

* :class:`UdpChannel` — one envelope per datagram on ``channels.udp.bind``.
  The ack for a message goes back, as one datagram, to the address and port
  the message came from (the dispatcher receives acks on the socket it sends
  from).
* :class:`MaildirChannel` — polls ``channels.maildir.path``. Every file in
  ``new/`` is read as an email (:mod:`email`, ``policy.default``), verified
  with :func:`~pushsync.listener.protocol.message_from_email`, handled, and
  then moved to ``cur/``: with the Maildir flag ``S`` (seen) when it was
  handled or was a duplicate, ``T`` (trashed) when it was rejected. Email
  has no way back, so no ack is sent for a mail.

The SYNC, IMAP and poll channels are not implemented yet; the runtime logs
that once and runs with the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from email import message_from_bytes, policy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from pushsync.listener import protocol
from pushsync.listener.config import Address
from pushsync.listener.limits import MAX_DATAGRAM

if TYPE_CHECKING:
    from pushsync.listener.runtime import Listener

logger = logging.getLogger(__name__)

MAX_MAIL: Final = 256 * 1024
"""Largest mail file read; a signed message is at most 1,200 bytes plus headers."""

DEFAULT_MAILDIR_POLL: Final = 1.0
"""Seconds between two looks into ``new/``."""


def format_peer(addr: Any) -> str:
    """A socket address as ``host:port`` (``[v6]:port``)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr)


# --------------------------------------------------------------------------- UDP


class UdpChannel(asyncio.DatagramProtocol):
    """Receives message datagrams on ``bind``; acks go back to each sender's address."""

    name = "udp"

    def __init__(self, listener: Listener, bind: Address) -> None:
        self.listener = listener
        self.bind = bind
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Bind the socket (port 0 picks a free port: see :attr:`address`)."""
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self, local_addr=(self.bind.host, self.bind.port)
        )

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the socket is bound to."""
        if self._transport is None:
            raise RuntimeError("the UDP channel is not started")
        host, port = self._transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not a DatagramTransport subclass before Python 3.13, but one in all but name.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Verify one datagram and hand its message on. Never raises."""
        peer = format_peer(addr)
        listener = self.listener
        msg = listener.verify(
            lambda: protocol.decode_message(
                data, listener.secret, listener.clock(), limit=MAX_DATAGRAM
            ),
            channel=self.name,
            peer=peer,
        )
        if msg is not None:
            listener.spawn(msg, reply=self._replier(addr, peer), channel=self.name, peer=peer)

    def error_received(self, exc: Exception) -> None:
        # e.g. ICMP port unreachable for an earlier ack: the sender resends.
        logger.debug("udp: socket error: %s", exc)

    def _replier(self, addr: Any, peer: str) -> Callable[[bytes], None]:
        def reply(data: bytes) -> None:
            transport = self._transport
            if transport is None or transport.is_closing():
                logger.warning("udp: cannot ack to %s: the socket is closed", peer)
                return
            transport.sendto(data, addr)

        return reply

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# --------------------------------------------------------------------------- Maildir


class MaildirChannel:
    """Polls a Maildir's ``new/`` every ``poll`` seconds; see the module docstring."""

    name = "maildir"

    def __init__(
        self, listener: Listener, path: Path, *, poll: float = DEFAULT_MAILDIR_POLL
    ) -> None:
        self.listener = listener
        self.path = path
        self.poll = poll
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()

    async def start(self) -> None:
        for sub in ("tmp", "new", "cur"):
            (self.path / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
        self._task = asyncio.create_task(self._loop(), name="pushsync maildir channel")

    async def _loop(self) -> None:
        while not self._closing.is_set():
            try:
                await self.scan()
            except Exception:  # a broken maildir must not stop the listener
                logger.exception("maildir: cannot scan %s", self.path)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.poll)

    async def scan(self) -> int:
        """Take every mail now in ``new/``, oldest name first; how many were taken."""
        new = self.path / "new"
        names = sorted(name for name in os.listdir(new) if not name.startswith("."))
        taken = 0
        for name in names:
            if self._closing.is_set():
                break
            await self._take(new / name)
            taken += 1
        return taken

    async def _take(self, file: Path) -> None:
        peer = file.name
        try:
            with file.open("rb") as stream:
                data = stream.read(MAX_MAIL + 1)
        except FileNotFoundError:
            return  # taken by someone else meanwhile
        except OSError as exc:
            logger.warning("maildir: cannot read %s: %s", file, exc)
            self._move(file, "T")
            return
        listener = self.listener
        msg = listener.verify(
            lambda: _message_from_mail(data, listener.secret, listener.clock()),
            channel=self.name,
            peer=peer,
        )
        if msg is None:
            self._move(file, "T")
            return
        status = await listener.handle(msg, reply=None, channel=self.name, peer=peer)
        self._move(file, "T" if status == "rejected" else "S")

    def _move(self, file: Path, flag: str) -> None:
        base = file.name.split(":", 1)[0]
        target = self.path / "cur" / f"{base}:2,{flag}"
        try:
            os.replace(file, target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("maildir: cannot move %s to cur/: %s; deleting it", file, exc)
            with contextlib.suppress(OSError):
                file.unlink()

    async def close(self) -> None:
        """Stop polling; a mail being handled is finished first (the runtime bounds the wait)."""
        self._closing.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _message_from_mail(data: bytes, secret: bytes, now: float) -> protocol.Message:
    """The verified message in the raw mail ``data``; :class:`ProtocolError` if none."""
    if len(data) > MAX_MAIL:
        raise protocol.Oversized(f"mail larger than {MAX_MAIL} bytes")
    try:
        mail = message_from_bytes(data, policy=policy.default)
        subject = mail.get("Subject")
        envelope = mail.get(protocol.ENVELOPE_HEADER)
        part = mail.get_body(preferencelist=("plain",))
        body = part.get_content() if part is not None else ""
    except Exception:
        raise protocol.Malformed("unreadable mail") from None
    if not isinstance(body, str):
        raise protocol.Malformed("mail body is not text")
    return protocol.message_from_email(
        None if subject is None else str(subject),
        body,
        None if envelope is None else str(envelope),
        secret,
        now,
    )
