"""``pushsync listen CONFIG --check``: each check through the real CLI, on a real dispatcher."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest

from tests.support.cli import run_cli_async
from tests.support.dispatching import DEVICE, SECRET, add_device, dispatching, server_address
from tests.support.keys import write_key


def write_config(folder: Path, server: str, *, udp: str, handlers: str) -> Path:
    write_key(folder / "device.key", SECRET)
    config = folder / "listener.yaml"
    config.write_text(
        f"device: {DEVICE}\nsecret_file: device.key\nstate_dir: state\n"
        f'channels:\n  sync: {{server: "{server}"}}\n  udp: {{bind: "{udp}"}}\n'
        f"handlers:\n{handlers}",
        encoding="utf-8",
    )
    return config


async def check(folder: Path) -> tuple[int, list[str], str]:
    done = await run_cli_async("listen", "listener.yaml", "--check", cwd=folder)
    return done.returncode, done.stdout.splitlines(), done.stderr


@pytest.mark.asyncio
async def test_a_device_ready_to_listen_passes_every_check(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    handlers = (
        "  - {name: go, subject: sync, action: sync}\n  - {name: rest, action: {run: [true]}}\n"
    )
    async with dispatching(dsn) as dispatcher:
        server = str(server_address(dispatcher))
        write_config(tmp_path, server, udp="127.0.0.1:0", handlers=handlers)
        status, lines, err = await check(tmp_path)
    assert status == 0, lines
    assert err == ""
    assert lines == [
        "ok  config listener.yaml and key file device.key",
        "ok  state_dir state",
        f"ok  sync channel: handshake with {server} as {DEVICE}",
        "ok  udp channel: bind 127.0.0.1:0",
        "ok  handler rest: program true",
        "",
        "handlers, in the order they are tried (first match wins unless it continues):",
        "  1. go: subject 'sync' -> sync",
        "  2. rest: every message -> run true",
    ]


@pytest.mark.asyncio
async def test_each_failure_has_its_hint(db: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    # The device is not registered, its UDP port is taken, its program does not exist,
    # and no handler takes what the first does not.
    handlers = "  - {name: go, subject: sync, action: {run: [no-such-program-here, $content]}}\n"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        udp = f"127.0.0.1:{taken.getsockname()[1]}"
        async with dispatching(dsn) as dispatcher:
            server = str(server_address(dispatcher))
            write_config(tmp_path, server, udp=udp, handlers=handlers)
            status, lines, err = await check(tmp_path)
    assert status == 1
    assert err == ""
    assert lines == [
        "ok  config listener.yaml and key file device.key",
        "ok  state_dir state",
        f"FAILED  sync channel: handshake with {server} as {DEVICE}: the server refused the key "
        f"of device {DEVICE} (unknown, disabled or wrong secret): check device and secret_file "
        "against `pushsync device list`",
        f"FAILED  udp channel: bind {udp}: Address already in use: another program "
        "(a listener?) has it",
        "FAILED  handler go: program no-such-program-here: not found on PATH (or not executable)",
        "",
        "handlers, in the order they are tried (first match wins unless it continues):",
        "  1. go: subject 'sync' -> run no-such-program-here $content",
        "  a message no handler matches is not confirmed (the server resends it until its ttl): "
        "add a handler without filters last to take every other message",
    ]


@pytest.mark.asyncio
async def test_nothing_listening_and_a_bad_config(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    handlers = "  - {name: all, action: sync}\n"
    write_config(tmp_path, f"127.0.0.1:{port}", udp="127.0.0.1:0", handlers=handlers)
    status, lines, _ = await check(tmp_path)
    assert status == 1
    assert lines[2] == (
        f"FAILED  sync channel: handshake with 127.0.0.1:{port} as {DEVICE}: nothing listens "
        f"there: is `pushsync dispatch --sync-listen 127.0.0.1:{port}` running?"
    )
    (tmp_path / "listener.yaml").write_text("device: truck 1\n", encoding="utf-8")
    status, lines, err = await check(tmp_path)
    assert status == 2
    assert lines == []
    assert err.splitlines()[0] == "listener.yaml:1:1: missing required key 'secret_file'"
