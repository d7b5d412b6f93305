"""Synchronization on real PostgreSQL and SQLite over a real SYNC connection.

The trucking example's publication ``driver``: each device holds its driver's
routes and their stops, and every open disruption report; it may upload
route updates and new reports.
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.dispatcher.sync_endpoint import MAX_UPLOAD_ROWS
from pushsync.listener.config import ListenerConfig
from pushsync.listener.connection import open_session
from pushsync.listener.localdb import LocalDatabase
from pushsync.wire import protocol
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching, server_address
from tests.support.publications import (
    device_config,
    local,
    local_reports,
    local_routes,
    local_stops,
    sync,
    sync_cut,
    write_locally,
)
from tests.support.waiting import until_async


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


# --------------------------------------------------------------------------- download


@pytest.mark.asyncio
async def test_first_sync_downloads_the_devices_rows_then_only_changes(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        first = await sync(truck2)
        assert set(first.full) == {
            "public.routes",
            "public.route_stops",
            "public.disruption_reports",
        }
        assert local_routes(truck2) == [(20, "south", 2)]
        assert local_stops(truck2) == [(20, 1, 100)]
        assert local_reports(truck2) == []

        fleet.execute("UPDATE public.routes SET route_name = 'south (detour)' WHERE route_id = 20")
        fleet.execute("UPDATE public.routes SET route_name = 'east 2' WHERE route_id = 30")
        second = await sync(truck2)
        # Only the changed row of truck-2 (route 30 is not its); route_stops reads routes to
        # choose its rows, but none of truck-2's stops entered, changed or left.
        assert second.full == ()
        assert second.upserted == 1
        assert second.deleted == 0
        assert local_routes(truck2) == [(20, "south (detour)", 2)]

        third = await sync(truck2)
        assert third.full == ()
        assert third.upserted == 0
        assert third.deleted == 0


@pytest.mark.asyncio
async def test_rows_enter_and_leave_the_set_also_through_other_tables(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        await sync(truck2)
        # Route 30 is reassigned to driver 2: it enters truck-2's set, with its stops
        # (route_stops did not change, but the tables its download reads did).
        fleet.execute("UPDATE public.routes SET driver_id = 2 WHERE route_id = 30")
        await sync(truck2)
        assert local_routes(truck2) == [(20, "south", 2), (30, "east", 2)]
        assert local_stops(truck2) == [(20, 1, 100), (30, 1, 300)]
        # Route 20 goes to driver 3: it leaves, stops and all.
        fleet.execute("UPDATE public.routes SET driver_id = 3 WHERE route_id = 20")
        await sync(truck2)
        assert local_routes(truck2) == [(30, "east", 2)]
        assert local_stops(truck2) == [(30, 1, 300)]
        # A report is filed, then cleared (leaves the set), another deleted outright.
        trucking.report(fleet, location=300, by=3)
        trucking.report(fleet, location=400, by=3)
        await sync(truck2)
        assert local_reports(truck2) == [(300, "open"), (400, "open")]
        fleet.execute(
            "UPDATE public.disruption_reports SET status = 'cleared' WHERE location_id = 300"
        )
        fleet.execute("DELETE FROM public.disruption_reports WHERE location_id = 400")
        result = await sync(truck2)
        assert result.deleted == 2
        assert local_reports(truck2) == []
        # Driver 2 now carries another device: truck-2's routes all leave.
        fleet.execute("UPDATE public.drivers SET device_id = NULL WHERE driver_id = 2")
        await sync(truck2)
        assert local_routes(truck2) == []
        assert local_stops(truck2) == []


@pytest.mark.asyncio
async def test_a_transaction_in_flight_during_a_sync_is_not_skipped(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        await sync(truck2)
        with psycopg.connect(dsn) as slow:  # a transaction that started before the sync...
            slow.execute(
                "INSERT INTO public.disruption_reports (location_id, reported_by) VALUES (7, 1)"
            )
            fleet.execute(  # ...and one that starts after it and commits first
                "INSERT INTO public.disruption_reports (location_id, reported_by) VALUES (8, 1)"
            )
            await sync(truck2)
            assert local_reports(truck2) == [(8, "open")]
            slow.commit()
        await sync(truck2)
        assert local_reports(truck2) == [(7, "open"), (8, "open")]


# --------------------------------------------------------------------------- upload


@pytest.mark.asyncio
async def test_an_uploaded_report_fires_the_rules_and_reaches_the_others(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck1 = device_config(tmp_path, dispatcher, "truck-1")
        await sync(truck1)
        report = str(uuid.uuid4())
        write_locally(
            truck1,
            "INSERT INTO disruption_reports (report_id, location_id, reported_by, status, note) "
            "VALUES (?, 100, 1, 'open', 'bridge closed')",
            report,
        )
        result = await sync(truck1)
        assert (result.uploaded, result.rejected) == (1, 0)
        row = fleet.execute(
            "SELECT location_id, reported_by, note FROM public.disruption_reports "
            "WHERE report_id = %s",
            (report,),
        ).fetchone()
        assert row == (100, 1, "bridge closed")
        # The upload is a write like any other: drivers 2 and 4 pass location 100.
        assert trucking.devices_of(fleet, "route_disruption") == ["truck-2", "truck-4"]
        truck4 = device_config(tmp_path, dispatcher, "truck-4")
        await sync(truck4)
        assert local_reports(truck4) == [(100, "open")]


@pytest.mark.asyncio
async def test_refused_uploads_are_reported_kept_and_the_server_row_comes_back(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        await sync(truck2)
        # Conflict: the server changed route 20 after the device got it; server wins.
        fleet.execute("UPDATE public.routes SET route_name = 'south (server)' WHERE route_id = 20")
        write_locally(truck2, "UPDATE routes SET route_name = 'south (device)' WHERE route_id = 20")
        # Not allowed: routes take updates only.
        write_locally(
            truck2, "INSERT INTO routes (route_id, route_name, driver_id) VALUES (99, 'mine', 2)"
        )
        result = await sync(truck2)
        assert (result.uploaded, result.rejected) == (0, 2)
        assert local_routes(truck2) == [(20, "south (server)", 2), (99, "mine", 2)]
        db = LocalDatabase.open(truck2.state_dir / "local.db")
        try:
            reasons = sorted(r.reason for r in db.rejected())
            assert db.pending() == []
        finally:
            db.close()
        assert reasons == [
            "the row changed in public.routes since the device last had it; server wins",
            "uploading inserts to public.routes is not allowed",
        ]
        names = fleet.execute("SELECT route_name FROM public.routes WHERE route_id IN (20, 99)")
        assert names.fetchall() == [("south (server)",)]
        # Without a conflict, an update goes through.
        write_locally(truck2, "UPDATE routes SET route_name = 'south again' WHERE route_id = 20")
        assert (await sync(truck2)).uploaded == 1
        name = fleet.execute("SELECT route_name FROM public.routes WHERE route_id = 20")
        assert name.fetchone() == ("south again",)


@pytest.mark.asyncio
async def test_an_interrupted_sync_is_safe_to_repeat(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck1 = device_config(tmp_path, dispatcher, "truck-1")
        await sync(truck1)
        write_locally(
            truck1,
            "INSERT INTO disruption_reports VALUES (?, 100, 1, 'open', 'first')",
            str(uuid.uuid4()),
        )
        # The server applies the upload, but its answer is lost.
        await sync_cut(truck1, dispatcher, lambda f, _: f.type == protocol.FrameType.UPLOADED)
        count = "SELECT count(*) FROM public.disruption_reports"
        assert fleet.execute(count).fetchone() == (1,)
        # More local changes meanwhile; the lost batch goes again first, exactly as it was.
        write_locally(
            truck1,
            "INSERT INTO disruption_reports VALUES (?, 101, 1, 'open', 'second')",
            str(uuid.uuid4()),
        )
        # This sync uploads both batches (the first is answered from the server's record,
        # not applied again), then its download is cut: nothing of it is applied locally.
        fleet.execute("UPDATE public.routes SET route_name = 'north 2' WHERE route_id = 10")
        await sync_cut(truck1, dispatcher, lambda f, _: f.type == protocol.FrameType.DOWNLOAD)
        assert fleet.execute(count).fetchone() == (2,)
        assert local_routes(truck1) == [(10, "north", 1)]
        result = await sync(truck1)
        assert result.uploaded == 0
        assert fleet.execute(count).fetchone() == (2,)
        assert local_routes(truck1) == [(10, "north 2", 1)]
        assert local_reports(truck1) == [(100, "open"), (101, "open")]


# --------------------------------------------------------------------------- bad input


@pytest.mark.asyncio
async def test_schema_drift_rebuilds_the_local_table(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        await sync(truck2)
        write_locally(truck2, "UPDATE routes SET route_name = 'local edit' WHERE route_id = 20")
        fleet.execute("ALTER TABLE public.routes ADD COLUMN eta text DEFAULT 'soon'")
        result = await sync(truck2)
        assert "public.routes" in result.full
        assert local(truck2, "SELECT route_name, eta FROM routes") == [("local edit", "soon")]
        fleet.execute("ALTER TABLE public.routes DROP COLUMN eta")
        # A change captured with the old shape names a column the server no longer has.
        write_locally(truck2, "UPDATE routes SET eta = 'late' WHERE route_id = 20")
        result = await sync(truck2)
        assert result.rejected == 1
        columns = [row[1] for row in local(truck2, "PRAGMA table_info(routes)")]
        assert columns == ["route_id", "route_name", "driver_id", "detour"]
        db = LocalDatabase.open(truck2.state_dir / "local.db")
        try:
            [refused] = db.rejected()
        finally:
            db.close()
        assert refused.reason.startswith("column eta of public.routes does not exist")
        assert refused.change.new is not None
        assert refused.change.new["eta"] == "late"


@pytest.mark.asyncio
async def test_unknown_publication_and_oversized_batches_are_refused(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        session = await open_session(server_address(dispatcher), device="truck-2", secret=SECRET)
        try:
            session.send(
                protocol.encode_json_frame(
                    protocol.FrameType.SYNC_BEGIN, {"publication": "nope", "tables": {}}
                )
            )
            frame = await session.recv(10)
            assert frame is not None
            error = protocol.decode_json_frame(frame, protocol.FrameType.SYNC_ERROR)["error"]
            assert error == "there is no publication 'nope'"
            # A batch of more rows than allowed, in several frames.
            session.send(
                protocol.encode_json_frame(
                    protocol.FrameType.SYNC_BEGIN, {"publication": "driver", "tables": {}}
                )
            )
            row = {"seq": 1, "table": "public.routes", "op": "update", "key": {"route_id": 20}}
            per_frame = 600
            for start in range(0, MAX_UPLOAD_ROWS + per_frame, per_frame):
                rows = [{**row, "seq": start + n} for n in range(per_frame)]
                frame_bytes = protocol.encode_json_frame(
                    protocol.FrameType.UPLOAD, {"batch": "b", "rows": rows, "more": True}
                )
                if not session.send(frame_bytes):
                    break
            frame = await session.recv(10)
            assert frame is not None
            error = protocol.decode_json_frame(frame, protocol.FrameType.SYNC_ERROR)["error"]
            assert error.startswith("upload batch too large")
        finally:
            await session.close()
        # Nothing was applied, and a normal sync still works.
        assert fleet.execute(
            "SELECT route_name FROM public.routes WHERE route_id = 20"
        ).fetchone() == ("south",)
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        assert (await sync(truck2)).upserted == 2  # route 20 and its stop


@pytest.mark.asyncio
async def test_a_device_gets_only_its_own_rows_whatever_it_sends(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The device id is the connection's: a payload cannot name another device."""
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        session = await open_session(server_address(dispatcher), device="truck-2", secret=SECRET)
        try:
            session.send(
                protocol.encode_json_frame(
                    protocol.FrameType.SYNC_BEGIN,
                    {"publication": "driver", "device": "truck-1", "device_id": "truck-1"},
                )
            )
            session.send(protocol.encode_frame(protocol.FrameType.DOWNLOAD))
            routes: list[Any] = []
            while (frame := await session.recv(10)) is not None:
                if frame.type == protocol.FrameType.SYNC_END:
                    break
                payload = protocol.decode_json_frame(frame, protocol.FrameType.DOWNLOAD)
                if payload["table"] == "public.routes":
                    routes += payload["upserts"]
            assert [r["route_id"] for r in routes] == [20]
        finally:
            await session.close()
        del truck2


