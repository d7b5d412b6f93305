"""The built-in sync client: upload local changes, download the publication's rows.

``pushsync sync CONFIG`` and the listener's ``sync`` action run
:func:`synchronize` over a SYNC connection (the listener's open one, else one of
its own) against the :class:`~pushsync.listener.localdb.LocalDatabase` in
``state_dir``, one at a time per folder. Frames and guarantees: ``docs/sync.md``.
Standard library only.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

from pushsync.errors import PushsyncError
from pushsync.listener.config import ListenerConfig
from pushsync.listener.connection import KeyRefused, Session
from pushsync.listener.localdb import (
    Column,
    LocalDatabase,
    LocalDatabaseMismatch,
    TableDownload,
    TableSchema,
)
from pushsync.listener.state import StateInUse, hold_for_sync
from pushsync.wire import protocol
from pushsync.wire import sync as wire
from pushsync.wire.protocol import FrameType
from pushsync.wire.sync import Change

logger = logging.getLogger(__name__)

BATCH_ROWS: Final = 1000
BATCH_BYTES: Final = 8 * 1024 * 1024
"""Bytes of JSON rows a new batch is cut at (a single larger row goes alone)."""
CHUNK_BYTES: Final = 48 * 1024
REPLY_TIMEOUT: Final = 60.0
LOCAL_DB: Final = "local.db"
DEFAULT_PUBLICATION: Final = "default"
"""The local name of the watermark when the config names no publication."""
NO_SYNC_ROUTE: Final = "no sync or poll channel is configured to synchronize through"

Decoded = TypeVar("Decoded")


class SyncFailed(PushsyncError):
    """The synchronization did not complete; the local database is as before its download."""


class Transport(Protocol):
    """A SYNC connection as the sync client needs it."""

    def send(self, data: bytes) -> bool: ...

    async def recv(self, timeout: float | None = None) -> protocol.Frame | None: ...


@dataclass(frozen=True, slots=True)
class SyncResult:
    publication: str
    uploaded: int
    rejected: int
    upserted: int
    deleted: int
    full: tuple[str, ...]
    """Tables downloaded in full."""
    seconds: float
    refused: str | None = None
    """Why the server refused the whole upload (``upload: atomic``); its changes are kept."""

    def describe(self) -> str:
        full = f"; full download of {', '.join(self.full)}" if self.full else ""
        refused = f"; upload refused, every change kept: {self.refused}" if self.refused else ""
        return (
            f"synchronized {self.publication} in {self.seconds * 1000:.0f} ms: "
            f"{_count(self.uploaded, 'change')} up ({self.rejected} rejected), "
            f"{_count(self.upserted, 'row')} down, {self.deleted} removed{full}{refused}"
        )


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def local_database(config: ListenerConfig) -> LocalDatabase:
    """The device's local database in ``state_dir``, claimed for its device and publication:
    :class:`~pushsync.listener.localdb.LocalDatabaseMismatch` (naming the config) when the
    file holds another device's or publication's rows."""
    config.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = LocalDatabase.open(config.state_dir / LOCAL_DB)
    try:
        db.claim(config.device, config.publication or DEFAULT_PUBLICATION)
    except LocalDatabaseMismatch as exc:
        db.close()
        raise LocalDatabaseMismatch(
            f"{config.path}: state_dir {config.state_dir}: {exc}; give each device (and each "
            "publication) its own state_dir"
        ) from None
    except BaseException:
        db.close()
        raise
    return db


class KeptDatabase:
    """A listener's local database, kept open from one synchronization to the next.

    Opening the file and closing it again (the checkpoint of the last connection) was
    most of the device's work in a synchronization that brought nothing. The listener
    owns its ``state_dir`` (``listener.lock``) and synchronizes under ``sync.lock``, so
    it keeps its connection; ``pushsync sync`` run beside it, and the application,
    use connections of their own. The database follows the config it is asked for: a
    config naming another ``state_dir``, device or publication, or a file removed or
    replaced meanwhile, gets the file opened (and claimed) again.
    """

    def __init__(self) -> None:
        self._db: LocalDatabase | None = None
        self._owner: tuple[Path, str, str] | None = None
        self._identity: tuple[int, int] | None = None

    def open(self, config: ListenerConfig) -> LocalDatabase:
        """The local database of ``config``: the one kept, if it is still that one."""
        path = config.state_dir / LOCAL_DB
        owner = (path, config.device, config.publication or DEFAULT_PUBLICATION)
        if self._db is not None:
            if owner == self._owner and _identity(path) == self._identity:
                return self._db
            self.close()
        db = local_database(config)
        self._db, self._owner, self._identity = db, owner, _identity(path)
        return db

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        """Close the database kept, if any (it is opened again when next asked for)."""
        db, self._db, self._owner, self._identity = self._db, None, None, None
        if db is not None:
            db.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is (device and inode); ``None`` if there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_dev, found.st_ino


async def synchronize(
    transport: Transport, db: LocalDatabase, publication: str | None
) -> SyncResult:
    """One synchronization over ``transport``; :class:`SyncFailed` if it did not complete."""
    started = time.monotonic()
    local_key = publication or DEFAULT_PUBLICATION
    client = _Client(transport, db)
    tables = {name: _shape(schema) for name, schema in db.schema().items()}
    begin = wire.SyncBegin(
        publication=publication, watermark=db.watermark(local_key), tables=tables
    )
    uploaded = rejected = 0
    held: list[int] = []
    """Seqs of the batches the server holds, unapplied, until the upload's last one."""
    after: int | None = None
    whole_refused: str | None = None
    first = _next_batch(db, after, 0)
    download = protocol.encode_frame(FrameType.DOWNLOAD)
    if first is None:  # nothing to upload: one write, so the server reads both at once
        client.send(wire.encode_sync_begin(begin) + download)
    else:
        client.send(wire.encode_sync_begin(begin))
    batch = first
    while batch is not None:
        name, changes, follows = batch
        answer, done, refused = await client.upload(name, changes, follows=follows, held=held)
        if answer.refused is not None:
            whole_refused = answer.refused
            _forget_batch(db)
            logger.warning("sync: the server refused the whole upload: %s", answer.refused)
            break
        if answer.held:
            held += [c.seq for c in changes]
            after = changes[-1].seq
        else:
            held, after = [], None
            uploaded += done
            rejected += refused
        batch = _next_batch(db, after, len(held))
    if first is not None:
        client.send(download)
    downloads, end = await client.download()
    stats = await asyncio.to_thread(db.apply, local_key, downloads, end.watermark)
    return SyncResult(
        publication=end.publication or local_key,
        uploaded=uploaded,
        rejected=rejected,
        upserted=stats.upserted,
        deleted=stats.deleted,
        full=tuple(d.schema.name for d in downloads if d.full),
        seconds=time.monotonic() - started,
        refused=whole_refused,
    )


