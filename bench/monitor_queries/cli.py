"""Each query of the web console (``pushsync monitor``) timed over a large history.

A throwaway PostgreSQL filled by ``fill.sql``: 10,000 devices (half of them
connected), 1,000,000 finished notifications over 30 days, 200,000
synchronizations and a small outbox (the history inserted as archiving
inserts it, so the per-minute roll-ups of migration 0011 fill with it). Every
view's query runs through the
console's own code (``pushsync.monitor.data`` on its read-only connections),
once to warm up, then ``--rounds`` times; the median and the slowest are
printed against the target (50 ms), with the same-run baseline: one full
scan of ``outbox_history`` (``count(*)``), the cost an unbounded query would
start from.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.dispatcher_process import throwaway_database
from bench.machine import fsync_ms
from pushsync import schema
from pushsync.monitor import data, params

HERE = Path(__file__).resolve().parent
TARGET_MS = 50.0
FSYNC_ROUNDS = 50
FSYNC_BLOCK = 4096
"""The fsync probe printed with the figures: median of 50 rounds of a 4 KiB write + fsync."""

Query = Callable[[data.AsyncConn], Awaitable[Any]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.monitor_queries", description=__doc__)
    parser.add_argument("--history", type=int, default=1_000_000, help="outbox_history rows")
    parser.add_argument("--devices", type=int, default=10_000, help="devices")
    parser.add_argument("--rounds", type=int, default=5, help="timed runs of each query")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    parser.add_argument(
        "--dsn",
        help="fill and query this database (its pushsync tables empty) instead of a "
        "throwaway server",
    )
    return parser.parse_args(argv)


def fill(conn: psycopg.Connection, history: int, devices: int) -> float:
    """The fleet and its past; the seconds it took."""
    started = time.perf_counter()
    schema.migrate(conn)
    conn.execute("SELECT setseed(0.17)")
    text = (HERE / "fill.sql").read_text("utf-8")
    for statement in text.split(";\n"):
        body = "\n".join(line for line in statement.splitlines() if not line.startswith("--"))
        if body.strip():
            conn.execute(statement, {"history": history, "devices": devices})
    conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def rollups(conn: psycopg.Connection) -> dict[str, Any]:
    """The roll-ups' sizes, and whether their counts are the history's (as archiving keeps them)."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM pushsync.flow_minutes),"
        " (SELECT count(*) FROM pushsync.latency_minutes),"
        " (SELECT coalesce(sum(n), 0) FROM pushsync.flow_minutes WHERE kind = 'written')"
        "   = (SELECT count(*) FROM pushsync.outbox_history),"
        " (SELECT coalesce(sum(n), 0) FROM pushsync.latency_minutes WHERE series = 'sync')"
        "   = (SELECT count(*) FROM pushsync.sync_sessions WHERE outcome = 'ok')"
    ).fetchone()
    assert row is not None
    return {"flow_rows": row[0], "latency_rows": row[1], "agree": bool(row[2] and row[3])}


def queries(samples: dict[str, Any]) -> dict[str, Query]:
    """Every query the console runs, named by view, with realistic parameters."""
    now = datetime.now(UTC)

    def fleet(**given: str) -> Query:
        return lambda db: data.fleet(db, params.fleet(given, now))

    def window(read: Callable[..., Awaitable[Any]], name: str) -> Query:
        return lambda db: read(db, params.window({"window": name}, now))

    def timeline(span: str, **given: str) -> Query:
        now_ms = math.ceil(now.timestamp() * 1000)  # not a microsecond more than the span
        since = str(now_ms - int(params.WINDOWS[span].total_seconds() * 1000))
        return lambda db: data.timeline(db, params.timeline({"since": since, **given}, now))

    history_id = uuid.UUID(samples["history_id"])
    outbox_id = uuid.UUID(samples["outbox_id"])
    return {
        "pulse (live updates)": data.pulse,
        "fleet: first page, 24 h counts": fleet(),
        "fleet: search 'truck-99'": fleet(search="truck-99"),
        "fleet: disconnected, 7 d counts": fleet(show="disconnected", window="7d"),
        "fleet: a later page": fleet(after="truck-5000"),
        "flow: 5 min per second": window(data.flow, "5m"),
        "flow: 1 h per minute (roll-up)": window(data.flow, "1h"),
        "flow: 24 h per 5 min (roll-up)": window(data.flow, "24h"),
        "latency: 1 h (roll-up)": window(data.latency, "1h"),
        "latency: 24 h (roll-up)": window(data.latency, "24h"),
        "timeline: 5 min, every device": timeline("5m"),
        "timeline: 1 h, every device": timeline("1h"),
        "timeline: 24 h, devices 'truck-77'": timeline("24h", search="truck-77"),
        "request: finished": lambda db: data.request(db, history_id),
        "request: in the outbox": lambda db: data.request(db, outbox_id),
    }


