"""``pushsync sync CONFIG`` as a device runs it, against a real ``pushsync dispatch``."""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import threading
from pathlib import Path

import psycopg

from tests.integration import trucking
from tests.support.cli import executable, stop
from tests.support.keys import write_key

SECRET = bytes(range(32))


def write_config(directory: Path, server: str) -> Path:
    write_key(directory / "truck-2.key", SECRET)
    path = directory / "truck-2.yaml"
    path.write_text(
        "device: truck-2\nsecret_file: truck-2.key\nstate_dir: state\npublication: driver\n"
        f'channels:\n  sync: {{server: "{server}"}}\n'
        "handlers:\n  - name: h\n    subject: sync\n    action: sync\n",
        encoding="utf-8",
    )
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
    return subprocess.run(
        [*executable(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_sync_downloads_then_updates_and_says_what_it_did(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s WHERE device_id = 'truck-2'", (SECRET,))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
    listens = ["--sync-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0"]
    dispatcher = subprocess.Popen(
        [*executable(), "dispatch", "--dsn", dsn, *listens],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert dispatcher.stderr is not None
    port = None
    for line in dispatcher.stderr:
        if found := re.search(r"SYNC gateway on 127\.0\.0\.1:(\d+)", line):
            port = found[1]
            break
    assert port is not None
    rest: list[str] = []
    drain = threading.Thread(target=lambda: rest.extend(dispatcher.stderr or []), daemon=True)
    drain.start()
    try:
        config = write_config(tmp_path, f"127.0.0.1:{port}")
        first = run("sync", str(config), cwd=tmp_path)
        assert first.returncode == 0, first.stderr
        assert re.match(
            r"synchronized driver in \d+ ms: 0 changes up \(0 rejected\), 2 rows down, 0 removed; "
            r"full download of public.routes, public.route_stops, public.disruption_reports\n",
            first.stdout,
        ), first.stdout
        local = tmp_path / "state" / "local.db"
        with sqlite3.connect(local) as conn:
            assert conn.execute("SELECT route_id, route_name FROM routes").fetchall() == [
                (20, "south")
            ]
        db.execute("UPDATE public.routes SET route_name = 'south 2' WHERE route_id = 20")
        second = run("sync", str(config), cwd=tmp_path)
        assert second.returncode == 0, second.stderr
        with sqlite3.connect(local) as conn:
            assert conn.execute("SELECT route_name FROM routes").fetchall() == [("south 2",)]
    finally:
        stop(dispatcher)


def test_sync_without_a_server_fails_with_exit_1(tmp_path: Path) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    config = write_config(tmp_path, f"127.0.0.1:{port}")
    result = run("sync", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith(f"sync failed: cannot connect to 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr


def test_sync_with_a_bad_config_fails_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("device: truck 2\n", encoding="utf-8")
    result = run("sync", "bad.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert "bad.yaml:1:9: bad device id 'truck 2'" in result.stderr
    assert "bad.yaml:1:1: missing required key 'secret_file'" in result.stderr
    assert "Traceback" not in result.stderr
