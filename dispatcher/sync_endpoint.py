"""The server side of synchronization: uploads applied, downloads computed, on a SYNC connection.

A device that has authenticated sends SYNC_BEGIN (its publication, its
watermark, the shape of its local tables), then zero or more upload batches
(UPLOAD frames, answered by UPLOADED), then DOWNLOAD; the server answers with
DOWNLOAD frames, one table after the other, and SYNC_END carrying the new
watermark. ``docs/sync.md`` has the frames and the guarantees; in short:

* **Who may synchronize what.** A device synchronizes only the publications
  granted to it (``pushsync.device_publications``); asking for another one is
  answered exactly like asking for one that does not exist.
* **Uploads** of one batch are applied in one transaction, each row under a
  savepoint: a row that fails (not allowed, a conflict the table's policy
  refuses, a constraint) is rejected with its reason and the others go on.
  The batch and its result are recorded in ``pushsync.sync_uploads`` in the
  same transaction, so a batch sent again is answered from there and never
  applied twice. The device id is the connection's, never the payload's.
* **Each uploaded row is authorized**: the server's row before the change
  (update, delete) and the row as written (insert, update) must both be rows
  the device downloads — the publication's download function, called with
  the connection's device id inside the applying transaction, must return
  them — and the table's ``upload_check`` function, if any, must accept the
  change. Otherwise the savepoint is rolled back (with whatever triggers on
  the table did) and the row is rejected. An update or delete must carry the
  row as the device last had it (``old``) unless the table's policy is
  ``client_wins``.
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

**Bounded.** A session holds at most one upload batch, as the frames that
carried it (:data:`MAX_UPLOAD_BYTES`), plus what arrived ahead of it
(:class:`SyncLimits`); each frame is decoded when it arrives, to check it, and
again, alone, when its rows are applied, so decoded rows never pile up. A
device runs one synchronization at a time, and the server at most
``SyncLimits.sessions``; a session waits for one of those slots at most
``SyncLimits.slot_wait`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from pushsync.db import first_line
from pushsync.dispatcher.sync_server import SyncConnection
from pushsync.wire import protocol
from pushsync.wire.protocol import FrameType

logger = logging.getLogger(__name__)

MAX_UPLOAD_ROWS: Final = 2_000
"""Rows one upload batch may hold; devices send at most 1,000. The answer (every seq,
and the reasons of refusals) must fit one 64 KiB frame."""
MAX_UPLOAD_BYTES: Final = 16 * 1024 * 1024
"""Bytes of UPLOAD frames one batch may take."""
MAX_IMAGE_COLUMNS: Final = 1_600
"""Columns one row image (key, old, new) may name: PostgreSQL's limit for a table."""
MAX_BATCH_VALUES: Final = 1_000_000
"""Values (columns of every image of every row) one upload batch may hold."""
CHUNK_BYTES: Final = 48 * 1024
"""Payload size a DOWNLOAD frame is filled to (frames hold at most 64 KiB)."""
PINNED: Final = (
    "SET LOCAL search_path = pg_catalog, pg_temp; "
    "SET LOCAL standard_conforming_strings = on; SET LOCAL jit = off"
)
"""The settings the download functions (inlined into these queries, so without SET
clauses of their own) and upload checks run with, whatever the connection's defaults."""
IDLE_TIMEOUT: Final = 60.0
"""Seconds a synchronization may wait for the device's next frame."""
OPS: Final = ("insert", "update", "delete")

AsyncConn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class SyncLimits:
    """What synchronizations may take of the dispatcher."""

    sessions: int = 8
    """Synchronizations running at once, over all devices (each device: one)."""
    slot_wait: float = 30.0
    """Seconds a synchronization waits for one of ``sessions`` before it is refused."""
    held_bytes: int = MAX_UPLOAD_BYTES + 2 * protocol.MAX_FRAME
    """Bytes of frames one session may hold: its batch, and what the device sent ahead."""
    forced_keys: int = 10_000
    """Keys of refused rows one session remembers to send back; beyond, the table is
    downloaded in full."""