async def measure(dsn: str, rounds: int) -> tuple[dict[str, dict[str, float]], float]:
    conninfo = psycopg.conninfo.make_conninfo(dsn, options=data.READ_ONLY)
    async with await psycopg.AsyncConnection.connect(conninfo, autocommit=True) as db:
        samples = await _samples(db)
        baseline = await _timed(db, _full_scan, rounds)
        figures = {}
        for name, run in queries(samples).items():
            times = await _timed(db, run, rounds)
            figures[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
    return figures, statistics.median(baseline)


async def _full_scan(db: data.AsyncConn) -> Any:
    cur = await db.execute("SELECT count(*) FROM pushsync.outbox_history")
    return await cur.fetchone()


async def _samples(db: data.AsyncConn) -> dict[str, Any]:
    cur = await db.execute(
        "SELECT (SELECT request_id::text FROM pushsync.outbox_history"
        "        ORDER BY finished_at DESC LIMIT 1),"
        "       (SELECT request_id::text FROM pushsync.outbox LIMIT 1)"
    )
    row = await cur.fetchone()
    assert row is not None
    return {"history_id": row[0], "outbox_id": row[1]}


async def _timed(db: data.AsyncConn, run: Query, rounds: int) -> list[float]:
    result = await run(db)  # warm-up, and a check that it answers
    assert result is not None
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await run(db)
        times.append((time.perf_counter() - started) * 1000)
    return times


def report(figures: dict[str, dict[str, float]], baseline_ms: float) -> list[str]:
    width = max(len(name) for name in figures)
    head = f"{'query':<{width}}  {'median':>9}  {'slowest':>9}  {'/ scan':>7}"
    lines = [f"{head}  target {TARGET_MS:g} ms"]
    for name, f in figures.items():
        verdict = "ok" if f["median_ms"] <= TARGET_MS else "OVER"
        lines.append(
            f"{name:<{width}}  {f['median_ms']:7.2f}ms  {f['max_ms']:7.2f}ms  "
            f"{f['median_ms'] / baseline_ms:7.3f}  {verdict}"
        )
    lines.append(
        f"{'baseline: count(*) of outbox_history':<{width}}  {baseline_ms:7.2f}ms  "
        "(every query above is a fraction of one full scan: '/ scan')"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    database = contextlib.nullcontext(args.dsn) if args.dsn else throwaway_database("bench")
    with database as dsn, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(dsn, autocommit=True) as conn:
            filled = fill(conn, args.history, args.devices)
            rolled = rollups(conn)
            version = conn.execute("SHOW server_version").fetchone()
        figures, baseline = asyncio.run(measure(dsn, args.rounds))
        machine = {
            "cpus": os.cpu_count(),
            "load_average": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
            "fsync_ms": round(fsync_ms(Path(tmp), FSYNC_ROUNDS, FSYNC_BLOCK), 3),
            "python": sys.version.split()[0],
            "postgresql": version[0] if version else "?",
            "platform": platform.platform(),
        }
    print("pushsync monitor-queries benchmark")
    print(
        f"{args.history:,} history rows, {args.devices:,} devices, {args.history // 5:,} "
        f"synchronizations (filled in {filled:.1f} s); median of {args.rounds} runs after one "
        "warm-up, on one read-only connection, "
        "each through the console's own code (query, rows to JSON-ready values)"
    )
    print(
        "machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
    )
    print(
        f"roll-ups: {rolled['flow_rows']:,} rows of flow_minutes, {rolled['latency_rows']:,} of "
        f"latency_minutes; their counts {'are' if rolled['agree'] else 'are NOT'} the history's"
    )
    print()
    for line in report(figures, baseline):
        print(line)
    over = [name for name, f in figures.items() if f["median_ms"] > TARGET_MS]
    print()
    print(f"{len(figures) - len(over)} of {len(figures)} queries within {TARGET_MS:g} ms")
    if args.json:
        print(
            json.dumps(
                {
                    "history": args.history,
                    "devices": args.devices,
                    "baseline_ms": baseline,
                    "queries": figures,
                    "rollups": rolled,
                    "machine": machine,
                }
            )
        )
    return 0