# --------------------------------------------------------------------------- upload batches


_READ_STATE: Final = "SELECT instance, batch, first_seq, last_seq FROM _pushsync_upload"


def _state(db: LocalDatabase) -> Any:
    """The client's own bookkeeping table in the local database (one read once it exists)."""
    conn = db.connection
    try:
        row = conn.execute(_READ_STATE).fetchone()
    except sqlite3.OperationalError:  # the first synchronization of this file
        row = None
    if row is not None:
        return row
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _pushsync_upload ("
        "singleton INTEGER PRIMARY KEY CHECK (singleton = 1), "
        "instance TEXT NOT NULL, batch TEXT, first_seq INTEGER, last_seq INTEGER)"
    )
    row = conn.execute(_READ_STATE).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO _pushsync_upload (singleton, instance) VALUES (1, ?)", (uuid.uuid4().hex,)
        )
        conn.commit()
        row = conn.execute(_READ_STATE).fetchone()
    return row


def _next_batch(
    db: LocalDatabase, after: int | None = None, skip: int = 0
) -> tuple[str, list[Change], bool] | None:
    """The batch to send, and whether more changes follow it; ``after``: the last seq of
    the batches the server holds unapplied (``skip`` changes), whose upload this continues.

    A batch's id names its seq range. The batch written down (before it is sent, until
    it is answered) is sent again when the upload reaches its first change; the others
    are cut the same way again from the same changes, so they get the same ids: an
    atomic upload tried again (its first batch, or its last) sends the same batches,
    and the server answers those it applied from its record.
    """
    instance, batch, first, last = _state(db)
    candidates = [c for c in db.pending(skip + BATCH_ROWS + 1) if after is None or c.seq > after]
    if not candidates:
        if batch is not None:
            _forget_batch(db)
        return None
    if batch is not None and after is None and first < candidates[0].seq:
        batch = None  # its changes were answered: stale
    if batch is not None and candidates[0].seq == first:
        changes = [c for c in candidates if c.seq <= last]
        return batch, changes, any(c.seq > last for c in candidates)
    changes = _cut(candidates[:BATCH_ROWS])
    follows = len(candidates) > len(changes)
    name = f"{instance}:{changes[0].seq}-{changes[-1].seq}"
    if batch is not None and follows:
        return name, changes, follows  # the last batch of an earlier try stays written down
    conn = db.connection
    conn.execute(
        "UPDATE _pushsync_upload SET batch = ?, first_seq = ?, last_seq = ?",
        (name, changes[0].seq, changes[-1].seq),
    )
    conn.commit()
    return name, changes, follows


