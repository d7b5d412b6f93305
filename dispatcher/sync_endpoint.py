"""The server side of synchronization: uploads applied, downloads computed, on a SYNC connection.

A device that has authenticated sends SYNC_BEGIN (its publication, its
watermark, the shape of its local tables), then zero or more upload batches
(UPLOAD frames, answered by UPLOADED), then DOWNLOAD; the server answers with
DOWNLOAD frames, one table after the other, and SYNC_END carrying the new
watermark. ``docs/sync.md`` has the frames and the guarantees; in short:

* **Uploads** of one batch are applied in one transaction, each row under a
  savepoint: a row that fails (not allowed, a conflict the table's policy
  refuses, a constraint) is rejected with its reason and the others go on.
  The batch and its result are recorded in ``pushsync.sync_uploads`` in the
  same transaction, so a batch sent again is answered from there and never
  applied twice. The device id is the connection's, never the payload's.
* **Downloads** run in one REPEATABLE READ transaction. Its snapshot is the
  new watermark. A table is sent in full the first time, when its shape on
  the device differs from the server's, when a table its download depends on
  changed, or when the watermark is older than the retained change log;
  otherwise only the rows whose change is visible now but was not in the
  watermark snapshot (``pg_visible_in_snapshot``): transactions that were
  still running at the last sync are caught by the next one, whatever their
  commit order. Rows that left the device's set, or were deleted, are sent as
  deletes.

Everything the device sends is checked before use: names are looked up in the
publication registry and the catalog, never put into SQL; values travel as
JSON and become typed rows through ``jsonb_populate_record``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from pushsync.db import first_line
from pushsync.dispatcher.sync_server import SyncConnection
from pushsync.listener import protocol
from pushsync.listener.protocol import FrameType

logger = logging.getLogger(__name__)

MAX_UPLOAD_ROWS: Final = 2_000
"""Rows one upload batch may hold; devices send at most 1,000. The answer (every seq,
and the reasons of refusals) must fit one 64 KiB frame."""
MAX_UPLOAD_BYTES: Final = 32 * 1024 * 1024
CHUNK_BYTES: Final = 48 * 1024
"""Payload size a DOWNLOAD frame is filled to (frames hold at most 64 KiB)."""
IDLE_TIMEOUT: Final = 60.0
"""Seconds a synchronization may wait for the device's next frame."""
OPS: Final = ("insert", "update", "delete")

AsyncConn = psycopg.AsyncConnection[Any]


class SyncRefused(Exception):
    """The device sent something the synchronization cannot go on with; the text says what."""


@dataclass(frozen=True, slots=True)
class ServerTable:
    """A published table as the server has it now."""

    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    upload: tuple[str, ...]
    conflict: str
    newest: str | None
    function: str
    depends_on: tuple[str, ...]

    @property
    def column_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.columns)

    def schema(self) -> dict[str, Any]:
        return {"columns": [list(c) for c in self.columns], "key": list(self.key)}

    def ident(self) -> sql.Composed:
        schema, _, name = self.name.partition(".")
        return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


@dataclass(slots=True)
class _Session:
    conn: SyncConnection
    frames: asyncio.Queue[protocol.Frame] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None


