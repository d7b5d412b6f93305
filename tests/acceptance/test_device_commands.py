"""An operator's device commands through the real CLI: many at once, new secrets, addresses.

``device rotate-secret`` cutting off open sessions is in
``tests/security/test_device_access.py``; here, what each command leaves behind.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import psycopg

from pushsync.wire import protocol
from tests.support.cli import Run


def devices(db: psycopg.Connection) -> list[tuple[Any, ...]]:
    """Every device with its secret, addresses and grants: what a command could change."""
    return db.execute(
        "SELECT d.device_id, d.secret, d.enabled, "
        "  (SELECT array_agg(medium || '=' || address || '/' || source ORDER BY medium, address) "
        "   FROM pushsync.device_addresses a WHERE a.device_id = d.device_id), "
        "  (SELECT array_agg(publication ORDER BY publication) "
        "   FROM pushsync.device_publications p WHERE p.device_id = d.device_id) "
        "FROM pushsync.devices d ORDER BY 1"
    ).fetchall()


def test_devices_from_a_csv_file_are_added_in_one_go(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    rows = ["device_id,udp,email,publications"]
    rows += [f"truck-{n},192.0.2.{n % 250 + 1}:5001,,driver" for n in range(300)]
    rows.append("office-1,,office@example.com,")
    (tmp_path / "fleet.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "keys").mkdir()
    result = pushsync("device", "add", "--from", "fleet.csv", "--secret-dir", "keys", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert result.stderr.endswith("301 devices added; secrets written to keys/ID.key\n")
    assert result.stdout == ""
    found = devices(db)
    assert len(found) == 301
    by_id = {row[0]: row for row in found}
    assert by_id["truck-7"][3] == ["udp=192.0.2.8:5001/manual"]
    assert by_id["truck-7"][4] == ["driver"]
    assert by_id["office-1"][3] == ["email=office@example.com/manual"]
    assert by_id["office-1"][4] is None
    key = tmp_path / "keys" / "truck-7.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert protocol.read_secret(key.read_text()) == bytes(by_id["truck-7"][1])
    assert len({bytes(row[1]) for row in found}) == 301  # every device its own secret

    printed = tmp_path / "more.csv"
    printed.write_text("device_id\ntruck-900\ntruck-901\n")
    result = pushsync("device", "add", "--from", "more.csv", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(",") for line in result.stdout.splitlines())
    assert sorted(lines) == ["truck-900", "truck-901"]
    stored = {row[0]: bytes(row[1]) for row in devices(db)}
    assert bytes.fromhex(lines["truck-900"]) == stored["truck-900"]


def test_a_csv_file_with_mistakes_adds_nothing(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    assert pushsync("device", "add", "truck-2", "--dsn", dsn).returncode == 0
    before = devices(db)
    (tmp_path / "keys").mkdir()
    (tmp_path / "bad.csv").write_text(
        "device_id,udp,publications\n"
        "truck-1,192.0.2.1:5001,driver\n"
        "bad id!,,\n"
        "truck-3,192.0.2.3,\n"
        "truck-1,,\n"
        "truck-4,,Driver\n"
        "truck-5,,,extra\n"
    )
    result = pushsync("device", "add", "--from", "bad.csv", "--secret-dir", "keys", "--dsn", dsn)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "pushsync: bad.csv:3: bad device id 'bad id!': use up to 64 letters, digits, '.', '_' "
        "or '-', starting with a letter or digit",
        "bad.csv:4: udp: bad UDP address '192.0.2.3': expected HOST:PORT (IPv6 as [::1]:5001), "
        "e.g. 192.0.2.7:5001",
        "bad.csv:5: device truck-1 is also on line 2",
        "bad.csv:6: publications: bad publication name 'Driver': use lower-case letters, "
        "digits and _, starting with a letter, at most 63 characters",
        "bad.csv:7: more fields than the header names (3)",
    ]
    # One device of the file exists already: none of the file is added, no key written.
    (tmp_path / "taken.csv").write_text("device_id\ntruck-1\ntruck-2\n")
    result = pushsync("device", "add", "--from", "taken.csv", "--secret-dir", "keys", "--dsn", dsn)
    assert result.returncode == 2
    assert result.stderr == "pushsync: these devices exist already, none added: truck-2\n"
    (tmp_path / "header.csv").write_text("id,udp\nx,\n")
    result = pushsync("device", "add", "--from", "header.csv", "--dsn", dsn)
    assert result.returncode == 2
    assert result.stderr.startswith("pushsync: header.csv:1: the header must name device_id")
    assert devices(db) == before
    assert list((tmp_path / "keys").iterdir()) == []


def test_rotate_secret_replaces_it_or_changes_nothing(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    assert (
        pushsync("device", "add", "truck-1", "--dsn", dsn, "--secret-file", "old.key").returncode
        == 0
    )
    old = (tmp_path / "old.key").read_text()
    printed = pushsync("device", "rotate-secret", "truck-1", "--dsn", dsn)
    assert printed.returncode == 0, printed.stderr
    assert printed.stderr.endswith(
        "device truck-1 has a new secret; the old one is refused from now on; "
        "the new secret (shown once):\n"
    )
    stored = bytes(devices(db)[0][1])
    assert protocol.read_secret(printed.stdout) == stored != protocol.read_secret(old)

    before = devices(db)
    unknown = pushsync("device", "rotate-secret", "truck-9", "--dsn", dsn, "--secret-file", "9.key")
    assert unknown.returncode == 2
    assert unknown.stderr == "pushsync: there is no device truck-9\n"
    assert not (tmp_path / "9.key").exists()
    existing = pushsync(
        "device", "rotate-secret", "truck-1", "--dsn", dsn, "--secret-file", "old.key"
    )
    assert existing.returncode == 2
    assert existing.stderr == "pushsync: old.key exists; not overwriting a secret\n"
    assert devices(db) == before  # the secret the file could not hold was not stored


def test_set_address_pins_and_drops_manual_addresses(
    pushsync: Run, db: psycopg.Connection, dsn: str
) -> None:
    assert (
        pushsync("device", "add", "truck-1", "--dsn", dsn, "--udp", "192.0.2.1:5001").returncode
        == 0
    )
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "VALUES ('truck-1', 'udp', 'tracking', '198.51.100.9:5001')"
    )
    result = pushsync(
        "device",
        "set-address",
        "truck-1",
        "--udp",
        "[2001:db8::7]:5001",
        "--email",
        "t1@example.com",
        "--dsn",
        dsn,
    )
    assert result.returncode == 0, result.stderr
    assert devices(db)[0][3] == [
        "email=t1@example.com/manual",
        "udp=198.51.100.9:5001/tracking",
        "udp=[2001:db8::7]:5001/manual",
    ]
    result = pushsync("device", "set-address", "truck-1", "--udp", "none", "--dsn", dsn)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "device truck-1: udp no manual address\n"
    # What the device reports itself stays; only the operator's pin is gone.
    assert devices(db)[0][3] == ["email=t1@example.com/manual", "udp=198.51.100.9:5001/tracking"]
    listing = json.loads(pushsync("device", "list", "--dsn", dsn, "--json").stdout)
    assert [(a["medium"], a["source"]) for a in listing[0]["addresses"]] == [
        ("email", "manual"),
        ("udp", "tracking"),
    ]

    before = devices(db)
    mistakes = {
        ("truck-1",): "pushsync: device set-address: give --udp, --email or --mqtt",
        ("truck-1", "--udp", "nope"): "pushsync: --udp: bad UDP address 'nope'",
        ("truck-1", "--email", "t1@", "--udp", "192.0.2.1:1"): "pushsync: --email: bad email",
        ("truck-9", "--udp", "192.0.2.1:1"): "pushsync: there is no device truck-9",
    }
    for args, first in mistakes.items():
        result = pushsync("device", "set-address", *args, "--dsn", dsn)
        assert result.returncode == 2, args
        assert result.stderr.startswith(first), result.stderr
        assert "Traceback" not in result.stderr
    assert devices(db) == before