def _cut(changes: list[Change]) -> list[Change]:
    """The first of ``changes`` that fit :data:`BATCH_BYTES` as JSON (at least one)."""
    size = 0
    for count, change in enumerate(changes):
        size += len(json.dumps(change.to_json(), separators=(",", ":")))  # >= its bytes
        if count and size > BATCH_BYTES:
            return changes[:count]
    return changes


def _shape(schema: TableSchema) -> wire.TableShape:
    return wire.TableShape(
        columns=tuple((c.name, c.pgtype) for c in schema.columns), key=schema.key
    )


def _forget_batch(db: LocalDatabase, batch: str | None = None) -> None:
    """Forget the batch written down (only if it is ``batch``, when given)."""
    conn = db.connection
    forget = "UPDATE _pushsync_upload SET batch = NULL, first_seq = NULL, last_seq = NULL"
    if batch is None:
        conn.execute(forget)
    else:
        conn.execute(f"{forget} WHERE batch = ?", (batch,))
    conn.commit()


class _Client:
    def __init__(self, transport: Transport, db: LocalDatabase) -> None:
        self.transport = transport
        self.db = db

    def send(self, frame: bytes) -> None:
        if not self.transport.send(frame):
            raise SyncFailed("the SYNC connection closed")

    async def receive(self, decode: Callable[[protocol.Frame], Decoded]) -> Decoded:
        return _decoded(decode, await self.receive_frame())

    async def receive_frame(self) -> protocol.Frame:
        """The server's next frame; :class:`SyncFailed` for SYNC_ERROR, or none in time.
        A PING (the server heard nothing for a while: a long batch) is answered here."""
        while True:
            try:
                frame = await self.transport.recv(REPLY_TIMEOUT)
            except TimeoutError:
                raise SyncFailed(f"no answer from the server in {REPLY_TIMEOUT:g}s") from None
            if frame is None or frame.type not in (FrameType.PING, FrameType.PONG):
                break
            if frame.type == FrameType.PING:
                self.send(protocol.encode_frame(FrameType.PONG, frame.payload))
        if frame is None:
            raise SyncFailed("the server closed the connection during the synchronization")
        if frame.type == FrameType.SYNC_ERROR:
            error = _decoded(wire.decode_sync_error, frame)
            raise SyncFailed(f"the server refused: {error[:300]}")
        return frame

    async def upload(
        self, batch: str, changes: list[Change], *, follows: bool, held: list[int]
    ) -> tuple[wire.Uploaded, int, int]:
        """Send a batch; the answer, and how many changes it applied and refused (with an
        upload's last batch: also those of the batches the server ``held``)."""
        chunk: list[wire.Change] = []
        size = 0
        for change in changes:
            row = json.dumps(change.to_json(), separators=(",", ":"), ensure_ascii=False)
            encoded = len(row.encode())
            if chunk and size + encoded > CHUNK_BYTES:
                upload = wire.Upload(batch=batch, rows=chunk, more=True, follows=follows)
                self.send(wire.encode_upload(upload))
                chunk, size = [], 0
            chunk.append(change)
            size += encoded + 1
        last = wire.Upload(batch=batch, rows=chunk, more=False, follows=follows)
        self.send(wire.encode_upload(last))
        answer = await self.receive(wire.decode_uploaded)
        if answer.batch != batch:
            raise SyncFailed("the server answered another upload batch")
        if answer.held or answer.refused is not None:
            if answer.applied or answer.rejected or (answer.held and not follows):
                raise SyncFailed("the server's answer does not fit the batch it was sent")
            return answer, 0, 0
        applied, refused = list(answer.applied), dict(answer.rejected)
        expected = {c.seq for c in changes}
        if set(applied) | set(refused) != expected:
            raise SyncFailed("the server's answer does not cover the batch it was sent")
        await asyncio.to_thread(self.db.uploaded, [*held, *applied], refused)
        _forget_batch(self.db, batch)
        for seq, reason in sorted(refused.items()):
            logger.warning("sync: local change %d refused by the server: %s", seq, reason)
        return answer, len(held) + len(applied), len(refused)

    async def download(self) -> tuple[list[TableDownload], wire.SyncEnd]:
        tables: dict[str, _Accumulated] = {}
        while True:
            frame = await self.receive_frame()
            if frame.type == FrameType.SYNC_END:
                end = _decoded(wire.decode_sync_end, frame)
                return [t.download() for t in tables.values()], end
            payload = _decoded(wire.decode_download, frame)
            found = tables.get(payload.table)
            if found is None:
                found = tables[payload.table] = _Accumulated(payload)
            found.add(payload)


