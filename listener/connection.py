"""The device side of a SYNC connection: connect, authenticate, exchange frames.

:func:`open_session` opens a TCP connection (inside TLS when configured) to
the dispatcher's SYNC port and runs the handshake of ``docs/protocol.md``: it
returns only once the server has proved it knows the device secret too.
A :class:`Session` then reads and writes frames, each authenticated with a
tag under the connection's session keys (``docs/protocol.md``, "Frame
authentication"): a frame that fails its tag ends the connection with
:class:`~pushsync.wire.protocol.BadSignature`. The listener's ``sync`` and
``poll`` channels (:mod:`pushsync.listener.channels`) and the built-in sync
client use it. Standard library only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from pathlib import Path
from typing import Final

from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from pushsync.wire.protocol import FrameType

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT: Final = 10.0
"""Seconds for TCP, TLS and the handshake together."""
READ_SIZE: Final = 65536


class Refused(protocol.ProtocolError):
    """The server closed the connection with BYE; its reason (untrusted text) is the message."""


class KeyRefused(Refused):
    """The server refused this device's key: an unknown device, a disabled one, or a secret
    the server does not hold for it (it does not say which)."""

    def __init__(self, device: str) -> None:
        super().__init__(
            f"the server refused the key of device {device} (unknown, disabled or wrong "
            "secret): check device and secret_file against `pushsync device list`"
        )


class Session:
    """An authenticated SYNC connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        device: str,
        secret: bytes,
        server: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.device = device
        self.secret = secret
        self.server = server
        self._frames = protocol.FrameReader()
        self._sealer: protocol.FrameSealer | None = None

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    @property
    def local_host(self) -> str:
        sockname = self.writer.get_extra_info("sockname")
        return str(sockname[0]) if isinstance(sockname, tuple) else ""

    async def recv(self, timeout: float | None = None) -> protocol.Frame | None:  # noqa: ASYNC109  recv(timeout): the session's interface
        """The next frame; None when the server closed the connection (a reset too: a
        server that closes with bytes of ours unread resets it, and which of the two the
        device sees is a matter of timing).

        ``TimeoutError`` after ``timeout`` seconds without a whole frame;
        :class:`~pushsync.wire.protocol.ProtocolError` for a bad stream.
        """
        async with asyncio.timeout(timeout):
            while (frame := self._frames.take()) is None:
                try:
                    data = await self.reader.read(READ_SIZE)
                except ConnectionResetError:
                    return None
                if not data:
                    return None
                self._frames.add(data)
        return frame

    def authenticate(self, keys: protocol.SessionKeys) -> None:
        """From now on tag every frame sent and check every frame received (after WELCOME)."""
        self._sealer = protocol.FrameSealer(keys.up)
        self._frames.authenticate(keys.down)

    def send(self, data: bytes) -> bool:
        """Queue ``data`` (whole frames, tagged here once authenticated); False if closed."""
        if self.writer.is_closing():
            return False
        if self._sealer is not None:
            data = self._sealer.seal(data)
        return self.send_raw(data)

    def send_raw(self, data: bytes) -> bool:
        """Queue ``data`` as it is, untagged (tests that play a broken device)."""
        if self.writer.is_closing():
            return False
        try:
            self.writer.write(data)
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.writer.drain()

    async def close(self, reason: str | None = None) -> None:
        """Say BYE (if ``reason`` is given) and close."""
        if reason is not None:
            self.send(protocol.encode_bye(reason))
        with contextlib.suppress(Exception):
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 2.0)


def client_tls(ca_file: Path | None) -> ssl.SSLContext:
    """Verify the server's certificate against ``ca_file`` (else the system's CAs)."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


async def open_session(
    server: Address,
    *,
    device: str,
    secret: bytes,
    tls: bool = False,
    ca_file: Path | None = None,
    timeout: float = CONNECT_TIMEOUT,  # noqa: ASYNC109  bounds the whole handshake; callers pass it
    local_host: str | None = None,
) -> Session:
    """Connect (from ``local_host``, if given: one address of a multi-homed host)
    and authenticate; see the module docstring.

    Raises ``OSError``/``TimeoutError`` for the network, :class:`Refused` when
    the server says BYE (wrong secret, unknown device, server unavailable),
    :class:`~pushsync.wire.protocol.BadSignature` when the server's proof
    is wrong (it does not know the secret: not our server), and other
    ``ProtocolError`` for a server that does not speak the protocol.
    """
    context = client_tls(ca_file) if tls else None
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            server.host,
            server.port,
            ssl=context,
            server_hostname=server.host if context else None,
            limit=READ_SIZE,
            local_addr=None if local_host is None else (local_host, 0),
        )
        session = Session(reader, writer, device=device, secret=secret, server=str(server))
        try:
            client_nonce = protocol.new_nonce()
            session.send(protocol.encode_hello(protocol.Hello(device=device, nonce=client_nonce)))
            challenge = protocol.decode_challenge(await _expect(session))
            proof = protocol.client_proof(secret, challenge, client_nonce, device)
            session.send(protocol.encode_auth(proof))
            try:
                welcome = protocol.decode_welcome(await _expect(session))
            except Refused as exc:
                if str(exc) == protocol.KEY_REFUSED:
                    raise KeyRefused(device) from None
                raise
            protocol.verify_proof(
                protocol.server_proof(secret, client_nonce, challenge, device), welcome
            )
            session.authenticate(protocol.session_keys(secret, client_nonce, challenge, device))
        except BaseException:
            await session.close()
            raise
    return session


async def _expect(session: Session) -> protocol.Frame:
    frame = await session.recv()
    if frame is None:
        raise Refused("the server closed the connection")
    if frame.type == FrameType.BYE:
        raise Refused(protocol.decode_bye(frame)[:200] or "the server said BYE")
    return frame


class Backoff:
    """Capped exponential backoff with jitter: each delay is 50 to 100% of the nominal one.

    The jitter comes from a generator of its own: drawing from the ``random``
    module's shared one would move the state that an embedding program (or a
    test's data generator on another thread) relies on.
    """

    def __init__(self, first: float = 0.5, most: float = 30.0) -> None:
        self.first = first
        self.most = most
        self._nominal = first
        self._jitter = random.Random()  # noqa: S311  backoff jitter, not a secret

    def next(self) -> float:
        delay = self._nominal * self._jitter.uniform(0.5, 1.0)
        self._nominal = min(self._nominal * 2, self.most)
        return delay

    def reset(self) -> None:
        self._nominal = self.first


__all__ = ["Backoff", "KeyRefused", "Refused", "Session", "client_tls", "open_session"]
