"""Gateway choice: the device tracker's order and the fixed gateways."""

from __future__ import annotations

import pytest

from pushsync.dispatcher.routing import gateway_order, next_gateway, usable

UDP = "192.0.2.7:5001"
EMAIL = "t17@example.com"


@pytest.mark.parametrize(
    ("rule_gateway", "connected", "udp", "email", "expected"),
    [
        ("auto", True, UDP, EMAIL, ("sync", "udp", "smtp")),
        ("auto", False, UDP, EMAIL, ("udp", "smtp")),
        ("auto", True, None, EMAIL, ("sync", "smtp")),
        ("auto", True, UDP, None, ("sync", "udp")),
        ("auto", False, None, EMAIL, ("smtp",)),
        ("auto", False, None, None, ()),
        ("auto", False, "", "", ()),
        ("sync", True, None, None, ("sync",)),
        ("sync", False, UDP, EMAIL, ()),
        ("udp", True, UDP, EMAIL, ("udp",)),
        ("udp", True, None, EMAIL, ()),
        ("smtp", True, UDP, EMAIL, ("smtp",)),
        ("smtp", True, UDP, None, ()),
    ],
)
def test_gateway_order(
    rule_gateway: str, connected: bool, udp: str | None, email: str | None, expected: tuple[str]
) -> None:
    assert gateway_order(rule_gateway, connected=connected, udp=udp, email=email) == expected


def test_unknown_gateway_is_an_error() -> None:
    with pytest.raises(ValueError, match="carrier"):
        gateway_order("carrier", connected=True, udp=UDP, email=EMAIL)
    with pytest.raises(ValueError, match="carrier"):
        usable("carrier", connected=True, udp=UDP, email=EMAIL)


@pytest.mark.parametrize(
    ("order", "failed", "expected"),
    [
        (("sync", "udp", "smtp"), set(), "sync"),
        (("sync", "udp", "smtp"), {"sync"}, "udp"),
        (("sync", "udp", "smtp"), {"sync", "udp"}, "smtp"),
        (("sync", "udp", "smtp"), {"udp"}, "sync"),
        (("sync", "udp", "smtp"), {"sync", "udp", "smtp"}, None),
        (("smtp",), {"sync"}, "smtp"),
        ((), set(), None),
    ],
)
def test_next_gateway(order: tuple[str, ...], failed: set[str], expected: str | None) -> None:
    assert next_gateway(order, failed) == expected


@pytest.mark.parametrize(
    ("rule_gateway", "connected", "mqtt", "expected"),
    [
        # A live SYNC connection first, then MQTT when a subscription is on record.
        ("auto", True, "on", ("sync", "mqtt", "udp", "smtp")),
        ("auto", False, "on", ("mqtt", "udp", "smtp")),
        ("auto", False, None, ("udp", "smtp")),
        # A rule that names mqtt publishes whether or not the device announced itself.
        ("mqtt", False, None, ("mqtt",)),
        ("mqtt", True, "on", ("mqtt",)),
        ("udp", False, "on", ("udp",)),
    ],
)
def test_gateway_order_with_mqtt(
    rule_gateway: str, connected: bool, mqtt: str | None, expected: tuple[str]
) -> None:
    order = gateway_order(rule_gateway, connected=connected, udp=UDP, email=EMAIL, mqtt=mqtt)
    assert order == expected
