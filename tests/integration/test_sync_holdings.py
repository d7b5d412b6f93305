"""Exact incremental downloads through joins, on real PostgreSQL and SQLite.

The server keeps what each device holds (``pushsync.device_holdings``) and sends
a device exactly the rows of its own download that entered, changed or left
since its last synchronization, whichever table the change was in.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.listener.config import ListenerConfig
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching
from tests.support.publications import (
    device_config,
    local,
    local_routes,
    local_stops,
    sync,
    write_locally,
)

ON_DUTY = "d.name <> 'off duty'"
PUBLICATIONS = f"""\
publications:
  - name: driver
    tables:
      - table: public.drivers
        download: SELECT * FROM public.drivers WHERE device_id = :device_id
        upload: [update]
        conflict: client_wins
      - table: public.routes
        download: |
          SELECT r.* FROM public.routes r
          JOIN public.drivers d ON d.driver_id = r.driver_id
          WHERE d.device_id = :device_id AND {ON_DUTY}
        upload: [update]
      - table: public.route_stops
        download: |
          SELECT s.* FROM public.route_stops s
          JOIN public.routes r ON r.route_id = s.route_id
          JOIN public.drivers d ON d.driver_id = r.driver_id
          WHERE d.device_id = :device_id AND {ON_DUTY}
