"""The SYNC gateway: persistent device connections on a TCP port, and light-weight polling.

:class:`ConnectionServer` accepts device connections (optionally TLS), authenticates
them and serves their frames; :class:`SyncGateway` pushes a notification down a
device's open connection. The frames and what the server does in each situation
are in ``docs/protocol.md`` ("SYNC", "What the dispatcher's SYNC server does");
its limits and file descriptors in ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import os
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

from pushsync.db import first_line
from pushsync.dispatcher.gateways import SendResult, failed, sent, to_message
from pushsync.dispatcher.outbox import Claimed
from pushsync.dispatcher.sockets import listening
from pushsync.logs import Throttle
from pushsync.wire import protocol
from pushsync.wire.addresses import format_peer
from pushsync.wire.limits import MAX_DATAGRAM
from pushsync.wire.protocol import FrameType

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
MAX_PREAUTH: Final = 256
"""Unauthenticated connections held at once; one more closes the oldest."""
MAX_PREAUTH_PER_HOST: Final = 32
"""Unauthenticated connections held at once from one address; one more closes its oldest."""
FAILED_AUTH_DELAY: Final = 0.2
"""Seconds after an AUTH arrives at which a failed authentication is answered."""
BACKLOG: Final = 1024
ACCEPT_BATCH: Final = 64
"""Connections accepted per turn of the event loop."""
ACCEPT_PAUSE: Final = 1.0
"""Seconds the server stops accepting when the system refuses (no file descriptor left)
and no unauthenticated connection can make room."""
EVICT_BATCH: Final = 16
"""Unauthenticated connections closed at once when no file descriptor is left."""
_OUT_OF_RESOURCES: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BUSY: Final = "too many connections, try again later"
COMINGS_LOG_INTERVAL: Final = 1.0
"""Seconds between two "connected" (or "disconnected") lines at INFO; those in between
are at DEBUG, and the next line says how many there were."""


class ConnectionStore(Protocol):
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

    def feed(self, conn: DeviceConnection, frame: protocol.Frame) -> None: ...

    def closed(self, conn: DeviceConnection) -> None: ...


@dataclass(slots=True)
class ConnectionStats:
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
    evicted: int = 0
    """Unauthenticated connections closed to make room for newer ones."""
    accept_errors: int = 0
    """Connections the system would not let the server accept (e.g. no file descriptor)."""
    bad_frames: int = 0
    """Connections closed for a frame whose tag did not match (forged, replayed, reordered)."""


@dataclass(kw_only=True)
class ConnectionSettings:
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    heartbeat: float = HEARTBEAT
    max_write_buffer: int = MAX_WRITE_BUFFER
    max_preauth: int = MAX_PREAUTH
    max_preauth_per_host: int = MAX_PREAUTH_PER_HOST
    failed_auth_delay: float = FAILED_AUTH_DELAY
    tls: ssl.SSLContext | None = field(default=None, repr=False)


T = TypeVar("T", bound=Hashable)


class Waiting(Generic[T]):
    """Unauthenticated connections, oldest first: overall and by source address.

    :meth:`add` admits a new one and names those to close so that at most
    ``most`` wait overall and ``per_host`` from one address — always the
    oldest, never the one just admitted.
    """

    def __init__(self, most: int, per_host: int) -> None:
        self.most = max(1, most)
        self.per_host = max(1, per_host)
        self._hosts: dict[T, str] = {}  # insertion order: oldest first
        self._by_host: dict[str, dict[T, None]] = {}

    def __len__(self) -> int:
        return len(self._hosts)

    def __contains__(self, item: object) -> bool:
        return item in self._hosts

    def add(self, item: T, host: str) -> list[T]:
        """Admit ``item``; the connections to close now, oldest first."""
        self._hosts[item] = host
        same = self._by_host.setdefault(host, {})
        same[item] = None
        victims: list[T] = []
        if len(same) > self.per_host:
            victims.append(next(iter(same)))
            self.discard(victims[-1])
        if len(self._hosts) > self.most:
            victims.append(next(iter(self._hosts)))
            self.discard(victims[-1])
        return victims

    def oldest(self) -> T | None:
        return next(iter(self._hosts), None)

    def discard(self, item: T) -> None:
        host = self._hosts.pop(item, None)
        if host is None:
            return
        same = self._by_host[host]
        del same[item]
        if not same:
            del self._by_host[host]


class ConnectionServer:
    """The TCP server holding device connections.

    Devices authenticate with challenge-response under their secret; after
    WELCOME a connection carries MESSAGE down, ACK (verified with the secret of
    the device it authenticated, handed to ``on_ack``) and TRACK up, POLL,
    PING/PONG and BYE, every frame tagged under the connection's session keys.

    Each connection is an :class:`asyncio.Protocol` with no task of its own once
    authenticated: one sweep task sends heartbeats and closes peers that stay
    silent, do not finish the handshake in time, or let output pile up. That
    keeps a connection to a few kilobytes, so one process holds tens of
    thousands. The server accepts connections itself (:meth:`_accept`), so
    running out of file descriptors is one throttled log line, not a traceback
    per attempt; :class:`Waiting` caps unauthenticated connections, closing the
    oldest. A failed authentication is answered ``failed_auth_delay`` after its
    AUTH, after the same work whatever made it fail. The database goes through a
    :class:`ConnectionStore`; a failure there closes only the connection it concerns,
    with a BYE. Nothing a peer sends raises out of the server.
    """

    def __init__(
        self,
        store: ConnectionStore,
        on_ack: AckSink,
        *,
        settings: ConnectionSettings | None = None,
        on_connect: Callable[[str], None] | None = None,
        sender: str = "pushsync",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.on_ack = on_ack
        self.settings = settings or ConnectionSettings()
        self.on_connect = on_connect
        self.sender = sender
        self.clock = clock
        self.stats = ConnectionStats()
        self.synchronizer: Synchronizer | None = None
        """Serves SYNC_BEGIN/UPLOAD/DOWNLOAD frames (the daemon sets one)."""
        self.by_device: dict[str, DeviceConnection] = {}
        """Authenticated connections by device id."""
        self._all: set[DeviceConnection] = set()
        self._waiting: Waiting[DeviceConnection] = Waiting(
            self.settings.max_preauth, self.settings.max_preauth_per_host
        )
        """Connections not authenticated yet, oldest first."""
        self.dummy_secret = secrets.token_bytes(protocol.SECRET_SIZE)
        """Checks the proof of a device without a secret, so that it costs the same work."""
        self.throttle = Throttle(logger)
        """For lines any peer can cause: at most one of a kind per interval."""
        self.comings = Throttle(logger, COMINGS_LOG_INTERVAL)
        """For "connected" and "disconnected": one line per device while they are few, a
        count when thousands come at once (each line held back is at DEBUG)."""
        self._sockets: list[socket.socket] = []
        self._address: tuple[str, int] | None = None
        self._resuming: dict[socket.socket, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (port 0: the system picks; see :attr:`address`)."""
        loop = asyncio.get_running_loop()
        self._sockets = await listening(host, port, BACKLOG)
        host_, port_ = self._sockets[0].getsockname()[:2]
        self._address = (str(host_), int(port_))
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        self._sweeper = asyncio.create_task(self._sweep(), name="pushsync sync sweep")

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise RuntimeError("the SYNC server is not started")
        return self._address

    @property
    def unauthenticated(self) -> int:
        """Connections accepted and not authenticated yet."""
        return len(self._waiting)

    def is_connected(self, device: str) -> bool:
        return device in self.by_device

    def credentials(self) -> list[tuple[str, bytes | None]]:
        """Each connection's device and the secret it authenticated with (None while
        in its handshake): to find, after a lost notification, who lost access."""
        return [(conn.device, conn.secret) for conn in self._all if conn.device is not None]

    def cut_off(self, device: str, reason: str) -> int:
        """Close every connection of ``device`` now, also one still in its handshake
        (its secret may have been read just before the device lost access); how many."""
        found = [conn for conn in self._all if conn.device == device]
        for conn in found:
            conn.close(reason)
        return len(found)

    def push(self, device: str, envelope: bytes) -> bool:
        """Write one MESSAGE frame to ``device``'s connection; False if it has none."""
        conn = self.by_device.get(device)
        if conn is None or not conn.write(protocol.encode_message_frame(envelope)):
            return False
        self.stats.pushed += 1
        return True

    async def close(self) -> None:
        """Stop accepting, say BYE to every device and close; wait for pending store calls."""
        self._stop_listening()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for conn in list(self._all):
            conn.close("server stopping")
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)
        await asyncio.sleep(0)  # the transports just closed let go of their sockets

    def _stop_listening(self) -> None:
        loop = asyncio.get_running_loop()
        for handle in self._resuming.values():
            handle.cancel()
        self._resuming.clear()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    # ----------------------------------------------------------------- accepting

    def _accept(self, sock: socket.socket) -> None:
        """Take the connections waiting on a listening socket (called when it is readable)."""
        for _ in range(ACCEPT_BATCH):
            try:
                accepted, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(sock, exc)
                return
            accepted.setblocking(False)
            self._serve(accepted, addr)

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        """No file descriptor (or memory) left: make room if an unauthenticated peer holds one,
        stop accepting for a moment, and say so in one line (not one per attempt)."""
        self.stats.accept_errors += 1
        pause = ACCEPT_PAUSE
        if exc.errno in _OUT_OF_RESOURCES:
            evicted = 0
            while evicted < EVICT_BATCH and (oldest := self._waiting.oldest()) is not None:
                oldest.close(BUSY, abort=True)  # its descriptor is free at the next turn
                evicted += 1
            self.stats.evicted += evicted
            if evicted:
                pause = 0.0
            self.throttle.warning(
                "sync: cannot accept connections: %s (raise LimitNOFILE / ulimit -n); %s",
                os.strerror(exc.errno or 0),
                "closed the oldest unauthenticated connections" if evicted else "pausing",
                key="accept resources",
            )
        else:
            self.throttle.warning("sync: cannot accept a connection: %s", exc, key="accept")
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        self._resuming[sock] = loop.call_later(pause, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._resuming.pop(sock, None)
        if sock in self._sockets:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)

    def _serve(self, sock: socket.socket, addr: Any) -> None:
        """Count the new connection as unauthenticated (closing the oldest if there are too
        many), then set up its transport (and TLS) in a task."""
        conn = DeviceConnection(self, addr)
        self._all.add(conn)
        self.stats.accepted += 1
        for victim in self._waiting.add(conn, conn.peer_host):
            self.stats.evicted += 1
            self.throttle.warning(
                "sync: too many unauthenticated connections; closing the oldest, from %s",
                victim.peer,
                key="evicted",
            )
            victim.close(BUSY, abort=True)
        task = asyncio.get_running_loop().create_task(
            self._open(conn, sock), name=f"sync open {conn.peer}"
        )
        conn.opening = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda done: _close_unless_served(done, sock))

    async def _open(self, conn: DeviceConnection, sock: socket.socket) -> bool:
        """Wrap ``sock`` in a transport (after the TLS handshake, if any); False if that failed."""
        tls = self.settings.tls
        try:
            await asyncio.get_running_loop().connect_accepted_socket(
                lambda: conn,
                sock,
                ssl=tls,
                ssl_handshake_timeout=self.settings.handshake_timeout if tls else None,
            )
        except Exception as exc:  # TLS refused, reset, timed out: that peer only
            self.throttle.info(
                "sync: %s: connection not set up: %s: %s",
                conn.peer,
                type(exc).__name__,
                exc,
                key="open",
            )
            conn.gone()
            return False
        finally:
            conn.opening = None
        return True

    # ----------------------------------------------------------------- internals

    def spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def authenticated(self, conn: DeviceConnection) -> None:
        """``conn`` passed the handshake: it no longer counts as unauthenticated."""
        self._waiting.discard(conn)
        self.stats.authenticated += 1

    def subscribed(self, conn: DeviceConnection) -> None:
        """``conn`` asked for pushes: it becomes its device's connection, replacing any other."""
        if conn.device is None:
            raise RuntimeError("sync: the connection has not authenticated")
        old = self.by_device.get(conn.device)
        if old is conn:
            return
        self.by_device[conn.device] = conn
        self.stats.subscribed += 1
        self.comings.info("sync: %s connected from %s", conn.device, conn.peer)
        if old is not None:
            old.close("replaced by a new connection", forget=False)
        self.spawn(self._record_connected(conn), f"sync connected {conn.device}")

    async def _record_connected(self, conn: DeviceConnection) -> None:
        if conn.device is None:
            raise RuntimeError("sync: the connection has not authenticated")
        try:
            await self.store.connected(conn.device, conn.peer)
        except Exception as exc:
            logger.warning("sync: cannot record %s's connection: %s", conn.device, first_line(exc))
        if self.on_connect is not None and self.by_device.get(conn.device) is conn:
            self.on_connect(conn.device)

    def detached(self, conn: DeviceConnection, *, forget: bool) -> None:
        self._all.discard(conn)
        self._waiting.discard(conn)
        if self.synchronizer is not None:
            self.synchronizer.closed(conn)
        device = conn.device
        if device is None or self.by_device.get(device) is not conn:
            return
        del self.by_device[device]
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


