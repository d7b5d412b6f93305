"""Which gateways to try for a notification, in order: pure decisions, no I/O.

The device tracker (``auto``) prefers a live SYNC connection, then MQTT when
the device has an MQTT subscription on record, then UDP, then SMTP, using only
what the device has; a rule's fixed gateway is used alone, and only if the
device has what it needs.
"""

from __future__ import annotations

from collections.abc import Iterable

AUTO_ORDER = ("sync", "mqtt", "udp", "smtp")


def usable(
    gateway: str,
    *,
    connected: bool,
    udp: str | None,
    email: str | None,
    mqtt: str | None = None,
) -> bool:
    """Whether the device has what ``gateway`` needs to reach it."""
    if gateway == "sync":
        return connected
    if gateway == "mqtt":
        return bool(mqtt)
    if gateway == "udp":
        return bool(udp)
    if gateway == "smtp":
        return bool(email)
    raise ValueError(f"unknown gateway {gateway!r}")


def gateway_order(
    rule_gateway: str,
    *,
    connected: bool,
    udp: str | None,
    email: str | None,
    mqtt: str | None = None,
) -> tuple[str, ...]:
    """The gateways to try, first choice first; empty if the device cannot be reached.

    A rule that names ``mqtt`` publishes whether or not a subscription is on
    record: the broker keeps the message for a persistent session that has
    not announced itself yet.
    """
    if rule_gateway == "mqtt":
        return ("mqtt",)
    candidates = AUTO_ORDER if rule_gateway == "auto" else (rule_gateway,)
    return tuple(
        g for g in candidates if usable(g, connected=connected, udp=udp, email=email, mqtt=mqtt)
    )


def next_gateway(order: Iterable[str], failed: set[str] | frozenset[str]) -> str | None:
    """The first gateway of ``order`` not yet ``failed``, or None when all have."""
    return next((g for g in order if g not in failed), None)
