"""The SYNC gateway: persistent device connections on a TCP port, and light-weight polling.

Devices open a TCP connection (optionally TLS) to ``--sync-listen`` and
authenticate with challenge-response under their secret (``docs/protocol.md``,
"SYNC"). After WELCOME the connection carries:

* MESSAGE frames down: :class:`SyncGateway` writes a notification to the
  device's open connection, the first choice of the device tracker;
* ACK frames up, verified with the secret of the device the connection
  authenticated, and handed to the dispatcher's confirmation queue;
* TRACK: the device's UDP endpoint, recorded as its ``tracking`` address;
* POLL: light-weight polling — every message the device has not confirmed is
  sent at once, then one POLL frame meaning "that is all";
* PING/PONG both ways, and BYE.

Each connection is an :class:`asyncio.Protocol` with no task of its own once
authenticated: one sweep task per server sends heartbeats and closes peers
that stay silent, that do not finish the handshake in time, or whose unread
output piles up. That keeps a connection to a few kilobytes, so one process
holds tens of thousands.

The database work (secret lookup, connection records, tracking, claims for
polls) goes through a :class:`SyncStore`; the daemon's implementation uses a
connection pool. A failure of the store closes the one connection it concerns
with a BYE, and the server keeps serving. Nothing a peer sends can raise out
of the server: framing errors close that connection with one log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from pushsync.db import first_line
from pushsync.dispatcher.gateways import SendResult, failed, format_peer, sent, to_message
from pushsync.dispatcher.outbox import Claimed
from pushsync.listener import protocol
from pushsync.listener.limits import MAX_DATAGRAM
from pushsync.listener.protocol import FrameType

logger = logging.getLogger(__name__)

DEFAULT_PORT: Final = 2439
HANDSHAKE_TIMEOUT: Final = 10.0
HEARTBEAT: Final = 30.0
"""Seconds of quiet after which the server PINGs a device."""
SILENCE_FACTOR: Final = 3
"""A peer silent for this many heartbeats is gone; its connection is closed."""
MAX_PREAUTH_BUFFER: Final = 1024
"""Bytes a peer may have sent before authenticating that do not form a frame yet."""
MAX_WRITE_BUFFER: Final = 256 * 1024
"""Unsent bytes queued for one device after which it counts as too slow and is dropped."""
POLL_BATCH: Final = 100


class SyncStore(Protocol):
    """The database operations the SYNC server needs."""

    async def secret(self, device: str) -> bytes | None:
        """The secret of an enabled device, None if there is no such enabled device."""

    async def connected(self, device: str, peer: str) -> None:
        """Record that this dispatcher now holds ``device``'s connection."""

    async def disconnected(self, device: str, peer: str) -> None:
        """Forget this dispatcher's record of ``device``'s connection from ``peer``."""

    async def track(self, device: str, address: str) -> None:
        """Record ``address`` as the device's tracked UDP endpoint."""

    async def claim_device(self, device: str, limit: int) -> list[Claimed]:
        """Claim what ``device`` has not confirmed (light-weight polling)."""

    async def sent(self, request_id: uuid.UUID, gateway: str) -> bool: ...

    async def failed(self, request_id: uuid.UUID, error: str, *, final: bool) -> bool: ...


AckSink = Callable[[protocol.Ack, str], None]


class Synchronizer(Protocol):
    """Takes the synchronization frames of authenticated connections."""

    def feed(self, conn: SyncConnection, frame: protocol.Frame) -> None: ...

    def closed(self, conn: SyncConnection) -> None: ...


@dataclass(slots=True)
class SyncStats:
    """What the SYNC port has seen since the server started."""

    accepted: int = 0
    authenticated: int = 0
    subscribed: int = 0
    """Authenticated connections that asked for pushes (SUBSCRIBE)."""
    refused: int = 0
    """Connections closed for failing authentication."""
    dropped: int = 0
    """Connections closed for bad frames, timeouts, silence or slowness."""
    acks: int = 0
    bad_acks: int = 0
    polls: int = 0
    pushed: int = 0