class Synchronizer:
    """Runs the synchronizations of a SYNC server's connections (one at a time each)."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn], *, timeout: float = 10.0) -> None:
        self.pool = pool
        self.timeout = timeout
        self._sessions: dict[SyncConnection, _Session] = {}
        self.completed = 0
        self.failed = 0

    def feed(self, conn: SyncConnection, frame: protocol.Frame) -> None:
        session = self._sessions.get(conn)
        if frame.type == FrameType.SYNC_BEGIN:
            if session is not None:
                _error(conn, "a synchronization is already running on this connection")
                return
            session = _Session(conn)
            self._sessions[conn] = session
            session.task = asyncio.create_task(self._run(session, frame), name="pushsync sync")
            return
        if session is None:
            _error(conn, f"{frame.type.name} without SYNC_BEGIN")
            return
        session.frames.put_nowait(frame)

    def closed(self, conn: SyncConnection) -> None:
        session = self._sessions.pop(conn, None)
        if session is not None and session.task is not None:
            session.task.cancel()

    async def close(self) -> None:
        tasks = [s.task for s in self._sessions.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, session: _Session, begin: protocol.Frame) -> None:
        conn = session.conn
        device = conn.device
        assert device is not None
        try:
            await _Sync(self, session, device).run(begin)
            self.completed += 1
        except (SyncRefused, protocol.ProtocolError) as exc:
            self.failed += 1
            logger.warning("sync: %s: %s", device, exc)
            _error(conn, str(exc))
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self.failed += 1
            logger.warning("sync: %s failed: %s", device, first_line(exc))
            _error(conn, "the server could not complete the synchronization; try again")
        except asyncio.CancelledError:
            raise
        except Exception:
            self.failed += 1
            logger.exception("sync: %s failed", device)
            _error(conn, "internal server error")
        finally:
            if self._sessions.get(conn) is session:
                del self._sessions[conn]


def _answer(batch: str, result: dict[str, Any]) -> dict[str, Any]:
    """The UPLOADED payload: every seq always; reasons shortened until it fits one frame."""
    answer = {"batch": batch, **result}
    rejected: dict[str, str] = result["rejected"]
    each = max((len(reason) for reason in rejected.values()), default=0)
    while _json_size(answer) > CHUNK_BYTES and each > 0:
        each //= 2
        answer["rejected"] = {seq: reason[:each] for seq, reason in rejected.items()}
    return answer


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _error(conn: SyncConnection, text: str) -> None:
    conn.write(protocol.encode_json_frame(FrameType.SYNC_ERROR, {"error": text[:500]}))


# --------------------------------------------------------------------------- one synchronization


class _Sync:
    def __init__(self, owner: Synchronizer, session: _Session, device: str) -> None:
        self.owner = owner
        self.session = session
        self.conn = session.conn
        self.device = device
        self.forced: dict[str, list[dict[str, Any]]] = {}
        """Keys of rows whose upload was refused: sent back so the device has the server's."""

    async def run(self, begin: protocol.Frame) -> None:
        request = protocol.decode_json_frame(begin, FrameType.SYNC_BEGIN)
        named = request.get("publication")
        publication = None if named is None else _text(named, "publication")
        watermark = request.get("watermark")
        if watermark is not None and not isinstance(watermark, str):
            raise SyncRefused("watermark must be text")
        local = request.get("tables") or {}
        if not isinstance(local, dict):
            raise SyncRefused("tables must be an object")
        publication, tables = await self._tables(publication)
        uploaded = 0
        while True:
            frame = await self._next()
            if frame.type == FrameType.UPLOAD:
                uploaded += await self._upload(frame, tables)
            elif frame.type == FrameType.DOWNLOAD:
                if frame.payload:
                    raise SyncRefused("DOWNLOAD from the device carries no payload")
                sent = await self._download(publication, tables, watermark, local)
                logger.info(
                    "sync: %s %s: %d rows uploaded, %s",
                    self.device,
                    publication,
                    uploaded,
                    ", ".join(f"{t} {n}" for t, n in sent.items()) or "nothing to download",
                )
                return
            else:
                raise SyncRefused(f"{frame.type.name} during a synchronization")

    async def _next(self) -> protocol.Frame:
        try:
            return await asyncio.wait_for(self.session.frames.get(), IDLE_TIMEOUT)
        except TimeoutError:
            raise SyncRefused("the device went quiet during the synchronization") from None

    # ----------------------------------------------------------------- the publication

    async def _tables(self, publication: str | None) -> tuple[str, dict[str, ServerTable]]:
        async with self.owner.pool.connection(self.owner.timeout) as db:
            if publication is None:
                cur = await db.execute(
                    "SELECT DISTINCT publication FROM pushsync.publication_tables ORDER BY 1"
                )
                names = [str(n) for (n,) in await cur.fetchall()]
                if len(names) != 1:
                    raise SyncRefused(
                        "name the publication to synchronize (`publication:` in the listener "
                        f"config): this server has {', '.join(names) or 'none'}"
                    )
                publication = names[0]
            cur = await db.execute(
                "SELECT table_name, key_columns, upload, conflict, newest_column, "
                "download_function, depends_on FROM pushsync.publication_tables "
                "WHERE publication = %s ORDER BY position",
                (publication,),
            )
            rows = await cur.fetchall()
            if not rows:
                raise SyncRefused(f"there is no publication {publication!r}")
            tables: dict[str, ServerTable] = {}
            for name, key, upload, conflict, newest, function, depends in rows:
                columns = await _columns(db, name)
                tables[name] = ServerTable(
                    name=name,
                    columns=columns,
                    key=tuple(key) or await _primary_key(db, name),
                    upload=tuple(upload),
                    conflict=conflict,
                    newest=newest,
                    function=function,
                    depends_on=tuple(depends),
                )
            return publication, tables

    # ----------------------------------------------------------------- upload

    async def _upload(self, first: protocol.Frame, tables: dict[str, ServerTable]) -> int:
        frame = first
        rows: list[Any] = []
        size = 0
        batch: str | None = None
        while True:
            payload = protocol.decode_json_frame(frame, FrameType.UPLOAD)
            size += len(frame.payload)
            name = _text(payload.get("batch"), "batch")
            if batch is not None and name != batch:
                raise SyncRefused("UPLOAD frames of one batch must name the same batch")
            batch = name
            chunk = payload.get("rows")
            if not isinstance(chunk, list):
                raise SyncRefused("rows must be a list")
            rows += chunk
            if len(rows) > MAX_UPLOAD_ROWS or size > MAX_UPLOAD_BYTES:
                raise SyncRefused(
                    f"upload batch too large: at most {MAX_UPLOAD_ROWS} rows and "
                    f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MiB"
                )
            if not payload.get("more"):
                break
            frame = await self._next()
        assert batch is not None
        changes = [_change(row, n) for n, row in enumerate(rows)]
        result = await self._apply(batch, changes, tables)
        self.conn.write(protocol.encode_json_frame(FrameType.UPLOADED, _answer(batch, result)))
        return len(result["applied"])

    async def _apply(
        self, batch: str, changes: list[dict[str, Any]], tables: dict[str, ServerTable]
    ) -> dict[str, Any]:
        async with self.owner.pool.connection(self.owner.timeout) as db:
            async with db.transaction():
                cur = await db.execute(
                    "SELECT result FROM pushsync.sync_uploads WHERE device_id = %s AND batch = %s",
                    (self.device, batch),
                )
                if (done := await cur.fetchone()) is not None:
                    logger.info(
                        "sync: %s sent batch %s again; answered as before", self.device, batch
                    )
                    known: dict[str, Any] = done[0]
                    return known
                applied: list[int] = []
                rejected: dict[str, str] = {}
                for change in changes:
                    reason = await self._apply_one(db, change, tables)
                    if reason is None:
                        applied.append(change["seq"])
                    else:
                        rejected[str(change["seq"])] = reason
                result = {"applied": applied, "rejected": rejected}
                await db.execute(
                    "INSERT INTO pushsync.sync_uploads (device_id, batch, result) "
                    "VALUES (%s, %s, %s::jsonb)",
                    (self.device, batch, json.dumps(result)),
                )
                return result

    async def _apply_one(
        self, db: AsyncConn, change: dict[str, Any], tables: dict[str, ServerTable]
    ) -> str | None:
        """Apply one uploaded change; the reason it was refused, or None."""
        table = tables.get(change["table"])
        if table is None:
            return f"table {change['table']} is not in this publication"
        op = change["op"]
        if op not in table.upload:
            return f"uploading {op}s to {table.name} is not allowed"
        for part in ("key", "old", "new"):
            image = change[part]
            if image is None:
                continue
            unknown = sorted(set(image) - table.column_names)
            if unknown:
                return (
                    f"column {unknown[0]} of {table.name} does not exist on the server "
                    "(its shape changed; the next download brings the new one)"
                )
        if set(table.key) - set(change["key"]):
            return f"the key of {table.name} is {', '.join(table.key)}"
        try:
            async with db.transaction():  # a savepoint: this row alone fails
                reason = await _write(db, table, change)
        except psycopg.Error as exc:
            reason = _pg_reason(exc)
        if reason is not None and op != "insert":
            self.forced.setdefault(table.name, []).append(change["key"])
        return reason

    # ----------------------------------------------------------------- download

    async def _download(
        self,
        publication: str,
        tables: dict[str, ServerTable],
        watermark: str | None,
        local: dict[str, Any],
    ) -> dict[str, str]:
        sent: dict[str, str] = {}
        async with self.owner.pool.connection(self.owner.timeout) as db:
            async with db.transaction():
                await db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                await db.execute("SET LOCAL search_path = pg_catalog, pg_temp")
                cur = await db.execute("SELECT pg_current_snapshot()::text")
                row = await cur.fetchone()
                assert row is not None
                snapshot = str(row[0])
                since = await self._usable_watermark(db, watermark)
                for table in tables.values():
                    full = since is None or _shape(local.get(table.name)) != table.schema()
                    if since is not None and not full and table.depends_on:
                        full = await _changed(db, list(table.depends_on), since)
                    if full:
                        count = await self._send_full(db, table)
                        sent[table.name] = f"{count} rows (full)"
                    else:
                        assert since is not None
                        ups, dels = await self._send_changes(db, table, since)
                        sent[table.name] = f"{ups} rows, {dels} deletes"
        self.conn.write(
            protocol.encode_json_frame(
                FrameType.SYNC_END, {"publication": publication, "watermark": snapshot}
            ),
            bulk=True,
        )
        await self.conn.drain()
        return sent

    async def _usable_watermark(self, db: AsyncConn, watermark: str | None) -> str | None:
        """The watermark, if the change log still covers everything since it; else None."""
        if watermark is None:
            return None
        try:
            async with db.transaction():
                cur = await db.execute(
                    "SELECT pg_snapshot_xmin(%s::pg_snapshot) >= h.pruned_below "
                    "FROM pushsync.changes_horizon AS h",
                    (watermark,),
                )
                row = await cur.fetchone()
        except psycopg.errors.InvalidTextRepresentation:
            raise SyncRefused("the watermark is not a snapshot this server made") from None
        return watermark if row is not None and row[0] else None

    async def _send_full(self, db: AsyncConn, table: ServerTable) -> int:
        query = sql.SQL("SELECT to_jsonb(r)::text FROM pushsync.{}(%s) AS r").format(
            sql.Identifier(table.function)
        )
        chunk = _Chunks(self.conn, table, full=True)
        async with db.cursor(name="pushsync_download") as cur:
            await cur.execute(query, (self.device,))
            while rows := await cur.fetchmany(1000):
                for (text,) in rows:
                    await chunk.upsert(text)
        await chunk.finish()
        return chunk.upserts

    async def _send_changes(self, db: AsyncConn, table: ServerTable, since: str) -> tuple[int, int]:
        cur = await db.execute(
            "SELECT DISTINCT key::text FROM pushsync.changes "
            "WHERE table_name = %s AND key IS NOT NULL "
            "AND xid >= pg_snapshot_xmin(%s::pg_snapshot) "
            "AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot)",
            (table.name, since, since),
        )
        keys = [str(k) for (k,) in await cur.fetchall()]
        keys += [json.dumps(k) for k in self.forced.get(table.name, [])]
        chunk = _Chunks(self.conn, table, full=False)
        if keys:
            key_columns = [sql.Identifier(k) for k in table.key]
            query = sql.SQL(
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
            cur = await db.execute(query, (sorted(set(keys)), self.device))
            for key, row in await cur.fetchall():
                if row is None:
                    await chunk.delete(key)
                else:
                    await chunk.upsert(row)
        await chunk.finish()
        return chunk.upserts, chunk.deletes


class _Chunks:
    """Fills DOWNLOAD frames with one table's rows; JSON texts are passed through unparsed."""

    def __init__(self, conn: SyncConnection, table: ServerTable, *, full: bool) -> None:
        self.conn = conn
        self.head = (
            '{"table":'
            + json.dumps(table.name)
            + ',"schema":'
            + json.dumps(table.schema(), separators=(",", ":"))
            + ',"full":'
            + ("true" if full else "false")
        )
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
        text = (
            self.head
            + ',"upserts":['
            + ",".join(self.upserts_pending)
            + '],"deletes":['
            + ",".join(self.deletes_pending)
            + '],"more":'
            + ("true" if more else "false")
            + "}"
        )
        data = text.encode("utf-8")
        if len(data) >= protocol.MAX_FRAME:
            raise SyncRefused("a row is too large to download (more than 64 KiB as JSON)")
        if not self.conn.write(protocol.encode_frame(FrameType.DOWNLOAD, data), bulk=True):
            raise ConnectionError("the device's connection closed during the download")
        await self.conn.drain()
        self.upserts_pending.clear()
        self.deletes_pending.clear()
        self.size = 0


# --------------------------------------------------------------------------- SQL helpers


async def _columns(db: AsyncConn, table: str) -> tuple[tuple[str, str], ...]:
    cur = await db.execute(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) "
        "FROM pg_attribute AS a WHERE a.attrelid = to_regclass(%s) "
        "AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
        (table,),
    )
    columns = tuple((str(n), str(t)) for n, t in await cur.fetchall())
    if not columns:
        raise SyncRefused(f"published table {table} does not exist on the server")
    return columns