class SyncRefused(Exception):
    """The device sent something the synchronization cannot go on with; the text says what."""


class _Rejected(Exception):
    """One uploaded row is refused (its savepoint is rolled back); the text says why."""


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
    check_function: str | None = None

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
    device: str
    frames: asyncio.Queue[protocol.Frame] = field(default_factory=asyncio.Queue)
    queued: int = 0
    """Bytes of frames received and not yet read by the session."""
    kept: int = 0
    """Bytes of frames the session keeps: the upload batch being received or applied."""
    task: asyncio.Task[None] | None = None

    @property
    def held(self) -> int:
        return self.queued + self.kept


class Synchronizer:
    """Runs the synchronizations of a SYNC server's connections (one at a time each)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[AsyncConn],
        *,
        timeout: float = 10.0,
        limits: SyncLimits | None = None,
    ) -> None:
        self.pool = pool
        self.timeout = timeout
        self.limits = limits or SyncLimits()
        self._slots = asyncio.Semaphore(self.limits.sessions)
        self._sessions: dict[SyncConnection, _Session] = {}
        self._devices: dict[str, _Session] = {}
        self._discarding: set[SyncConnection] = set()
        """Connections whose synchronization was refused: the rest of its frames is dropped."""
        self.completed = 0
        self.failed = 0

    def feed(self, conn: SyncConnection, frame: protocol.Frame) -> None:
        session = self._sessions.get(conn)
        if frame.type == FrameType.SYNC_BEGIN:
            self._discarding.discard(conn)
            if session is not None:
                _error(conn, "a synchronization is already running on this connection")
                return
            self._begin(conn, frame)
            return
        if session is None:
            if conn not in self._discarding:
                _error(conn, f"{frame.type.name} without SYNC_BEGIN")
            return
        session.queued += len(frame.payload)
        if session.held > self.limits.held_bytes:
            self._refuse(
                session,
                f"the device sent more than {self.limits.held_bytes // (1024 * 1024)} MiB "
                "ahead of the server's answers",
            )
            return
        session.frames.put_nowait(frame)

    def closed(self, conn: SyncConnection) -> None:
        self._discarding.discard(conn)
        session = self._sessions.get(conn)
        if session is not None:
            self._forget(session)
            if session.task is not None:
                session.task.cancel()

    async def close(self) -> None:
        tasks = [s.task for s in self._sessions.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _begin(self, conn: SyncConnection, frame: protocol.Frame) -> None:
        device = conn.device
        assert device is not None
        if device in self._devices:
            self.failed += 1
            logger.warning("sync: %s asked for a second synchronization at once", device)
            _error(
                conn,
                "a synchronization of this device is already running; try again when it has ended",
            )
            self._discarding.add(conn)
            return
        session = _Session(conn, device)
        self._sessions[conn] = session
        self._devices[device] = session
        session.task = asyncio.create_task(self._run(session, frame), name="pushsync sync")

    def _forget(self, session: _Session) -> None:
        if self._sessions.get(session.conn) is session:
            del self._sessions[session.conn]
        if self._devices.get(session.device) is session:
            del self._devices[session.device]

    def _refuse(self, session: _Session, text: str) -> None:
        """End ``session`` now, from outside its task, with ``text`` for the device."""
        self._forget(session)
        if session.task is not None:
            session.task.cancel()
        self.failed += 1
        logger.warning("sync: %s: %s", session.device, text)
        _error(session.conn, text)
        self._discarding.add(session.conn)

    async def _run(self, session: _Session, begin: protocol.Frame) -> None:
        device = session.device
        try:
            await self._in_slot(session, begin)
            self.completed += 1
        except (SyncRefused, protocol.ProtocolError) as exc:
            self._failed(session, str(exc))
            logger.warning("sync: %s: %s", device, exc)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            self._failed(session, "the server could not complete the synchronization; try again")
            logger.warning("sync: %s failed: %s", device, first_line(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            self._failed(session, "internal server error")
            logger.exception("sync: %s failed", device)
        finally:
            self._forget(session)

    async def _in_slot(self, session: _Session, begin: protocol.Frame) -> None:
        try:
            async with asyncio.timeout(self.limits.slot_wait):
                await self._slots.acquire()
        except TimeoutError:
            raise SyncRefused(
                "the server is busy with other synchronizations; try again later"
            ) from None
        try:
            await _Sync(self, session).run(begin)
        finally:
            self._slots.release()

    def _failed(self, session: _Session, text: str) -> None:
        self.failed += 1
        _error(session.conn, text)
        if session.conn.open:
            self._discarding.add(session.conn)


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
    def __init__(self, owner: Synchronizer, session: _Session) -> None:
        self.owner = owner
        self.session = session
        self.conn = session.conn
        self.device = session.device
        self.local: dict[str, Any] = {}
        """The device's description of its local tables (SYNC_BEGIN)."""
        self.forced: dict[str, list[dict[str, Any]]] = {}
        """Keys of rows whose upload was refused: sent back so the device has the server's."""
        self.forced_count = 0
        self.full: set[str] = set()
        """Tables to download in full: more refused keys than a session remembers."""

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
        self.local = local
        del request
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
            frame = await asyncio.wait_for(self.session.frames.get(), IDLE_TIMEOUT)
        except TimeoutError:
            raise SyncRefused("the device went quiet during the synchronization") from None
        self.session.queued -= len(frame.payload)
        return frame

    # ----------------------------------------------------------------- the publication

    async def _tables(self, publication: str | None) -> tuple[str, dict[str, ServerTable]]:
        async with self.owner.pool.connection(self.owner.timeout) as db:
            cur = await db.execute(
                "SELECT g.publication FROM pushsync.device_publications AS g "
                "WHERE g.device_id = %s AND EXISTS (SELECT 1 FROM pushsync.publication_tables "
                "AS p WHERE p.publication = g.publication) ORDER BY 1",
                (self.device,),
            )
            granted = [str(n) for (n,) in await cur.fetchall()]
            if publication is None:
                if len(granted) != 1:
                    raise SyncRefused(
                        "name the publication to synchronize (`publication:` in the listener "
                        f"config): this device may synchronize {', '.join(granted) or 'none'}"
                    )
                publication = granted[0]
            if publication not in granted:
                # Not granted or not defined: the same answer, so nothing is learnt.
                raise SyncRefused(f"there is no publication {publication!r}")
            cur = await db.execute(
                "SELECT table_name, key_columns, upload, conflict, newest_column, "
                "download_function, depends_on, upload_check_function "
                "FROM pushsync.publication_tables WHERE publication = %s ORDER BY position",
                (publication,),
            )
            rows = await cur.fetchall()
            if not rows:
                raise SyncRefused(f"there is no publication {publication!r}")
            tables: dict[str, ServerTable] = {}
            for name, key, upload, conflict, newest, function, depends, check in rows:
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
                    check_function=check,
                )
            return publication, tables

    # ----------------------------------------------------------------- upload

    async def _upload(self, first: protocol.Frame, tables: dict[str, ServerTable]) -> int:
        """Receive one batch (checking each frame as it comes), then apply it."""
        frames: list[protocol.Frame] = []
        frame = first
        batch: str | None = None
        rows = values = 0
        try:
            while True:
                payload = protocol.decode_json_frame(frame, FrameType.UPLOAD)
                self.session.kept += len(frame.payload)
                frames.append(frame)
                name = _text(payload.get("batch"), "batch")
                if batch is not None and name != batch:
                    raise SyncRefused("UPLOAD frames of one batch must name the same batch")
                batch = name
                chunk = payload.get("rows")
                if not isinstance(chunk, list):
                    raise SyncRefused("rows must be a list")
                for row in chunk:
                    values += _change(row, rows).values
                    rows += 1
                    if rows > MAX_UPLOAD_ROWS or values > MAX_BATCH_VALUES:
                        raise _too_large()
                if self.session.kept > MAX_UPLOAD_BYTES:
                    raise _too_large()
                more = payload.get("more")
                del payload, chunk
                if not more:
                    break
                frame = await self._next()
            assert batch is not None
            result = await self._apply(batch, frames, tables)
        finally:
            self.session.kept -= sum(len(f.payload) for f in frames)
            frames.clear()
        self.conn.write(protocol.encode_json_frame(FrameType.UPLOADED, _answer(batch, result)))
        return len(result["applied"])

    async def _apply(
        self, batch: str, frames: list[protocol.Frame], tables: dict[str, ServerTable]
    ) -> dict[str, Any]:
        async with self.owner.pool.connection(self.owner.timeout) as db:
            async with db.transaction():
                await db.execute(PINNED)
                await self._still_enabled(db)
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
                for change in _changes(frames):
                    reason = await self._apply_one(db, change, tables)
                    if reason is None:
                        applied.append(change.seq)
                    else:
                        rejected[str(change.seq)] = reason
                result = {"applied": applied, "rejected": rejected}
                await db.execute(
                    "INSERT INTO pushsync.sync_uploads (device_id, batch, result) "
                    "VALUES (%s, %s, %s::jsonb)",
                    (self.device, batch, json.dumps(result)),
                )
                return result

    async def _still_enabled(self, db: AsyncConn) -> None:
        """Refuse the batch if the device lost access since it authenticated. The row
        lock makes a concurrent ``device disable`` wait for this batch: once that command
        returns, no batch of the device commits any more."""
        cur = await db.execute(
            "SELECT enabled FROM pushsync.devices WHERE device_id = %s FOR SHARE",
            (self.device,),
        )
        row = await cur.fetchone()
        if row is None or not row[0]:
            raise SyncRefused("this device may no longer synchronize")

    async def _apply_one(
        self, db: AsyncConn, change: _Change, tables: dict[str, ServerTable]
    ) -> str | None:
        """Apply one uploaded change; the reason it was refused, or None."""
        table = tables.get(change.table)
        if table is None:
            return f"table {change.table} is not in this publication"
        reason = _admissible(table, change, self._declared(table))
        if reason is None:
            try:
                async with db.transaction():  # a savepoint: this row alone fails
                    await _write(db, table, change, self.device)
            except _Rejected as exc:
                reason = str(exc)
            except psycopg.Error as exc:
                reason = _pg_reason(exc)
        if reason is not None and change.op != "insert" and set(table.key) <= set(change.key):
            self._force(table, change.key)  # the next download brings the server's row
        return reason

    def _declared(self, table: ServerTable) -> frozenset[str]:
        """The server's columns that the device's local table has (all, if it says none)."""
        local = self.local.get(table.name)
        columns = local.get("columns") if isinstance(local, dict) else None
        if not isinstance(columns, list):
            return table.column_names
        named = {c[0] for c in columns if isinstance(c, list) and c and isinstance(c[0], str)}
        return table.column_names & named

    def _force(self, table: ServerTable, key: dict[str, Any]) -> None:
        if table.name in self.full:
            return
        if self.forced_count >= self.owner.limits.forced_keys:
            self.full.add(table.name)
            self.forced_count -= len(self.forced.pop(table.name, []))
            return
        self.forced.setdefault(table.name, []).append(key)
        self.forced_count += 1

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
                await db.execute(PINNED)
                cur = await db.execute("SELECT pg_current_snapshot()::text")
                row = await cur.fetchone()
                assert row is not None
                snapshot = str(row[0])
                since = await self._usable_watermark(db, watermark)
                for table in tables.values():
                    full = since is None or _shape(local.get(table.name)) != table.schema()
                    full = full or table.name in self.full
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


