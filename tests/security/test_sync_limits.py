"""What an authenticated device can make the dispatcher hold is bounded.

A device owner who forges huge uploads in the change log of their SQLite file
(row images of thousands of tiny columns, batches of them) used to grow the
dispatcher by hundreds of megabytes that it kept. Now a session holds at most
one batch, as the frames that carried it, and decodes one frame at a time;
images wider than any table are refused at once. The dispatcher here is a
real ``pushsync dispatch`` process whose resident memory is measured (its
peak, ``VmHWM``, reset before the attacks through ``/proc/PID/clear_refs``).

A device also runs one synchronization at a time, and the server a bounded
number of them: the rest are refused with a clear SYNC_ERROR.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from pushsync.dispatcher.sync_endpoint import SyncLimits
from pushsync.listener.sync import SyncFailed
from tests.integration import trucking
from tests.reliability.harness import DispatcherProcess
from tests.support.dispatching import dispatching, server_address
from tests.support.owned_device import SECRET, OwnedDevice, server_state
from tests.support.waiting import until_async

MIB = 1024
"""KiB in a MiB (/proc reports KiB)."""
GROWTH_LIMIT = 64 * MIB
"""What the attacks below may add to the dispatcher's peak memory: one batch per session
is 16 MiB at most. Before the limits, they added more than 250 MiB."""


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (the peak) of ``pid``, in KiB."""
    found = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0])
    return found


def reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")  # VmHWM := VmRSS


def forge_wide_rows(device: OwnedDevice, rows: int, columns: int, part: str) -> None:
    """``rows`` updates of route 10 whose ``part`` image (key or new) names ``columns``
    tiny columns, recorded as one batch already sent: the client sends such a batch again
    as it was, whatever its size."""
    wide = {f"c{n:04}": 0 for n in range(columns)}
    key = wide if part == "key" else {"route_id": 10}
    new = wide if part == "new" else {"route_id": 10}
    row = (json.dumps(key, separators=(",", ":")), json.dumps(new, separators=(",", ":")))
    with sqlite3.connect(device.local_db) as conn:
        conn.executemany(
            'INSERT INTO _pushsync_changes ("table", op, "key", old, new) '
            "VALUES ('public.routes', 'update', ?, NULL, ?)",
            [row] * rows,
        )
        first, last = conn.execute("SELECT min(seq), max(seq) FROM _pushsync_changes").fetchone()
        conn.execute(
            "UPDATE _pushsync_upload SET batch = ?, first_seq = ?, last_seq = ?",
            (f"forged-{first}", first, last),
        )


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    trucking.add_devices(db, "truck-5")  # driver 5's device
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


@pytest.fixture
def dispatcher(fleet: psycopg.Connection, dsn: str, tmp_path: Path) -> Iterator[DispatcherProcess]:
    process = DispatcherProcess(dsn, tmp_path / "dispatch.log")
    try:
        yield process
        process.stop()
    finally:
        process.close()


@pytest.mark.asyncio
async def test_huge_uploads_are_refused_and_the_dispatcher_stays_small(
    fleet: psycopg.Connection, tmp_path: Path, dispatcher: DispatcherProcess
) -> None:
    host, port = dispatcher.wait_address("SYNC")
    devices = {
        name: OwnedDevice.make(tmp_path, name, f"{host}:{port}")
        for name in ("truck-1", "truck-2", "truck-3", "truck-4", "truck-5")
    }
    for device in devices.values():  # every code path once, before measuring
        await device.sync()
    before = server_state(fleet)
    baseline = memory(dispatcher.pid)["VmRSS"]
    reset_peak(dispatcher.pid)
    assert memory(dispatcher.pid)["VmHWM"] < baseline + 4 * MIB

    # 1. 400 rows whose key names 5,000 columns (about 20 MB of frames).
    forge_wide_rows(devices["truck-1"], rows=400, columns=5_000, part="key")
    with pytest.raises(SyncFailed) as refused:
        await devices["truck-1"].sync()
    assert str(refused.value) == (
        "the server refused: upload row 0: key names 5000 columns; a table has at most 1600"
    )
    first = memory(dispatcher.pid)
    assert server_state(fleet) == before

    # 2. Three devices at once, 600 rows each whose new image names 1,500 columns: each
    #    batch (9 MB) is within the limits; every row is refused, one frame decoded at a
    #    time. Meanwhile another device synchronizes as usual.
    attackers = [devices[name] for name in ("truck-3", "truck-4", "truck-5")]
    for device in attackers:
        forge_wide_rows(device, rows=600, columns=1_500, part="new")
    fleet.execute("UPDATE public.routes SET route_name = 'south 2' WHERE route_id = 20")
    before = server_state(fleet)
    *attacks, bystander = await asyncio.gather(
        *(device.sync() for device in attackers), devices["truck-2"].sync()
    )
    for result in attacks:
        assert (result.uploaded, result.rejected) == (0, 600)
    assert bystander.upserted >= 1
    assert devices["truck-2"].sql("SELECT route_name FROM routes") == [("south 2",)]
    for reason in devices["truck-3"].rejected():  # shortened to fit one answer frame
        assert reason.startswith("column c0000 of public.routes does not exist")
    second = memory(dispatcher.pid)
    await asyncio.sleep(1)
    after = memory(dispatcher.pid)["VmRSS"]

    figures = {
        "baseline_kib": baseline,
        "peak_after_wide_keys_kib": first["VmHWM"],
        "peak_after_three_devices_kib": second["VmHWM"],
        "rss_after_kib": after,
    }
    print(json.dumps(figures))
    assert first["VmHWM"] - baseline < GROWTH_LIMIT, figures
    assert second["VmHWM"] - baseline < GROWTH_LIMIT, figures
    assert after - baseline < GROWTH_LIMIT // 2, figures
    assert server_state(fleet) == before
    assert "Traceback" not in dispatcher.output()


