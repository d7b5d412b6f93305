"""The ``pushsync`` command as a user runs it: exit codes, output, files, database."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import psycopg

from pushsync.wire import protocol
from tests.integration import trucking
from tests.support.cli import Run, executable


def copy_example(tmp_path: Path) -> Path:
    target = tmp_path / "rules.yaml"
    shutil.copy(trucking.RULES, target)
    return target


def test_check_accepts_the_example(pushsync: Run, tmp_path: Path) -> None:
    copy_example(tmp_path)
    result = pushsync("check", "rules.yaml")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "rules.yaml: ok (5 rules, 0 polls, 1 publication)\n"


def test_check_reports_located_errors_without_traceback(pushsync: Run, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(
        "version: 1\nrules:\n  - name: r\n    table: public.t\n    on: [insert, upsert]\n"
        "    recipients: SELECT device_id FROM public.x; DROP TABLE public.t\n"
        "    resend: 5m\n"
    )
    result = pushsync("check", "bad.yaml")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "bad.yaml:5:18: rule r: on must be one of insert, update, delete, not 'upsert' "
        "(did you mean 'insert'?)",
        "bad.yaml:6:17: rule r: recipients: expected one SELECT, found more than one statement",
        "bad.yaml:7:5: rule r: unknown key 'resend' (did you mean 'resend_every'?)",
    ]


def test_check_missing_file(pushsync: Run) -> None:
    result = pushsync("check", "nope.yaml")
    assert result.returncode == 2
    assert (
        result.stderr == "pushsync: cannot read rules file nope.yaml: No such file or directory\n"
    )


def test_compile_writes_the_migration(pushsync: Run, tmp_path: Path) -> None:
    copy_example(tmp_path)
    result = pushsync("compile", "rules.yaml", "-o", "missing/rules.sql")
    assert result.returncode == 2  # out/ does not exist
    assert result.stderr == "pushsync: cannot write missing/rules.sql: No such file or directory\n"
    assert list(tmp_path.iterdir()) == [tmp_path / "rules.yaml"]
    result = pushsync("compile", "rules.yaml", "-o", "rules.sql")
    assert result.returncode == 0, result.stderr
    sql = (tmp_path / "rules.sql").read_text()
    assert sql.startswith("-- pushsync rules migration. GENERATED FILE - DO NOT EDIT")
    assert "-- source:    rules.yaml\n" in sql
    stdout = pushsync("compile", "rules.yaml").stdout
    assert stdout == sql


def test_compile_error_leaves_existing_output_alone(pushsync: Run, tmp_path: Path) -> None:
    (tmp_path / "rules.sql").write_text("previous\n")
    (tmp_path / "rules.yaml").write_text("version: 2\n")
    result = pushsync("compile", "rules.yaml", "-o", "rules.sql")
    assert result.returncode == 2
    assert result.stderr == "rules.yaml:1:10: unsupported version 2: use 1\n"
    assert (tmp_path / "rules.sql").read_text() == "previous\n"


def test_migrate_then_a_change_makes_a_notification(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    copy_example(tmp_path)
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    result = pushsync("migrate", "rules.yaml", env={"PUSHSYNC_DSN": dsn})
    assert result.returncode == 0, result.stderr
    assert result.stdout == "base schema: up to date\nrules: applied rules.yaml\n"
    again = pushsync("migrate", "--dsn", dsn, "rules.yaml")
    assert again.returncode == 0, again.stderr
    result = pushsync("device", "add", "truck-1", "--dsn", dsn, "--secret-file", "truck-1.key")
    assert result.returncode == 0, result.stderr
    db.execute("INSERT INTO public.drivers VALUES (1, 'Ann', 'truck-1'), (2, 'Bo', NULL)")
    db.execute("INSERT INTO public.routes VALUES (10, 'north', 1)")
    db.execute("INSERT INTO public.route_stops VALUES (10, 1, 100)")
    db.execute("DELETE FROM pushsync.outbox")
    trucking.report(db, location=100, by=2)
    assert trucking.devices_of(db) == ["truck-1"]


def test_migrate_refuses_rules_the_database_cannot_run(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    copy_example(tmp_path)  # the example's tables do not exist in this database
    result = pushsync("migrate", "--dsn", dsn, "rules.yaml")
    assert result.returncode == 2
    assert (
        "rules.yaml:10:12: rule route_disruption: table public.disruption_reports does "
        "not exist" in result.stderr.splitlines()
    )
    assert "Traceback" not in result.stderr
    count = db.execute("SELECT count(*) FROM pushsync.rules").fetchone()
    assert count == (0,)


def test_migrate_without_a_server(pushsync: Run) -> None:
    result = pushsync("migrate", "--dsn", "host=127.0.0.1 port=1 connect_timeout=2 password=s3cret")
    assert result.returncode == 1
    assert result.stderr.startswith("pushsync: database: cannot connect to ")
    assert "host=127.0.0.1 port=1" in result.stderr
    assert "s3cret" not in result.stderr


def test_device_add_and_list(pushsync: Run, tmp_path: Path, dsn: str) -> None:
    result = pushsync(
        "device",
        "add",
        "truck-17",
        "--dsn",
        dsn,
        "--udp",
        "192.0.2.7:5001",
        "--email",
        "t17@example.com",
        "--secret-file",
        "truck-17.key",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    key = tmp_path / "truck-17.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = key.read_text().strip()
    assert len(protocol.read_secret(key.read_text())) == 32  # what the listener reads

    printed = pushsync("device", "add", "truck-18", env={"PUSHSYNC_DSN": dsn})
    assert printed.returncode == 0, printed.stderr
    assert len(bytes.fromhex(printed.stdout.strip())) == 32
    assert printed.stdout.strip() != secret

    duplicate = pushsync("device", "add", "truck-17", "--dsn", dsn, "--secret-file", "again.key")
    assert duplicate.returncode == 2
    assert duplicate.stderr == "pushsync: device truck-17 already exists\n"
    assert not (tmp_path / "again.key").exists()  # nothing half-done

    listing = pushsync("device", "list", "--dsn", dsn, "--json")
    assert listing.returncode == 0, listing.stderr
    devices = json.loads(listing.stdout)
    assert [d["device_id"] for d in devices] == ["truck-17", "truck-18"]
    assert secret not in listing.stdout
    assert [d["connected_to"] for d in devices] == [None, None]
    assert [
        (a["medium"], a["address"], a["source"], a["effective"]) for a in devices[0]["addresses"]
    ] == [
        ("email", "t17@example.com", "manual", True),
        ("udp", "192.0.2.7:5001", "manual", True),
    ]
    table = pushsync("device", "list", "--dsn", dsn)
    assert table.returncode == 0
    assert table.stdout.splitlines()[0].split() == [
        "DEVICE",
        "ENABLED",
        "CONNECTED",
        "LAST",
        "SEEN",
        "ADDRESSES",
    ]
    assert "udp=192.0.2.7:5001 (manual)" in table.stdout


def test_device_add_rejects_bad_input(pushsync: Run, dsn: str) -> None:
    cases = {
        ("bad id!",): "pushsync: bad device id 'bad id!'",
        ("ok", "--udp", "192.0.2.7"): "pushsync: --udp: bad UDP address '192.0.2.7'",
        ("ok", "--udp", "host:99999"): "pushsync: --udp: bad UDP address 'host:99999'",
        ("ok", "--email", "nobody"): "pushsync: --email: bad email address 'nobody'",
    }
    for args, message in cases.items():
        result = pushsync("device", "add", *args, "--dsn", dsn)
        assert result.returncode == 2, args
        assert result.stderr.startswith(message), result.stderr
    listing = pushsync("device", "list", "--dsn", dsn, "--json")
    assert json.loads(listing.stdout) == []


def test_status_counts_the_outbox(pushsync: Run, db: psycopg.Connection, dsn: str) -> None:
    trucking.setup(db)
    trucking.report(db, location=100, by=3)  # three trucks notified
    db.execute(
        "UPDATE pushsync.outbox SET state = 'sent', gateway_used = 'udp' "
        "WHERE device_id = 'truck-1'"
    )
    db.execute(
        "UPDATE pushsync.outbox SET state = 'failed', gateway_used = 'smtp' "
        "WHERE device_id = 'truck-2'"
    )
    result = pushsync("status", "--dsn", dsn, "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["outbox"] == {
        "pending": 1,
        "sending": 0,
        "sent": 1,
        "confirmed": 0,
        "expired": 0,
        "failed": 1,
    }
    assert figures["gateways"] == {
        "smtp": {"sent": 0, "confirmed": 0, "expired": 0, "failed": 1},
        "udp": {"sent": 1, "confirmed": 0, "expired": 0, "failed": 0},
    }
    assert figures["oldest_unsent_seconds"] >= 0
    assert figures["dispatchers"] == []
    assert figures["connected_devices"] == 0
    # A message sent and never confirmed expires: counted, in the outbox and once archived.
    db.execute(
        "UPDATE pushsync.outbox SET state = 'expired', gateway_used = 'udp' "
        "WHERE device_id = 'truck-4'"
    )
    figures = json.loads(pushsync("status", "--dsn", dsn, "--json").stdout)
    assert figures["gateways"]["udp"] == {"sent": 1, "confirmed": 0, "expired": 1, "failed": 0}
    text = pushsync("status", "--dsn", dsn)
    assert text.returncode == 0
    assert "  expired    1" in text.stdout.splitlines()
    assert "  udp        1 / 0 / 1 / 0" in text.stdout.splitlines()


def test_status_and_device_list_show_dispatchers_and_connections(
    pushsync: Run, db: psycopg.Connection, dsn: str
) -> None:
    trucking.setup(db)
    db.execute(
        "INSERT INTO pushsync.dispatchers (owner, host, pid, sync_address, alive_until) VALUES "
        "('node-a', 'h1', 10, '10.0.0.1:2439', now() + interval '1 minute'), "
        "('node-b', 'h2', 20, NULL, now() - interval '1 second')"
    )
    db.execute(
        "INSERT INTO pushsync.sync_connections (device_id, owner, peer) VALUES "
        "('truck-1', 'node-a', '10.0.0.9:5000'), ('truck-2', 'node-b', '10.0.0.8:5000')"
    )
    figures = json.loads(pushsync("status", "--dsn", dsn, "--json").stdout)
    assert figures["connected_devices"] == 1  # truck-2's dispatcher is not responding
    assert [(d["owner"], d["alive"], d["connected_devices"]) for d in figures["dispatchers"]] == [
        ("node-a", True, 1),
        ("node-b", False, 1),
    ]
    text = pushsync("status", "--dsn", dsn).stdout
    assert "dispatchers alive: 1; devices connected over SYNC: 1" in text
    assert "node-b: not responding" in text
    devices = json.loads(pushsync("device", "list", "--dsn", dsn, "--json").stdout)
    connected = {d["device_id"]: d["connected_to"] for d in devices}
    assert connected["truck-1"] == "node-a"
    assert connected["truck-2"] is None


def test_json_logs_carry_no_password(tmp_path: Path) -> None:
    """``--log-format json``: one object per line; the DSN's password never appears."""
    import signal
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} user=fleet password=hunter2-secret dbname=fleet"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSYNC_", "PG"))}
    listens = ["--sync-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0"]
    process = subprocess.Popen(
        [*executable(), "--log-format", "json", "dispatch", "--dsn", dsn, *listens],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert process.stderr is not None
    lines = []
    for line in process.stderr:
        lines.append(line)
        if "failed (attempt 2)" in line:
            break
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0
    records = [json.loads(line) for line in lines + rest.splitlines() if line.strip()]
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    failed = [r for r in records if "database connection" in r["message"]]
    assert failed
    assert failed[0]["level"] == "warning"
    assert f"port={port}" in failed[0]["message"]
    assert all("hunter2" not in json.dumps(r) for r in records)


def test_dispatch_survives_sighup_and_stops_on_sigterm(dsn: str, tmp_path: Path) -> None:
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
    listens = ["--sync-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0"]
    process = subprocess.Popen(
        [*executable(), "dispatch", "--dsn", dsn, *listens],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "listening on channel" in line:
            break
    process.send_signal(signal.SIGHUP)
    for line in process.stderr:
        if "SIGHUP: reloading" in line:
            break
    assert process.poll() is None  # still running
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=30)
    assert process.returncode == 0, rest
    assert "Traceback" not in rest