async def _primary_key(db: AsyncConn, table: str) -> tuple[str, ...]:
    cur = await db.execute(
        "SELECT a.attname::text FROM pg_index AS i "
        "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) "
        "JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
        "WHERE i.indrelid = to_regclass(%s) AND i.indisprimary ORDER BY k.ord",
        (table,),
    )
    key = tuple(str(n) for (n,) in await cur.fetchall())
    if not key:
        raise SyncRefused(f"published table {table} has no primary key on the server")
    return key


async def _changed(db: AsyncConn, tables: list[str], since: str) -> bool:
    cur = await db.execute(
        "SELECT EXISTS (SELECT 1 FROM pushsync.changes WHERE table_name = ANY(%s) "
        "AND xid >= pg_snapshot_xmin(%s::pg_snapshot) "
        "AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot))",
        (tables, since, since),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _write(db: AsyncConn, table: ServerTable, change: dict[str, Any]) -> str | None:
    """Apply one checked change under the table's conflict policy; the refusal, or None."""
    op = change["op"]
    key = json.dumps(change["key"])
    where = _key_match(table, key)
    if op == "insert":
        new = change["new"]
        if new is None:
            return "an insert needs the new row"
        columns = [sql.Identifier(c) for c in new]
        inserted = await db.execute(
            sql.SQL(
                "INSERT INTO {table} ({cols}) SELECT {xcols} "
                "FROM jsonb_populate_record(NULL::{table}, %s::jsonb) AS x ON CONFLICT DO NOTHING"
            ).format(
                table=table.ident(),
                cols=sql.SQL(", ").join(columns),
                xcols=sql.SQL(", ").join(sql.SQL("x.{}").format(c) for c in columns),
            ),
            (json.dumps(new),),
        )
        if inserted.rowcount == 1:
            return None
        if table.conflict == "server_wins":
            return f"a row with this key already exists in {table.name}"
        return await _update(db, table, where, new, current=None)
    cur = await db.execute(
        sql.SQL("SELECT to_jsonb(t)::text FROM {table} AS t WHERE {where} FOR UPDATE").format(
            table=table.ident(), where=where
        )
    )
    row = await cur.fetchone()
    if row is None:
        if op == "delete":
            return None  # already gone: what the device wanted
        return f"the row no longer exists in {table.name}"
    current = json.loads(row[0], parse_float=str)
    old = change["old"]
    if old is not None and not await _same(db, table, old, current):
        if table.conflict == "server_wins":
            return f"the row changed in {table.name} since the device last had it; server wins"
        if table.conflict == "newest" and op == "update":
            if not await _newer(db, table, change["new"], row[0]):
                return f"the server's row of {table.name} is newer ({table.newest})"
        elif table.conflict == "newest":
            return f"the row changed in {table.name} since the device last had it"
    if op == "delete":
        await db.execute(
            sql.SQL("DELETE FROM {table} AS t WHERE {where}").format(
                table=table.ident(), where=where
            )
        )
        return None
    new = change["new"]
    if new is None:
        return "an update needs the new row"
    return await _update(db, table, where, new, current=current)


async def _update(
    db: AsyncConn, table: ServerTable, where: sql.Composable, new: dict[str, Any], current: Any
) -> str | None:
    columns = [sql.Identifier(c) for c in new]
    await db.execute(
        sql.SQL(
            "UPDATE {table} AS t SET ({cols}) = (SELECT {xcols} "
            "FROM jsonb_populate_record(NULL::{table}, %s::jsonb) AS x) WHERE {where}"
        ).format(
            table=table.ident(),
            cols=sql.SQL(", ").join(columns),
            xcols=sql.SQL(", ").join(sql.SQL("x.{}").format(c) for c in columns),
            where=where,
        ),
        (json.dumps(new),),
    )
    return None


def _key_match(table: ServerTable, key_json: str) -> sql.Composable:
    columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL(
        "({lhs}) = (SELECT {rhs} FROM jsonb_populate_record(NULL::{table}, {key}) AS k)"
    ).format(
        lhs=sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in columns),
        rhs=sql.SQL(", ").join(sql.SQL("k.{}").format(c) for c in columns),
        table=table.ident(),
        key=sql.Literal(key_json),
    )


