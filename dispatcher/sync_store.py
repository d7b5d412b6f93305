"""The synchronizations' static statements: the named blocks of ``sql/sync.sql``, one function each.

What is composed per published table (its name, its key, its functions) is in
``sync_apply`` (uploads) and ``sync_download`` (downloads).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus

from pushsync import queries
from pushsync.dispatcher.sync_errors import SyncRefused
from pushsync.dispatcher.sync_tables import ServerTable
from pushsync.wire.sync import Uploaded

AsyncConn = psycopg.AsyncConnection[Any]


def query(name: str) -> str:
    """The named block ``name`` of ``sql/sync.sql``."""
    return queries.get(name, "sync.sql")


async def pin(db: AsyncConn) -> None:
    """Pin the settings download functions and upload checks run with (this transaction)."""
    await db.execute(query("pinned"))


# --------------------------------------------------------------------------- the publication


@dataclass(frozen=True, slots=True)
class Publication:
    """The publication a synchronization is for, as the server has it now."""

    name: str
    tables: dict[str, ServerTable]
    """In download order."""
    atomic: bool
    """Whether its uploads are all or nothing (``upload: atomic``)."""


async def publication(db: AsyncConn, device: str, requested: str | None) -> Publication:
    """The publication ``device`` asked for (None: its only one), with its tables; refused
    if the device may not synchronize it. One statement."""
    params = {"device": device, "publication": requested}
    cur = await db.execute(query("publication_granted"), params)
    return _accepted(requested, await cur.fetchall())


def _accepted(requested: str | None, rows: list[Any]) -> Publication:
    """The publication of ``publication_granted``'s rows, or the refusal."""
    granted: list[str] = list(rows[0][0]) if rows else []
    if requested is None and len(granted) != 1:
        raise SyncRefused(
            "name the publication to synchronize (`publication:` in the listener "
            f"config): this device may synchronize {', '.join(granted) or 'none'}"
        )
    chosen = rows[0][1] if rows else None
    if chosen is None or chosen not in granted or rows[0][2] is None:
        # Not granted or not defined: the same answer, so nothing is learnt.
        raise SyncRefused(f"there is no publication {chosen or requested!r}")
    tables = [_table(row[2:]) for row in rows]
    atomic = any(bool(row[10]) for row in rows)
    return Publication(name=str(chosen), tables={t.name: t for t in tables}, atomic=atomic)


def _table(row: Any) -> ServerTable:
    name, key, upload, conflict, newest, function, depends, check, _, names, types, pk = row
    if not names:
        raise SyncRefused(f"published table {name} does not exist on the server")
    key = tuple(key) or tuple(pk)
    if not key:
        raise SyncRefused(f"published table {name} has no primary key on the server")
    return ServerTable(
        name=name,
        columns=tuple(zip(names, types, strict=True)),
        key=key,
        upload=tuple(upload),
        conflict=conflict,
        newest=newest,
        function=function,
        depends_on=tuple(depends),
        check_function=check,
    )


# --------------------------------------------------------------------------- uploads


async def still_enabled(db: AsyncConn, device: str) -> None:
    """Refuse the batch if the device lost access since it authenticated (and lock it)."""
    cur = await db.execute(query("device_enabled"), {"device": device})
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise SyncRefused("this device may no longer synchronize")


async def answered(db: AsyncConn, device: str, batch: str) -> Uploaded | None:
    """The answer to ``batch`` if it was applied before."""
    cur = await db.execute(query("upload_answered"), {"device": device, "batch": batch})
    row = await cur.fetchone()
    if row is None:
        return None
    result: dict[str, Any] = row[0]
    rejected = {int(seq): str(reason) for seq, reason in result["rejected"].items()}
    return Uploaded(batch=batch, applied=list(result["applied"]), rejected=rejected)


