"""What ``pushsync dispatch`` is told: one frozen :class:`DispatcherSettings`, every default here.

The command line (``pushsync/cli.py``) fills in what the user gave; the demo
and the tests fill in what they need; :func:`~pushsync.dispatcher.daemon.serve`
assembles a running dispatcher from it. The SYNC server's own defaults
(heartbeat, handshake limits) stay with it, in
:class:`~pushsync.dispatcher.connections.ConnectionSettings`, and the
synchronizations' in :class:`~pushsync.dispatcher.sync_endpoint.SyncLimits`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from pushsync.dispatcher.connections import DEFAULT_PORT, ConnectionSettings
from pushsync.dispatcher.gateways import smtp_from_url, split_address
from pushsync.dispatcher.mqtt import MqttSettings, mqtt_from_url
from pushsync.dispatcher.sync_endpoint import SyncLimits


@dataclass(frozen=True, slots=True, kw_only=True)
class DispatcherSettings:
    """One dispatcher's configuration.

    ValueError if a listen address is not ``HOST:PORT``; UsageError naming what
    is wrong with ``smtp``.
    """

    dsn: str = field(repr=False)
    """Where the database is; may hold a password, so not in ``repr``."""
    owner: str | None = None
    """This dispatcher's name in ``pushsync.dispatchers`` and on its leases; None:
    host, pid and a random tag."""

    udp_listen: str | None = "0.0.0.0:0"
    """Where UDP messages leave from and acks arrive: every interface, a port the
    system picks (logged at start). Devices ack to the address a message came
    from, so any port works; fix one when a firewall must allow it. None: no UDP
    gateway."""
    sync_listen: str | None = f"0.0.0.0:{DEFAULT_PORT}"
    """Where devices open their SYNC connections; None: no SYNC server."""
    sync: ConnectionSettings = field(default_factory=ConnectionSettings)
    """The SYNC server's TLS, heartbeat and handshake limits."""
    sync_limits: SyncLimits = field(default_factory=SyncLimits)
    """What synchronizations may take of this dispatcher."""
    smtp: str | None = None
    """The email gateway, ``smtp://[USER@]HOST[:PORT][?from=ADDRESS]``
    (:func:`~pushsync.dispatcher.gateways.smtp_from_url`); None: no email."""
    smtp_password: str | None = field(default=None, repr=False)
    """The SMTP password, if not in the URL (where command lines show it)."""
    mqtt: str | None = None
    """The MQTT gateway's broker, ``mqtt[s]://[USER@]HOST[:PORT][?client_id=…]``
    (:func:`~pushsync.dispatcher.mqtt.mqtt_from_url`); None: no MQTT."""
    mqtt_password: str | None = field(default=None, repr=False)
    """The broker password, if not in the URL."""
    mqtt_ca_file: str | None = None
    """CA certificates to check an ``mqtts://`` broker with; None: the system's."""
    mqtt_cert_file: str | None = None
    """A client certificate to present to an ``mqtts://`` broker (with ``mqtt_key_file``)."""
    mqtt_key_file: str | None = None
    metrics_listen: str | None = None
    """Where ``/metrics`` and ``/healthz`` are served; None: not at all."""

    batch: int = 500
    """Rows claimed at a time."""
    lease: timedelta = timedelta(seconds=30)
    """How long a claimed row stays this dispatcher's before another may take it."""
    poll_interval: float = 1.0
    """Seconds between claims when no NOTIFY wakes the send loop."""
    housekeeping_interval: float = 5.0
    """Seconds between heartbeats, gauges, expiry, pruning and archiving."""
    archive_batch: int = 1000
    """Finished rows moved to the history at a time."""
    polls_reload_interval: float = 30.0
    """Seconds between readings of the list of polls."""
    changes_retention: timedelta = timedelta(days=7)
    """How long the change log keeps a change."""

    def __post_init__(self) -> None:
        for address in (self.udp_listen, self.sync_listen, self.metrics_listen):
            if address is not None:
                split_listen(address)
        if self.smtp is not None:
            smtp_from_url(self.smtp, password=self.smtp_password)  # UsageError if wrong
        if self.mqtt is not None:
            self.mqtt_settings()  # UsageError if wrong

    def mqtt_settings(self) -> MqttSettings:
        """The MQTT gateway's settings; UsageError if ``mqtt`` is wrong."""
        if self.mqtt is None:
            raise ValueError("no MQTT broker is configured")
        return mqtt_from_url(
            self.mqtt,
            password=self.mqtt_password,
            ca_file=self.mqtt_ca_file,
            cert_file=self.mqtt_cert_file,
            key_file=self.mqtt_key_file,
        )

    @property
    def alive_for(self) -> timedelta:
        """How long after its last heartbeat this dispatcher counts as alive: three
        housekeeping rounds, at least 15 seconds."""
        return timedelta(seconds=max(15.0, 3 * self.housekeeping_interval))


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0 allowed: the system picks one) as (host, port)."""
    return split_address(text, lowest_port=0)


__all__ = ["DispatcherSettings", "split_listen"]