# --------------------------------------------------------------------------- one uploaded row


@dataclass(frozen=True, slots=True)
class _Change:
    """One uploaded change, checked for shape (not yet for meaning)."""

    seq: int
    table: str
    op: str
    key: dict[str, Any]
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    @property
    def values(self) -> int:
        """How many values its images hold."""
        return sum(len(image) for image in (self.key, self.old, self.new) if image is not None)


@dataclass(frozen=True, slots=True)
class _Current:
    """The server's row an uploaded change finds, locked."""

    text: str
    """The row as JSON (``to_jsonb``)."""
    record: str
    """The row as PostgreSQL's text of a record of the table: exact, for the upload check."""
    theirs: bool
    """Whether the device's download returns it."""

    @property
    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = json.loads(self.text, parse_float=str)
        return values


def _admissible(table: ServerTable, change: _Change, declared: frozenset[str]) -> str | None:
    """Why ``change`` cannot be applied to ``table`` whatever the server holds, or None.

    ``declared``: the server's columns the device's local table has; an update or
    delete must carry them all in ``old`` (the row as the device last had it),
    unless the table's policy is ``client_wins``.
    """
    op = change.op
    if op not in table.upload:
        return f"uploading {op}s to {table.name} is not allowed"
    for image in (change.key, change.old, change.new):
        unknown = sorted(set(image or ()) - table.column_names)
        if unknown:
            return (
                f"column {unknown[0]} of {table.name} does not exist on the server "
                "(its shape changed; the next download brings the new one)"
            )
    if set(table.key) - set(change.key):
        return f"the key of {table.name} is {', '.join(table.key)}"
    if op != "delete" and change.new is None:
        return f"{_a(op)} needs the new row"
    if op == "insert":
        assert change.new is not None
        if any(k not in change.new or change.new[k] != change.key[k] for k in table.key):
            return f"the key of an insert must be the key of its new row in {table.name}"
        return None
    if table.conflict == "client_wins":
        return None
    if change.old is None:
        return (
            f"{_a(op)} of {table.name} must carry the row as the device last had it (old); "
            f"only a client_wins table takes one without"
        )
    missing = sorted((declared | set(table.key)) - set(change.old))
    if missing:
        return f"the old row of this {op} lacks column {missing[0]} of {table.name}"
    return None


