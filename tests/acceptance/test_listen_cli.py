"""``pushsync listen`` as a device runs it: a signed datagram in, an action run, an ack out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from pushsync.wire import protocol
from tests.support.cli import Run, executable
from tests.support.keys import write_key
from tests.support.listening import ARGV_RECORDER
from tests.support.processes import free_udp_port

SECRET = bytes(range(32))


def write_config(tmp_path: Path, port: int) -> Path:
    write_key(tmp_path / "truck-1.key", SECRET)
    (tmp_path / "record.py").write_text(ARGV_RECORDER)
    config = tmp_path / "listener.yaml"
    config.write_text(
        f"""\
device: truck-1
secret_file: truck-1.key
state_dir: state
channels:
  udp: {{bind: "127.0.0.1:{port}"}}
handlers:
  - name: disruption
    subject: sync
    action: {{run: [{json.dumps(sys.executable)}, record.py, ran.jsonl, "$request_id", "$content"]}}
"""
    )
    return config


def new_message(content: str) -> protocol.Message:
    now = time.time()
    return protocol.Message(
        request_id=uuid.uuid4(),
        device="truck-1",
        subject="sync",
        content=content,
        sender="pushsync",
        priority="normal",
        created=now,
        expires=now + 60,
    )


def send_until_acked(message: protocol.Message, port: int) -> protocol.Ack | None:
    """Send the datagram every 0.2 s (also before the listener is up) until it is acked."""
    datagram = protocol.encode_message(message, SECRET)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as device_side:
        device_side.settimeout(0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            device_side.sendto(datagram, ("127.0.0.1", port))
            try:
                return protocol.decode_ack(device_side.recv(2048), SECRET)
            except TimeoutError:
                continue
    return None


def test_bad_config_is_refused_with_located_errors(pushsync: Run, tmp_path: Path) -> None:
    (tmp_path / "listener.yaml").write_text("device: truck 1\nhandlers: []\n")
    result = pushsync("listen", "listener.yaml")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "listener.yaml:1:9: " in result.stderr


def test_listen_runs_the_action_once_and_acks(tmp_path: Path) -> None:
    port = free_udp_port()
    config = write_config(tmp_path, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
    listener = subprocess.Popen(
        [*executable(), "listen", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = new_message("$(rm -rf /); `id`")
        ack = send_until_acked(message, port)
        assert ack is not None, "no acknowledgement from the listener"
        assert ack.request_id == message.request_id
        ran = (tmp_path / "ran.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in ran] == [[str(message.request_id), message.content]]
    finally:
        listener.send_signal(signal.SIGTERM)
        _, stderr = listener.communicate(timeout=30)
    assert listener.returncode == 0, stderr
    assert "Traceback" not in stderr


MINIMAL = """\
import sys, sysconfig
paths = sysconfig.get_paths()
sys.path[:] = [sys.argv[1], paths["stdlib"], paths["platstdlib"], paths["stdlib"] + "/lib-dynload"]
from pushsync.cli import main
code = main(["listen", sys.argv[2]])
heavy = sorted({"psycopg", "sqlglot", "jinja2"} & {m.split(".")[0] for m in sys.modules})
print("server packages imported:", ",".join(heavy) or "none", file=sys.stderr)
raise SystemExit(code)
"""


def test_listen_runs_with_only_the_standard_library_and_pyyaml(tmp_path: Path) -> None:
    """A device's environment: no site-packages but a copy of PyYAML (``python -S -E``)."""
    import shutil

    import yaml

    site = tmp_path / "site"
    shutil.copytree(Path(yaml.__file__).parent, site / "yaml")
    root = Path(__file__).resolve().parents[2]
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(root / "pushsync", site / "pushsync", ignore=skip)
    for part in ("generator", "dispatcher", "listener", "sql"):  # as the wheel lays them out
        shutil.copytree(root / part, site / "pushsync" / part, ignore=skip)
    port = free_udp_port()
    config = write_config(tmp_path, port)
    with socket.socket() as closed:  # a SYNC server that is not there: retried, not fatal
        closed.bind(("127.0.0.1", 0))
        nowhere = closed.getsockname()[1]
    text = config.read_text()
    config.write_text(
        text.replace("channels:\n", f'channels:\n  sync: {{server: "127.0.0.1:{nowhere}"}}\n')
    )
    listener = subprocess.Popen(
        [sys.executable, "-S", "-E", "-c", MINIMAL, str(site), str(config)],
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", "")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        message = new_message("minimal")
        ack = send_until_acked(message, port)
        assert ack is not None
        assert ack.request_id == message.request_id
    finally:
        listener.send_signal(signal.SIGTERM)
        _, stderr = listener.communicate(timeout=30)
    assert listener.returncode == 0, stderr
    assert "server packages imported: none" in stderr
    assert "sync: cannot connect to 127.0.0.1:" in stderr
    assert "Traceback" not in stderr
