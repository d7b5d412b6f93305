"""One table's rows sent to a device as DOWNLOAD frames: in full, or what differs from its own.

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


HASH: Final = sql.SQL("substr(decode(md5(s.j::text), 'hex'), 1, 8)")
"""A row's hash as held: the first 8 bytes of the MD5 of its JSON text (``s.j``)."""


async def send_full(
    db: AsyncConn, conn: DeviceConnection, table: ServerTable, device: str, holder: int
) -> int:
    """Every row of ``table`` the device holds; how many. What the device will hold once it
    applied them is kept pending (``holder``)."""
    query = sql.SQL(
        "SELECT convert_to({key}::text, 'UTF8'), {hash}, s.j::text "
        "FROM (SELECT to_jsonb(f) AS j FROM pushsync.{function}(%s) AS f) AS s"
    ).format(key=_key(table), hash=HASH, function=sql.Identifier(table.function))
    chunk = _Chunks(db, conn, table, full=True)
    keys: list[bytes] = []
    hashes: list[bytes] = []
    async with db.cursor(name="pushsync_download") as cur:
        await cur.execute(query, (device,))
        while rows := await cur.fetchmany(FETCH_ROWS):
            for key, digest, text in rows:
                keys.append(key)
                hashes.append(digest)
                await chunk.upsert(text)
    await chunk.finish()
    await sync_store.hold_full(db, holder, table.name, keys, hashes)
    return chunk.upserts


async def send_diff(
    db: AsyncConn,
    conn: DeviceConnection,
    table: ServerTable,
    *,
    device: str,
    holder: int,
    since: str,
    forced: Sequence[Mapping[str, Any]],
    whole: bool,
) -> tuple[int, int]:
    """What differs between the device's download of ``table`` and what it holds: rows
    that entered or changed as upserts, keys that left as deletes, and the rows of the
    ``forced`` keys (refused uploads) as the server has them, or as deletes if the
    device's set lacks them. ``whole``: compare the device's whole download (a table it
    reads changed); else only the keys of ``table`` changed since the watermark
    ``since``. How many of each; the differences are kept pending (``holder``)."""
    params = {
        "device": device,
        "holder": holder,
        "table": table.name,
        "since": since,
        "forced": [json.dumps(k) for k in forced],
    }
    cur = await db.execute(_whole(table) if whole else _keyed(table), params)
    chunk = _Chunks(db, conn, table, full=False)
    for key, row in await cur.fetchall():
        if row is None:
            await chunk.delete(key)
        else:
            await chunk.upsert(row)
    await chunk.finish()
    return chunk.upserts, chunk.deletes


def _key(table: ServerTable, of: str = "s.j") -> sql.Composed:
    """The key of the row ``of`` (jsonb) as a jsonb object of the key's columns."""
    return sql.SQL("jsonb_build_object({})").format(
        sql.SQL(", ").join(
            sql.SQL("{}, {}->{}").format(sql.Literal(k), sql.SQL(of), sql.Literal(k))
            for k in table.key
        )
    )


def _forced(table: ServerTable) -> sql.Composed:
    """The forced keys (``%(forced)s``, JSON texts) as held keys, typed like the table's."""
    return sql.SQL(
        "SELECT DISTINCT convert_to({key}::text, 'UTF8') AS key "
        "FROM unnest(%(forced)s::jsonb[]) AS fk(key) "
        "CROSS JOIN LATERAL jsonb_populate_record(NULL::{ident}, fk.key) AS x"
    ).format(key=_key(table, "to_jsonb(x)"), ident=table.ident())


_EMIT: Final = sql.SQL(
    " saved AS ("
    " INSERT INTO pushsync.device_rows_pending (holder, tbl, key, hash)"
    " SELECT %(holder)s, to_regclass(%(table)s)::oid, e.key, e.hash FROM emitted AS e"
    " WHERE e.hash IS NOT NULL OR e.held IS NOT NULL)"
    " SELECT convert_from(e.key, 'UTF8'), e.row FROM emitted AS e"
)
"""Keep what is sent pending (a row's new hash, NULL for a delete of a held row); send it."""


def _whole(table: ServerTable) -> sql.Composed:
    """The device's whole download of ``table`` against what it holds."""
    return sql.SQL(
        "WITH cur AS MATERIALIZED ("
        " SELECT convert_to({key}::text, 'UTF8') AS key, {hash} AS hash, s.j::text AS row"
        " FROM (SELECT to_jsonb(f) AS j FROM pushsync.{function}(%(device)s) AS f) AS s),"
        " held AS ("
        " SELECT r.key, r.hash FROM pushsync.device_rows AS r"
        " WHERE r.holder = %(holder)s AND r.tbl = to_regclass(%(table)s)::oid),"
        " forced AS ({forced}),"
        " emitted AS MATERIALIZED ("
        " SELECT coalesce(c.key, h.key, f.key) AS key, c.row, c.hash, h.hash AS held"
        " FROM cur AS c FULL JOIN held AS h ON h.key = c.key"
        " FULL JOIN forced AS f ON f.key = coalesce(c.key, h.key)"
        " WHERE f.key IS NOT NULL OR c.hash IS DISTINCT FROM h.hash),"
        "{emit}"
    ).format(
        key=_key(table),
        hash=HASH,
        function=sql.Identifier(table.function),
        forced=_forced(table),
        emit=_EMIT,
    )


def _keyed(table: ServerTable) -> sql.Composed:
    """The keys of ``table`` changed since the watermark (and the forced ones): each as the
    device's download has it now, against what it holds."""
    key_columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL(
        "WITH keys AS ("
        " SELECT DISTINCT convert_to(c.key::text, 'UTF8') AS key FROM pushsync.changes AS c"
        " WHERE c.table_name = %(table)s AND c.key IS NOT NULL"
        " AND c.xid >= pg_snapshot_xmin(%(since)s::pg_snapshot)"
        " AND NOT pg_visible_in_snapshot(c.xid, %(since)s::pg_snapshot)),"
        " forced AS ({forced}),"
        " cur AS MATERIALIZED ("
        " SELECT k.key, r.row, r.hash FROM (SELECT key FROM keys UNION SELECT key FROM forced)"
        " AS k LEFT JOIN LATERAL ("
        " SELECT s.j::text AS row, {hash} AS hash FROM ("
        " SELECT to_jsonb(f) AS j FROM pushsync.{function}(%(device)s) AS f"
        " WHERE ({lhs}) = (SELECT {rhs} FROM jsonb_populate_record("
        " NULL::{ident}, convert_from(k.key, 'UTF8')::jsonb) AS x)) AS s) AS r ON true),"
        " emitted AS MATERIALIZED ("
        " SELECT c.key, c.row, c.hash, h.hash AS held"
        " FROM cur AS c LEFT JOIN pushsync.device_rows AS h"
        " ON h.holder = %(holder)s AND h.tbl = to_regclass(%(table)s)::oid AND h.key = c.key"
        " WHERE c.key IN (SELECT key FROM forced) OR c.hash IS DISTINCT FROM h.hash),"
        "{emit}"
    ).format(
        forced=_forced(table),
        hash=HASH,
        function=sql.Identifier(table.function),
        lhs=sql.SQL(", ").join(sql.SQL("f.{}").format(k) for k in key_columns),
        rhs=sql.SQL(", ").join(sql.SQL("x.{}").format(k) for k in key_columns),
        ident=table.ident(),
        emit=_EMIT,
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
        if self.full or self.upserts or self.deletes:  # nothing changed: no frame at all
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


__all__ = ["CHUNK_BYTES", "send_diff", "send_full"]