def _a(op: str) -> str:
    return f"an {op}" if op[0] in "aeiou" else f"a {op}"


def _not_theirs(table: ServerTable) -> str:
    return f"the row is not (or no longer) one of this device's rows of {table.name}"


async def _write(db: AsyncConn, table: ServerTable, change: _Change, device: str) -> None:
    """Apply one admissible change for ``device`` under the table's conflict policy.

    Raises :class:`_Rejected` when the change may not be applied; the caller's
    savepoint then undoes whatever was written, triggers' work included. The
    download function runs in this transaction after the write, so it sees the
    row as written (and as the table's triggers left it).
    """
    params: dict[str, Any] = {"key": json.dumps(change.key), "device": device}
    where = _key_match(table, sql.Placeholder("key"))
    current = await _current(db, table, where, params)
    if change.op == "insert" and current is None:
        written = await _insert(db, table, change.new)
        await _after(db, table, written, None, device)
        return
    if current is None:
        if change.op == "delete":
            return  # already gone: what the device wanted
        raise _Rejected(_not_theirs(table))
    if not current.theirs:
        raise _Rejected(_not_theirs(table))
    if change.op == "insert" and table.conflict == "server_wins":
        raise _Rejected(f"a row with this key already exists in {table.name}")
    await _resolve(db, table, change, current)
    if change.op == "delete":
        await _upload_check(db, table, device, None, current.record)
        await db.execute(
            sql.SQL("DELETE FROM {table} AS t WHERE {where}").format(
                table=table.ident(), where=where
            ),
            params,
        )
        return
    written = await _update(db, table, where, change.new, params)
    await _after(db, table, written, current.record, device)


