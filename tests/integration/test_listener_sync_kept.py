"""A listener keeps its local database open between synchronizations (``KeptDatabase``).

On real PostgreSQL and SQLite over real SYNC connections, with the trucking
example's publication ``driver``: what the application writes through its own
connection still goes up, schema drift still rebuilds the table, ``pushsync
sync`` beside the listener still works, and the kept database follows its
config and its file, is closed by a failed synchronization and at shutdown.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pushsync.listener.channels import SyncChannel
from pushsync.listener.config import ListenerConfig, load_config
from pushsync.listener.connection import open_session
from pushsync.listener.localdb import LocalDatabase, LocalDatabaseMismatch
from pushsync.listener.runtime import Listener
from pushsync.listener.state import SYNC_LOCK, FolderLock
from pushsync.listener.sync import KeptDatabase, SyncFailed, sync_once
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching, server_address
from tests.support.keys import write_key
from tests.support.publications import Cut, device_config, local, local_reports, local_routes
from tests.support.waiting import until_async


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The local database files opened from here on, one entry per open."""
    paths: list[Path] = []
    real = LocalDatabase.open.__func__  # type: ignore[attr-defined]

    def counting(cls: type[LocalDatabase], path: Path) -> LocalDatabase:
        paths.append(Path(path))
        db: LocalDatabase = real(cls, path)
        return db

    monkeypatch.setattr(LocalDatabase, "open", classmethod(counting))
    return paths


def write_as_application(config: ListenerConfig, sql: str, *params: Any) -> None:
    """A write through a connection of the application's own, committed."""
    with sqlite3.connect(config.state_dir / "local.db", timeout=10) as conn:
        conn.execute(sql, params)
    conn.close()


def server_route_name(fleet: psycopg.Connection, route_id: int) -> str:
    row = fleet.execute(
        "SELECT route_name FROM public.routes WHERE route_id = %s", (route_id,)
    ).fetchone()
    assert row is not None
    return str(row[0])


# --------------------------------------------------------------------------- the listener


