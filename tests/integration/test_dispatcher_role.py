"""The dispatcher runs with exactly the grants docs/schema.md gives its role.

The SQL block is taken from the documentation itself, so the docs cannot drift
from what the dispatcher needs: a missing grant fails this test.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pushsync.wire import protocol
from tests.integration import trucking
from tests.support.dispatching import (
    DEVICE,
    SECRET,
    add_device,
    dispatching,
    enqueue,
    outbox_row,
    session,
)
from tests.support.publications import device_config, local_routes, sync, write_locally
from tests.support.waiting import until_async

DOCS = Path(__file__).resolve().parents[2] / "docs" / "schema.md"


def documented_grants(role: str) -> list[str]:
    """The statements of the docs' dispatcher role block, for a role named ``role``."""
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```sql\n(.*?)```", text, re.DOTALL)
    block = next(b for b in blocks if "CREATE ROLE pushsync_dispatcher" in b)
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
    # The example poll, publication and application tables do not exist in this database.
    statements = [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
    statements = [s for s in statements if not re.search(r"poll__|pub__|public\.", s)]
    return [s.replace("pushsync_dispatcher", role) for s in statements]


@pytest.mark.asyncio
async def test_the_documented_dispatcher_role_is_enough(db: psycopg.Connection, dsn: str) -> None:
    role = f"pushsync_dispatcher_{uuid.uuid4().hex[:8]}"
    for statement in documented_grants(role):
        db.execute(statement)  # our own documentation's SQL
    try:
        add_device(db)
        request_id = enqueue(db)
        expired = enqueue(db)
        db.execute(
            "UPDATE pushsync.outbox SET expires_at = now() - interval '1 second', "
            "created_at = now() - interval '1 minute' WHERE request_id = %s",
            (expired,),
        )
        async with dispatching(make_conninfo(dsn, user=role)) as dispatcher:
            conn = await session(dispatcher)
            try:
                conn.send(protocol.encode_track(":5001"))
                frame = await conn.recv(timeout=10)
                assert frame is not None
                assert frame.type == protocol.FrameType.MESSAGE
                msg = protocol.decode_message(frame.payload, SECRET, time.time())
                assert msg.request_id == request_id
                ack = protocol.Ack(request_id=request_id, device=DEVICE, confirmed=time.time())
                conn.send(protocol.encode_ack_frame(protocol.encode_ack(ack, SECRET)))
                await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmed")
                await until_async(lambda: outbox_row(db, expired)[0] == "expired", "expired")
                archived = "SELECT count(*) FROM pushsync.outbox_history"
                await until_async(lambda: db.execute(archived).fetchone() == (2,), "archived")
                # archiving, with no right on the console's roll-ups, counted its rows there
                written = "SELECT sum(n) FROM pushsync.flow_minutes WHERE kind = 'written'"
                assert db.execute(written).fetchone() == (2,)
                tracked = db.execute(
                    "SELECT address FROM pushsync.device_addresses WHERE source = 'tracking'"
                ).fetchone()
                assert tracked == ("127.0.0.1:5001",)
            finally:
                await conn.close("bye")
            await asyncio.sleep(0)
        assert db.execute("SELECT count(*) FROM pushsync.dispatchers").fetchone() == (0,)
    finally:
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')


@pytest.mark.asyncio
async def test_synchronization_runs_with_the_documented_kinds_of_grants(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    role = f"pushsync_dispatcher_{uuid.uuid4().hex[:8]}"
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    for statement in documented_grants(role):
        db.execute(statement)
    # The documented examples, for the trucking publication's functions and tables.
    functions = db.execute(
        "SELECT DISTINCT download_function FROM pushsync.publication_tables"
    ).fetchall()
    for (function,) in functions:
        db.execute(f'GRANT EXECUTE ON FUNCTION pushsync."{function}"(text) TO "{role}"')
    checks = db.execute(
        "SELECT upload_check_function, table_name FROM pushsync.publication_tables "
        "WHERE upload_check_function IS NOT NULL"
    ).fetchall()
    for function, table in checks:
        db.execute(
            f'GRANT EXECUTE ON FUNCTION pushsync."{function}"(text, {table}, {table}) TO "{role}"'
        )
    db.execute(
        "GRANT SELECT ON public.routes, public.drivers, public.route_stops, "
        f'public.disruption_reports TO "{role}"'
    )
    db.execute(f'GRANT UPDATE ON public.routes TO "{role}"')
    db.execute(f'GRANT INSERT ON public.disruption_reports TO "{role}"')
    try:
        async with dispatching(make_conninfo(dsn, user=role)) as dispatcher:
            truck2 = device_config(tmp_path, dispatcher, "truck-2")
            await sync(truck2)
            write_locally(truck2, "UPDATE routes SET route_name = 'by role' WHERE route_id = 20")
            assert (await sync(truck2)).uploaded == 1
            assert local_routes(truck2) == [(20, "by role", 2)]
    finally:
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')