async def _current(
    db: AsyncConn, table: ServerTable, where: sql.Composable, params: dict[str, Any]
) -> _Current | None:
    """The server's row of the change's key, locked, and whether the device holds it."""
    cur = await db.execute(
        sql.SQL(
            "SELECT to_jsonb(t)::text, t::text, EXISTS (SELECT 1 FROM pushsync.{function}"
            "(%(device)s) AS f WHERE {mine}) FROM {table} AS t WHERE {where} FOR UPDATE OF t"
        ).format(
            function=sql.Identifier(table.function),
            mine=_same_key(table, "f", "t"),
            table=table.ident(),
            where=where,
        ),
        params,
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return _Current(text=row[0], record=row[1], theirs=bool(row[2]))


async def _resolve(db: AsyncConn, table: ServerTable, change: _Change, current: _Current) -> None:
    """The conflict policy, when the server's row is not the one the device changed."""
    if change.old is None or await _same(db, table, change.old, current.values):
        return
    if table.conflict == "server_wins":
        raise _Rejected(
            f"the row changed in {table.name} since the device last had it; server wins"
        )
    if table.conflict == "newest":
        if change.op != "update":
            raise _Rejected(f"the row changed in {table.name} since the device last had it")
        if not await _newer(db, table, change.new, current.text):
            raise _Rejected(f"the server's row of {table.name} is newer ({table.newest})")


async def _insert(db: AsyncConn, table: ServerTable, new: dict[str, Any] | None) -> str:
    """Insert ``new``; the row written, as the text of a record."""
    assert new is not None
    columns = [sql.Identifier(c) for c in new]
    cur = await db.execute(
        sql.SQL(
            "INSERT INTO {table} AS t ({cols}) SELECT {xcols} "
            "FROM jsonb_populate_record(NULL::{table}, %s::jsonb) AS x RETURNING t::text"
        ).format(
            table=table.ident(),
            cols=sql.SQL(", ").join(columns),
            xcols=sql.SQL(", ").join(sql.SQL("x.{}").format(c) for c in columns),
        ),
        (json.dumps(new),),
    )
    row = await cur.fetchone()
    if row is None:  # a rule or an INSTEAD trigger took it elsewhere
        raise _Rejected(f"the insert into {table.name} wrote no row")
    return str(row[0])


async def _update(
    db: AsyncConn,
    table: ServerTable,
    where: sql.Composable,
    new: dict[str, Any] | None,
    params: dict[str, Any],
) -> str:
    """Update the row of the key to ``new``; the row written, as the text of a record."""
    assert new is not None
    columns = [sql.Identifier(c) for c in new]
    cur = await db.execute(
        sql.SQL(
            "UPDATE {table} AS t SET ({cols}) = (SELECT {xcols} "
            "FROM jsonb_populate_record(NULL::{table}, %(new)s::jsonb) AS x) WHERE {where} "
            "RETURNING t::text"
        ).format(
            table=table.ident(),
            cols=sql.SQL(", ").join(columns),
            xcols=sql.SQL(", ").join(sql.SQL("x.{}").format(c) for c in columns),
            where=where,
        ),
        {**params, "new": json.dumps(new)},
    )
    row = await cur.fetchone()
    if row is None:
        raise _Rejected(f"the update of {table.name} wrote no row")
    return str(row[0])


async def _after(
    db: AsyncConn, table: ServerTable, written: str, old: str | None, device: str
) -> None:
    """The row as written must be one the device downloads, and pass the upload check."""
    check: sql.Composable = sql.SQL("true")
    if table.check_function is not None:
        check = sql.SQL("pushsync.{}(%(device)s, t, %(old)s::{})").format(
            sql.Identifier(table.check_function), table.ident()
        )
    cur = await db.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM pushsync.{function}(%(device)s) AS f WHERE {mine}), "
            "{check} FROM {table} AS t, (SELECT (%(written)s::{table}).*) AS w WHERE {same}"
        ).format(
            function=sql.Identifier(table.function),
            mine=_same_key(table, "f", "t"),
            check=check,
            table=table.ident(),
            same=_same_key(table, "t", "w"),
        ),
        {"device": device, "old": old, "written": written},
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise _Rejected(
            f"the row as written would not be one of this device's rows of {table.name}"
        )
    if not row[1]:
        raise _Rejected(f"the upload_check of {table.name} refuses this change")