def blocked(db: psycopg.Connection) -> bool:
    """Whether some session of this database waits for a lock."""
    row = db.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    ).fetchone()
    return bool(row and row[0])


async def wait_blocked(db: psycopg.Connection) -> None:
    await until_async(lambda: blocked(db), "the synchronization to reach the lock", 10)


@pytest.mark.asyncio
async def test_a_device_runs_one_synchronization_at_a_time(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """Truck-2's first synchronization waits on a row lock; a second one of the same
    device, on another connection from another copy of its files, is refused."""
    async with dispatching(dsn) as dispatcher:
        server = str(server_address(dispatcher))
        first = OwnedDevice.make(tmp_path, "truck-2", server)
        second = OwnedDevice.make(tmp_path, "truck-2", server, label="truck-2-again")
        await first.sync()
        await second.sync()
        first.sql("UPDATE routes SET route_name = 'south (first)' WHERE route_id = 20")
        with psycopg.connect(dsn) as locker:
            locker.execute("SELECT 1 FROM public.routes WHERE route_id = 20 FOR UPDATE")
            running = asyncio.create_task(first.sync())
            await wait_blocked(fleet)
            before = server_state(fleet)
            with pytest.raises(SyncFailed) as refused:
                await second.sync()
            assert str(refused.value) == (
                "the server refused: a synchronization of this device is already running; "
                "try again when it has ended"
            )
            assert server_state(fleet) == before
            locker.rollback()
        result = await asyncio.wait_for(running, 10)
        assert (result.uploaded, result.rejected) == (1, 0)
        await second.sync()  # and the next one is served
        assert second.sql("SELECT route_name FROM routes") == [("south (first)",)]


@pytest.mark.asyncio
async def test_the_server_runs_a_bounded_number_of_synchronizations(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn, limits=SyncLimits(sessions=1, slot_wait=0.5)) as dispatcher:
        address = str(server_address(dispatcher))
        truck1 = OwnedDevice.make(tmp_path, "truck-1", address)
        truck2 = OwnedDevice.make(tmp_path, "truck-2", address)
        await truck1.sync()
        await truck2.sync()
        truck2.sql("UPDATE routes SET route_name = 'south (truck-2)' WHERE route_id = 20")
        with psycopg.connect(dsn) as locker:
            locker.execute("SELECT 1 FROM public.routes WHERE route_id = 20 FOR UPDATE")
            running = asyncio.create_task(truck2.sync())
            await wait_blocked(fleet)
            truck1.sql("UPDATE routes SET route_name = 'north (truck-1)' WHERE route_id = 10")
            before = server_state(fleet)
            with pytest.raises(SyncFailed) as refused:
                await truck1.sync()
            assert str(refused.value) == (
                "the server refused: the server is busy with other synchronizations; "
                "try again later"
            )
            assert server_state(fleet) == before
            assert truck1.pending() == 1
            locker.rollback()
        assert (await asyncio.wait_for(running, 10)).uploaded == 1
        assert (await truck1.sync()).uploaded == 1
