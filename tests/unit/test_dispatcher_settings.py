"""DispatcherSettings: its checks, and what its repr keeps to itself."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any

import pytest

from pushsync.dispatcher.settings import DispatcherSettings
from pushsync.errors import UsageError


def test_defaults_are_those_of_pushsync_dispatch() -> None:
    settings = DispatcherSettings(dsn="")
    assert (settings.batch, settings.lease) == (500, timedelta(seconds=30))
    assert (settings.udp_listen, settings.sync_listen) == ("0.0.0.0:0", "0.0.0.0:2439")
    assert settings.metrics_listen is None
    assert settings.smtp is None
    assert settings.alive_for == timedelta(seconds=15)


def test_alive_for_follows_a_slow_housekeeping() -> None:
    settings = DispatcherSettings(dsn="", housekeeping_interval=10.0)
    assert settings.alive_for == timedelta(seconds=30)


@pytest.mark.parametrize("field", ["udp_listen", "sync_listen", "metrics_listen"])
def test_a_listen_address_that_is_not_host_port_is_refused(field: str) -> None:
    given: dict[str, Any] = {field: "localhost"}
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        DispatcherSettings(dsn="", **given)


def test_a_wrong_smtp_url_is_refused_at_once() -> None:
    with pytest.raises(UsageError, match="smtp://"):
        DispatcherSettings(dsn="", smtp="http://mail.example")


def test_repr_shows_neither_the_dsn_nor_the_smtp_password() -> None:
    settings = DispatcherSettings(
        dsn="postgresql://app:hunter2@db/app",
        smtp="smtp://mailer@mail.example",
        smtp_password="swordfish",
    )
    assert "hunter2" not in repr(settings)
    assert "swordfish" not in repr(settings)


def test_settings_are_frozen() -> None:
    settings = DispatcherSettings(dsn="")
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch = 1  # type: ignore[misc]
