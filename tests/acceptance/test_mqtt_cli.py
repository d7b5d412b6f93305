"""The MQTT gateway through the real commands: ``dispatch --mqtt``, ``listen`` with an
``mqtt`` channel, ``send --wait``, ``device set-address --mqtt``, and their mistakes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import Run
from tests.support.dispatching import DEVICE, add_device
from tests.support.listening import runs
from tests.support.mosquitto import DISPATCHER_PASSWORD, Broker, broker
from tests.support.mqtt import device_config, on_record
from tests.support.processes import Dispatch, Listen
from tests.support.waiting import until


def refused(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [line]


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    with broker(tmp_path / "broker", [DEVICE]) as running:
        yield running


def addresses(pushsync: Run, dsn: str) -> list[dict[str, object]]:
    listed = pushsync("device", "list", "--dsn", dsn, "--json")
    assert listed.returncode == 0, listed.stderr
    [device] = json.loads(listed.stdout)
    found: list[dict[str, object]] = device["addresses"]
    return [a for a in found if a["medium"] == "mqtt"]


def test_push_over_mqtt_with_the_real_commands(
    pushsync: Run, db: psycopg.Connection, dsn: str, tmp_path: Path, mosquitto: Broker
) -> None:
    config = device_config(tmp_path / "device", mosquitto)
    add_device(db)
    password = tmp_path / "mqtt-password"
    password.write_text(DISPATCHER_PASSWORD + "\n", encoding="utf-8")
    dispatch = Dispatch(
        dsn,
        tmp_path / "dispatch.log",
        "--mqtt",
        mosquitto.url,
        "--mqtt-password-file",
        str(password),
    )
    listen: Listen | None = None
    try:
        # The device announces itself when it connects (and every 10 minutes): to a
        # dispatcher already subscribed.
        until(lambda: "receiving acks" in dispatch.output(), "the dispatcher", logs=[dispatch.log])
        listen = Listen(config, tmp_path / "listen.log")
        listen.wait_started()
        until(lambda: on_record(db) != [], "the announcement", logs=[dispatch.log, listen.log])
        assert [(a["source"], a["address"]) for a in addresses(pushsync, dsn)] == [
            ("tracking", "on")
        ]
        sent = pushsync("send", DEVICE, "sync", "over the broker", "--dsn", dsn, "--wait")
        assert sent.returncode == 0, sent.stderr + listen.output()[-2000:]
        assert "confirmed over mqtt after 1 attempt" in sent.stderr
        assert [run["content"] for run in runs(config.parent)] == ["over the broker"]
        listen.stop()
        logged = dispatch.stop()
    finally:
        if listen is not None:
            listen.close()
        dispatch.close()
    assert "MQTT gateway: mqtt://dispatcher@127.0.0.1:" in logged
    assert DISPATCHER_PASSWORD not in logged


def test_set_address_puts_a_subscription_on_record_and_drops_it(
    pushsync: Run, db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    done = pushsync("device", "set-address", DEVICE, "--dsn", dsn, "--mqtt", "on")
    assert done.returncode == 0, done.stderr
    assert [(a["source"], a["address"]) for a in addresses(pushsync, dsn)] == [("manual", "on")]
    refused(
        pushsync("device", "set-address", DEVICE, "--dsn", dsn, "--mqtt", "maybe"),
        "pushsync: --mqtt: expected on or none, not 'maybe'",
    )
    assert pushsync("device", "set-address", DEVICE, "--dsn", dsn, "--mqtt", "none").returncode == 0
    assert on_record(db) == []


@pytest.mark.parametrize(
    ("options", "line"),
    [
        (
            ["--mqtt", "http://broker.example"],
            "pushsync: --mqtt: expected mqtt://… or mqtts://…, not 'http'",
        ),
        (["--mqtt-password-file", "pw"], "pushsync: --mqtt-password-file needs --mqtt"),
    ],
)
def test_dispatch_option_mistakes(pushsync: Run, dsn: str, options: list[str], line: str) -> None:
    refused(pushsync("dispatch", "--dsn", dsn, "--sync-listen", "off", *options), line)


def test_a_bad_variable_is_named(pushsync: Run, dsn: str) -> None:
    refused(
        pushsync("dispatch", "--dsn", dsn, env={"PUSHSYNC_MQTT": "mqtt://:1883"}),
        "pushsync: PUSHSYNC_MQTT: a host is needed: mqtt://[USER@]HOST[:PORT]",
    )


def test_listen_check_logs_in_and_subscribes(
    pushsync: Run, tmp_path: Path, mosquitto: Broker
) -> None:
    config = device_config(tmp_path / "device", mosquitto)
    good = pushsync("listen", str(config), "--check")
    assert good.returncode == 0, good.stdout + good.stderr
    line = f"ok  mqtt channel: {mosquitto.server} as {DEVICE}, subscribing to pushsync/{DEVICE}/in"
    assert line in good.stdout.splitlines()
    (config.parent / "mqtt.pw").write_text("wrong", encoding="utf-8")
    bad = pushsync("listen", str(config), "--check")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert f"FAILED  mqtt channel: {mosquitto.server} as {DEVICE}, subscribing to " in bad.stdout
    assert "the broker refused the login: Not authorized" in bad.stdout
