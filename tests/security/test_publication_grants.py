"""A device synchronizes only the publications granted to it.

Devices are registered and granted with the real CLI (``pushsync device add
--publication``, ``device grant``, ``device revoke``); they synchronize with
the real ``pushsync sync`` against a real ``pushsync dispatch``. A device that
asks for a publication it was not granted gets exactly the answer it would get
for one that does not exist, uploads nothing and downloads nothing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.integration import trucking
from tests.reliability.harness import DispatcherProcess
from tests.support.cli import executable
from tests.support.owned_device import SECRET, OwnedDevice, server_state

OFFICE = """
  - name: office                      # the whole roster, for the dispatch office's tablets
    tables:
      - table: public.drivers
        download: SELECT * FROM public.drivers
        upload: [update]
        conflict: client_wins
"""
ROUTE_50 = {"route_id": 50, "route_name": "spare", "driver_id": 5, "detour": None}
REFUSED = "sync failed: the server refused: {}\n"


def pushsync(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSYNC_", "PG"))}
    return subprocess.run(
        [*executable(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def sync(device: OwnedDevice) -> subprocess.CompletedProcess[str]:
    return pushsync("sync", str(device.config_path), cwd=device.directory)


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    """The trucking fleet (truck-1..4 granted ``driver``) and a second publication."""
    trucking.setup(db)
    trucking.apply_rules(db, trucking.RULES.read_text(encoding="utf-8") + OFFICE)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


@pytest.fixture
def server(dsn: str, tmp_path: Path) -> Iterator[str]:
    dispatcher = DispatcherProcess(dsn, tmp_path / "dispatch.log")
    try:
        host, port = dispatcher.wait_address("SYNC")
        yield f"{host}:{port}"
        dispatcher.stop()
    finally:
        dispatcher.close()


def test_a_device_synchronizes_only_what_it_is_granted(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, server: str
) -> None:
    added = pushsync(
        "device", "add", "truck-7", "--dsn", dsn, "--secret-file", "t7.key", cwd=tmp_path
    )
    assert added.returncode == 0, added.stderr
    fleet.execute("UPDATE public.drivers SET device_id = 'truck-7' WHERE driver_id = 5")
    secret = bytes.fromhex((tmp_path / "t7.key").read_text(encoding="ascii").strip())

    def truck7(publication: str | None) -> OwnedDevice:
        return OwnedDevice.make(
            tmp_path,
            "truck-7",
            server,
            publication=publication,
            label=f"truck-7-{publication}",
            secret=secret,
            key_file=tmp_path / "t7.key",
        )

    unnamed, driver, office, nope = truck7(None), truck7("driver"), truck7("office"), truck7("nope")
    # The owner hopes a change of the spare route goes up with the first sync.
    driver.forge(
        "public.routes",
        "update",
        {"route_id": 50},
        old=ROUTE_50,
        new={**ROUTE_50, "route_name": "mine"},
    )
    before = server_state(fleet)
    unknown = sync(nope)
    assert unknown.returncode == 1
    assert unknown.stderr == REFUSED.format("there is no publication 'nope'")
    for device, name in ((driver, "driver"), (office, "office")):
        refused = sync(device)
        assert refused.returncode == 1
        assert refused.stderr == unknown.stderr.replace("'nope'", f"'{name}'")
    refused = sync(unnamed)
    assert refused.returncode == 1
    assert refused.stderr == REFUSED.format(
        "name the publication to synchronize (`publication:` in the listener config): "
        "this device may synchronize none"
    )
    assert server_state(fleet) == before
    assert driver.pending() == 1
    assert all(
        not d.sql("SELECT name FROM sqlite_schema WHERE name = 'routes'") for d in (driver, office)
    )

    granted = pushsync("device", "grant", "truck-7", "driver", "--dsn", dsn, cwd=tmp_path)
    assert (granted.returncode, granted.stdout) == (0, "device truck-7 may synchronize: driver\n")
    # One publication granted: a device that names none synchronizes it.
    done = sync(unnamed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("synchronized driver in ")
    assert unnamed.sql("SELECT route_id FROM routes") == [(50,)]
    done = sync(driver)
    assert done.returncode == 0, done.stderr
    assert fleet.execute("SELECT route_name FROM public.routes WHERE route_id = 50").fetchone() == (
        "mine",
    )
    refused = sync(office)
    assert refused.stderr == unknown.stderr.replace("'nope'", "'office'")

    revoked = pushsync("device", "revoke", "truck-7", "driver", "--dsn", dsn, cwd=tmp_path)
    assert (revoked.returncode, revoked.stdout) == (0, "device truck-7 may synchronize: nothing\n")
    before = server_state(fleet)
    refused = sync(driver)
    assert refused.stderr == unknown.stderr.replace("'nope'", "'driver'")
    assert server_state(fleet) == before


def test_a_device_granted_one_publication_cannot_read_another(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, server: str
) -> None:
    """Truck-1 has ``driver``; ``office`` (every driver's row, writable) stays closed to
    it until granted, and closes again when revoked."""
    truck1 = OwnedDevice.make(tmp_path, "truck-1", server, publication="office")
    truck1.forge(
        "public.drivers",
        "update",
        {"driver_id": 2},
        new={"driver_id": 2, "name": "Bo", "device_id": "truck-1"},
    )
    before = server_state(fleet)
    refused = sync(truck1)
    assert refused.returncode == 1
    assert refused.stderr == REFUSED.format("there is no publication 'office'")
    assert server_state(fleet) == before
    assert not truck1.sql("SELECT name FROM sqlite_schema WHERE name = 'drivers'")

    granted = pushsync("device", "grant", "truck-1", "office", "--dsn", dsn, cwd=tmp_path)
    assert granted.stdout == "device truck-1 may synchronize: driver, office\n"
    unnamed = OwnedDevice.make(tmp_path, "truck-1", server, publication=None, label="unnamed")
    refused = sync(unnamed)
    assert refused.stderr == REFUSED.format(
        "name the publication to synchronize (`publication:` in the listener config): "
        "this device may synchronize driver, office"
    )
    revoked = pushsync("device", "revoke", "truck-1", "office", "--dsn", dsn, cwd=tmp_path)
    assert revoked.stdout == "device truck-1 may synchronize: driver\n"
    assert sync(truck1).stderr == REFUSED.format("there is no publication 'office'")
    assert server_state(fleet) == before


def test_grants_through_the_cli(fleet: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    """``device add --publication`` (repeatable), and what the grant commands refuse."""
    added = pushsync(
        *("device", "add", "tablet-1", "--dsn", dsn, "--secret-file", "tablet.key"),
        *("--publication", "office", "--publication", "fleet_ops"),
        cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    assert "no applied rules file defines publication fleet_ops" in added.stderr
    rows = fleet.execute(
        "SELECT publication FROM pushsync.device_publications WHERE device_id = 'tablet-1' "
        "ORDER BY 1"
    )
    assert rows.fetchall() == [("fleet_ops",), ("office",)]
    before = server_state(fleet)
    nobody = pushsync("device", "grant", "nobody", "office", "--dsn", dsn, cwd=tmp_path)
    assert (nobody.returncode, nobody.stderr.strip()) == (2, "pushsync: there is no device nobody")
    bad = pushsync("device", "grant", "truck-1", "Office;", "--dsn", dsn, cwd=tmp_path)
    assert bad.returncode == 2
    assert "bad publication name 'Office;'" in bad.stderr
    assert server_state(fleet) == before
    # Removing the device removes its grants.
    fleet.execute("DELETE FROM pushsync.devices WHERE device_id = 'tablet-1'")
    gone = fleet.execute(
        "SELECT count(*) FROM pushsync.device_publications WHERE device_id = 'tablet-1'"
    )
    assert gone.fetchone() == (0,)
