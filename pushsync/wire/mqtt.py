"""MQTT topics and the device's announcement: what the MQTT gateway and channel both use.

The broker carries the same signed envelopes as UDP (:mod:`pushsync.wire.protocol`)
and is trusted with nothing: a message to device D is published to
``<prefix>/D/in``, D's acks come back on ``<prefix>/D/ack``. A device that
connects announces itself on its ack topic with a signed ack of
:data:`ANNOUNCEMENT` (the nil request id): the dispatcher records that the
device has an MQTT subscription, so automatic routing reaches it over MQTT.
"""

from __future__ import annotations

import re
import uuid
from typing import Final

DEFAULT_PREFIX: Final = "pushsync"
"""Topics start with this unless a dispatcher's ``--mqtt …?prefix=`` and a
listener's ``topic_prefix`` both say otherwise."""

ANNOUNCEMENT: Final = uuid.UUID(int=0)
"""The request id of a device's announcement; no outbox row ever has it."""

ANNOUNCEMENT_WINDOW: Final = 300.0
"""Seconds an announcement's time may be off the dispatcher's clock; an older
one (replayed by someone who kept it) records nothing."""

ANNOUNCE_EVERY: Final = 600.0
"""Seconds between a connected device's announcements: besides the one at each
connection, for dispatchers that were not subscribed then (their sessions are clean)."""

_PREFIX = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")


def check_prefix(prefix: str) -> str:
    """``prefix`` if it can start a topic: levels of letters, digits, ``_.-``, joined by
    ``/``; no wildcards, no ``$`` (the broker's own topics). ValueError otherwise."""
    if not _PREFIX.match(prefix):
        raise ValueError(
            f"bad MQTT topic prefix {prefix!r}: levels of letters, digits, '_', '.' and '-' "
            "joined by '/', no wildcards"
        )
    return prefix


def in_topic(prefix: str, device: str) -> str:
    """Where messages to ``device`` are published."""
    return f"{prefix}/{device}/in"


def ack_topic(prefix: str, device: str) -> str:
    """Where ``device`` publishes its acks and its announcement."""
    return f"{prefix}/{device}/ack"


def acks_filter(prefix: str, group: str | None = None) -> str:
    """The subscription that takes every device's acks; with ``group``, shared by the
    dispatchers of that group so each ack reaches one of them (``$share/group/…``)."""
    topics = f"{prefix}/+/ack"
    return topics if group is None else f"$share/{group}/{topics}"


def device_of_ack_topic(prefix: str, topic: str) -> str | None:
    """The device whose ack topic ``topic`` is, or None if it is not one."""
    head = f"{prefix}/"
    if not topic.startswith(head) or not topic.endswith("/ack"):
        return None
    device = topic[len(head) : -len("/ack")]
    return device if device and "/" not in device else None


def fresh(announced: float, now: float) -> bool:
    """Whether an announcement made at ``announced`` counts at ``now``."""
    return abs(now - announced) <= ANNOUNCEMENT_WINDOW


__all__ = [
    "ANNOUNCEMENT",
    "ANNOUNCEMENT_WINDOW",
    "ANNOUNCE_EVERY",
    "DEFAULT_PREFIX",
    "ack_topic",
    "acks_filter",
    "check_prefix",
    "device_of_ack_topic",
    "fresh",
    "in_topic",
]