@dataclass(kw_only=True)
class SyncSettings:
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    heartbeat: float = HEARTBEAT
    max_write_buffer: int = MAX_WRITE_BUFFER
    tls: ssl.SSLContext | None = field(default=None, repr=False)


class SyncServer:
    """The TCP server holding device connections; see the module docstring."""

    def __init__(
        self,
        store: SyncStore,
        on_ack: AckSink,
        *,
        settings: SyncSettings | None = None,
        on_connect: Callable[[str], None] | None = None,
        sender: str = "pushsync",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.on_ack = on_ack
        self.settings = settings or SyncSettings()
        self.on_connect = on_connect
        self.sender = sender
        self.clock = clock
        self.stats = SyncStats()
        self.synchronizer: Synchronizer | None = None
        """Serves SYNC_BEGIN/UPLOAD/DOWNLOAD frames (the daemon sets one)."""
        self.connections: dict[str, SyncConnection] = {}
        """Authenticated connections by device id."""
        self._all: set[SyncConnection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: the system picks; see :attr:`address`)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SyncConnection(self),
            host,
            port,
            ssl=self.settings.tls,
            ssl_handshake_timeout=self.settings.handshake_timeout if self.settings.tls else None,
            reuse_address=True,
            backlog=1024,
        )
        self._sweeper = asyncio.create_task(self._sweep(), name="pushsync sync sweep")

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the SYNC server is not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    def is_connected(self, device: str) -> bool:
        return device in self.connections

    def push(self, device: str, envelope: bytes) -> bool:
        """Write one MESSAGE frame to ``device``'s connection; False if it has none."""
        conn = self.connections.get(device)
        if conn is None or not conn.write(protocol.encode_message_frame(envelope)):
            return False
        self.stats.pushed += 1
        return True

    async def close(self) -> None:
        """Stop accepting, say BYE to every device and close; wait for pending store calls."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for conn in list(self._all):
            conn.close("server stopping")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)

    # ----------------------------------------------------------------- internals

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def attached(self, conn: SyncConnection) -> None:
        self._all.add(conn)
        self.stats.accepted += 1

    def subscribed(self, conn: SyncConnection) -> None:
        """``conn`` asked for pushes: it becomes its device's connection, replacing any other."""
        assert conn.device is not None
        old = self.connections.get(conn.device)
        if old is conn:
            return
        self.connections[conn.device] = conn
        self.stats.subscribed += 1
        logger.info("sync: %s connected from %s", conn.device, conn.peer)
        if old is not None:
            old.close("replaced by a new connection", forget=False)
        self.spawn(self._record_connected(conn), f"sync connected {conn.device}")

    async def _record_connected(self, conn: SyncConnection) -> None:
        assert conn.device is not None
        try:
            await self.store.connected(conn.device, conn.peer)
        except Exception as exc:
            logger.warning("sync: cannot record %s's connection: %s", conn.device, first_line(exc))
        if self.on_connect is not None and self.connections.get(conn.device) is conn:
            self.on_connect(conn.device)

    def detached(self, conn: SyncConnection, *, forget: bool) -> None:
        self._all.discard(conn)
        if self.synchronizer is not None:
            self.synchronizer.closed(conn)
        device = conn.device
        if device is None or self.connections.get(device) is not conn:
            return
        del self.connections[device]
        if forget:
            self.spawn(self._record_disconnected(device, conn.peer), f"sync gone {device}")

    async def _record_disconnected(self, device: str, peer: str) -> None:
        try:
            await self.store.disconnected(device, peer)
        except Exception as exc:
            logger.warning("sync: cannot record %s's disconnection: %s", device, first_line(exc))

    async def _sweep(self) -> None:
        settings = self.settings
        interval = max(0.05, min(settings.heartbeat, settings.handshake_timeout) / 4)
        silence = settings.heartbeat * SILENCE_FACTOR
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            for conn in list(self._all):
                if conn.device is None or not conn.open:
                    if now - conn.started > settings.handshake_timeout:
                        self.stats.dropped += 1
                        conn.close("handshake timed out")
                elif now - conn.last_received > silence:
                    self.stats.dropped += 1
                    conn.close("silent too long")
                elif now - conn.last_sent >= settings.heartbeat:
                    conn.write(protocol.encode_ping(int(time.time() * 1000)))


