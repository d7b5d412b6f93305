"""The whole path through the real commands: INSERT -> trigger -> dispatch -> listen -> action.

``pushsync migrate``, ``device add``, ``dispatch`` and ``listen`` run as subprocesses;
a row inserted into the trucking database makes the affected truck's listener run
its action, and the confirmation comes back into the outbox.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import psycopg

from tests.integration import trucking
from tests.support.cli import Run, start, stop
from tests.support.listening import ARGV_RECORDER
from tests.support.processes import free_udp_port
from tests.support.waiting import until


def test_insert_reaches_the_device_and_is_confirmed(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    (tmp_path / "rules.yaml").write_text(trucking.RULES.read_text())
    assert pushsync("migrate", "--dsn", dsn, "rules.yaml").returncode == 0
    added = pushsync("device", "add", "truck-1", "--dsn", dsn, "--secret-file", "truck-1.key")
    assert added.returncode == 0, added.stderr
    port = free_udp_port()
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "VALUES ('truck-1', 'udp', 'manual', %s)",
        (f"127.0.0.1:{port}",),
    )
    db.execute("INSERT INTO public.drivers VALUES (1, 'Ann', 'truck-1'), (2, 'Bo', NULL)")
    db.execute("INSERT INTO public.routes VALUES (10, 'north', 1)")
    db.execute("INSERT INTO public.route_stops VALUES (10, 1, 100)")
    db.execute("DELETE FROM pushsync.outbox")

    (tmp_path / "record.py").write_text(ARGV_RECORDER)
    (tmp_path / "listener.yaml").write_text(
        f"""\
device: truck-1
secret_file: truck-1.key
state_dir: state
channels:
  udp: {{bind: "127.0.0.1:{port}"}}
handlers:
  - name: disruption
    subject: sync
    message_start: "[sync]disruption"
    action: {{run: [{json.dumps(sys.executable)}, record.py, ran.jsonl, "$content"]}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
    listener = start("listen", "listener.yaml", cwd=tmp_path, env=env)
    dispatcher = start(
        "dispatch",
        "--dsn",
        dsn,
        "--udp-listen",
        "127.0.0.1:0",
        "--sync-listen",
        "127.0.0.1:0",
        cwd=tmp_path,
        env=env,
    )
    try:
        trucking.report(db, location=100, by=2)

        def confirmed() -> bool:
            row = db.execute("SELECT state FROM pushsync.outbox").fetchone()
            history = db.execute("SELECT state FROM pushsync.outbox_history").fetchone()
            return (row or history) in (("confirmed",),)

        until(confirmed, "the row to be confirmed", 20.0, every=0.05)
        ran = (tmp_path / "ran.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in ran] == [["disruption 100 on north"]]
    finally:
        stop(dispatcher)
        stop(listener)
