"""The synchronizations' static statements: the named blocks of ``sql/sync.sql``, one function each.

What is composed per published table (its name, its key, its functions) is in
``sync_apply`` (uploads) and ``sync_download`` (downloads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from pushsync import queries
from pushsync.dispatcher.sync_errors import SyncRefused
from pushsync.dispatcher.sync_tables import ServerTable
from pushsync.wire.sync import TableShape, Uploaded

AsyncConn = psycopg.AsyncConnection[Any]


def query(name: str) -> str:
    """The named block ``name`` of ``sql/sync.sql``."""
    return queries.get(name, "sync.sql")


async def pin(db: AsyncConn) -> None:
    """Pin the settings download functions and upload checks run with (this transaction)."""
    await db.execute(query("pinned"))


# --------------------------------------------------------------------------- the publication


async def granted(db: AsyncConn, device: str) -> list[str]:
    """The publications ``device`` may synchronize that the rules define."""
    cur = await db.execute(query("publications_granted"), {"device": device})
    return [str(name) for (name,) in await cur.fetchall()]


async def published(db: AsyncConn, publication: str) -> list[ServerTable]:
    """The tables of ``publication``, in download order, as the server has them now."""
    cur = await db.execute(query("publication_tables"), {"publication": publication})
    tables = []
    for name, key, upload, conflict, newest, function, depends, check in await cur.fetchall():
        shape = await _shape(db, name, tuple(key))
        tables.append(
            ServerTable(
                name=name,
                columns=shape.columns,
                key=shape.key,
                upload=tuple(upload),
                conflict=conflict,
                newest=newest,
                function=function,
                depends_on=tuple(depends),
                check_function=check,
            )
        )
    return tables


async def atomic(db: AsyncConn, publication: str) -> bool:
    """Whether ``publication`` applies each upload in one transaction, or nothing of it."""
    cur = await db.execute(query("publication_atomic"), {"publication": publication})
    row = await cur.fetchone()
    return bool(row and row[0])


async def _shape(db: AsyncConn, table: str, key: tuple[str, ...]) -> TableShape:
    """The table's columns, and ``key`` or else its primary key."""
    cur = await db.execute(query("table_columns"), {"table": table})
    columns = tuple((str(n), str(t)) for n, t in await cur.fetchall())
    if not columns:
        raise SyncRefused(f"published table {table} does not exist on the server")
    if not key:
        cur = await db.execute(queries.get("primary_key"), {"table": table})
        key = tuple(str(n) for (n,) in await cur.fetchall())
    if not key:
        raise SyncRefused(f"published table {table} has no primary key on the server")
    return TableShape(columns=columns, key=key)


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


async def begin_download(db: AsyncConn) -> str:
    """Make this transaction the download's (one snapshot, pinned); the snapshot as text.
    The statements go in one round trip (a pipeline)."""
    async with db.pipeline():
        await db.execute(query("download_begin"))
        for statement in query("pinned").split(";\n"):
            await db.execute(statement)
        cur = await db.execute(query("download_snapshot"))
        row = await cur.fetchone()
    if row is None:
        raise RuntimeError("a one-row SELECT returned no row")
    return str(row[0])


async def usable_watermark(db: AsyncConn, watermark: str | None) -> str | None:
    """The watermark, if the change log still covers everything since it; else None."""
    if watermark is None:
        return None
    try:
        async with db.transaction():
            cur = await db.execute(query("watermark_usable"), {"watermark": watermark})
            row = await cur.fetchone()
    except psycopg.errors.InvalidTextRepresentation:
        raise SyncRefused("the watermark is not a snapshot this server made") from None
    return watermark if row is not None and row[0] else None


async def changed_each(
    db: AsyncConn, tables: list[ServerTable], since: str
) -> dict[str, tuple[bool, bool]]:
    """For each table: whether a table its download reads (itself included) changed since
    the watermark ``since``, and whether one of the others did (one statement)."""
    described = [
        {"name": t.name, "reads": [t.name, *t.depends_on], "depends": list(t.depends_on)}
        for t in tables
    ]
    params = {"tables": json.dumps(described), "since": since}
    cur = await db.execute(query("tables_changed_each"), params)
    rows = await cur.fetchall()
    return {str(name): (bool(reads), bool(depends)) for name, reads, depends in rows}


# --------------------------------------------------------------------------- holdings


@dataclass(frozen=True, slots=True)
class Holdings:
    """What the server knows of the rows a device holds, at the start of its download."""

    holder: int
    """The device's and publication's number in ``pushsync.device_rows``."""
    known: frozenset[str]
    """The tables whose rows on the device are known (the others are sent in full)."""
    confirmed: str | None
    """The watermark those rows belong to: the one the device came with, or None."""


async def _run_all(db: AsyncConn, name: str, params: dict[str, Any]) -> None:
    """The statements of block ``name``, one after the other (one transaction: the caller's)."""
    for statement in query(name).split(";\n"):
        await db.execute(statement, params)


async def holdings(db: AsyncConn, device: str, publication: str, watermark: str | None) -> Holdings:
    """Settle the device's holdings by the watermark it came with: the last answer's
    (it applied it: promoted), the one before (it did not: discarded), or another
    (nothing known: forgotten, every table in full). Two round trips."""
    cur = await db.execute(query("holdings_lock"), {"device": device, "publication": publication})
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("INSERT ... RETURNING returned no row")
    holder, confirmed, pending = row
    params = {"holder": holder}
    async with db.pipeline():
        if watermark is not None and watermark == pending:
            await _run_all(db, "holdings_promote", params)
        elif watermark is None or watermark != confirmed:
            await _run_all(db, "holdings_forget", params)
            watermark = None
        await _run_all(db, "holdings_discard", params)
        cur = await db.execute(query("holdings_known"), params)
        known = frozenset(str(name) for (name,) in await cur.fetchall())
    return Holdings(holder=int(holder), known=known, confirmed=watermark)


async def hold_full(
    db: AsyncConn, holder: int, table: str, keys: list[bytes], hashes: list[bytes]
) -> None:
    """What the device holds of ``table`` once it applied a full download of it."""
    params = {"holder": holder, "table": table, "keys": keys, "hashes": hashes}
    await _run_all(db, "holdings_full", params)


async def answered_download(
    db: AsyncConn, holder: int, confirmed: str | None, pending: str
) -> None:
    """Record the answer's watermark, in the answer's transaction."""
    params = {"holder": holder, "confirmed": confirmed, "pending": pending}
    await db.execute(query("holdings_answered"), params)


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
    "SessionRecord",
    "answered",
    "answered_download",
    "atomic",
    "begin_download",
    "changed_each",
    "download_frame",
    "granted",
    "hold_full",
    "holdings",
    "pin",
    "published",
    "query",
    "record",
    "record_session",
    "still_enabled",
    "usable_watermark",
]
