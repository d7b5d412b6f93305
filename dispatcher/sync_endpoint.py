"""The server side of synchronization: one device's session on its SYNC connection.

SYNC_BEGIN, upload batches (UPLOAD, answered by UPLOADED), DOWNLOAD, answered
by DOWNLOAD frames and SYNC_END: ``docs/sync.md`` has the frames, the
guarantees and the limits. The payloads are ``pushsync.wire.sync``'s; what
becomes of an uploaded row is ``conflicts`` (decisions) and ``sync_apply``
(writes); downloads are ``sync_download``; the static SQL is ``sync_store``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import psycopg
from psycopg_pool import AsyncConnectionPool

from pushsync.db import first_line
from pushsync.dispatcher import conflicts, sync_apply, sync_download, sync_store
from pushsync.dispatcher.connections import DeviceConnection
from pushsync.dispatcher.sync_errors import Rejected, SyncRefused
from pushsync.dispatcher.sync_store import AsyncConn
from pushsync.dispatcher.sync_tables import ServerTable
from pushsync.wire import protocol
from pushsync.wire import sync as wire
from pushsync.wire.protocol import FrameType

logger = logging.getLogger(__name__)

MAX_UPLOAD_ROWS: Final = 2_000
"""Rows one upload batch may hold; devices send at most 1,000. The answer (every seq,
and the reasons of refusals) must fit one 64 KiB frame."""
MAX_UPLOAD_BYTES: Final = 16 * 1024 * 1024
"""Bytes of UPLOAD frames one batch may take."""
MAX_BATCH_VALUES: Final = 1_000_000
"""Values (columns of every image of every row) one upload batch may hold."""
ANSWER_BYTES: Final = sync_download.CHUNK_BYTES
"""Size an UPLOADED payload is kept under, shortening the reasons of refusals."""
IDLE_TIMEOUT: Final = 60.0
"""Seconds a synchronization may wait for the device's next frame."""


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
    atomic_rows: int = 20_000
    """Rows one upload of an ``upload: atomic`` publication may hold, over all its batches
    (applied in one transaction, held open until its last batch)."""
    atomic_bytes: int = 4 * MAX_UPLOAD_BYTES
    """Bytes of UPLOAD frames one atomic upload may take, over all its batches."""
    atomic_seconds: float = 60.0
    """Seconds one atomic upload may keep its transaction (and the row locks it took)
    open, from its first batch to its last."""


@dataclass(slots=True)
class _Held:
    """The open transaction of an atomic upload, between its first batch and its last."""

    stack: contextlib.AsyncExitStack
    db: AsyncConn
    deadline: float
    """The event loop's time by which the last batch must have been applied."""
    batches: list[tuple[str, list[int]]] = field(default_factory=list)
    """Each batch applied in it so far, with the seqs of its changes."""
    rows: int = 0
    bytes: int = 0


@dataclass(slots=True)
class _Session:
    conn: DeviceConnection
    device: str
    frames: asyncio.Queue[protocol.Frame] = field(default_factory=asyncio.Queue)
    queued: int = 0
    """Bytes of frames received and not yet read by the session."""
    kept: int = 0
    """Bytes of frames the session keeps: the upload batch being received or applied."""
    task: asyncio.Task[None] | None = None
    record: sync_store.SessionRecord | None = None
    """What ``pushsync.sync_sessions`` gets when the synchronization ends."""

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
        self._sessions: dict[DeviceConnection, _Session] = {}
        self._devices: dict[str, _Session] = {}
        self._discarding: set[DeviceConnection] = set()
        """Connections whose synchronization was refused: the rest of its frames is dropped."""
        self.completed = 0
        self.failed = 0

    def feed(self, conn: DeviceConnection, frame: protocol.Frame) -> None:
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

    def closed(self, conn: DeviceConnection) -> None:
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

    def _begin(self, conn: DeviceConnection, frame: protocol.Frame) -> None:
        device = conn.device
        if device is None:
            raise RuntimeError("sync: the connection has not authenticated")
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
        session.record = sync_store.SessionRecord(device=device, started_at=datetime.now(UTC))
        self._sessions[conn] = session
        self._devices[device] = session
        session.task = asyncio.create_task(self._run(session, frame), name="pushsync sync")

    def answered(self, session: _Session) -> None:
        """``session``'s device has its answer: what remains (its record) is not cancelled
        when its connection closes, and the device may synchronize again."""
        self._forget(session)

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
        outcome, error = "ok", ""
        try:
            await self._in_slot(session, begin)
            self.completed += 1
        except (SyncRefused, protocol.ProtocolError) as exc:
            outcome, error = "refused", str(exc)
            self._failed(session, error)
            logger.warning("sync: %s: %s", device, exc)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            outcome, error = "failed", first_line(exc)
            self._failed(session, "the server could not complete the synchronization; try again")
            logger.warning("sync: %s failed: %s", device, error)
        except asyncio.CancelledError:
            self._forget(session)
            raise
        except Exception:
            outcome, error = "failed", "internal server error"
            self._failed(session, error)
            logger.exception("sync: %s failed", device)
        self._forget(session)
        await self._write_record(session, outcome, error)

    async def _write_record(self, session: _Session, outcome: str, error: str) -> None:
        """One row in ``pushsync.sync_sessions``; a failure is logged, never the device's."""
        if session.record is None:
            return
        record = session.record
        record.outcome, record.error = outcome, error[:500] or None
        try:
            async with asyncio.timeout(self.timeout):
                async with self.pool.connection() as db:
                    await sync_store.record_session(db, record)
        except Exception as exc:  # the record is a report: the synchronization is done
            logger.warning(
                "sync: %s: the synchronization was not recorded: %s",
                session.device,
                first_line(exc),
            )

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


