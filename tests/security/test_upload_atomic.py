"""A device owner cannot make an atomic upload hold its transaction, and its locks, forever.

The device (a valid key, a hand-made client) starts an ``upload: atomic``
upload and never sends its last batch, or sends more than one upload may
hold: the server rolls the transaction back at the limit, answers SYNC_ERROR,
and the application is not kept waiting on the rows it had locked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
import pytest

from pushsync.dispatcher.sync_endpoint import SyncLimits
from pushsync.listener.connection import Session, open_session
from pushsync.wire import protocol
from pushsync.wire import sync as wire
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching, server_address
from tests.support.publications import ATOMIC

REPORTS = "SELECT count(*) FROM public.disruption_reports"


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    trucking.setup(db)
    trucking.apply_rules(db, ATOMIC)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    return db


def report(seq: int, report_id: str) -> dict[str, Any]:
    row = {
        "report_id": report_id,
        "location_id": 100,
        "reported_by": 1,
        "status": "open",
        "note": "x",
    }
    key = {"report_id": report_id}
    return {"seq": seq, "table": "public.disruption_reports", "op": "insert", "key": key,
            "old": None, "new": row}  # fmt: skip


def upload(batch: str, rows: list[dict[str, Any]], *, follows: bool) -> bytes:
    payload = {"batch": batch, "rows": rows, "more": False, "follows": follows}
    return protocol.encode_json_frame(protocol.FrameType.UPLOAD, payload)


async def answer(session: Session) -> protocol.Frame:
    frame = await session.recv(10)
    assert frame is not None
    return frame


@pytest.mark.asyncio
async def test_an_upload_without_its_last_batch_lets_go_of_its_locks_at_the_limit(
    fleet: psycopg.Connection, dsn: str
) -> None:
    report_id = str(uuid.uuid4())
    async with dispatching(dsn, limits=SyncLimits(atomic_seconds=1.0)) as dispatcher:
        session = await open_session(server_address(dispatcher), device="truck-1", secret=SECRET)
        try:
            begin = wire.SyncBegin(publication="driver", watermark=None)
            session.send(wire.encode_sync_begin(begin))
            session.send(upload("b1", [report(1, report_id)], follows=True))
            held = await answer(session)
            assert wire.decode_uploaded(held).held
            started = time.monotonic()
            # The application wants the row the held upload inserted: it waits for the
            # upload's transaction, which the server ends at the limit.
            insert = asyncio.to_thread(
                fleet.execute,
                "INSERT INTO public.disruption_reports VALUES (%s, 300, 3, 'open', 'app')",
                (report_id,),
            )
            await insert
            waited = time.monotonic() - started
            error = wire.decode_sync_error(await answer(session))
            assert error == "the atomic upload took more than 1 s; nothing of it was applied"
        finally:
            await session.close()
    assert waited < 5
    assert fleet.execute("SELECT location_id, note FROM public.disruption_reports").fetchall() == [
        (300, "app")
    ]
    assert fleet.execute("SELECT count(*) FROM pushsync.sync_uploads").fetchone() == (0,)


@pytest.mark.asyncio
async def test_an_upload_larger_than_one_may_hold_is_refused_whole(
    fleet: psycopg.Connection, dsn: str
) -> None:
    async with dispatching(dsn, limits=SyncLimits(atomic_rows=3)) as dispatcher:
        session = await open_session(server_address(dispatcher), device="truck-1", secret=SECRET)
        try:
            session.send(
                wire.encode_sync_begin(wire.SyncBegin(publication="driver", watermark=None))
            )
            first = [report(1, str(uuid.uuid4())), report(2, str(uuid.uuid4()))]
            session.send(upload("b1", first, follows=True))
            assert wire.decode_uploaded(await answer(session)).held
            second = [report(3, str(uuid.uuid4())), report(4, str(uuid.uuid4()))]
            session.send(upload("b2", second, follows=False))
            error = wire.decode_sync_error(await answer(session))
            assert error.startswith("atomic upload too large: at most 3 rows")
        finally:
            await session.close()
    assert fleet.execute(REPORTS).fetchone() == (0,)


@pytest.mark.asyncio
async def test_an_upload_ended_before_its_last_batch_applies_nothing(
    fleet: psycopg.Connection, dsn: str
) -> None:
    async with dispatching(dsn) as dispatcher:
        session = await open_session(server_address(dispatcher), device="truck-1", secret=SECRET)
        try:
            session.send(
                wire.encode_sync_begin(wire.SyncBegin(publication="driver", watermark=None))
            )
            session.send(upload("b1", [report(1, str(uuid.uuid4()))], follows=True))
            assert wire.decode_uploaded(await answer(session)).held
            session.send(protocol.encode_frame(protocol.FrameType.DOWNLOAD))
            error = wire.decode_sync_error(await answer(session))
            assert error == (
                "the atomic upload ended without its last batch; nothing of it was applied"
            )
            assert fleet.execute(REPORTS).fetchone() == (0,)
            # A device that does not say whether batches follow: each batch is a whole upload.
            session.send(
                wire.encode_sync_begin(wire.SyncBegin(publication="driver", watermark=None))
            )
            rows = [report(1, str(uuid.uuid4())), report(2, str(uuid.uuid4()))]
            plain = {"batch": "b2", "rows": rows, "more": False}
            session.send(protocol.encode_json_frame(protocol.FrameType.UPLOAD, plain))
            answered = wire.decode_uploaded(await answer(session))
            assert (answered.held, answered.refused, list(answered.applied)) == (
                False,
                None,
                [1, 2],
            )
        finally:
            await session.close()
    assert fleet.execute(REPORTS).fetchone() == (2,)
