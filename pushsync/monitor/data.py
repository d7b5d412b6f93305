"""The console's figures: the named blocks of ``sql/monitor.sql``, one function each.

Every function takes a connection (read-only, see :func:`open_pool`) and the
checked parameters of :mod:`.params`, and returns plain JSON values: times as
ISO 8601 text, durations in seconds. No statement is composed from a request:
parameters are bound.
"""

from __future__ import annotations

import bisect
import math
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
    """Per second from the history's rows up to 15 minutes; beyond, per minute (or
    per several minutes: at most :data:`params.FLOW_BARS` buckets) from the roll-up
    ``flow_minutes``."""
    if w.step == "minute":
        args = {"since": w.since, "seconds": w.bucket_seconds}
        rows = await _json_rows(db, "monitor_flow_minutes", args)
    else:
        rows = await _json_rows(db, "monitor_flow", {"since": w.since, "step": w.step})
    return {
        "since": jsonable(w.since),
        "step": w.step,
        "step_seconds": w.bucket_seconds,
        "buckets": rows,
    }


def bucket_bounds(bucket: int) -> tuple[float, float]:
    """Milliseconds ``[low, high)`` of a bucket of ``pushsync.latency_bucket`` (sql/0011)."""
    if bucket <= 0:
        return 0.0, 1.0
    return 2 ** ((bucket - 1) / 4), 2 ** (bucket / 4)


def bucket_middle(bucket: int) -> float:
    """The value a bucket stands for: its geometric middle (within 10 % of any value in it)."""
    return 0.5 if bucket <= 0 else 2 ** ((bucket - 0.5) / 4)


def estimate(counts: dict[int, int], bounds: list[float]) -> dict[str, Json]:
    """A latency series from its log-scale bucket counts: how many, estimated
    p50/p95/p99, at most the upper edge of the highest bucket, and the histogram
    over the console's ``bounds`` (each bucket counted where its middle falls)."""
    n = sum(counts.values())
    order = sorted(b for b, k in counts.items() if k > 0)
    pct: list[float] = []
    for p in (0.5, 0.95, 0.99):
        rank, seen = max(1, math.ceil(p * n)), 0
        for b in order:
            seen += counts[b]
            if seen >= rank:
                pct.append(round(bucket_middle(b), 3))
                break
    histogram = [0] * len(bounds)
    for b in order:
        histogram[max(bisect.bisect_right(bounds, bucket_middle(b)) - 1, 0)] += counts[b]
    return {
        "n": n,
        "p50": pct[0],
        "p95": pct[1],
        "p99": pct[2],
        "max": round(bucket_bounds(order[-1])[1], 3),
        "histogram": histogram,
        "estimated": True,
    }


async def latency(db: AsyncConn, w: params.Window) -> dict[str, Json]:
    """Exact percentiles from the rows up to 15 minutes; beyond, estimated from the
    roll-up ``latency_minutes`` (within 10 %, ``"estimated": true``)."""
    bounds = list(params.LATENCY_BOUNDS_MS)
    if w.step == "minute":
        counts: dict[str, dict[int, int]] = {}
        for row in await _rows(db, "monitor_latency_minutes", {"since": w.since}):
            counts.setdefault(row["series"], {})[int(row["bucket"])] = int(row["n"])
        series = {name: estimate(c, bounds) for name, c in counts.items()}
        return {"since": jsonable(w.since), "bounds_ms": bounds, "series": series}
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
            "estimated": False,
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
        "limit": q.limit,
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
    "bucket_bounds",
    "bucket_middle",
    "estimate",
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