def _fitted(answer: wire.Uploaded) -> wire.Uploaded:
    """The answer with every seq always; reasons shortened until it fits one frame."""
    fitted, rejected = answer, answer.rejected
    each = max((len(reason) for reason in rejected.values()), default=0)
    while _json_size(wire.uploaded_json(fitted)) > ANSWER_BYTES and each > 0:
        each //= 2
        shortened = {seq: reason[:each] for seq, reason in rejected.items()}
        fitted = wire.Uploaded(batch=answer.batch, applied=answer.applied, rejected=shortened)
    return fitted


def _answer(batch: str, result: Mapping[str, Any]) -> dict[str, Any]:
    """The UPLOADED payload of ``result`` as ``pushsync.sync_uploads`` records it, fitted."""
    rejected = {int(seq): reason for seq, reason in result["rejected"].items()}
    answer = wire.Uploaded(batch=batch, applied=result["applied"], rejected=rejected)
    return wire.uploaded_json(_fitted(answer))


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _error(conn: DeviceConnection, text: str) -> None:
    conn.write(wire.encode_sync_error(text[:500]))


# --------------------------------------------------------------------------- one synchronization


class _Sync:
    def __init__(self, owner: Synchronizer, session: _Session) -> None:
        self.owner = owner
        self.session = session
        self.conn = session.conn
        self.device = session.device
        self.local: Mapping[str, wire.TableShape] = {}
        """The device's description of its local tables (SYNC_BEGIN)."""
        self.forced: dict[str, list[wire.Row]] = {}
        """Keys of rows whose upload was refused: sent back so the device has the server's."""
        self.forced_count = 0
        self.full: set[str] = set()
        """Tables to download in full: more refused keys than a session remembers."""
        self.atomic = False
        """Whether the publication's uploads are all or nothing (``upload: atomic``)."""
        self.held: _Held | None = None
        """The atomic upload under way: its transaction is open."""

    async def run(self, begin: protocol.Frame) -> None:
        request = wire.decode_sync_begin(begin)
        self.local = request.tables
        try:
            await self._exchange(request.publication, request.watermark)
        finally:
            await self._release(commit=False)  # an atomic upload cut short: nothing of it

    async def _exchange(self, requested: str | None, watermark: str | None) -> None:
        """The device's frames until its DOWNLOAD. A device with nothing to upload sends
        DOWNLOAD with SYNC_BEGIN: the publication is then read with the download (one
        round trip less); else at once, so that SYNC_BEGIN alone is answered."""
        publication: sync_store.Publication | None = None
        frame = self._ready()
        if frame is None or frame.type != FrameType.DOWNLOAD:
            publication = await self._publication(requested)
        uploaded = 0
        while True:
            if frame is None:
                frame = await self._next()
            if frame.type == FrameType.UPLOAD:
                assert publication is not None  # noqa: S101  read unless DOWNLOAD came first
                uploaded += await self._upload(frame, publication.tables)
            elif frame.type == FrameType.DOWNLOAD:
                if frame.payload:
                    raise SyncRefused("DOWNLOAD from the device carries no payload")
                if self.held is not None:
                    raise SyncRefused(
                        "the atomic upload ended without its last batch; nothing of it was applied"
                    )
                name, sent = await self._download(requested, publication, watermark)
                logger.info(
                    "sync: %s %s: %d row%s uploaded, %s",
                    self.device,
                    name,
                    uploaded,
                    "" if uploaded == 1 else "s",
                    ", ".join(f"{t} {n}" for t, n in sent.items()) or "nothing to download",
                )
                return
            else:
                raise SyncRefused(f"{frame.type.name} during a synchronization")
            frame = None

    def _ready(self) -> protocol.Frame | None:
        """The device's next frame if it has arrived already."""
        try:
            frame = self.session.frames.get_nowait()
        except asyncio.QueueEmpty:
            return None
        self.session.queued -= len(frame.payload)
        return frame

    async def _next(self) -> protocol.Frame:
        wait = IDLE_TIMEOUT
        if self.held is not None:
            wait = min(wait, max(0.0, self.held.deadline - asyncio.get_running_loop().time()))
        try:
            frame = await asyncio.wait_for(self.session.frames.get(), wait)
        except TimeoutError:
            if self.held is not None and wait < IDLE_TIMEOUT:
                raise self._held_too_long() from None
            raise SyncRefused("the device went quiet during the synchronization") from None
        self.session.queued -= len(frame.payload)
        return frame

    # ----------------------------------------------------------------- the publication

    async def _publication(self, requested: str | None) -> sync_store.Publication:
        async with self.owner.pool.connection(self.owner.timeout) as db:
            publication = await sync_store.publication(db, self.device, requested)
        self._chosen(publication)
        return publication

    def _chosen(self, publication: sync_store.Publication) -> None:
        self.atomic = publication.atomic
        if self.session.record is not None:
            self.session.record.publication = publication.name

    # ----------------------------------------------------------------- upload

    async def _upload(self, first: protocol.Frame, tables: dict[str, ServerTable]) -> int:
        """Receive one batch (checking each frame as it comes), then apply it."""
        frames: list[protocol.Frame] = []
        frame = first
        batch: str | None = None
        rows = values = 0
        try:
            while True:
                upload = wire.decode_upload(frame, first=rows)
                self.session.kept += len(frame.payload)
                frames.append(frame)
                if batch is not None and upload.batch != batch:
                    raise SyncRefused("UPLOAD frames of one batch must name the same batch")
                batch = upload.batch
                for change in upload.rows:
                    values += change.values
                    rows += 1
                    if rows > MAX_UPLOAD_ROWS or values > MAX_BATCH_VALUES:
                        raise _too_large()
                if self.session.kept > MAX_UPLOAD_BYTES:
                    raise _too_large()
                more, follows = upload.more, upload.follows
                del upload
                if not more:
                    break
                frame = await self._next()
            assert batch is not None  # noqa: S101  type narrowing; the loop ran once at least
            if self.atomic:
                size = sum(len(f.payload) for f in frames)
                answer, applied = await self._apply_atomic(
                    batch, frames, tables, follows=bool(follows), rows=rows, size=size
                )
            else:
                answer = await self._apply(batch, frames, tables)
                applied = len(answer.applied)
        finally:
            self.session.kept -= sum(len(f.payload) for f in frames)
            frames.clear()
        self.conn.write(wire.encode_uploaded(_fitted(answer)))
        if self.session.record is not None:
            self.session.record.upload_rows += applied
            self.session.record.conflicts += len(answer.rejected)
        return applied

    # ----------------------------------------------------------------- atomic uploads

    async def _apply_atomic(
        self,
        batch: str,
        frames: list[protocol.Frame],
        tables: dict[str, ServerTable],
        *,
        follows: bool,
        rows: int,
        size: int,
    ) -> tuple[wire.Uploaded, int]:
        """Apply a batch in the upload's transaction: held while more batches follow,
        committed with the last, rolled back whole at the first refused change. Returns
        the answer and how many changes it applied (all of the upload's, with the last)."""
        held = self.held
        if held is None:
            async with self.owner.pool.connection(self.owner.timeout) as db:
                known = await sync_store.answered(db, self.device, batch)
            if known is not None:
                logger.info("sync: %s sent batch %s again; answered as before", self.device, batch)
                return known, 0
            held = await self._hold()
        elif any(done == batch for done, _ in held.batches):
            raise SyncRefused(f"batch {batch} was sent twice in one upload")
        limits = self.owner.limits
        held.rows += rows
        held.bytes += size
        if held.rows > limits.atomic_rows or held.bytes > limits.atomic_bytes:
            raise SyncRefused(
                f"atomic upload too large: at most {limits.atomic_rows:,} rows and "
                f"{limits.atomic_bytes // (1024 * 1024)} MiB over all its batches; "
                "nothing of it was applied"
            )
        seqs: list[int] = []
        for change in _changes(frames):
            reason = await self._apply_one(held.db, change, tables, force=False)
            if reason is not None:
                await self._release(commit=False)
                refused = (
                    f"nothing of the upload was applied: change {change.seq} "
                    f"({change.table}) was refused: {reason}"
                )
                return wire.Uploaded(batch=batch, applied=[], rejected={}, refused=refused), 0
            seqs.append(change.seq)
        held.batches.append((batch, seqs))
        if asyncio.get_running_loop().time() > held.deadline:
            raise self._held_too_long()
        if follows:
            return wire.Uploaded(batch=batch, applied=[], rejected={}, held=True), 0
        for done, applied in held.batches:
            answer = wire.Uploaded(batch=done, applied=applied, rejected={})
            await sync_store.record(held.db, self.device, answer)
        total = sum(len(applied) for _, applied in held.batches)
        await self._release(commit=True)
        return wire.Uploaded(batch=batch, applied=seqs, rejected={}), total

    async def _hold(self) -> _Held:
        """Open the transaction of an atomic upload (it locks the device's row: a
        ``device disable`` waits for it, at most ``atomic_seconds``)."""
        stack = contextlib.AsyncExitStack()
        try:
            db = await stack.enter_async_context(self.owner.pool.connection(self.owner.timeout))
            await stack.enter_async_context(db.transaction())
            await sync_store.pin(db)
            await sync_store.still_enabled(db, self.device)
        except BaseException as exc:
            await stack.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        deadline = asyncio.get_running_loop().time() + self.owner.limits.atomic_seconds
        self.held = _Held(stack=stack, db=db, deadline=deadline)
        return self.held

    async def _release(self, *, commit: bool) -> None:
        """End the atomic upload's transaction: commit it, or roll everything back."""
        held, self.held = self.held, None
        if held is None:
            return
        if commit:
            await held.stack.aclose()
            return
        rollback = psycopg.Rollback()
        await held.stack.__aexit__(psycopg.Rollback, rollback, None)

    def _held_too_long(self) -> SyncRefused:
        return SyncRefused(
            f"the atomic upload took more than {self.owner.limits.atomic_seconds:g} s; "
            "nothing of it was applied"
        )

    async def _apply(
        self, batch: str, frames: list[protocol.Frame], tables: dict[str, ServerTable]
    ) -> wire.Uploaded:
        async with self.owner.pool.connection(self.owner.timeout) as db, db.transaction():
            await sync_store.pin(db)
            await sync_store.still_enabled(db, self.device)
            known = await sync_store.answered(db, self.device, batch)
            if known is not None:
                logger.info("sync: %s sent batch %s again; answered as before", self.device, batch)
                return known
            applied: list[int] = []
            rejected: dict[int, str] = {}
            for change in _changes(frames):
                reason = await self._apply_one(db, change, tables)
                if reason is None:
                    applied.append(change.seq)
                else:
                    rejected[change.seq] = reason
            answer = wire.Uploaded(batch=batch, applied=applied, rejected=rejected)
            await sync_store.record(db, self.device, answer)
            return answer

    async def _apply_one(
        self,
        db: AsyncConn,
        change: wire.Change,
        tables: dict[str, ServerTable],
        *,
        force: bool = True,
    ) -> str | None:
        """Apply one uploaded change; the reason it was refused, or None."""
        table = tables.get(change.table)
        if table is None:
            return f"table {change.table} is not in this publication"
        reason = conflicts.admissible(table, change, self._declared(table))
        if reason is None:
            try:
                async with db.transaction():  # a savepoint: this row alone fails
                    await sync_apply.write(db, table, change, self.device)
            except Rejected as exc:
                reason = str(exc)
            except psycopg.Error as exc:
                reason = _pg_reason(exc)
        if not force:
            return reason
        if reason is not None and change.op != "insert" and set(table.key) <= set(change.key):
            self._force(table, change.key)  # the next download brings the server's row
        return reason

    def _declared(self, table: ServerTable) -> frozenset[str]:
        """The server's columns that the device's local table has (all, if it says none)."""
        local = self.local.get(table.name)
        if local is None:
            return table.column_names
        return table.column_names & local.column_names

    def _force(self, table: ServerTable, key: wire.Row) -> None:
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
        requested: str | None,
        publication: sync_store.Publication | None,
        watermark: str | None,
    ) -> tuple[str, dict[str, str]]:
        """Answer the DOWNLOAD in one transaction (one snapshot, the answer's watermark);
        then record the synchronization on the same connection. Nothing changed for the
        device: two round trips (docs/sync.md, "An untouched download")."""
        async with self.owner.pool.connection(self.owner.timeout) as db:
            try:
                name, sent = await self._answer(db, requested, publication, watermark)
            except BaseException:
                await sync_store.abandon(db)
                raise
            await self.conn.drain()
            # The device has its answer: closing its connection no longer cancels this
            # task (a cancelled statement would cost the pool its connection).
            self.owner.answered(self.session)
            await self._record(db)
        return name, sent

    async def _answer(
        self,
        db: AsyncConn,
        requested: str | None,
        publication: sync_store.Publication | None,
        watermark: str | None,
    ) -> tuple[str, dict[str, str]]:
        opened = await sync_store.open_download(
            db,
            self.device,
            requested if publication is None else publication.name,
            watermark,
            tables=publication is None,
        )
        if publication is None:
            assert opened.publication is not None  # noqa: S101  asked for: read, or refused
            publication = opened.publication
            self._chosen(publication)
        held = opened.holdings
        if held is None:
            raise RuntimeError("the holdings of a granted publication were not found")
        if held.confirmed is None and watermark is not None:
            await sync_store.valid_watermark(db, watermark)  # refused if no snapshot at all
        plan = self._plan(publication.tables, held)
        async with db.pipeline():
            await sync_store.settle(db, held, opened.snapshot, sending=bool(plan))
            if not plan:  # nothing to send: the answer commits in the same round trip
                await sync_store.commit(db)
        sent: dict[str, str] = {}
        for table, whole in plan:
            sent[table.name] = await self._send(db, table, held, whole)
        if plan:
            await sync_store.commit(db)
        end = wire.SyncEnd(publication=publication.name, watermark=opened.snapshot)
        self.conn.write(wire.encode_sync_end(end), bulk=True)
        return publication.name, sent

    def _plan(
        self, tables: dict[str, ServerTable], held: sync_store.Holdings
    ) -> list[tuple[ServerTable, bool | None]]:
        """The tables to send, in download order: each in full (None), or what differs
        from the device's (True: its whole download compared; False: only changed keys).
        A table that nothing it reads changed, with nothing forced, is not evaluated."""
        plan: list[tuple[ServerTable, bool | None]] = []
        for table in tables.values():
            full = held.confirmed is None or table.name not in held.known
            full = full or self.local.get(table.name) != table.shape()
            full = full or table.name in self.full
            if full:
                plan.append((table, None))
                continue
            reads_changed, whole = held.reads_changed(table)
            if reads_changed or self.forced.get(table.name):
                plan.append((table, whole))
        return plan

    async def _send(
        self, db: AsyncConn, table: ServerTable, held: sync_store.Holdings, whole: bool | None
    ) -> str:
        if whole is None:
            count = await sync_download.send_full(db, self.conn, table, self.device, held.holder)
            self._downloaded(count)
            return f"{count} rows (full)"
        assert held.confirmed is not None  # noqa: S101  type narrowing; else full
        ups, dels = await sync_download.send_diff(
            db,
            self.conn,
            table,
            device=self.device,
            holder=held.holder,
            since=held.confirmed,
            forced=self.forced.get(table.name, []),
            whole=whole,
        )
        self._downloaded(ups + dels)
        return f"{ups} rows, {dels} deletes"

    async def _record(self, db: AsyncConn) -> None:
        """The synchronization's row, on the download's connection once the answer is
        written (its own transaction); ``_run`` then has nothing left to record."""
        record, self.session.record = self.session.record, None
        if record is None:
            return
        try:
            async with asyncio.timeout(self.owner.timeout):
                await sync_store.record_session(db, record)
        except Exception as exc:  # the record is a report: the synchronization is done
            logger.warning(
                "sync: %s: the synchronization was not recorded: %s", self.device, first_line(exc)
            )

    def _downloaded(self, rows: int) -> None:
        if self.session.record is not None:
            self.session.record.download_rows += rows


def _pg_reason(exc: psycopg.Error) -> str:
    diag = exc.diag
    text = diag.message_primary or first_line(exc)
    return f"refused by the database: {text}"


def _too_large() -> SyncRefused:
    return SyncRefused(
        f"upload batch too large: at most {MAX_UPLOAD_ROWS} rows, "
        f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MiB and {MAX_BATCH_VALUES:,} values"
    )


def _changes(frames: list[protocol.Frame]) -> Iterator[wire.Change]:
    """The changes of a batch's frames, decoding one frame at a time."""
    index = 0
    for frame in frames:
        rows = wire.decode_upload(frame, first=index).rows
        yield from rows
        index += len(rows)
        del rows


__all__ = ["MAX_UPLOAD_ROWS", "SyncLimits", "SyncRefused", "Synchronizer"]
