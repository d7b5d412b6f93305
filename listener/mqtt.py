"""The listener's MQTT channel: messages from a broker, acks back through it.

The device subscribes (QoS 1) to ``<topic_prefix>/<device>/in`` in a persistent
session (``clean_session`` false, client id the device id unless configured),
so a broker keeps what is published while the device is away and hands it
over when it returns; the outbox's resend and ``ttl`` still cover a broker
that forgets. Every message is the signed envelope of the other channels and
is verified here: the broker is a carrier, trusted with nothing. Acks and, at
every connection, the device's announcement (:data:`~pushsync.wire.mqtt.ANNOUNCEMENT`,
which puts its MQTT subscription on record at the dispatcher) are published
at QoS 1 to ``<topic_prefix>/<device>/ack``.

paho-mqtt is the optional extra ``pushsync[mqtt]``, imported only here and
only when the channel starts; paho's network loop runs in a thread of its
own, and what arrives is handed to the event loop. How it behaves:
``docs/listener.md`` ("mqtt").
"""

from __future__ import annotations

import asyncio
import logging
import queue
import ssl
from typing import TYPE_CHECKING, Any

from pushsync.errors import PushsyncError
from pushsync.listener.config import MQTT_EXTRA
from pushsync.listener.config import MqttChannel as MqttConfig
from pushsync.logs import Throttle
from pushsync.wire import mqtt as topics
from pushsync.wire import protocol

if TYPE_CHECKING:
    from pushsync.listener.runtime import Listener

logger = logging.getLogger(__name__)

KEEPALIVE = 30
"""Seconds between the client's PINGREQs when nothing else is sent."""
RESUBSCRIBE_FIRST = 1.0
RESUBSCRIBE_MAX = 10.0
"""A refused subscription is asked for again after 1 s, doubling to 10 s."""