"""


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    example = trucking.RULES.read_text(encoding="utf-8")
    trucking.apply_rules(db, example[: example.index("\npublications:")] + "\n" + PUBLICATIONS)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


def server_routes(db: psycopg.Connection, device: str) -> list[tuple[Any, ...]]:
    return db.execute(
        'SELECT route_id, route_name, driver_id FROM pushsync."pub__driver__public__routes"(%s) '
        "ORDER BY 1",
        (device,),
    ).fetchall()


def server_stops(db: psycopg.Connection, device: str) -> list[tuple[Any, ...]]:
    return db.execute(
        'SELECT route_id, seq, location_id FROM pushsync."pub__driver__public__route_stops"(%s) '
        "ORDER BY 1, 2",
        (device,),
    ).fetchall()


def holds_what_the_server_sends(db: psycopg.Connection, config: ListenerConfig) -> None:
    device = config.device
    assert local_routes(config) == server_routes(db, device)
    assert local_stops(config) == server_stops(db, device)


async def synced(dispatcher: Dispatcher, tmp_path: Path, *devices: str) -> list[ListenerConfig]:
    configs = [device_config(tmp_path, dispatcher, d) for d in devices]
    for config in configs:
        await sync(config)
    return configs


@pytest.mark.asyncio
async def test_changes_through_one_and_two_joined_tables_reach_only_their_devices(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck1, truck2, truck3 = await synced(dispatcher, tmp_path, "truck-1", "truck-2", "truck-3")
        # Route 30 goes from driver 3 to driver 2: through routes (read by route_stops
        # through a join), truck-2 gets the route and its stop, truck-3 loses both.
        fleet.execute("UPDATE public.routes SET driver_id = 2 WHERE route_id = 30")
        got2, got3, got1 = await sync(truck2), await sync(truck3), await sync(truck1)
        assert (got2.full, got2.upserted, got2.deleted) == ((), 2, 0)
        assert (got3.full, got3.upserted, got3.deleted) == ((), 0, 2)
        assert (got1.full, got1.upserted, got1.deleted) == ((), 0, 0)
        assert local_routes(truck2) == [(20, "south", 2), (30, "east", 2)]
        assert local_stops(truck2) == [(20, 1, 100), (30, 1, 300)]
        assert local_routes(truck3) == []
        assert local_stops(truck3) == []
        # A change in drivers that moves no row of anyone's set sends nothing to anyone.
        fleet.execute("UPDATE public.drivers SET name = 'Ann B.' WHERE driver_id = 1")
        got1, got2 = await sync(truck1), await sync(truck2)
        assert (got1.upserted, got1.deleted) == (1, 0)  # its own drivers row
        assert (got2.upserted, got2.deleted) == (0, 0)
        # Two joins away: driver 2 goes off duty; both its routes and their stops leave.
        fleet.execute("UPDATE public.drivers SET name = 'off duty' WHERE driver_id = 2")
        got2 = await sync(truck2)
        assert (got2.full, got2.upserted, got2.deleted) == ((), 1, 4)
        for config in (truck1, truck2, truck3):
            holds_what_the_server_sends(fleet, config)
        # Back on duty: they enter again.
        fleet.execute("UPDATE public.drivers SET name = 'Bo' WHERE driver_id = 2")
        got2 = await sync(truck2)
        assert (got2.full, got2.upserted, got2.deleted) == ((), 1 + 4, 0)
        holds_what_the_server_sends(fleet, truck2)


@pytest.mark.asyncio
async def test_the_devices_own_upload_moves_rows_out_through_a_joined_table(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        (truck2,) = await synced(dispatcher, tmp_path, "truck-2")
        write_locally(truck2, "UPDATE drivers SET name = 'off duty' WHERE driver_id = 2")
        got = await sync(truck2)
        assert (got.uploaded, got.rejected) == (1, 0)
        assert (got.full, got.deleted) == ((), 2)  # route 20 and its stop left, at once
        assert local_routes(truck2) == []
        assert local_stops(truck2) == []
        assert local(truck2, "SELECT name FROM drivers") == [("off duty",)]
        holds_what_the_server_sends(fleet, truck2)
        again = await sync(truck2)
        assert (again.upserted, again.deleted) == (0, 0)


@pytest.mark.asyncio
async def test_a_transaction_in_flight_through_a_join_is_not_skipped(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        (truck2,) = await synced(dispatcher, tmp_path, "truck-2")
        with psycopg.connect(dsn) as slow:  # started before the sync, commits after it
            slow.execute("UPDATE public.routes SET driver_id = 2 WHERE route_id = 30")
            fleet.execute("UPDATE public.route_stops SET location_id = 101 WHERE route_id = 20")
            first = await sync(truck2)
            assert (first.upserted, first.deleted) == (1, 0)
            assert local_stops(truck2) == [(20, 1, 101)]
            slow.commit()
        second = await sync(truck2)
        assert (second.upserted, second.deleted) == (2, 0)  # route 30 and its stop
        assert local_routes(truck2) == [(20, "south", 2), (30, "east", 2)]
        holds_what_the_server_sends(fleet, truck2)


@pytest.mark.asyncio
async def test_concurrent_writers_during_syncs_leave_the_device_exact(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        rng = random.Random(13)
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.is_set():
                with conn.transaction():
                    route = rng.choice([10, 20, 30, 40])
                    conn.execute(
                        "UPDATE public.routes SET driver_id = %s WHERE route_id = %s",
                        (rng.choice([1, 2, 3, 4]), route),
                    )
                    conn.execute(
                        "UPDATE public.route_stops SET location_id = location_id + 1 "
                        "WHERE route_id = %s",
                        (rng.choice([10, 20, 30, 40]),),
                    )
                    conn.execute(
                        "UPDATE public.drivers SET name = %s WHERE driver_id = %s",
                        (rng.choice(["off duty", "on"]), rng.choice([1, 2, 3])),
                    )
                writes[0] += 1

    async with dispatching(dsn) as dispatcher:
        configs = await synced(dispatcher, tmp_path, "truck-1", "truck-2", "truck-3")
        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            for _ in range(4):
                for config in configs:
                    await sync(config)
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        assert writes[0] > 0
        for config in configs:
            last = await sync(config)
            assert last.full == ()
            holds_what_the_server_sends(fleet, config)


def _copy_state(config: ListenerConfig, to: Path) -> None:
    to.mkdir(exist_ok=True)
    for path in config.state_dir.glob("local.db*"):
        shutil.copy2(path, to / path.name)


def _restore_state(config: ListenerConfig, source: Path) -> None:
    for path in config.state_dir.glob("local.db*"):
        path.unlink()
    for path in source.glob("local.db*"):
        shutil.copy2(path, config.state_dir / path.name)


@pytest.mark.asyncio
async def test_an_answer_the_device_never_applied_is_sent_again(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        (truck2,) = await synced(dispatcher, tmp_path, "truck-2")
        before = tmp_path / "before"
        _copy_state(truck2, before)
        fleet.execute("UPDATE public.routes SET driver_id = 2 WHERE route_id = 30")
        fleet.execute("UPDATE public.routes SET route_name = 'south 2' WHERE route_id = 20")
        got = await sync(truck2)
        assert (got.upserted, got.deleted) == (3, 0)
        _restore_state(truck2, before)  # as if the answer had been lost on the way
        again = await sync(truck2)
        assert (again.full, again.upserted, again.deleted) == ((), 3, 0)
        holds_what_the_server_sends(fleet, truck2)
        # A device restored from an older copy comes with a watermark the server no longer
        # keeps the holdings of: its tables are sent in full, and it is exact again.
        fleet.execute("UPDATE public.routes SET driver_id = 3 WHERE route_id = 30")
        await sync(truck2)
        _restore_state(truck2, before)
        older = await sync(truck2)
        assert set(older.full) == {"public.drivers", "public.routes", "public.route_stops"}
        holds_what_the_server_sends(fleet, truck2)


@pytest.mark.asyncio
async def test_a_device_cannot_obtain_rows_outside_its_set_through_the_diff(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """A device owner forges what it holds: another device's watermark, rows of another
    driver written into its local tables, uploads naming another driver's keys. Whatever
    it claims, it gets only its own rows."""
    async with dispatching(dsn) as dispatcher:
        truck2, truck3 = await synced(dispatcher, tmp_path, "truck-2", "truck-3")
        theirs = local(truck3, "SELECT publication, watermark FROM _pushsync_watermarks")
        assert theirs
        write_locally(
            truck2,
            "UPDATE _pushsync_watermarks SET watermark = ? WHERE publication = ?",
            theirs[0][1],
            theirs[0][0],
        )
        write_locally(
            truck2,
            "INSERT INTO routes (route_id, route_name, driver_id) VALUES (30, 'mine', 2)",
        )
        write_locally(truck2, "UPDATE routes SET route_name = 'x' WHERE route_id = 30")
        write_locally(truck2, "DELETE FROM route_stops WHERE route_id = 20")
        fleet.execute("UPDATE public.routes SET route_name = 'east 2' WHERE route_id = 30")
        got = await sync(truck2)
        assert got.rejected >= 1
        assert local_routes(truck2) == [(20, "south", 2)]
        assert local_stops(truck2) == [(20, 1, 100)]
        again = await sync(truck2)  # confirms what it got: what the server holds for it
        assert (again.full, again.upserted, again.deleted) == ((), 0, 0)
        held = fleet.execute(
            "SELECT convert_from(r.key, 'UTF8') FROM pushsync.device_rows AS r "
            "JOIN pushsync.device_holdings AS h USING (holder) "
            "WHERE h.device_id = 'truck-2' AND r.tbl = 'public.routes'::regclass"
        ).fetchall()
        assert held == [('{"route_id": 20}',)]
        assert fleet.execute(
            "SELECT route_name FROM public.routes WHERE route_id = 30"
        ).fetchall() == [("east 2",)]


@pytest.mark.asyncio
async def test_an_untouched_sync_reads_no_published_table(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """Nothing a download reads changed: the answer comes from the change log and the
    device's holdings alone. Every published table is locked against reading meanwhile;
    a download function run for any of them would wait, and the sync with it."""
    async with dispatching(dsn) as dispatcher:
        (truck2,) = await synced(dispatcher, tmp_path, "truck-2")
        await sync(truck2)
        with psycopg.connect(dsn) as locker:
            locker.execute(
                "LOCK TABLE public.drivers, public.routes, public.route_stops "
                "IN ACCESS EXCLUSIVE MODE"
            )
            untouched = await asyncio.wait_for(sync(truck2), 30)
            assert (untouched.full, untouched.upserted, untouched.deleted) == ((), 0, 0)
            locker.rollback()
        fleet.execute("UPDATE public.route_stops SET location_id = 102 WHERE route_id = 20")
        got = await sync(truck2)
        assert (got.full, got.upserted, got.deleted) == ((), 1, 0)
        holds_what_the_server_sends(fleet, truck2)


@pytest.mark.asyncio
async def test_a_change_in_flight_during_an_untouched_sync_comes_with_the_next(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The untouched sync's watermark is its snapshot: a transaction in flight then (here
    through a joined table only: drivers, read by the routes and stops downloads) is
    neither in its answer nor skipped by the next."""
    async with dispatching(dsn) as dispatcher:
        (truck2,) = await synced(dispatcher, tmp_path, "truck-2")
        await sync(truck2)
        with psycopg.connect(dsn) as slow:  # started before the sync, commits after it
            slow.execute("UPDATE public.drivers SET name = 'off duty' WHERE driver_id = 2")
            during = await sync(truck2)
            assert (during.full, during.upserted, during.deleted) == ((), 0, 0)
            slow.commit()
        after = await sync(truck2)
        # its drivers row changed; route 20 and its stop left through the join
        assert (after.full, after.upserted, after.deleted) == ((), 1, 2)
        assert local_routes(truck2) == []
        assert local_stops(truck2) == []
        holds_what_the_server_sends(fleet, truck2)
        again = await sync(truck2)
        assert (again.upserted, again.deleted) == (0, 0)