class SyncConnection(asyncio.Protocol):
    """One device's connection; states: hello → auth → open → closed."""

    __slots__ = (
        "_challenge",
        "_client_nonce",
        "_drained",
        "_next_track",
        "_polling",
        "_reader",
        "_secret",
        "_state",
        "_transport",
        "device",
        "last_received",
        "last_sent",
        "peer",
        "peer_host",
        "server",
        "started",
    )

    def __init__(self, server: SyncServer) -> None:
        self.server = server
        self.device: str | None = None
        self.peer = "?"
        self.peer_host = ""
        self.started = self.last_received = self.last_sent = server.clock()
        self._transport: asyncio.Transport | None = None
        self._reader = protocol.FrameReader()
        self._state = "hello"
        self._client_nonce = b""
        self._challenge = b""
        self._secret: bytes | None = None
        self._drained: asyncio.Event | None = None  # only while output is paused
        self._next_track: str | None = None
        """The newest TRACK not recorded yet; one recording runs at a time (a flood of
        TRACK frames costs one task, not one each)."""
        self._polling = False

    @property
    def open(self) -> bool:
        return self._state == "open"

    # ----------------------------------------------------------------- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        addr = transport.get_extra_info("peername")
        self.peer = format_peer(addr)
        self.peer_host = str(addr[0]) if isinstance(addr, tuple) else ""
        self.server.attached(self)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self._state == "open"
        self._state = "closed"
        self.resume_writing()
        self.server.detached(self, forget=True)
        if was_open:
            logger.info("sync: %s at %s disconnected", self.device, self.peer)

    def data_received(self, data: bytes) -> None:
        if self._state == "closed":
            return
        self.last_received = self.server.clock()
        try:
            frames = self._reader.feed(data)
            if self._state != "open" and self._reader.buffered > MAX_PREAUTH_BUFFER:
                raise protocol.Oversized("too much data before authentication")
            for frame in frames:
                if self._state == "closed":
                    return
                self._frame(frame)
        except protocol.ProtocolError as exc:
            self._drop(f"{type(exc).__name__}: {exc}")
        except Exception:  # a bug here must not stop the server
            logger.exception("sync: error handling a frame from %s", self.peer)
            self._drop("internal error")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    def pause_writing(self) -> None:
        self._drained = asyncio.Event()

    def resume_writing(self) -> None:
        if self._drained is not None:
            self._drained.set()
            self._drained = None

    async def drain(self) -> None:
        """Wait until the transport takes more output (bulk senders: synchronization)."""
        waiter = self._drained
        if waiter is not None and self._state != "closed":
            await waiter.wait()

    # ----------------------------------------------------------------- frames

    def _frame(self, frame: protocol.Frame) -> None:
        state = self._state
        if state == "hello":
            self._hello(frame)
        elif state == "auth":
            self._auth(frame)
        elif state == "open":
            self._traffic(frame)
        else:  # "checking": nothing may arrive before WELCOME
            raise protocol.Malformed(f"{frame.type.name} before WELCOME")

    def _hello(self, frame: protocol.Frame) -> None:
        try:
            hello = protocol.decode_hello(frame)
        except protocol.UnsupportedVersion as exc:
            self.server.stats.refused += 1
            logger.info("sync: %s: %s", self.peer, exc)
            self.close("unsupported version")
            return
        self.device = hello.device
        self._client_nonce = hello.nonce
        self._challenge = protocol.new_nonce()
        self._state = "auth"
        self.write(protocol.encode_challenge(self._challenge))

    def _auth(self, frame: protocol.Frame) -> None:
        proof = protocol.decode_auth(frame)
        self._state = "checking"
        self.server.spawn(self._check(proof), f"sync auth {self.peer}")

    async def _check(self, proof: bytes) -> None:
        device = self.device
        assert device is not None
        try:
            secret = await self.server.store.secret(device)
        except Exception as exc:
            logger.warning("sync: cannot look up device %s: %s", device, first_line(exc))
            self.close("server unavailable, try again later")
            return
        if self._state == "closed":
            return
        expected = None
        if secret is not None:
            expected = protocol.client_proof(secret, self._challenge, self._client_nonce, device)
        try:
            protocol.verify_proof(expected or bytes(protocol.MAC_SIZE), proof)
            if secret is None:
                raise protocol.BadSignature("authentication failed")
        except protocol.BadSignature:
            self.server.stats.refused += 1
            logger.warning(
                "sync: %s failed to authenticate as %r (wrong secret, unknown or disabled)",
                self.peer,
                device,
            )
            self.close("authentication failed")
            return
        assert secret is not None
        self._secret = secret
        self._state = "open"
        self.write(
            protocol.encode_welcome(
                protocol.server_proof(secret, self._client_nonce, self._challenge, device)
            )
        )
        self.server.stats.authenticated += 1
        logger.debug("sync: %s authenticated from %s", device, self.peer)

    def _traffic(self, frame: protocol.Frame) -> None:
        kind = frame.type
        if kind == FrameType.ACK:
            self._ack(frame.payload)
        elif kind == FrameType.PING:
            protocol.decode_heartbeat(frame)
            self.write(protocol.encode_frame(FrameType.PONG, frame.payload))
        elif kind == FrameType.PONG:
            protocol.decode_heartbeat(frame)
        elif kind == FrameType.TRACK:
            endpoint = protocol.decode_track(frame)
            address = protocol.tracked_address(endpoint, self.peer_host)
            idle = self._next_track is None
            self._next_track = address
            if idle:
                self.server.spawn(self._track(), f"sync track {self.device}")
        elif kind == FrameType.SUBSCRIBE:
            if frame.payload:
                raise protocol.Malformed("SUBSCRIBE carries no payload")
            self.server.subscribed(self)
        elif kind == FrameType.POLL:
            protocol.decode_poll(frame)
            self.server.stats.polls += 1
            if not self._polling:  # one poll at a time answers every POLL sent meanwhile
                self._polling = True
                self.server.spawn(self._poll(), f"sync poll {self.device}")
        elif kind in (FrameType.SYNC_BEGIN, FrameType.UPLOAD, FrameType.DOWNLOAD):
            if self.server.synchronizer is None:
                self.write(
                    protocol.encode_json_frame(
                        FrameType.SYNC_ERROR, {"error": "this server does not synchronize"}
                    )
                )
                return
            self.server.synchronizer.feed(self, frame)
        elif kind == FrameType.BYE:
            reason = protocol.decode_bye(frame)
            logger.info("sync: %s said BYE: %r", self.device, reason[:80])
            self.close(None)
        else:
            raise protocol.Malformed(f"{kind.name} from a device")

    def _ack(self, payload: bytes) -> None:
        assert self._secret is not None and self.device is not None
        try:
            ack = protocol.decode_ack(payload, self._secret, limit=MAX_DATAGRAM)
            if ack.device != self.device:
                raise protocol.BadSignature("ack names another device")
        except protocol.ProtocolError as exc:
            self.server.stats.bad_acks += 1
            logger.warning(
                "sync: dropped an ack from %s: %s: %s", self.device, type(exc).__name__, exc
            )
            return
        self.server.stats.acks += 1
        try:
            self.server.on_ack(ack, self.peer)
        except Exception:
            logger.exception("sync: ack handler failed for %s", ack.request_id)

    async def _track(self) -> None:
        assert self.device is not None
        while (address := self._next_track) is not None:
            try:
                await self.server.store.track(self.device, address)
            except Exception as exc:
                logger.warning("sync: cannot record %s's address: %s", self.device, first_line(exc))
            else:
                logger.info("sync: %s tracks UDP %s", self.device, address)
            if self._next_track == address:
                self._next_track = None

    async def _poll(self) -> None:
        """Send everything the device has not confirmed, then POLL."""
        device = self.device
        assert device is not None and self._secret is not None
        store = self.server.store
        try:
            while self._state == "open":
                items = await store.claim_device(device, POLL_BATCH)
                for item in items:
                    await self._send_polled(item)
                if len(items) < POLL_BATCH:
                    break
        except Exception as exc:
            logger.warning("sync: poll by %s failed: %s", device, first_line(exc))
            self.close("server unavailable, try again later")
            return
        finally:
            self._polling = False
        self.write(protocol.encode_poll())

    async def _send_polled(self, item: Claimed) -> None:
        store = self.server.store
        try:
            envelope = protocol.encode_message(
                to_message(item, self.server.sender), item.secret, limit=MAX_DATAGRAM
            )
        except protocol.ProtocolError as exc:
            await store.failed(item.request_id, f"sync: cannot encode: {exc}", final=True)
            return
        if self.write(protocol.encode_message_frame(envelope)):
            self.server.stats.pushed += 1
            await store.sent(item.request_id, "sync")
        else:
            await store.failed(item.request_id, "sync: connection closed", final=False)

    # ----------------------------------------------------------------- output

    def write(self, data: bytes, *, bulk: bool = False) -> bool:
        """Queue ``data``; False (and the connection dropped) if it cannot be.

        A device that lets more than ``max_write_buffer`` bytes pile up is
        dropped as too slow, unless ``bulk``: a bulk sender awaits :meth:`drain`.
        """
        transport = self._transport
        if transport is None or transport.is_closing() or self._state == "closed":
            return False
        transport.write(data)
        self.last_sent = self.server.clock()
        if bulk:
            return True
        if transport.get_write_buffer_size() > self.server.settings.max_write_buffer:
            self.server.stats.dropped += 1
            self._drop("too slow: output is piling up")
            return False
        return True

    def close(self, reason: str | None, *, forget: bool = True) -> None:
        """Say BYE (with ``reason``, if any) and close."""
        if self._state == "closed":
            return
        transport = self._transport
        if reason is not None and transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(protocol.encode_bye(reason))
        self._state = "closed"
        self.resume_writing()
        self.server.detached(self, forget=forget)
        if transport is not None:
            transport.close()

    def _drop(self, why: str) -> None:
        self.server.stats.dropped += 1
        logger.warning(
            "sync: dropped %s (%s): %s", self.peer, self.device or "unauthenticated", why
        )
        transport = self._transport
        self._state = "closed"
        self.resume_writing()
        self.server.detached(self, forget=True)
        if transport is not None:
            transport.abort()


class SyncGateway:
    """The ``sync`` gateway: one MESSAGE frame down the device's open connection."""

    name = "sync"

    def __init__(self, server: SyncServer, *, limit: int = MAX_DATAGRAM) -> None:
        self.server = server
        self.limit = limit

    async def send(self, item: Claimed) -> SendResult:
        if not self.server.is_connected(item.device_id):
            return failed(self.name, "device has no SYNC connection here", final=False)
        try:
            envelope = protocol.encode_message(
                to_message(item, self.server.sender), item.secret, limit=self.limit
            )
        except protocol.Oversized:
            size = protocol.encoded_size(to_message(item, self.server.sender))
            return failed(self.name, f"message too large ({size} bytes > {self.limit})", final=True)
        except protocol.ProtocolError as exc:
            return failed(self.name, f"cannot encode: {exc}", final=True)
        if not self.server.push(item.device_id, envelope):
            return failed(self.name, "SYNC connection closed", final=False)
        return sent(self.name)


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from a PEM certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


__all__ = [
    "DEFAULT_PORT",
    "SyncConnection",
    "SyncGateway",
    "SyncServer",
    "SyncSettings",
    "SyncStats",
    "SyncStore",
    "server_tls",
]
