"""``channels.mqtt`` of the listener config: what it reads, each mistake located, and the
extra it names when paho-mqtt is not installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pushsync.errors import RulesError
from pushsync.listener.config import MqttChannel, loads_config
from pushsync.wire.addresses import Address
from tests.support.cli import clean_env
from tests.support.keys import write_key

BASE = """\
device: truck-7
secret_file: truck-7.key
channels:
  mqtt: {CHANNEL}
handlers:
  - name: h
    action: sync
"""


def config(channel: str) -> str:
    return BASE.replace("{CHANNEL}", channel)


def problems(channel: str) -> list[str]:
    with pytest.raises(RulesError) as caught:
        loads_config(config(channel), "listener.yaml")
    return [str(p) for p in caught.value]


def test_every_key() -> None:
    loaded = loads_config(
        config(
            '{server: "broker.example:8883", topic_prefix: fleet/eu, username: truck-7, '
            "password_file: mqtt.pw, tls: true, ca_file: ca.pem, client_id: t7}"
        ),
        "/etc/pushsync/listener.yaml",
    )
    assert loaded.channels.mqtt == MqttChannel(
        server=Address(host="broker.example", port=8883),
        topic_prefix="fleet/eu",
        username="truck-7",
        password_file=Path("/etc/pushsync/mqtt.pw"),
        tls=True,
        ca_file=Path("/etc/pushsync/ca.pem"),
        client_id="t7",
    )


def test_defaults() -> None:
    loaded = loads_config(config('{server: "127.0.0.1:1883"}'), "listener.yaml")
    assert loaded.channels.mqtt == MqttChannel(server=Address(host="127.0.0.1", port=1883))
    assert loaded.channels.mqtt.topic_prefix == "pushsync"


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ("{}", "listener.yaml:4:9: channels.mqtt: missing required key 'server'"),
        (
            '{server: "b:1883", topic_prefix: "a/#"}',
            "listener.yaml:4:42: channels.mqtt: bad MQTT topic prefix 'a/#': levels of "
            "letters, digits, '_', '.' and '-' joined by '/', no wildcards",
        ),
        (
            '{server: "b:1883", password_file: pw}',
            "listener.yaml:4:43: channels.mqtt: password_file needs a username",
        ),
        (
            '{server: "b:1883", client_id: ""}',
            "listener.yaml:4:39: channels.mqtt: client_id must not be empty",
        ),
        (
            '{server: "b:1883", ca_file: ca.pem}',
            "listener.yaml:4:37: channels.mqtt: ca_file is used only with tls: true",
        ),
        (
            '{server: "b:1883", qos: 2}',
            "listener.yaml:4:28: channels.mqtt: unknown key 'qos'",
        ),
    ],
)
def test_mistakes_are_located(channel: str, expected: str) -> None:
    assert problems(channel) == [expected]


def test_without_paho_the_config_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "paho", None)  # as if paho-mqtt were not installed
    assert problems('{server: "127.0.0.1:1883"}') == [
        "listener.yaml:4:9: channels.mqtt: the mqtt channel needs paho-mqtt: "
        "pip install 'pushsync[mqtt]'"
    ]


def test_listen_without_paho_exits_2_with_the_located_line(tmp_path: Path) -> None:
    """The real command in a Python where paho cannot be imported; no traceback."""
    write_key(tmp_path / "truck-7.key", bytes(range(32)))
    path = tmp_path / "listener.yaml"
    path.write_text(config('{server: "127.0.0.1:1883"}'), encoding="utf-8")
    program = (
        "import sys; sys.modules['paho'] = None; "
        "from pushsync.cli import main; sys.exit(main(['listen', sys.argv[1]]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, str(path)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"{path}:4:9: channels.mqtt: the mqtt channel needs paho-mqtt: pip install 'pushsync[mqtt]'"
    )
