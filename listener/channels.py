"""The listener's channels: how signed envelopes reach :class:`~pushsync.listener.runtime.Listener`.

Each channel (:class:`UdpChannel`, :class:`MaildirChannel`, :class:`SyncChannel`,
:class:`PollChannel`) is a thin shell around :mod:`pushsync.wire.protocol`: it
turns what arrived into a verified message, or a counted, logged rejection, and
hands it to the listener; nothing a peer sends raises out of a channel. How
each behaves is in ``docs/listener.md`` ("How the channels behave"); the IMAP
channel is :mod:`pushsync.listener.imap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from email import message_from_bytes, policy
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

from pushsync.listener.config import PollChannel as PollConfig
from pushsync.listener.config import SyncChannel as SyncConfig
from pushsync.listener.connection import Backoff, KeyRefused, Session, open_session
from pushsync.logs import Throttle, plain
from pushsync.wire import protocol
from pushsync.wire.addresses import Address, format_peer
from pushsync.wire.protocol import FrameType

if TYPE_CHECKING:
    from pushsync.listener.runtime import Listener

logger = logging.getLogger(__name__)

RECEIVE_BUFFER: Final = 4 * 1024 * 1024
"""Bytes asked for the UDP channel's receive buffer (the kernel caps it at rmem_max)."""

MAX_MAIL: Final = 256 * 1024
"""Largest mail file read; a signed message is at most 1,200 bytes plus headers."""

DEFAULT_MAILDIR_POLL: Final = 1.0
"""Seconds between two looks into ``new/``."""


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
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(self.bind.host, self.bind.port)
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"udp channel: cannot bind {self.bind}: {exc.strerror or exc}"
            ) from None
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a burst of messages must not overflow the default buffer
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)

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
        msg = listener.verify_envelope(data, channel=self.name, peer=peer)
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
    """Polls a Maildir's ``new/`` every ``poll`` seconds.

    Every file there is read as an email (:mod:`email`, ``policy.default``),
    verified with :func:`~pushsync.wire.protocol.message_from_email`, handled,
    then moved to ``cur/``: flag ``S`` (seen) when handled or a duplicate,
    ``T`` (trashed) when rejected. Email has no way back: no ack.
    """

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
        if status == "deferred":
            return  # stays in new/: taken again at the next look
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


# --------------------------------------------------------------------------- SYNC