async def _upload_check(
    db: AsyncConn, table: ServerTable, device: str, new: str | None, old: str | None
) -> None:
    if table.check_function is None:
        return
    cur = await db.execute(
        sql.SQL("SELECT pushsync.{}(%s, %s::{table}, %s::{table})").format(
            sql.Identifier(table.check_function), table=table.ident()
        ),
        (device, new, old),
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise _Rejected(f"the upload_check of {table.name} refuses this change")


def _key_match(table: ServerTable, key: sql.Composable) -> sql.Composable:
    """``t``'s key equals the key in the JSON object ``key``, typed as the table's."""
    columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL(
        "({lhs}) = (SELECT {rhs} FROM jsonb_populate_record(NULL::{table}, {key}::jsonb) AS k)"
    ).format(
        lhs=sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in columns),
        rhs=sql.SQL(", ").join(sql.SQL("k.{}").format(c) for c in columns),
        table=table.ident(),
        key=key,
    )


def _same_key(table: ServerTable, left: str, right: str) -> sql.Composable:
    """``(left.k1, …) = (right.k1, …)`` over the table's key."""
    columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL("({}) = ({})").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(left), c) for c in columns),
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(right), c) for c in columns),
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


def _too_large() -> SyncRefused:
    return SyncRefused(
        f"upload batch too large: at most {MAX_UPLOAD_ROWS} rows, "
        f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MiB and {MAX_BATCH_VALUES:,} values"
    )


