"""The MQTT gateway: signed envelopes published through a broker, signed acks read back.

``pushsync dispatch --mqtt mqtt[s]://USER@HOST:PORT`` publishes each message,
the same signed envelope UDP carries, at QoS 1 and never retained, to
``<prefix>/<device>/in`` (:mod:`pushsync.wire.mqtt`), and counts it sent once
the broker has acknowledged it (PUBACK). Devices ack on ``<prefix>/<device>/ack``;
every dispatcher subscribes to those topics through one shared subscription
(``$share/<group>/<prefix>/+/ack``), so the broker hands each ack to one of
them. Acks are verified with the device's key exactly as on UDP: the broker is
a carrier, trusted with nothing, and an ack on one device's topic that names
another device is dropped. A device's signed announcement
(:data:`~pushsync.wire.mqtt.ANNOUNCEMENT`) records that it has an MQTT
subscription (``sql/mqtt.sql``), which ``auto`` routing then prefers to UDP.

paho-mqtt's network loop runs on the dispatcher's event loop: its socket is
watched with ``add_reader``/``add_writer`` (``loop_read``, ``loop_write``), its
keepalive is a task calling ``loop_misc``, and only the TCP/TLS connect runs in
a thread. A publish and its PUBACK thus never cross threads (with paho's own
thread, ``loop_start``, each message cost two thread hand-overs and the GIL
between them: 10,000 publishes took several times longer). A publish waits
for its PUBACK on an asyncio future. paho is imported when the gateway
starts, so settings are checked without it. docs/operations.md ("The MQTT
gateway") has the broker's side: ACLs, a Mosquitto configuration, EMQX and NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from pushsync import queries
from pushsync.dispatcher.acks import MAX_LOOKUPS, AckHandler, AckVerifier, SecretFetch, SecretLookup
from pushsync.dispatcher.gateways import DEFAULT_SENDER, SendResult, failed, sent, to_message
from pushsync.dispatcher.outbox import Claimed
from pushsync.dispatcher.urls import parse_server_url
from pushsync.errors import UsageError
from pushsync.logs import Throttle
from pushsync.wire import mqtt as topics
from pushsync.wire import protocol
from pushsync.wire.limits import MAX_DATAGRAM

if TYPE_CHECKING:
    from contextlib import AsyncExitStack

    from psycopg_pool import AsyncConnectionPool

    from pushsync.dispatcher.daemon import Dispatcher

logger = logging.getLogger(__name__)

SCHEMES: Final = {"mqtt": (False, 1883), "mqtts": (True, 8883)}
DEFAULT_GROUP: Final = "pushsync"
PUBLISH_TIMEOUT: Final = 10.0
"""Seconds a publish waits for the broker's PUBACK before it counts as not sent."""
BACKOFF_FIRST: Final = 1.0
BACKOFF_MAX: Final = 5.0
CLOSE_TIMEOUT: Final = 1.0
"""Seconds :meth:`MqttGateway.close` waits for the DISCONNECT to be written."""
MAX_INFLIGHT: Final = 0
"""QoS 1 publishes awaiting their PUBACK at once: no limit in paho (its default, 20,
throttles a batch, and any limit makes it scan every message in flight at each PUBACK);
the dispatcher's batch (``--batch``, 500) bounds them."""


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True, slots=True, kw_only=True)
class MqttSettings:
    """Where the broker is and how to log in; made by :func:`mqtt_from_url`."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    """None: ``pushsync-dispatch-`` and a random tag, new at every start."""
    prefix: str = topics.DEFAULT_PREFIX
    group: str | None = DEFAULT_GROUP
    """The shared subscription's group: dispatchers of one group share the acks. None
    (``?group=none``): a plain subscription, every dispatcher gets every ack (for
    brokers without shared subscriptions, such as NATS)."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    publish_timeout: float = PUBLISH_TIMEOUT