async def record(db: AsyncConn, device: str, answer: Uploaded) -> None:
    """Remember the batch and its answer, in the transaction that applied it."""
    result = {
        "applied": list(answer.applied),
        "rejected": {str(seq): reason for seq, reason in answer.rejected.items()},
    }
    params = {"device": device, "batch": answer.batch, "result": json.dumps(result)}
    await db.execute(query("upload_record"), params)


# --------------------------------------------------------------------------- the record


@dataclass(kw_only=True, slots=True)
class SessionRecord:
    """One synchronization as ``pushsync.sync_sessions`` keeps it."""

    device: str
    started_at: datetime
    publication: str | None = None
    upload_rows: int = 0
    """Uploaded rows applied."""
    download_rows: int = 0
    """Rows and deletes sent down."""
    conflicts: int = 0
    """Uploaded rows refused (conflicts, checks, the database)."""
    outcome: str = "ok"
    error: str | None = None


async def record_session(db: AsyncConn, record: SessionRecord) -> None:
    """Insert the synchronization's row (autocommit: one statement, its own transaction)."""
    params = {
        "device": record.device,
        "publication": record.publication,
        "started_at": record.started_at,
        "upload_rows": record.upload_rows,
        "download_rows": record.download_rows,
        "conflicts": record.conflicts,
        "outcome": record.outcome,
        "error": record.error,
    }
    await db.execute(query("session_record"), params)


# --------------------------------------------------------------------------- downloads


@dataclass(frozen=True, slots=True)
class Holdings:
    """What the server knows of the rows a device holds, at the start of its download."""

    holder: int
    """The device's and publication's number in ``pushsync.device_rows``."""
    confirmed: str | None
    """The watermark the device's rows belong to once settled: the one it came with (the
    last answer's or the one before), or None (nothing known: every table in full)."""
    known: frozenset[str]
    """The tables whose rows on the device are known once settled (the others: in full)."""
    changed: frozenset[str]
    """The tables the publication's downloads read with a change since ``confirmed``."""
    settle: tuple[str, ...]
    """The blocks that settle them (promote, forget, discard): none if nothing changes."""

    def reads_changed(self, table: ServerTable) -> tuple[bool, bool]:
        """Whether a table ``table``'s download reads (itself included) changed since the
        watermark, and whether one of the others did."""
        others = not self.changed.isdisjoint(table.depends_on)
        return others or table.name in self.changed, others


@dataclass(frozen=True, slots=True)
class Opened:
    """A download's transaction, once its first round trip is back."""

    snapshot: str
    """The download's snapshot: the answer's watermark."""
    publication: Publication | None
    """The publication, if it was asked for."""
    holdings: Holdings | None
    """None if the publication is refused (the caller raises and rolls back)."""


async def open_download(
    db: AsyncConn,
    device: str,
    requested: str | None,
    watermark: str | None,
    *,
    tables: bool,
) -> Opened:
    """Begin the download's transaction (one snapshot, pinned), read the publication (if
    ``tables``: it was not read for the uploads) and lock and read the device's holdings
    with what changed since ``watermark`` (compared in SQL with the holdings' own
    watermarks, never cast): one round trip (a pipeline). The caller ends
    the transaction (:func:`commit`, or :func:`abandon` on every other way out)."""
    params = {"device": device, "publication": requested, "watermark": watermark}
    async with db.pipeline():
        await db.execute(query("download_begin"))
        for statement in query("pinned").split(";\n"):
            await db.execute(statement)
        await db.execute(query("download_generic"))
        snap = await db.execute(query("download_snapshot"))
        pub = await db.execute(query("publication_granted"), params) if tables else None
        held = await db.execute(query("holdings_open"), params)
        row = await snap.fetchone()
        pub_rows = await pub.fetchall() if pub is not None else None
        held_rows = await held.fetchall()
    if row is None:
        raise RuntimeError("a one-row SELECT returned no row")
    chosen = _accepted(requested, pub_rows) if pub_rows is not None else None
    name = chosen.name if chosen is not None else requested
    mine = [r for r in held_rows if name is None or r[1] == name]
    return Opened(
        snapshot=str(row[0]),
        publication=chosen,
        holdings=_settled(mine[0]) if len(mine) == 1 else None,
    )


