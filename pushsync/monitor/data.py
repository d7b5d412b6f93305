"""The console's figures: the named blocks of ``sql/monitor.sql``, one function each.

Every function takes a connection (read-only, see :func:`open_pool`) and the
checked parameters of :mod:`.params`, and returns plain JSON values: times as
ISO 8601 text, durations in seconds. No statement is composed from a request:
parameters are bound.
"""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pushsync import queries
from pushsync.monitor import params

AsyncConn = psycopg.AsyncConnection[Any]
Json = Any

READ_ONLY = (
    "-c default_transaction_read_only=on -c statement_timeout=5000"
    " -c plan_cache_mode=force_custom_plan"
)
"""Connection options: every statement of the console is read-only and takes at most 5 s."""


def query(name: str) -> str:
    return queries.get(name, "monitor.sql")


def query_as_json(name: str) -> str:
    """The block ``name``, its rows made one JSON array by PostgreSQL, in the block's order:
    a page of rows reaches the browser without a Python object per value."""
    return f"SELECT coalesce(json_agg(q), '[]') FROM ({query(name)}) AS q"  # noqa: S608  a named block, no request text


def open_pool(dsn: str, *, size: int = 4) -> AsyncConnectionPool[AsyncConn]:
    """A pool of read-only, autocommit connections (not opened yet: ``await pool.open()``)."""
    return AsyncConnectionPool(
        dsn,
        min_size=1,
        max_size=size,
        kwargs={"autocommit": True, "options": READ_ONLY},
        open=False,
        name="pushsync-monitor",
    )


def jsonable(value: Any) -> Json:
    """A row value as JSON: times as ISO text, intervals as seconds, UUIDs as text."""
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


async def _rows(db: AsyncConn, name: str, args: dict[str, Any]) -> list[dict[str, Json]]:
    async with db.cursor(row_factory=dict_row) as cur:
        await cur.execute(query(name), args)
        return [{k: jsonable(v) for k, v in row.items()} for row in await cur.fetchall()]


async def _json_rows(db: AsyncConn, name: str, args: dict[str, Any]) -> list[dict[str, Json]]:
    cur = await db.execute(query_as_json(name), args)
    row = await cur.fetchone()
    return list(row[0]) if row else []


async def pulse(db: AsyncConn) -> dict[str, Json]:
    """The header's figures, and what changes when anything happens."""
    rows = await _rows(db, "monitor_pulse", {})
    return rows[0]


async def fleet(db: AsyncConn, q: params.FleetQuery) -> dict[str, Json]:
    args = {"search": q.search, "show": q.show, "after": q.after, "limit": q.limit + 1}
    rows = await _json_rows(db, "monitor_fleet", {**args, "since": q.since})
    more = len(rows) > q.limit
    return {"devices": rows[: q.limit], "more": more, "since": jsonable(q.since)}


async def flow(db: AsyncConn, w: params.Window) -> dict[str, Json]:
    rows = await _json_rows(db, "monitor_flow", {"since": w.since, "step": w.step})
    return {"since": jsonable(w.since), "step": w.step, "buckets": rows}


async def latency(db: AsyncConn, w: params.Window) -> dict[str, Json]:
    bounds = list(params.LATENCY_BOUNDS_MS)
    rows = await _rows(db, "monitor_latency", {"since": w.since, "bounds": bounds})
    series = {}
    for row in rows:
        p50, p95, p99 = row["pct"]
        histogram = [0] * len(bounds)
        for index, n in (row["histogram"] or {}).items():
            histogram[min(max(int(index), 1), len(bounds)) - 1] += int(n)
        series[row["series"]] = {
            "n": row["n"],
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "max": row["most"],
            "histogram": histogram,
        }
    return {"since": jsonable(w.since), "bounds_ms": bounds, "series": series}


async def timeline(db: AsyncConn, q: params.TimelineQuery) -> dict[str, Json]:
    args = {"since": q.since, "until": q.until, "search": q.search, "limit": q.limit}
    pushes = await _json_rows(db, "monitor_timeline_pushes", args)
    syncs = await _json_rows(db, "monitor_timeline_syncs", args)
    return {
        "since": jsonable(q.since),
        "until": jsonable(q.until),
        "pushes": pushes,
        "syncs": syncs,
        "truncated": len(pushes) >= q.limit or len(syncs) >= q.limit,
    }


async def request(db: AsyncConn, request_id: uuid.UUID) -> dict[str, Json] | None:
    rows = await _rows(db, "monitor_request", {"request_id": request_id})
    if not rows:
        return None
    found = rows[0]
    syncs = await _rows(
        db, "monitor_request_syncs", {"device": found["device_id"], "since": found["created_at"]}
    )
    return {"request": found, "syncs": syncs}


__all__ = [
    "READ_ONLY",
    "fleet",
    "flow",
    "jsonable",
    "latency",
    "open_pool",
    "pulse",
    "query",
    "query_as_json",
    "request",
    "timeline",
]