class DeviceConnection(asyncio.Protocol):
    """One device's connection; states: hello → auth → checking → open → closed."""

    __slots__ = (
        "_challenge",
        "_client_nonce",
        "_drained",
        "_next_track",
        "_polling",
        "_reader",
        "_sealer",
        "_secret",
        "_state",
        "_transport",
        "device",
        "last_received",
        "last_sent",
        "opening",
        "peer",
        "peer_host",
        "server",
        "started",
    )

    def __init__(self, server: ConnectionServer, addr: Any) -> None:
        self.server = server
        self.device: str | None = None
        self.peer = format_peer(addr)
        self.peer_host = str(addr[0]) if isinstance(addr, tuple) else ""
        self.started = self.last_received = self.last_sent = server.clock()
        self.opening: asyncio.Task[bool] | None = None
        """Sets up the transport (and TLS) until connection_made."""
        self._transport: asyncio.Transport | None = None
        self._reader = protocol.FrameReader()
        self._sealer: protocol.FrameSealer | None = None
        """Tags what the server sends, once authenticated."""
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
        if not isinstance(transport, asyncio.Transport):
            raise TypeError(f"sync: a stream transport, not {type(transport).__name__}")
        if self._state == "closed":  # closed while its transport was being set up
            transport.abort()
            return
        self._transport = transport

    def gone(self) -> None:
        """The connection could not be set up (TLS handshake failed, reset)."""
        self._state = "closed"
        self.server.detached(self, forget=True)

    def connection_lost(self, exc: Exception | None) -> None:
        was_open = self._state == "open"
        self._state = "closed"
        self.resume_writing()
        self.server.detached(self, forget=True)
        if was_open:
            self.server.comings.info("sync: %s at %s disconnected", self.device, self.peer)

    def data_received(self, data: bytes) -> None:
        if self._state == "closed":
            return
        self.last_received = self.server.clock()
        reader = self._reader
        try:
            reader.add(data)
            while self._state != "closed" and (frame := reader.take()) is not None:
                self._frame(frame)
            if self._state != "open" and reader.buffered > MAX_PREAUTH_BUFFER:
                raise protocol.Oversized("too much data before authentication")
        except protocol.BadSignature as exc:  # only frames after WELCOME carry tags
            self.server.stats.bad_frames += 1
            self._drop(f"{type(exc).__name__}: {exc}")
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
            self.server.throttle.info("sync: %s: %s", self.peer, exc, key="version")
            self.close(
                f"unsupported version: this server speaks SYNC version {protocol.SYNC_VERSION}; "
                "upgrade pushsync on the device"
            )
            return
        self.device = hello.device
        self._client_nonce = hello.nonce
        self._challenge = protocol.new_nonce()
        self._state = "auth"
        self.write(protocol.encode_challenge(self._challenge))

    def _auth(self, frame: protocol.Frame) -> None:
        proof = protocol.decode_auth(frame)
        self._state = "checking"
        arrived = asyncio.get_running_loop().time()
        self.server.spawn(self._check(proof, arrived), f"sync auth {self.peer}")

    async def _check(self, proof: bytes, arrived: float) -> None:
        """Answer WELCOME at once, or BYE ``failed_auth_delay`` after the AUTH ``arrived``.

        Unknown, disabled and wrong-secret devices take the same path: one
        lookup, one HMAC (under a dummy secret when there is none), one
        comparison, then the wait for the fixed deadline.
        """
        device = self.device
        server = self.server
        if device is None:
            raise RuntimeError("sync: AUTH before HELLO")
        try:
            secret = await server.store.secret(device)
        except Exception as exc:
            server.throttle.warning(
                "sync: cannot look up device %s: %s", device, first_line(exc), key="lookup"
            )
            await self._until(arrived + server.settings.failed_auth_delay)
            self.close("server unavailable, try again later")
            return
        key = server.dummy_secret if secret is None else secret
        expected = protocol.client_proof(key, self._challenge, self._client_nonce, device)
        if not hmac.compare_digest(expected, proof) or secret is None:
            server.stats.refused += 1
            server.throttle.warning(
                "sync: %s failed to authenticate as %r (wrong secret, unknown or disabled)",
                self.peer,
                device,
                key="refused",
            )
            await self._until(arrived + server.settings.failed_auth_delay)
            self.close(protocol.KEY_REFUSED)
            return
        if self._state == "closed":
            return
        self._secret = secret
        self.write(
            protocol.encode_welcome(
                protocol.server_proof(secret, self._client_nonce, self._challenge, device)
            )
        )
        keys = protocol.session_keys(secret, self._client_nonce, self._challenge, device)
        self._sealer = protocol.FrameSealer(keys.down)
        self._reader.authenticate(keys.up)
        self._state = "open"
        server.authenticated(self)
        logger.debug("sync: %s authenticated from %s", device, self.peer)

    @staticmethod
    async def _until(deadline: float) -> None:
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)

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
        if self._secret is None or self.device is None:
            raise RuntimeError("sync: the connection has not authenticated")
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
        if self.device is None:
            raise RuntimeError("sync: the connection has not authenticated")
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
        if device is None or self._secret is None:
            raise RuntimeError("sync: the connection has not authenticated")
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
        if self._sealer is not None:
            data = self._sealer.seal(data)
        transport.write(data)
        self.last_sent = self.server.clock()
        if bulk:
            return True
        if transport.get_write_buffer_size() > self.server.settings.max_write_buffer:
            self.server.stats.dropped += 1
            self._drop("too slow: output is piling up")
            return False
        return True

    @property
    def secret(self) -> bytes | None:
        """The secret this connection authenticated with; None before."""
        return self._secret

    def close(self, reason: str | None, *, forget: bool = True, abort: bool = False) -> None:
        """Say BYE (with ``reason``, if any) and close; ``abort``: without waiting for
        output to drain (the file descriptor is free at once)."""
        if self._state == "closed":
            return
        transport = self._transport
        if reason is not None and transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                bye = protocol.encode_bye(reason)
                transport.write(bye if self._sealer is None else self._sealer.seal(bye))
        self._state = "closed"
        self.resume_writing()
        self.server.detached(self, forget=forget)
        if transport is None:
            if self.opening is not None:
                self.opening.cancel()  # its socket is closed when the task ends
        elif abort:
            transport.abort()
        else:
            transport.close()

    def _drop(self, why: str) -> None:
        self.server.stats.dropped += 1
        if self._state == "open":
            logger.warning("sync: dropped %s (%s): %s", self.peer, self.device, why)
        else:
            self.server.throttle.warning(
                "sync: dropped %s (unauthenticated): %s", self.peer, why, key="dropped"
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

    def __init__(self, server: ConnectionServer, *, limit: int = MAX_DATAGRAM) -> None:
        self.server = server
        self.limit = limit

    async def send(self, item: Claimed) -> SendResult:
        return self.send_now(item)

    def send_now(self, item: Claimed) -> SendResult:
        """Push at once: a MESSAGE frame is queued on the open connection without waiting,
        so the dispatcher sends a batch inline, with no task per row (as UDP to an IP)."""
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


def _close_unless_served(task: asyncio.Task[bool], sock: socket.socket) -> None:
    """After a connection's set-up task: close its socket unless a transport took it."""
    if task.cancelled() or task.exception() is not None or not task.result():
        sock.close()


def server_tls(cert_file: str, key_file: str) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or newer) from a PEM certificate chain and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert_file, key_file)
    return context


__all__ = [
    "DEFAULT_PORT",
    "MAX_PREAUTH",
    "MAX_PREAUTH_PER_HOST",
    "ConnectionServer",
    "ConnectionSettings",
    "ConnectionStats",
    "ConnectionStore",
    "DeviceConnection",
    "SyncGateway",
    "Waiting",
    "server_tls",
]