def _settled(row: Any) -> Holdings:
    """The holdings once settled by the watermark the device came with: the last answer's
    (it applied it: promoted), the one before (it did not: discarded), or another
    (nothing known: forgotten, every table in full)."""
    holder, _, confirmed, pending, since, known, pending_full, pending_rows, changed = row
    anything_pending = bool(pending_rows) or bool(pending_full)
    blocks: list[str] = []
    if since is not None and since == pending:
        if anything_pending:
            blocks.append("holdings_promote")
        known = [*known, *pending_full]
    elif since is None or since != confirmed:
        blocks.append("holdings_forget")
        known, since = [], None
    if anything_pending:
        blocks.append("holdings_discard")
    return Holdings(
        holder=int(holder),
        confirmed=since,
        known=frozenset(str(t) for t in known),
        changed=frozenset(str(t) for t in changed) if since is not None else frozenset(),
        settle=tuple(blocks),
    )


async def valid_watermark(db: AsyncConn, watermark: str) -> None:
    """Refuse a watermark that is no snapshot (one neither of the device's last two)."""
    try:
        await db.execute(query("watermark_valid"), {"watermark": watermark})
    except psycopg.errors.InvalidTextRepresentation:
        raise SyncRefused("the watermark is not a snapshot this server made") from None


async def settle(db: AsyncConn, held: Holdings, snapshot: str, *, sending: bool) -> None:
    """Settle the holdings and record the answer's watermark (the device holds
    ``confirmed`` until it comes back with ``snapshot``); if tables are to be ``sending``,
    plan their statements as usual again. Queued in the caller's pipeline: nothing is
    read back."""
    params = {"holder": held.holder}
    for block in held.settle:
        await _run_all(db, block, params)
    answered = {"holder": held.holder, "confirmed": held.confirmed, "pending": snapshot}
    await db.execute(query("holdings_answered"), answered)
    if sending:
        await db.execute(query("download_planned"))


async def commit(db: AsyncConn) -> None:
    await db.execute("COMMIT")


async def abandon(db: AsyncConn) -> None:
    """Roll back the download's transaction if it is still open (whatever ended it)."""
    status = db.info.transaction_status
    if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
        with contextlib.suppress(psycopg.Error):
            await db.execute("ROLLBACK")


async def _run_all(db: AsyncConn, name: str, params: dict[str, Any]) -> None:
    """The statements of block ``name``, one after the other (one transaction: the caller's)."""
    for statement in query(name).split(";\n"):
        await db.execute(statement, params)


async def hold_full(
    db: AsyncConn, holder: int, table: str, keys: list[bytes], hashes: list[bytes]
) -> None:
    """What the device holds of ``table`` once it applied a full download of it."""
    params = {"holder": holder, "table": table, "keys": keys, "hashes": hashes}
    await _run_all(db, "holdings_full", params)


async def download_frame(
    db: AsyncConn,
    table: ServerTable,
    *,
    full: bool,
    upserts: list[str],
    deletes: list[str],
    more: bool,
) -> bytes:
    """The payload of one DOWNLOAD frame; rows and keys are JSON texts, passed through."""
    params = {
        "table": table.name,
        "schema": json.dumps(table.shape().to_json()),
        "full": full,
        "upserts": upserts,
        "deletes": deletes,
        "more": more,
    }
    cur = await db.execute(query("download_frame"), params)
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("a one-row SELECT returned no row")
    return str(row[0]).encode("utf-8")


__all__ = [
    "Holdings",
    "Opened",
    "Publication",
    "SessionRecord",
    "abandon",
    "answered",
    "commit",
    "download_frame",
    "hold_full",
    "open_download",
    "pin",
    "publication",
    "query",
    "record",
    "record_session",
    "settle",
    "still_enabled",
    "valid_watermark",
]
