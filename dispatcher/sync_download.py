"""One table's rows sent to a device as DOWNLOAD frames: in full, or what changed since a watermark.

The rows are read through the publication's download function, composed here
from the catalog's names (``psycopg.sql.Identifier``), as PostgreSQL's JSON text;
they are never parsed on the way: PostgreSQL builds each frame's payload
(``download_frame`` in ``sql/sync.sql``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

from psycopg import sql

from pushsync.dispatcher import sync_store
from pushsync.dispatcher.connections import DeviceConnection
from pushsync.dispatcher.sync_errors import SyncRefused
from pushsync.dispatcher.sync_store import AsyncConn
from pushsync.dispatcher.sync_tables import ServerTable
from pushsync.wire import protocol
from pushsync.wire.protocol import FrameType

CHUNK_BYTES: Final = 48 * 1024
"""Payload size a DOWNLOAD frame is filled to (frames hold at most 64 KiB)."""
FETCH_ROWS: Final = 1000


async def send_full(db: AsyncConn, conn: DeviceConnection, table: ServerTable, device: str) -> int:
    """Every row of ``table`` the device holds; how many."""
    query = sql.SQL("SELECT to_jsonb(r)::text FROM pushsync.{}(%s) AS r").format(
        sql.Identifier(table.function)
    )
    chunk = _Chunks(db, conn, table, full=True)
    async with db.cursor(name="pushsync_download") as cur:
        await cur.execute(query, (device,))
        while rows := await cur.fetchmany(FETCH_ROWS):
            for (text,) in rows:
                await chunk.upsert(text)
    await chunk.finish()
    return chunk.upserts


async def send_changes(
    db: AsyncConn,
    conn: DeviceConnection,
    table: ServerTable,
    device: str,
    since: str,
    forced: Sequence[Mapping[str, Any]],
) -> tuple[int, int]:
    """The rows of ``table`` changed since the watermark ``since``, and those of the
    ``forced`` keys: each as the device's download has it now, or as a delete if it has
    it no more. How many of each."""
    keys = await sync_store.changed_keys(db, table.name, since)
    keys += [json.dumps(k) for k in forced]
    chunk = _Chunks(db, conn, table, full=False)
    if keys:
        cur = await db.execute(_rows_of_keys(table), (sorted(set(keys)), device))
        for key, row in await cur.fetchall():
            if row is None:
                await chunk.delete(key)
            else:
                await chunk.upsert(row)
    await chunk.finish()
    return chunk.upserts, chunk.deletes


def _rows_of_keys(table: ServerTable) -> sql.Composed:
    """Each key of ``%s`` (JSON texts) with the device's row of that key, or NULL."""
    key_columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL(
        "SELECT c.key::text, to_jsonb(r)::text "
        "FROM unnest(%s::jsonb[]) AS c(key) "
        "LEFT JOIN LATERAL ("
        "SELECT * FROM pushsync.{function}(%s) AS f "
        "WHERE ({lhs}) = "
        "(SELECT {rhs} FROM jsonb_populate_record(NULL::{table}, c.key) AS x)"
        ") AS r ON true"
    ).format(
        function=sql.Identifier(table.function),
        lhs=sql.SQL(", ").join(sql.SQL("f.{}").format(k) for k in key_columns),
        rhs=sql.SQL(", ").join(sql.SQL("x.{}").format(k) for k in key_columns),
        table=table.ident(),
    )


class _Chunks:
    """Fills DOWNLOAD frames with one table's rows; JSON texts are passed through unparsed."""

    def __init__(
        self, db: AsyncConn, conn: DeviceConnection, table: ServerTable, *, full: bool
    ) -> None:
        self.db = db
        self.conn = conn
        self.table = table
        self.full = full
        self.upserts_pending: list[str] = []
        self.deletes_pending: list[str] = []
        self.size = 0
        self.upserts = 0
        self.deletes = 0

    async def upsert(self, row: str) -> None:
        self.upserts_pending.append(row)
        self.upserts += 1
        await self._grow(len(row))

    async def delete(self, key: str) -> None:
        self.deletes_pending.append(key)
        self.deletes += 1
        await self._grow(len(key))

    async def _grow(self, size: int) -> None:
        self.size += size + 1
        if self.size >= CHUNK_BYTES:
            await self._flush(more=True)

    async def finish(self) -> None:
        await self._flush(more=False)

    async def _flush(self, *, more: bool) -> None:
        data = await sync_store.download_frame(
            self.db,
            self.table,
            full=self.full,
            upserts=self.upserts_pending,
            deletes=self.deletes_pending,
            more=more,
        )
        if len(data) >= protocol.MAX_FRAME:
            raise SyncRefused("a row is too large to download (more than 64 KiB as JSON)")
        if not self.conn.write(protocol.encode_frame(FrameType.DOWNLOAD, data), bulk=True):
            raise ConnectionError("the device's connection closed during the download")
        await self.conn.drain()
        self.upserts_pending.clear()
        self.deletes_pending.clear()
        self.size = 0


__all__ = ["CHUNK_BYTES", "send_changes", "send_full"]