@pytest.mark.asyncio
async def test_a_listener_opens_its_local_database_once_and_closes_it_when_it_stops(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, opened: list[Path]
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        listener = Listener(truck2)
        stop = asyncio.Event()
        task = asyncio.create_task(listener.run(stop))
        try:
            await asyncio.wait_for(listener.started.wait(), 10)
            await asyncio.wait_for(listener.channel(SyncChannel).connected.wait(), 10)
            assert opened == [truck2.state_dir / "local.db"]  # at start: a handler syncs
            trucking.report(fleet, location=100, by=1)  # pushes truck-2, whose handler syncs
            await until_async(lambda: has_reports(truck2, 1), "the first pushed sync", 15)
            assert listener.local.is_open
            # The application edits a downloaded row through its own connection.
            write_as_application(
                truck2, "UPDATE routes SET route_name = 'mine' WHERE route_id = 20"
            )
            trucking.report(fleet, location=100, by=3)  # a second push, a second sync
            await until_async(lambda: has_reports(truck2, 2), "the second pushed sync", 15)
            assert server_route_name(fleet, 20) == "mine"  # uploaded by the kept database
            assert opened == [truck2.state_dir / "local.db"]  # still the one of the start
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    assert not listener.local.is_open
    gc.collect()  # the test's own reading connections
    assert open_files(truck2.state_dir) == []
    assert local_routes(truck2) == [(20, "mine", 2)]


def open_files(directory: Path) -> list[str]:
    """The files under ``directory`` this process has open, but its lock files."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile (the directory's own descriptor)
            continue
        if target.startswith(f"{directory}/") and not target.endswith(".lock"):
            found.append(target)
    return found


OFFLINE = """\
device: truck-2
secret_file: device.key
state_dir: state
publication: driver
channels:
  sync: {server: "127.0.0.1:9"}
handlers:
  - name: sync
    subject: sync
    action: sync
"""
"""A listener whose server does not answer: it keeps trying to connect, and runs."""


def offline_listener(tmp_path: Path) -> Listener:
    write_key(tmp_path / "device.key", SECRET)
    (tmp_path / "listener.yaml").write_text(OFFLINE, encoding="utf-8")
    return Listener(load_config(tmp_path / "listener.yaml"))


@pytest.mark.asyncio
async def test_a_listener_started_during_pushsync_sync_leaves_the_file_to_its_first_sync(
    tmp_path: Path,
) -> None:
    held = FolderLock(tmp_path / "state", SYNC_LOCK)  # as `pushsync sync` holds it
    assert held.try_acquire()
    try:
        async with running(offline_listener(tmp_path)) as listener:
            assert not listener.local.is_open
            assert not (tmp_path / "state" / "local.db").exists()  # it does not race
    finally:
        held.release()


@pytest.mark.asyncio
async def test_a_listener_whose_state_dir_holds_another_devices_file_still_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with LocalDatabase.open(tmp_path / "state" / "local.db") as db:
        db.claim("truck-9", "driver")
    async with running(offline_listener(tmp_path)) as listener:
        assert not listener.local.is_open
    assert any(
        "listener.yaml: state_dir" in r.message and "holds the data of device truck-9" in r.message
        for r in caplog.records
    )


@asynccontextmanager
async def running(listener: Listener) -> AsyncIterator[Listener]:
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.started.wait(), 10)
        yield listener
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@asynccontextmanager
async def kept_truck2(
    dsn: str, tmp_path: Path
) -> AsyncIterator[tuple[Any, ListenerConfig, KeptDatabase]]:
    """A dispatcher, truck-2's listener config for it, and a database kept for truck-2,
    closed afterwards."""
    async with dispatching(dsn) as dispatcher:
        kept = KeptDatabase()
        try:
            yield dispatcher, device_config(tmp_path, dispatcher, "truck-2"), kept
        finally:
            kept.close()


def has_reports(config: ListenerConfig, count: int) -> bool:
    try:
        return len(local_reports(config)) >= count
    except sqlite3.OperationalError:  # no table yet
        return False


# --------------------------------------------------------------------------- beside it


@pytest.mark.asyncio
async def test_pushsync_sync_and_the_application_work_beside_a_kept_database(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with kept_truck2(dsn, tmp_path) as (_dispatcher, truck2, kept):
        first = await sync_once(truck2, SECRET, kept=kept)
        assert first.full  # the first download
        fleet.execute("UPDATE public.routes SET route_name = 'server' WHERE route_id = 20")
        # `pushsync sync` opens the file itself while the listener holds it open.
        beside = await sync_once(truck2, SECRET)
        assert (beside.upserted, beside.full) == (1, ())
        again = await sync_once(truck2, SECRET, kept=kept)
        assert (again.upserted, again.deleted, again.full) == (0, 0, ())
        write_as_application(truck2, "UPDATE routes SET route_name = 'app' WHERE route_id = 20")
        up = await sync_once(truck2, SECRET, kept=kept)
        assert (up.uploaded, up.rejected) == (1, 0)
        assert server_route_name(fleet, 20) == "app"


@pytest.mark.asyncio
async def test_schema_drift_rebuilds_the_table_of_a_kept_database(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with kept_truck2(dsn, tmp_path) as (_dispatcher, truck2, kept):
        await sync_once(truck2, SECRET, kept=kept)
        write_as_application(truck2, "UPDATE routes SET route_name = 'edit' WHERE route_id = 20")
        fleet.execute("ALTER TABLE public.routes ADD COLUMN eta text DEFAULT 'soon'")
        result = await sync_once(truck2, SECRET, kept=kept)
        assert "public.routes" in result.full
        assert local(truck2, "SELECT route_name, eta FROM routes") == [("edit", "soon")]
        # The application's connection sees the rebuilt table and writes to it.
        write_as_application(truck2, "UPDATE routes SET eta = 'late' WHERE route_id = 20")
        fleet.execute("ALTER TABLE public.routes DROP COLUMN eta")
        refused = await sync_once(truck2, SECRET, kept=kept)
        assert refused.rejected == 1
        assert kept.open(truck2).rejected()[0].reason.startswith("column eta of public.routes")


# --------------------------------------------------------------------------- following


@pytest.mark.asyncio
async def test_a_kept_database_follows_a_config_naming_another_state_dir(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, opened: list[Path]
) -> None:
    async with kept_truck2(dsn, tmp_path) as (_dispatcher, truck2, kept):
        moved = replace(truck2, state_dir=tmp_path / "elsewhere")
        await sync_once(truck2, SECRET, kept=kept)
        result = await sync_once(moved, SECRET, kept=kept)
        assert result.full  # a new file: its first download
        assert local_routes(moved) == [(20, "south", 2)]
        assert opened == [truck2.state_dir / "local.db", moved.state_dir / "local.db"]


@pytest.mark.asyncio
async def test_a_kept_database_whose_file_was_removed_is_opened_again(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with kept_truck2(dsn, tmp_path) as (_dispatcher, truck2, kept):
        await sync_once(truck2, SECRET, kept=kept)
        for name in ("local.db", "local.db-wal", "local.db-shm"):
            (truck2.state_dir / name).unlink(missing_ok=True)
        result = await sync_once(truck2, SECRET, kept=kept)
        # Not written into the removed file: the new one holds the device's rows.
        assert (truck2.state_dir / "local.db").exists()
        assert local_routes(truck2) == [(20, "south", 2)]
        assert result.full


@pytest.mark.asyncio
async def test_a_kept_database_refuses_another_devices_config_for_its_file(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with kept_truck2(dsn, tmp_path) as (dispatcher, truck2, kept):
        other = replace(device_config(tmp_path, dispatcher, "truck-3"), state_dir=truck2.state_dir)
        await sync_once(truck2, SECRET, kept=kept)
        before = local_routes(truck2)
        with pytest.raises(LocalDatabaseMismatch, match=r"truck-3.*listener\.yaml: state_dir"):
            await sync_once(other, SECRET, kept=kept)
        assert not kept.is_open
        assert local_routes(truck2) == before


@pytest.mark.asyncio
async def test_a_failed_synchronization_closes_the_kept_database(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with kept_truck2(dsn, tmp_path) as (dispatcher, truck2, kept):
        await sync_once(truck2, SECRET, kept=kept)
        watermark = kept.open(truck2).watermark("driver")
        fleet.execute("UPDATE public.routes SET route_name = 'lost' WHERE route_id = 20")
        session = await open_session(server_address(dispatcher), device="truck-2", secret=SECRET)
        try:
            cut = Cut(session, lambda frame, seen: frame.type.name == "SYNC_END")
            with pytest.raises(SyncFailed):
                await sync_once(truck2, SECRET, cut, kept=kept)
        finally:
            await session.close()
        assert not kept.is_open
        assert local_routes(truck2) == [(20, "south", 2)]  # nothing of the answer applied
        again = await sync_once(truck2, SECRET, kept=kept)
        assert again.upserted == 1
        assert kept.open(truck2).watermark("driver") != watermark
