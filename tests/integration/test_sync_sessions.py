"""Every synchronization leaves one row in ``pushsync.sync_sessions``, and writing it can
never fail the synchronization."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pushsync.listener.connection import open_session
from pushsync.wire import protocol
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching, server_address
from tests.support.publications import device_config, sync, write_locally
from tests.support.waiting import until_async

COLUMNS = "device_id, publication, upload_rows, download_rows, conflicts, outcome, error"


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


def sessions(db: psycopg.Connection) -> list[tuple[Any, ...]]:
    return db.execute(
        f"SELECT {COLUMNS} FROM pushsync.sync_sessions ORDER BY session_id"
    ).fetchall()


@pytest.mark.asyncio
async def test_each_synchronization_is_recorded_with_its_rows_and_conflicts(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        await sync(truck2)
        await until_async(lambda: len(sessions(fleet)) == 1, "the first synchronization's row")
        fleet.execute("UPDATE public.routes SET route_name = 'south (server)' WHERE route_id = 20")
        write_locally(truck2, "UPDATE routes SET route_name = 'south (device)' WHERE route_id = 20")
        write_locally(truck2, "UPDATE route_stops SET location_id = 7 WHERE route_id = 20")
        result = await sync(truck2)
        await until_async(lambda: len(sessions(fleet)) == 2, "the second synchronization's row")
    assert (result.uploaded, result.rejected) == (0, 2)
    first, second = sessions(fleet)
    # route 20 and its one stop, in full the first time
    assert first == ("truck-2", "driver", 0, 2, 0, "ok", None)
    # the server's route 20 comes back (and its stop), the two uploads were refused
    assert second[:2] == ("truck-2", "driver")
    assert second[2:5] == (0, result.upserted + result.deleted, 2)
    assert second[5:] == ("ok", None)
    span = fleet.execute(
        "SELECT bool_and(started_at <= finished_at AND finished_at <= now()) "
        "FROM pushsync.sync_sessions"
    ).fetchone()
    assert span == (True,)


@pytest.mark.asyncio
async def test_a_refused_synchronization_is_recorded_as_refused(
    fleet: psycopg.Connection, dsn: str
) -> None:
    async with dispatching(dsn) as dispatcher:
        session = await open_session(server_address(dispatcher), device="truck-2", secret=SECRET)
        try:
            begin = {"publication": "nope", "tables": {}}
            session.send(protocol.encode_json_frame(protocol.FrameType.SYNC_BEGIN, begin))
            frame = await session.recv(10)
            assert frame is not None
            assert frame.type == protocol.FrameType.SYNC_ERROR
        finally:
            await session.close()
        await until_async(lambda: len(sessions(fleet)) == 1, "the refused synchronization's row")
    assert sessions(fleet) == [
        ("truck-2", None, 0, 0, 0, "refused", "there is no publication 'nope'")
    ]


@pytest.mark.asyncio
async def test_a_record_that_cannot_be_written_fails_nothing(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet.execute("ALTER TABLE pushsync.sync_sessions RENAME TO sync_sessions_away")
    async with dispatching(dsn) as dispatcher:
        truck2 = device_config(tmp_path, dispatcher, "truck-2")
        with caplog.at_level(logging.WARNING, logger="pushsync.dispatcher.sync_endpoint"):
            first = await sync(truck2)
            fleet.execute("UPDATE public.routes SET route_name = 'south 2' WHERE route_id = 20")
            second = await sync(truck2)
            await until_async(
                lambda: caplog.text.count("the synchronization was not recorded") == 2,
                "both failures to record logged",
            )
    assert first.upserted == 2
    assert second.upserted >= 1
    assert "sync_sessions" in caplog.text
    row = fleet.execute("SELECT route_name FROM public.routes WHERE route_id = 20").fetchone()
    assert row == ("south 2",)