def _change(row: Any, index: int) -> _Change:
    """One uploaded change, checked for shape and size (not yet for meaning)."""
    if not isinstance(row, dict):
        raise SyncRefused(f"upload row {index} is not an object")
    seq = row.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise SyncRefused(f"upload row {index}: seq must be a whole number")
    table = _text(row.get("table"), f"upload row {index}: table")
    op = row.get("op")
    if op not in OPS:
        raise SyncRefused(f"upload row {index}: op must be insert, update or delete")
    images: dict[str, dict[str, Any] | None] = {}
    for part in ("key", "old", "new"):
        image = row.get(part)
        if image is not None and not isinstance(image, dict):
            raise SyncRefused(f"upload row {index}: {part} must be an object")
        if image is not None and len(image) > MAX_IMAGE_COLUMNS:
            raise SyncRefused(
                f"upload row {index}: {part} names {len(image)} columns; "
                f"a table has at most {MAX_IMAGE_COLUMNS}"
            )
        images[part] = image
    key = images["key"]
    if key is None:
        raise SyncRefused(f"upload row {index}: key is missing")
    return _Change(seq=seq, table=table, op=op, key=key, old=images["old"], new=images["new"])


def _changes(frames: list[protocol.Frame]) -> Iterator[_Change]:
    """The changes of a batch's frames, decoding one frame at a time."""
    index = 0
    for frame in frames:
        rows = protocol.decode_json_frame(frame, FrameType.UPLOAD)["rows"]
        for row in rows:
            yield _change(row, index)
            index += 1
        del rows


__all__ = ["MAX_UPLOAD_ROWS", "SyncLimits", "SyncRefused", "Synchronizer"]