@pytest.mark.asyncio
async def test_the_sync_action_runs_over_the_listeners_own_connection(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    from pushsync.listener.channels import SyncChannel
    from pushsync.listener.runtime import Listener

    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        listener = Listener(truck2)
        stop = asyncio.Event()
        task = asyncio.create_task(listener.run(stop))
        try:
            await asyncio.wait_for(listener.started.wait(), 10)
            channel = listener.channel(SyncChannel)
            await asyncio.wait_for(channel.connected.wait(), 10)
            connections = channel.connections
            trucking.report(fleet, location=100, by=1)  # truck-2 is pushed; its handler syncs
            await until_async(
                lambda: local_reports_or_empty(truck2), "the pushed device's sync", 15
            )
            assert local_reports(truck2) == [(100, "open")]
            assert channel.connections == connections  # no second connection was needed
            assert sync_of_connections(dispatcher) == 1
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)


def local_reports_or_empty(config: ListenerConfig) -> list[tuple[Any, ...]]:
    try:
        return local_reports(config)
    except sqlite3.OperationalError:
        return []


def sync_of_connections(dispatcher: Dispatcher) -> int:
    assert dispatcher.connections is not None
    return dispatcher.connections.stats.authenticated


# --------------------------------------------------------------------------- cost


def test_a_download_is_inlined_into_the_key_lookups_of_a_sync(fleet: psycopg.Connection) -> None:
    """Looking up one key of a device's set reads that key, not the whole set: the
    download function is inlined (no SET clause) and the routes' primary key is used."""
    fleet.execute("SET enable_seqscan = off")  # tiny tables: show the index is usable
    plan = "\n".join(
        row[0]
        for row in fleet.execute(
            'EXPLAIN SELECT * FROM pushsync."pub__driver__public__routes"(%s) AS f '
            "WHERE f.route_id = 1",
            ("truck-1",),
        )
    )
    assert "Function Scan" not in plan, plan
    assert "routes_pkey" in plan, plan