class SyncChannel:
    """A persistent SYNC connection to the dispatcher (:mod:`pushsync.listener.connection`).

    Messages arrive as MESSAGE frames and are acked on the same connection; the
    device reports its UDP endpoint (TRACK) when it also listens on UDP; PINGs
    keep it alive; it reconnects with jittered backoff whenever it drops.
    """

    name = "sync"

    def __init__(
        self,
        listener: Listener,
        config: SyncConfig,
        *,
        udp_port: Callable[[], int | None] = lambda: None,
        backoff: Backoff | None = None,
    ) -> None:
        self.listener = listener
        self.config = config
        self.udp_port = udp_port
        self.backoff = backoff or Backoff()
        self.connected = asyncio.Event()
        """Set while an authenticated connection is up (tests wait on it)."""
        self.connections = 0
        """Connections authenticated since start."""
        self._session: Session | None = None
        self._lent: _Lent | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._refusals = Throttle(logger, self.backoff.most)
        """A refused key is logged once per backoff cap; it does not mend by retrying."""

    @contextlib.asynccontextmanager
    async def borrow(self) -> AsyncIterator[_Lent | None]:
        """The open connection for a synchronization (its frames come to it), or None."""
        session = self._session
        if session is None or session.closed or self._lent is not None:
            yield None
            return
        lent = self._lent = _Lent(session)
        try:
            yield lent
        finally:
            self._lent = None

    async def start(self) -> None:
        """Start connecting in the background: a server that is down is retried, not fatal."""
        self._task = asyncio.create_task(self._loop(), name="pushsync sync channel")

    async def _loop(self) -> None:
        server = str(self.config.server)
        while not self._closing.is_set():
            try:
                session = await _connect(self.listener, self.config)
            except KeyRefused as exc:
                delay = self.backoff.next()
                self._refusals.warning("sync: %s; retrying in %.1fs", exc, delay, key="key")
                await self._pause(delay)
                continue
            except (OSError, TimeoutError, protocol.ProtocolError) as exc:
                delay = self.backoff.next()
                logger.warning(
                    "sync: cannot connect to %s: %s; retrying in %.1fs", server, _why(exc), delay
                )
                await self._pause(delay)
                continue
            self.backoff.reset()
            self.connections += 1
            logger.info("sync: connected to %s", server)
            try:
                await self._serve(session)
            except protocol.ProtocolError as exc:
                logger.warning("sync: dropped the connection to %s: %s", server, _why(exc))
            except (OSError, TimeoutError) as exc:
                logger.warning("sync: connection to %s lost: %s", server, _why(exc))
            except Exception:  # a bug must not end the channel
                logger.exception("sync: connection to %s failed", server)
            finally:
                self.connected.clear()
                self._session = None
                if self._lent is not None:
                    self._lent.frames.put_nowait(None)  # the synchronization's connection ended
                await session.close(None if session.closed else "")
            if not self._closing.is_set():
                delay = self.backoff.next()
                logger.info("sync: reconnecting to %s in %.1fs", server, delay)
                await self._pause(delay)

    async def _serve(self, session: Session) -> None:
        self._session = session
        session.send(protocol.encode_subscribe())
        port = self.udp_port()
        if port is not None:
            session.send(protocol.encode_track(f":{port}"))
        self.connected.set()
        heartbeat = self.config.heartbeat.total_seconds()
        quiet = 0.0
        while not self._closing.is_set():
            try:
                frame = await session.recv(timeout=heartbeat)
            except TimeoutError:
                quiet += heartbeat
                if quiet >= heartbeat * 3:
                    raise TimeoutError(f"the server was silent for {quiet:g}s") from None
                session.send(protocol.encode_ping(int(self.listener.clock() * 1000)))
                continue
            if frame is None:
                raise ConnectionError("the server closed the connection")
            quiet = 0.0
            if not self._frame(session, frame):
                return

    def _frame(self, session: Session, frame: protocol.Frame) -> bool:
        """Act on one frame; False when the connection ends."""
        kind = frame.type
        if kind == FrameType.MESSAGE:
            _take_message(self.listener, session, frame.payload, self.name)
        elif kind == FrameType.PING:
            protocol.decode_heartbeat(frame)
            session.send(protocol.encode_frame(FrameType.PONG, frame.payload))
        elif kind == FrameType.PONG:
            protocol.decode_heartbeat(frame)
        elif kind == FrameType.POLL:
            protocol.decode_poll(frame)
        elif kind == FrameType.BYE:
            logger.info("sync: the server said BYE: %r", protocol.decode_bye(frame)[:80])
            return False
        elif kind in protocol.SYNC_FRAMES and kind != FrameType.SYNC_BEGIN:
            if self._lent is not None:
                self._lent.frames.put_nowait(frame)
            else:
                logger.warning(
                    "sync: %s from the server with no synchronization running", kind.name
                )
        else:
            raise protocol.Malformed(f"{kind.name} from the server")
        return True

    async def _pause(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), delay)

    async def close(self) -> None:
        self._closing.set()
        if self._session is not None:
            await self._session.close("listener stopping")
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


async def _connect(listener: Listener, config: SyncConfig | PollConfig) -> Session:
    """An authenticated connection to the SYNC port a channel names."""
    return await open_session(
        config.server,
        device=listener.config.device,
        secret=listener.secret,
        tls=config.tls,
        ca_file=config.ca_file,
    )