_GROUP_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def mqtt_from_url(
    url: str,
    *,
    password: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
) -> MqttSettings:
    """The broker ``--mqtt`` names: ``mqtt[s]://[USER@]HOST[:PORT][?client_id=…&prefix=…&group=…]``.

    ``mqtt://`` is plain TCP (port 1883 by default), ``mqtts://`` TLS (8883),
    checked against the system's CAs or ``ca_file``; ``cert_file`` and
    ``key_file`` present a client certificate. The password comes from
    ``password`` (``--mqtt-password-file``) or, visible to other users on the
    command line, from the URL. UsageError naming what is wrong, never the password.
    """
    found = parse_server_url(
        url,
        schemes=SCHEMES,
        options=("client_id", "prefix", "group"),
        form="mqtt://[USER@]HOST[:PORT]",
        password=password,
    )
    values = found.options
    if "client_id" in values and not values["client_id"]:
        raise UsageError("client_id must not be empty")
    prefix = values.get("prefix", topics.DEFAULT_PREFIX)
    try:
        topics.check_prefix(prefix)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    group: str | None = values.get("group", DEFAULT_GROUP)
    if group == "none":
        group = None
    elif not group or not set(group) <= _GROUP_CHARS:
        raise UsageError(f"bad group {group!r}: letters, digits, '_', '.' and '-', or none")
    tls, default_port = SCHEMES[found.scheme]
    if (ca_file or cert_file or key_file) and not tls:
        raise UsageError("--mqtt-ca-file, --mqtt-cert and --mqtt-key need an mqtts:// broker")
    if bool(cert_file) != bool(key_file):
        raise UsageError("--mqtt-cert and --mqtt-key go together")
    return MqttSettings(
        host=found.host,
        port=found.port or default_port,
        tls=tls,
        username=found.username,
        password=found.password,
        client_id=values.get("client_id"),
        prefix=prefix,
        group=group,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
    )


def describe_mqtt(settings: MqttSettings) -> str:
    """For log lines: scheme, user, host, port and topics — never the password."""
    scheme = "mqtts" if settings.tls else "mqtt"
    user = f"{settings.username}@" if settings.username else ""
    return (
        f"{scheme}://{user}{settings.host}:{settings.port}, publishing to "
        f"{topics.in_topic(settings.prefix, '<device>')}, acks through "
        f"{topics.acks_filter(settings.prefix, settings.group)}"
    )


# --------------------------------------------------------------------------- the gateway


@dataclass(slots=True)
class MqttStats:
    """What arrived on the ack topics."""

    accepted: int = 0
    dropped: int = 0
    announcements: int = 0
    lookups: int = 0


