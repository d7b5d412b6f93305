"""A device owner uploads changes to rows that are not theirs: every one is refused.

The trucking fleet with a publication ``driver`` in which a device holds its
driver's row, its driver's routes and every open report, and may rename its
driver (``client_wins``), insert, update and delete routes (``server_wins``)
and file reports — as its own driver (``upload_check``). Truck-1 carries
driver 1 (Ann, route 10). Each attack goes through the real sync client and a
real SYNC connection to the dispatcher, with the device's SQLite file edited
as its owner could; each must be rejected with a reason the device keeps, and
leave the server exactly as it was.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from tests.integration import trucking
from tests.support.dispatching import dispatching, server_address
from tests.support.owned_device import SECRET, OwnedDevice, server_state
from tests.support.upload_rules import rules

NOT_THEIRS = "the row is not (or no longer) one of this device's rows of {}"
WOULD_LEAVE = "the row as written would not be one of this device's rows of {}"
ROUTE_20 = {"route_id": 20, "route_name": "south", "driver_id": 2, "detour": None}
DRIVER_2 = {"driver_id": 2, "name": "Bo", "device_id": "truck-2"}


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    trucking.apply_rules(db, rules())
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


@pytest.mark.asyncio
async def test_another_drivers_route_cannot_be_updated(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """Route 20 (Bo's) is not in truck-1's download: updating it by key is refused, even
    with the right ``old`` image and the route given to truck-1's own driver."""
    async with dispatching(dsn) as dispatcher:
        truck1 = OwnedDevice.make(tmp_path, "truck-1", str(server_address(dispatcher)))
        await truck1.sync()
        before = server_state(fleet)
        truck1.forge(
            "public.routes",
            "update",
            {"route_id": 20},
            old=ROUTE_20,
            new={**ROUTE_20, "route_name": "hijacked", "driver_id": 1},
        )
        truck1.forge(
            "public.routes",
            "update",
            {"route_id": 20},
            old=ROUTE_20,
            new={**ROUTE_20, "route_name": "renamed by truck-1"},
        )
        result = await truck1.sync()
        assert (result.uploaded, result.rejected) == (0, 2)
        assert truck1.rejected() == [NOT_THEIRS.format("public.routes")] * 2
        assert server_state(fleet) == before
        # The device holds its own route only, as before.
        assert truck1.sql("SELECT route_id FROM routes") == [(10,)]


@pytest.mark.asyncio
async def test_a_route_cannot_be_moved_out_of_the_devices_rows(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """An update whose result leaves the device's set (route 10 given to Bo) is refused:
    the rule that fires on the write (route_reassigned) leaves no notification."""
    async with dispatching(dsn) as dispatcher:
        truck1 = OwnedDevice.make(tmp_path, "truck-1", str(server_address(dispatcher)))
        await truck1.sync()
        before = server_state(fleet)
        truck1.sql("UPDATE routes SET driver_id = 2 WHERE route_id = 10")
        truck1.sql("INSERT INTO routes (route_id, route_name, driver_id) VALUES (11, 'for Bo', 2)")
        result = await truck1.sync()
        assert (result.uploaded, result.rejected) == (0, 2)
        assert truck1.rejected() == [WOULD_LEAVE.format("public.routes")] * 2
        assert server_state(fleet) == before
        # The server's row came back to the device.
        assert truck1.sql("SELECT route_id, driver_id FROM routes ORDER BY 1") == [
            (10, 1),
            (11, 2),
        ]


@pytest.mark.asyncio
async def test_a_report_cannot_be_filed_as_another_driver(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The upload_check refuses a report by Bo from Ann's device; what the table's own
    trigger (plan_detours) and the rules did on the insert is undone with it."""
    async with dispatching(dsn) as dispatcher:
        truck1 = OwnedDevice.make(tmp_path, "truck-1", str(server_address(dispatcher)))
        await truck1.sync()
        before = server_state(fleet)
        insert = (
            "INSERT INTO disruption_reports (report_id, location_id, reported_by, status, note) "
            "VALUES (?, 100, ?, 'open', ?)"
        )
        truck1.sql(insert, str(uuid.uuid4()), 2, "filed as Bo")
        result = await truck1.sync()
        assert (result.uploaded, result.rejected) == (0, 1)
        assert truck1.rejected() == [
            "the upload_check of public.disruption_reports refuses this change"
        ]
        assert server_state(fleet) == before
        # Ann's own report goes through: the trigger plans detours, the rule notifies.
        truck1.sql(insert, str(uuid.uuid4()), 1, "filed by Ann")
        result = await truck1.sync()
        assert (result.uploaded, result.rejected) == (1, 0)
        detours = fleet.execute("SELECT count(*) FROM public.routes WHERE detour IS NOT NULL")
        assert detours.fetchone() == (4,)
        assert trucking.devices_of(fleet, "route_disruption") == ["truck-2", "truck-4"]


@pytest.mark.asyncio
async def test_another_devices_driver_cannot_be_rebound(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """``drivers`` is client_wins (no ``old`` needed), yet truck-1 can neither take Bo's
    driver row (truck-2's) nor hand its own to another device id."""
    async with dispatching(dsn) as dispatcher:
        truck1 = OwnedDevice.make(tmp_path, "truck-1", str(server_address(dispatcher)))
        await truck1.sync()
        before = server_state(fleet)
        truck1.forge(
            "public.drivers", "update", {"driver_id": 2}, new={**DRIVER_2, "device_id": "truck-1"}
        )
        truck1.forge(
            "public.drivers", "update", {"driver_id": 2}, new={**DRIVER_2, "device_id": None}
        )
        truck1.sql("UPDATE drivers SET device_id = 'truck-9' WHERE driver_id = 1")
        result = await truck1.sync()
        assert (result.uploaded, result.rejected) == (0, 3)
        assert truck1.rejected() == [
            NOT_THEIRS.format("public.drivers"),
            NOT_THEIRS.format("public.drivers"),
            WOULD_LEAVE.format("public.drivers"),
        ]
        assert server_state(fleet) == before
        # Renaming its own driver is what the publication allows.
        truck1.sql("UPDATE drivers SET name = 'Ann B.' WHERE driver_id = 1")
        assert (await truck1.sync()).uploaded == 1
        name = fleet.execute("SELECT name, device_id FROM public.drivers WHERE driver_id = 1")
        assert name.fetchone() == ("Ann B.", "truck-1")


@pytest.mark.asyncio
async def test_another_drivers_route_cannot_be_deleted_or_taken_by_insert(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """A delete of a route outside the set, and an insert that lands on an existing key
    (client_wins would turn it into an update) are refused."""
    fleet.execute("INSERT INTO public.routes VALUES (60, 'spare 2', 2)")  # no stops: deletable
    trucking.apply_rules(fleet, rules().replace("conflict: server_wins", "conflict: client_wins"))
    async with dispatching(dsn) as dispatcher:
        truck1 = OwnedDevice.make(tmp_path, "truck-1", str(server_address(dispatcher)))
        await truck1.sync()
        before = server_state(fleet)
        spare = {"route_id": 60, "route_name": "spare 2", "driver_id": 2, "detour": None}
        truck1.forge("public.routes", "delete", {"route_id": 60}, old=spare)
        truck1.sql("INSERT INTO routes (route_id, route_name, driver_id) VALUES (60, 'mine', 1)")
        result = await truck1.sync()
        assert (result.uploaded, result.rejected) == (0, 2)
        assert truck1.rejected() == [NOT_THEIRS.format("public.routes")] * 2
        assert server_state(fleet) == before
