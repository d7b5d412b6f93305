"""``upload: atomic`` on real PostgreSQL and SQLite over a real SYNC connection.

The trucking example's publication ``driver``, compiled with ``upload: atomic``:
the batches of one upload (two changes each here) are applied in one
transaction, or nothing of them is.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from pushsync.listener import sync as client
from pushsync.listener.config import ListenerConfig
from pushsync.listener.localdb import LocalDatabase
from pushsync.wire import protocol
from pushsync.wire import sync as wire
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching
from tests.support.publications import ATOMIC, device_config, sync, sync_cut, write_locally
from tests.support.waiting import until_async

REPORTS = "SELECT count(*) FROM public.disruption_reports"


@pytest.fixture
def fleet(db: psycopg.Connection, monkeypatch: pytest.MonkeyPatch) -> psycopg.Connection:
    trucking.setup(db)
    trucking.apply_rules(db, ATOMIC)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    monkeypatch.setattr(client, "BATCH_ROWS", 2)
    return db


def report_locally(config: ListenerConfig, count: int, first: int = 100) -> None:
    for n in range(count):
        write_locally(
            config,
            "INSERT INTO disruption_reports VALUES (?, ?, 1, 'open', 'x')",
            str(uuid.uuid4()),
            first + n,
        )


def pending(config: ListenerConfig) -> int:
    db = LocalDatabase.open(config.state_dir / "local.db")
    try:
        return len(db.pending(100))
    finally:
        db.close()


def last_answer(frame: protocol.Frame) -> bool:
    """The answer to an upload's last batch (not one that says "held")."""
    if frame.type != protocol.FrameType.UPLOADED:
        return False
    return not wire.decode_uploaded(frame).held


def first_held(frame: protocol.Frame) -> bool:
    return frame.type == protocol.FrameType.UPLOADED and wire.decode_uploaded(frame).held


@pytest.mark.asyncio
async def test_a_refused_change_in_the_third_batch_leaves_the_first_two_unapplied(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck1 = device_config(tmp_path, dispatcher, "truck-1")
        await sync(truck1)
        report_locally(truck1, 4)  # batches 1 and 2
        write_locally(truck1, "INSERT INTO routes VALUES (99, 'mine', 1, NULL)")  # batch 3
        result = await sync(truck1)
        assert result.refused is not None
        assert "uploading inserts to public.routes is not allowed" in result.refused
        assert result.uploaded == 0
        assert fleet.execute(REPORTS).fetchone() == (0,)
        assert fleet.execute("SELECT count(*) FROM pushsync.sync_uploads").fetchone() == (0,)
        assert pending(truck1) == 5  # every change kept, to upload again
        # The same changes under `upload: rows`: each stands alone, as before.
        trucking.apply_rules(fleet)
        result = await sync(truck1)
        assert (result.uploaded, result.rejected, result.refused) == (4, 1, None)
        assert fleet.execute(REPORTS).fetchone() == (4,)
        assert pending(truck1) == 0


@pytest.mark.asyncio
async def test_a_retry_after_a_lost_answer_applies_nothing_twice(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck1 = device_config(tmp_path, dispatcher, "truck-1")
        await sync(truck1)
        report_locally(truck1, 5)  # three batches: 2, 2, 1
        # The server applies all three, but its answer to the last is lost.
        await sync_cut(truck1, dispatcher, lambda f, _: last_answer(f))
        assert fleet.execute(REPORTS).fetchone() == (5,)
        # A change made meanwhile would cut a different last batch; the lost one goes as it was.
        report_locally(truck1, 1, first=200)
        result = await sync(truck1)
        # Five answered from the server's record (applied before), one applied now.
        assert (result.uploaded, result.refused) == (6, None)
        assert fleet.execute(REPORTS).fetchone() == (6,)
        batches = fleet.execute("SELECT count(*) FROM pushsync.sync_uploads").fetchone()
        assert batches == (4,)
        assert pending(truck1) == 0


@pytest.mark.asyncio
async def test_a_connection_lost_mid_upload_leaves_nothing(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with dispatching(dsn) as dispatcher:
        truck1 = device_config(tmp_path, dispatcher, "truck-1")
        await sync(truck1)
        report_locally(truck1, 5)
        await sync_cut(truck1, dispatcher, lambda f, _: first_held(f))

        def rolled_back() -> bool:
            idle = fleet.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE state LIKE 'idle in transaction%%' AND pid <> pg_backend_pid()"
            ).fetchone()
            return idle == (0,)

        await until_async(rolled_back, "the upload's transaction rolled back", timeout=5)
        assert fleet.execute(REPORTS).fetchone() == (0,)
        assert fleet.execute("SELECT count(*) FROM pushsync.sync_uploads").fetchone() == (0,)
        result = await sync(truck1)
        assert (result.uploaded, result.refused) == (5, None)
        assert fleet.execute(REPORTS).fetchone() == (5,)