class MqttGateway:
    """Publishes to the broker of ``settings``; verifies the acks it hands back.

    :meth:`start` connects in the background, and again whenever the
    connection ends (backoff 1 s doubling to 5 s); a send while the broker is
    unreachable fails at once, not final, so ``auto`` routing goes on to UDP or
    email and the outbox retries.
    """

    name = "mqtt"

    def __init__(
        self,
        settings: MqttSettings,
        *,
        secret_for: SecretLookup,
        on_ack: AckHandler,
        fetch_secret: SecretFetch | None = None,
        on_announce: Callable[[str], None] | None = None,
        sender: str = DEFAULT_SENDER,
    ) -> None:
        self.settings = settings
        self.sender = sender
        self.stats = MqttStats()
        self.connected = asyncio.Event()
        """Set while the broker has accepted this gateway's connection."""
        self.subscribed = asyncio.Event()
        """Set once the broker has granted the acks' subscription (tests wait on it)."""
        self._acks = AckVerifier(
            secret_for=secret_for,
            fetch_secret=fetch_secret,
            accept=self._accept,
            drop=self._drop,
            stats=self.stats,
            limit=MAX_DATAGRAM,
        )
        self._on_ack = on_ack
        self._on_announce = on_announce
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[None]] = {}
        """Publishes awaiting their PUBACK, by message id. Only the loop's thread touches
        it: paho's loop_read (which reads PUBACKs) runs there, and a publish never
        writes (nor reads) at once, since writing waits for add_writer."""
        self._log = Throttle(logger)
        self._refusal: str | None = None
        self._loop_thread: int | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[Any] | None = None
        self._socket_closed = asyncio.Event()
        self._gone = asyncio.Event()
        """Set when the connection ends (or a connection attempt was refused)."""
        self._established = False
        self._resubscribing: asyncio.Task[None] | None = None
        self._subscribe_delay = BACKOFF_FIRST

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start connecting in the background; a broker that is down is retried, not fatal."""
        from paho.mqtt import client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        settings = self.settings
        client_id = settings.client_id or f"pushsync-dispatch-{uuid.uuid4().hex[:12]}"
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=paho.MQTTv311,
        )
        if settings.username is not None:
            client.username_pw_set(settings.username, settings.password)
        if settings.tls:
            context = ssl.create_default_context(cafile=settings.ca_file)
            if settings.cert_file and settings.key_file:
                context.load_cert_chain(settings.cert_file, settings.key_file)
            client.tls_set_context(context)
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_publish = self._published
        client.on_subscribe = self._granted
        client.on_message = self._message
        # paho's network loop runs on this event loop: its socket is watched with
        # add_reader/add_writer, so publishes and PUBACKs never cross threads.
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written
        self._client = client
        self._supervisor = asyncio.create_task(self._keep_connected(client), name="mqtt")

    async def _keep_connected(self, client: Any) -> None:
        """Connect, wait until the connection ends, and again, with backoff (1 s to 5 s)."""
        settings = self.settings
        delay = BACKOFF_FIRST
        while True:
            self._gone.clear()
            established = False
            # The TCP (and TLS) handshake blocks: in a thread, so the loop runs on.
            # Shielded: a cancelled wait leaves the thread running, and close()
            # waits for it to be done with the socket.
            self._connecting = asyncio.ensure_future(
                asyncio.to_thread(client.connect, settings.host, settings.port, settings.keepalive)
            )
            try:
                await asyncio.shield(self._connecting)
            except (OSError, ValueError) as exc:
                self._log.warning(
                    "MQTT: cannot connect to %s:%d: %s; retrying in %.0fs",
                    settings.host,
                    settings.port,
                    exc,
                    delay,
                    key="connect",
                )
            else:
                housekeeping = asyncio.create_task(self._misc(client))
                try:
                    await self._gone.wait()
                finally:
                    housekeeping.cancel()
                established = self._established
                self._established = False
            if established:
                delay = BACKOFF_FIRST
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _misc(self, client: Any) -> None:
        """paho's keepalive: PINGREQ when quiet, and a connection that stopped answering
        is closed (its on_disconnect ends the wait above)."""
        while True:
            await asyncio.sleep(1.0)
            client.loop_misc()

    async def close(self) -> None:
        """Disconnect (a connection being made is waited for, then closed); sends still
        waiting fail."""
        client, self._client = self._client, None
        if client is None:
            return
        self._stop_resubscribing()
        if self._supervisor is not None:
            self._supervisor.cancel()
            await asyncio.gather(self._supervisor, return_exceptions=True)
        if self._connecting is not None:
            await asyncio.gather(self._connecting, return_exceptions=True)
        if client.socket() is not None:
            client.disconnect()  # written by loop_write, then paho closes the socket
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._socket_closed.wait()
        sock = client.socket()
        if sock is not None:  # the DISCONNECT could not be written: close it here
            self._on_loop(lambda loop: loop.remove_reader(sock))
            self._on_loop(lambda loop: loop.remove_writer(sock))
            sock.close()
        self._fail_pending("the MQTT gateway is closing")
        self._acks.close()

    # ----------------------------------------------------------------- paho's socket

    def _socket_open(self, client: Any, _userdata: Any, sock: Any) -> None:
        self._call(self._socket_closed.clear)
        self._on_loop(lambda loop: loop.add_reader(sock, client.loop_read))

    def _socket_close(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._on_loop(lambda loop: loop.remove_reader(sock))
        self._call(self._socket_closed.set)

    def _want_write(self, client: Any, _userdata: Any, sock: Any) -> None:
        self._on_loop(lambda loop: loop.add_writer(sock, client.loop_write))

    def _written(self, _client: Any, _userdata: Any, sock: Any) -> None:
        self._on_loop(lambda loop: loop.remove_writer(sock))

    def _on_loop(self, act: Callable[[asyncio.AbstractEventLoop], object]) -> None:
        """``act(loop)`` now on the loop's thread, or soon from the connecting thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            _quietly(act, loop)
        else:
            loop.call_soon_threadsafe(_quietly, act, loop)

    # ----------------------------------------------------------------- sending

    async def send(self, item: Claimed) -> SendResult:
        client = self._client
        if client is None or not self.connected.is_set():
            why = self._refusal or "not connected to the MQTT broker"
            return failed(self.name, why, final=False)
        try:
            data = protocol.encode_message(
                to_message(item, self.sender), item.secret, limit=MAX_DATAGRAM
            )
        except protocol.Oversized:
            size = protocol.encoded_size(to_message(item, self.sender))
            error = f"message too large ({size} bytes > {MAX_DATAGRAM})"
            return failed(self.name, error, final=True)
        except protocol.ProtocolError as exc:
            return failed(self.name, f"cannot encode: {exc}", final=True)
        topic = topics.in_topic(self.settings.prefix, item.device_id)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        info = client.publish(topic, data, qos=1, retain=False)
        if info.rc != 0:
            return failed(self.name, f"cannot publish: paho error {info.rc}", final=False)
        self._pending[info.mid] = future
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                await future
        except TimeoutError:
            self._pending.pop(info.mid, None)
            error = f"no PUBACK from the broker in {self.settings.publish_timeout:g}s"
            return failed(self.name, error, final=False)
        except ConnectionError as exc:
            return failed(self.name, str(exc), final=False)
        return sent(self.name)

    # ----------------------------------------------------------------- paho's callbacks

    def _connected(
        self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._refusal = f"the MQTT broker refused the connection: {reason}"
            self._log.warning("%s", self._refusal, key="refused")
            return
        self._refusal = None
        self._established = True
        client.subscribe(self._acks_filter, qos=1)
        self._call(self.connected.set)
        logger.info("MQTT: connected to %s:%d", self.settings.host, self.settings.port)

    def _disconnected(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._call(self.connected.clear)
        self._call(self.subscribed.clear)
        self._call(self._stop_resubscribing)  # a new connection subscribes anyway
        self._call(self._fail_pending, "the connection to the MQTT broker was lost")
        self._call(self._gone.set)
        if self._client is not None:
            self._log.warning("MQTT: disconnected from the broker (%s); reconnecting", reason)

    def _granted(
        self, _client: Any, _userdata: Any, _mid: int, reasons: list[Any], _props: Any
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            self._log.warning(
                "MQTT: the broker refused the subscription to the acks (%s): check its ACL; "
                "trying again in %.0fs",
                ", ".join(str(r) for r in reasons),
                self._subscribe_delay,
                key="subscription",
            )
            self._call(self._subscribe_later)
            return
        self._subscribe_delay = BACKOFF_FIRST
        self._call(self.subscribed.set)
        logger.info("MQTT: receiving acks through %s", self._acks_filter)

    @property
    def _acks_filter(self) -> str:
        return topics.acks_filter(self.settings.prefix, self.settings.group)

    def _subscribe_later(self) -> None:
        """Ask again for the acks' subscription after a while (1 s doubling to 5 s), on the
        same connection. A refusal need not be final: NATS refuses it while its JetStream
        cannot create the consumer behind it (a node lost, a leader being elected); the
        connection goes on publishing meanwhile."""
        if self._resubscribing is not None and not self._resubscribing.done():
            return
        delay, self._subscribe_delay = (
            self._subscribe_delay,
            min(self._subscribe_delay * 2, BACKOFF_MAX),
        )
        self._resubscribing = asyncio.create_task(self._subscribe_again(delay))

    async def _subscribe_again(self, delay: float) -> None:
        await asyncio.sleep(delay)
        client = self._client
        if client is not None and self.connected.is_set():
            client.subscribe(self._acks_filter, qos=1)

    def _stop_resubscribing(self) -> None:
        if self._resubscribing is not None:
            self._resubscribing.cancel()
            self._resubscribing = None

    def _published(self, _client: Any, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        future = self._pending.pop(mid, None)
        if future is not None:
            _resolve(future)

    def _message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._call(self.ack_received, str(message.topic), bytes(message.payload))

    def _call(self, callback: Callable[..., Any], *args: Any) -> None:
        """``callback(*args)`` on the loop: now if this is its thread (paho's callbacks
        run from loop_read and loop_write there), else soon (the connecting thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            loop.call_soon_threadsafe(callback, *args)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionError(why))

    # ----------------------------------------------------------------- acks

    def ack_received(self, topic: str, data: bytes) -> None:
        """Verify an envelope from an ack topic and hand it on; drop anything else.

        Never raises. The topic's device must be the envelope's, and the
        signature that device's: the broker's ACL is a second wall, not the first.
        """
        owner = topics.device_of_ack_topic(self.settings.prefix, topic)
        if owner is None:
            self._drop(topic, protocol.Malformed("not an ack topic"))
            return
        self._acks.verify(data, topic, device=owner)

    def _accept(self, ack: protocol.Ack, topic: str) -> None:
        if ack.request_id == topics.ANNOUNCEMENT:
            self._announced(ack, topic)
            return
        self.stats.accepted += 1
        try:
            self._on_ack(ack, f"mqtt {topic}")
        except Exception:
            logger.exception("ack handler failed for %s from %s", ack.request_id, topic)

    def _announced(self, ack: protocol.Ack, topic: str) -> None:
        if not topics.fresh(ack.confirmed, time.time()):
            self._drop(topic, protocol.Expired("an announcement that is not fresh"))
            return
        self.stats.announcements += 1
        if self._on_announce is not None:
            self._on_announce(ack.device)

    def _drop(self, topic: str, exc: protocol.ProtocolError) -> None:
        self.stats.dropped += 1
        self._log.warning(
            "MQTT: dropped an envelope on %s: %s: %s",
            topic,
            type(exc).__name__,
            exc,
            key=type(exc).__name__,
        )


def _quietly(
    act: Callable[[asyncio.AbstractEventLoop], object], loop: asyncio.AbstractEventLoop
) -> None:
    """A socket watch added or removed; a socket closed meanwhile has nothing to remove."""
    try:
        act(loop)
    except (ValueError, OSError) as exc:
        logger.debug("MQTT: socket watch: %s", exc)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# --------------------------------------------------------------------------- the record


async def record_subscription(pool: AsyncConnectionPool[Any], device: str) -> None:
    """Record that ``device`` has an MQTT subscription (source 'tracking'; a manual
    record still decides). Nothing for a disabled or unknown device."""
    async with pool.connection() as conn:
        await conn.execute(queries.get("mqtt_announced", "mqtt.sql"), {"device_id": device})


# --------------------------------------------------------------------------- assembly


async def start_mqtt(dispatcher: Dispatcher, started: AsyncExitStack) -> MqttGateway | None:
    """The MQTT gateway the dispatcher's settings name, started and added to it (or None)."""
    settings = dispatcher.settings
    if settings.mqtt is None:
        return None
    mqtt = settings.mqtt_settings()
    recording: set[asyncio.Task[None]] = set()

    def announced(device: str) -> None:
        if len(recording) >= MAX_LOOKUPS:
            logger.warning("MQTT: too many announcements at once; %s not recorded", device)
            return
        task = asyncio.get_running_loop().create_task(_record(dispatcher, device))
        recording.add(task)
        task.add_done_callback(recording.discard)

    gateway = MqttGateway(
        mqtt,
        secret_for=dispatcher.secret_for,
        fetch_secret=dispatcher.fetch_secret,
        on_ack=dispatcher.on_ack,
        on_announce=announced,
    )
    await gateway.start()
    started.push_async_callback(gateway.close)
    dispatcher.add_gateway(gateway)
    logger.info("MQTT gateway: %s", describe_mqtt(mqtt))
    return gateway


async def _record(dispatcher: Dispatcher, device: str) -> None:
    try:
        await record_subscription(dispatcher.store.pool, device)
    except Exception as exc:
        logger.warning("MQTT: cannot record the subscription of %s: %s", device, exc)
        return
    logger.info("MQTT: %s announced its subscription", device)


__all__ = [
    "MqttGateway",
    "MqttSettings",
    "MqttStats",
    "describe_mqtt",
    "mqtt_from_url",
    "record_subscription",
    "start_mqtt",
]