async def _same(
    db: AsyncConn, table: ServerTable, old: dict[str, Any], current: dict[str, Any]
) -> bool:
    """Whether the device's pre-image equals the server's row, in the columns it names."""
    cur = await db.execute(
        sql.SQL("SELECT to_jsonb(jsonb_populate_record(NULL::{table}, %s::jsonb))::text").format(
            table=table.ident()
        ),
        (json.dumps(old),),
    )
    row = await cur.fetchone()
    assert row is not None
    normal = json.loads(row[0], parse_float=str)
    return all(normal.get(c) == current.get(c) for c in old)


async def _newer(
    db: AsyncConn, table: ServerTable, new: dict[str, Any] | None, current: str
) -> bool:
    assert table.newest is not None
    if new is None:
        return False
    column = sql.Identifier(table.newest)
    cur = await db.execute(
        sql.SQL(
            "SELECT coalesce(x.{col} > y.{col}, x.{col} IS NOT NULL) "
            "FROM jsonb_populate_record(NULL::{table}, %s::jsonb) AS x, "
            "jsonb_populate_record(NULL::{table}, %s::jsonb) AS y"
        ).format(col=column, table=table.ident()),
        (json.dumps(new), current),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


def _pg_reason(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or first_line(exc)
    return f"refused by the database: {text}"


def _shape(local: Any) -> Any:
    """The device's description of a local table, comparable to ServerTable.schema()."""
    if not isinstance(local, dict):
        return None
    return {"columns": local.get("columns"), "key": local.get("key")}


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise SyncRefused(f"{what} must be non-empty text")
    return value


def _change(row: Any, index: int) -> dict[str, Any]:
    """One uploaded change, checked for shape (not yet for meaning)."""
    if not isinstance(row, dict):
        raise SyncRefused(f"upload row {index} is not an object")
    seq = row.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise SyncRefused(f"upload row {index}: seq must be a whole number")
    table = _text(row.get("table"), f"upload row {index}: table")
    op = row.get("op")
    if op not in OPS:
        raise SyncRefused(f"upload row {index}: op must be insert, update or delete")
    images: dict[str, Any] = {}
    for part in ("key", "old", "new"):
        image = row.get(part)
        if image is not None and not isinstance(image, dict):
            raise SyncRefused(f"upload row {index}: {part} must be an object")
        images[part] = image
    if images["key"] is None:
        raise SyncRefused(f"upload row {index}: key is missing")
    return {"seq": seq, "table": table, "op": op, **images}


__all__ = ["MAX_UPLOAD_ROWS", "SyncRefused", "Synchronizer"]