class MqttChannel:
    """A persistent MQTT session with the broker of ``config``; reconnects by itself."""

    name = "mqtt"

    def __init__(self, listener: Listener, config: MqttConfig) -> None:
        self.listener = listener
        self.config = config
        device = listener.config.device
        self.in_topic = topics.in_topic(config.topic_prefix, device)
        self.ack_topic = topics.ack_topic(config.topic_prefix, device)
        self.connected = asyncio.Event()
        """Set while the broker has accepted the connection and granted the subscription."""
        self.connections = 0
        """Connections the broker accepted since start."""
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._announcing: asyncio.Task[None] | None = None
        self._resubscribing: asyncio.Task[None] | None = None
        self._resubscribe_delay = RESUBSCRIBE_FIRST
        self._log = Throttle(logger)

    @property
    def server(self) -> str:
        return str(self.config.server)

    async def start(self) -> None:
        """Connect in the background: a broker that is down is retried, not fatal.

        PushsyncError naming the extra when paho-mqtt is not installed, or when
        ``password_file`` cannot be read.
        """
        try:
            from paho.mqtt import client as paho
            from paho.mqtt.enums import CallbackAPIVersion
        except ImportError:
            raise PushsyncError(f"the mqtt channel needs paho-mqtt: {MQTT_EXTRA}") from None
        config = self.config
        self._loop = asyncio.get_running_loop()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=config.client_id or self.listener.config.device,
            clean_session=False,
            protocol=paho.MQTTv311,
        )
        if config.username is not None:
            client.username_pw_set(config.username, self._password())
        if config.tls:
            cafile = None if config.ca_file is None else str(config.ca_file)
            client.tls_set_context(ssl.create_default_context(cafile=cafile))
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        client.connect_async(config.server.host, config.server.port, keepalive=KEEPALIVE)
        client.loop_start()
        self._announcing = asyncio.create_task(self._announce_now_and_then())

    def _password(self) -> str | None:
        return _read_password(self.config)

    async def close(self) -> None:
        if self._announcing is not None:
            self._announcing.cancel()
        self._stop_resubscribing()
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self.connected.clear()

    # ----------------------------------------------------------------- paho's thread

    def _on_connect(
        self, client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._log.warning(
                "mqtt: %s refused the connection: %s", self.server, reason, key="refused"
            )
            return
        # Always subscribe: a broker that lost the session (restarted without
        # persistence) has forgotten the subscription.
        client.subscribe(self.in_topic, qos=1)
        self._call(self._connected)

    def _on_subscribe(
        self, _client: Any, _userdata: Any, _mid: int, reasons: list[Any], _props: Any
    ) -> None:
        if any(reason.is_failure for reason in reasons):
            self._log.warning(
                "mqtt: %s refused the subscription to %s: check the broker's ACL; asking again",
                self.server,
                self.in_topic,
                key="subscription",
            )
            self._call(self._subscribe_later)
            return
        self._call(self._subscribed)

    def _on_disconnect(
        self, _client: Any, _userdata: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._call(self.connected.clear)
        self._call(self._stop_resubscribing)  # the next connection subscribes anyway
        if self._client is not None:
            self._log.warning(
                "mqtt: lost the connection to %s (%s); reconnecting", self.server, reason
            )

    def _on_message(self, _client: Any, _userdata: Any, message: Any) -> None:
        self._call(self.received, str(message.topic), bytes(message.payload))

    def _call(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(callback, *args)

    # ----------------------------------------------------------------- the event loop

    def _connected(self) -> None:
        self.connections += 1
        logger.info("mqtt: connected to %s, subscribing to %s", self.server, self.in_topic)
        self._announce()

    def _subscribed(self) -> None:
        self._resubscribe_delay = RESUBSCRIBE_FIRST
        self.connected.set()

    def _subscribe_later(self) -> None:
        """Ask again for the subscription after a while, on the same connection. A refusal
        need not be final: NATS refuses while its JetStream cannot create the consumer
        behind the subscription (a node lost, a leader being elected)."""
        if self._resubscribing is not None and not self._resubscribing.done():
            return
        delay = self._resubscribe_delay
        self._resubscribe_delay = min(delay * 2, RESUBSCRIBE_MAX)
        self._resubscribing = asyncio.create_task(self._subscribe_again(delay))

    async def _subscribe_again(self, delay: float) -> None:
        await asyncio.sleep(delay)
        client = self._client
        if client is not None and client.is_connected():
            client.subscribe(self.in_topic, qos=1)

    def _stop_resubscribing(self) -> None:
        if self._resubscribing is not None:
            self._resubscribing.cancel()
            self._resubscribing = None

    async def _announce_now_and_then(self) -> None:
        """Announce again every :data:`~pushsync.wire.mqtt.ANNOUNCE_EVERY` while connected."""
        while True:
            await asyncio.sleep(topics.ANNOUNCE_EVERY)
            if self.connected.is_set():
                self._announce()

    def _announce(self) -> None:
        """Tell the dispatchers, signed, that this device listens on its topic."""
        listener = self.listener
        ack = protocol.Ack(
            request_id=topics.ANNOUNCEMENT,
            device=listener.config.device,
            confirmed=listener.clock(),
        )
        self._publish(protocol.encode_ack(ack, listener.secret))

    def received(self, topic: str, data: bytes) -> None:
        """Verify one envelope from the broker and hand its message on. Never raises."""
        listener = self.listener
        msg = listener.verify_envelope(data, channel=self.name, peer=topic)
        if msg is not None:
            listener.spawn(msg, reply=self._publish, channel=self.name, peer=self.server)

    def _publish(self, data: bytes) -> None:
        """Publish an ack; paho queues it while the broker is away."""
        client = self._client
        if client is None:
            raise ConnectionError("the mqtt channel is closed")
        client.publish(self.ack_topic, data, qos=1, retain=False)


def check_broker(config: MqttConfig, device: str, timeout: float) -> str | None:
    """For ``listen --check``: log in to the broker and subscribe to the device's topic,
    then leave; None when both worked, else what went wrong. Blocking.

    The check uses a client id of its own (``…-check``) with a clean session, so the
    device's persistent session, and the messages the broker keeps in it, are untouched.
    """
    from paho.mqtt import client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    answers: queue.Queue[tuple[str, Any]] = queue.Queue()
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"{config.client_id or device}-check",
        clean_session=True,
        protocol=paho.MQTTv311,
    )
    if config.username is not None:
        client.username_pw_set(config.username, _read_password(config))
    if config.tls:
        cafile = None if config.ca_file is None else str(config.ca_file)
        client.tls_set_context(ssl.create_default_context(cafile=cafile))
    client.on_connect = lambda _c, _u, _f, reason, _p: answers.put(("connect", reason))
    client.on_subscribe = lambda _c, _u, _m, reasons, _p: answers.put(("subscribe", reasons))
    try:
        client.connect(config.server.host, config.server.port, keepalive=KEEPALIVE)
    except (OSError, ssl.SSLError) as exc:
        return str(exc) or type(exc).__name__
    client.loop_start()
    try:
        return _check_answers(
            client, answers, topics.in_topic(config.topic_prefix, device), timeout
        )
    finally:
        client.disconnect()
        client.loop_stop()


def _check_answers(
    client: Any, answers: queue.Queue[tuple[str, Any]], topic: str, timeout: float
) -> str | None:
    try:
        _, reason = answers.get(timeout=timeout)
        if reason.is_failure:
            return f"the broker refused the login: {reason}"
        client.subscribe(topic, qos=1)
        _, reasons = answers.get(timeout=timeout)
    except queue.Empty:
        return f"no answer in {timeout:.0f}s"
    if any(reason.is_failure for reason in reasons):
        return f"the broker refused the subscription to {topic}: check its ACL"
    return None


def _read_password(config: MqttConfig) -> str | None:
    path = config.password_file
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PushsyncError(f"mqtt channel: cannot read password_file {path}: {exc}") from None


__all__ = ["MqttChannel", "check_broker"]