class _Lent:
    """The persistent connection, lent to one synchronization."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.frames: asyncio.Queue[protocol.Frame | None] = asyncio.Queue()

    def send(self, data: bytes) -> bool:
        return self.session.send(data)

    async def recv(self, timeout: float | None = None) -> protocol.Frame | None:  # noqa: ASYNC109  the session's recv(timeout) interface
        return await asyncio.wait_for(self.frames.get(), timeout)


def _take_message(listener: Listener, session: Session, payload: bytes, channel: str) -> None:
    """Verify a MESSAGE frame's envelope and hand it on; acks go back on ``session``."""
    msg = listener.verify_envelope(payload, channel=channel, peer=session.server)
    if msg is not None:
        listener.spawn(msg, reply=_ack_on(session), channel=channel, peer=session.server)


def _ack_on(session: Session) -> Callable[[bytes], None]:
    def reply(ack: bytes) -> None:
        if not session.send(protocol.encode_ack_frame(ack)):
            raise ConnectionError("the SYNC connection is closed")

    return reply


# --------------------------------------------------------------------------- poll


class PollChannel:
    """Light-weight polling of the SYNC port every ``every``.

    Each round connects, sends POLL, takes the messages up to the server's
    closing POLL, acks them and says BYE.
    """

    name = "poll"

    def __init__(self, listener: Listener, config: PollConfig) -> None:
        self.listener = listener
        self.config = config
        self.polls = 0
        """Polls completed since start."""
        self._task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._now = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="pushsync poll channel")

    def poll_now(self) -> None:
        """Poll at once instead of at the next interval."""
        self._now.set()

    async def _loop(self) -> None:
        every = self.config.every.total_seconds()
        while not self._closing.is_set():
            try:
                await self.poll()
            except (OSError, TimeoutError, protocol.ProtocolError) as exc:
                logger.warning("poll: %s: %s", self.config.server, _why(exc))
            except Exception:
                logger.exception("poll: %s failed", self.config.server)
            waiters = [asyncio.ensure_future(e.wait()) for e in (self._closing, self._now)]
            try:
                await asyncio.wait(waiters, timeout=every, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            self._now.clear()

    async def poll(self) -> int:
        """One poll: connect, POLL, take the messages, BYE; how many messages came."""
        session = await _connect(self.listener, self.config)
        taken = 0
        handling: list[asyncio.Task[Any]] = []
        try:
            session.send(protocol.encode_poll())
            while True:
                frame = await session.recv(timeout=30.0)
                if frame is None:
                    raise ConnectionError("the server closed the connection during a poll")
                if frame.type == FrameType.POLL:
                    protocol.decode_poll(frame)
                    break
                if frame.type == FrameType.MESSAGE:
                    taken += 1
                    handling.append(self._handle(session, frame.payload))
                elif frame.type == FrameType.PING:
                    session.send(protocol.encode_frame(FrameType.PONG, frame.payload))
                elif frame.type == FrameType.BYE:
                    raise protocol.Malformed("the server said BYE during a poll")
                elif frame.type != FrameType.PONG:
                    raise protocol.Malformed(f"{frame.type.name} from the server")
            if handling:
                await asyncio.gather(*handling, return_exceptions=True)
            await session.drain()
            self.polls += 1
            if taken:
                logger.info("poll: %d messages from %s", taken, self.config.server)
        finally:
            await session.close("poll done")
        return taken

    def _handle(self, session: Session, payload: bytes) -> asyncio.Task[Any]:
        listener = self.listener
        msg = listener.verify_envelope(payload, channel=self.name, peer=session.server)
        if msg is None:
            return asyncio.ensure_future(asyncio.sleep(0))
        return listener.spawn(msg, reply=_ack_on(session), channel=self.name, peer=session.server)

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _why(exc: BaseException) -> str:
    return plain(exc)


def message_from_mail(data: bytes, secret: bytes, now: float) -> protocol.Message:
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


_message_from_mail = message_from_mail