class _Accumulated:
    """The DOWNLOAD frames of one table, put together."""

    def __init__(self, first: wire.Download) -> None:
        columns = tuple(Column(name=n, pgtype=t) for n, t in first.schema.columns)
        self.schema = TableSchema(name=first.table, columns=columns, key=first.schema.key)
        self.full = first.full
        self.upserts: list[dict[str, Any]] = []
        self.deletes: list[dict[str, Any]] = []

    def add(self, payload: wire.Download) -> None:
        self.upserts.extend(payload.upserts)
        self.deletes.extend(payload.deletes)

    def download(self) -> TableDownload:
        return TableDownload(
            schema=self.schema, full=self.full, upserts=self.upserts, deletes=self.deletes
        )


def _decoded(decode: Callable[[protocol.Frame], Decoded], frame: protocol.Frame) -> Decoded:
    try:
        return decode(frame)
    except protocol.ProtocolError as exc:
        raise SyncFailed(f"unexpected answer from the server: {exc}") from None


# --------------------------------------------------------------------------- entry points


async def sync_once(
    config: ListenerConfig,
    secret: bytes,
    transport: Transport | None = None,
    *,
    on_wait: Callable[[str], None] | None = None,
    kept: KeptDatabase | None = None,
) -> SyncResult:
    """One synchronization for ``config``'s device, over ``transport`` or a new connection,
    after any other one under way in its ``state_dir`` (``on_wait`` hears that it waits).

    The local database is opened for it and closed after it, or taken from ``kept`` (a
    listener's) and left open there; a synchronization that fails closes it, so the
    next one opens the file afresh."""
    from pushsync.listener.connection import open_session

    with await hold_for_sync(config.state_dir, config.path, on_wait=on_wait):
        if kept is None:
            db = local_database(config)
            try:
                return await _sync_locked(config, secret, transport, db, open_session)
            finally:
                db.close()
        try:
            return await _sync_locked(config, secret, transport, kept.open(config), open_session)
        except BaseException:
            kept.close()
            raise


async def _sync_locked(
    config: ListenerConfig,
    secret: bytes,
    transport: Transport | None,
    db: LocalDatabase,
    open_session: Callable[..., Awaitable[Session]],
) -> SyncResult:
    if transport is not None:
        return await synchronize(transport, db, config.publication)
    where = config.sync_server
    if where is None:
        raise SyncFailed(NO_SYNC_ROUTE)
    server, tls, ca_file = where
    try:
        session = await open_session(
            server, device=config.device, secret=secret, tls=tls, ca_file=ca_file
        )
    except KeyRefused:
        raise
    except (OSError, TimeoutError, protocol.ProtocolError) as exc:
        raise SyncFailed(f"cannot connect to {server}: {exc}") from None
    try:
        return await synchronize(session, db, config.publication)
    finally:
        await session.close("sync done")


def run_sync(config_path: str) -> int:
    """``pushsync sync CONFIG``: one synchronization now; 0 on success, 1 if it failed, 2 for
    a mistake to fix first (the config, the key the server refused, a shared state_dir)."""
    import sys

    from pushsync.listener.config import load_for_command

    loaded = load_for_command(config_path)
    if isinstance(loaded, int):
        return loaded
    config, secret = loaded
    try:
        said = functools.partial(print, file=sys.stderr, flush=True)
        result = asyncio.run(sync_once(config, secret, on_wait=said))
    except (KeyRefused, LocalDatabaseMismatch, StateInUse) as exc:
        print(f"sync failed: {exc}", file=sys.stderr)
        return 2
    except (SyncFailed, OSError, PushsyncError) as exc:
        print(f"sync failed: {exc}", file=sys.stderr)
        return 1
    print(result.describe())
    return 0


__all__ = [
    "BATCH_BYTES",
    "BATCH_ROWS",
    "KeptDatabase",
    "SyncFailed",
    "SyncResult",
    "Transport",
    "local_database",
    "run_sync",
    "sync_once",
    "synchronize",
]
