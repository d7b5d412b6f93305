"""An update or delete without the row as the device last had it cannot skip the conflict check.

``server_wins`` (and ``newest``) compare the server's row with the uploaded
``old`` image. A device owner who removes that image from the change log, or
cuts it down to the key, used to have the update applied over the server's
newer row. Now such a change is refused, reported back, and changes nothing;
only a ``client_wins`` table takes changes without ``old``.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.integration import trucking
from tests.support.dispatching import dispatching, server_address
from tests.support.owned_device import SECRET, OwnedDevice, server_state
from tests.support.upload_rules import rules

WITHOUT_OLD = (
    "{} of public.routes must carry the row as the device last had it (old); "
    "only a client_wins table takes one without"
)


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    db.execute("INSERT INTO public.routes VALUES (60, 'spare 2', 2)")  # no stops: deletable
    trucking.apply_rules(db, rules())
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


@pytest.mark.asyncio
async def test_updates_and_deletes_without_old_are_refused_under_server_wins(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = OwnedDevice.make(tmp_path, "truck-2", str(server_address(dispatcher)))
        await truck2.sync()
        # The office renames route 20; the device renames it too, and deletes route 60.
        fleet.execute("UPDATE public.routes SET route_name = 'south (office)' WHERE route_id = 20")
        truck2.sql("UPDATE routes SET route_name = 'south (device)' WHERE route_id = 20")
        truck2.sql("DELETE FROM routes WHERE route_id = 60")
        # The owner strips the old images from the change log.
        truck2.sql("UPDATE _pushsync_changes SET old = NULL")
        before = server_state(fleet)
        result = await truck2.sync()
        assert (result.uploaded, result.rejected) == (0, 2)
        assert truck2.rejected() == [
            WITHOUT_OLD.format("an update"),
            WITHOUT_OLD.format("a delete"),
        ]
        assert server_state(fleet) == before
        # The server's rows came back to the device.
        assert truck2.sql("SELECT route_id, route_name FROM routes ORDER BY 1") == [
            (20, "south (office)"),
            (60, "spare 2"),
        ]
        # What client_wins means stays: the device's own driver row, renamed without old.
        fleet.execute("UPDATE public.drivers SET name = 'Bo (office)' WHERE driver_id = 2")
        truck2.sql("UPDATE drivers SET name = 'Bo (device)' WHERE driver_id = 2")
        truck2.sql("UPDATE _pushsync_changes SET old = NULL")
        assert (await truck2.sync()).uploaded == 1
        name = fleet.execute("SELECT name FROM public.drivers WHERE driver_id = 2").fetchone()
        assert name == ("Bo (device)",)


@pytest.mark.asyncio
async def test_an_old_image_cut_down_to_the_key_is_refused(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = OwnedDevice.make(tmp_path, "truck-2", str(server_address(dispatcher)))
        await truck2.sync()
        fleet.execute("UPDATE public.routes SET route_name = 'south (office)' WHERE route_id = 20")
        truck2.sql("UPDATE routes SET route_name = 'south (device)' WHERE route_id = 20")
        truck2.sql("""UPDATE _pushsync_changes SET old = '{"route_id": 20}'""")
        before = server_state(fleet)
        result = await truck2.sync()
        assert (result.uploaded, result.rejected) == (0, 1)
        assert truck2.rejected() == [
            "the old row of this update lacks column detour of public.routes"
        ]
        assert server_state(fleet) == before
