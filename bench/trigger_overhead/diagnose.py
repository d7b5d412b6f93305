"""``--diagnose``: where the time of a generated trigger goes.

1. Per-statement cost of single-row INSERTs measured server-side (a DO loop:
   no network), both all in one transaction and with a COMMIT after each, for
   the benchmark variants and for the partial triggers of ``diagnose.sql``; the
   overhead of a statement-level trigger so splits into firing a PL/pgSQL
   trigger, capturing the transition table, SECURITY DEFINER + SET search_path,
   and the generated INSERT ... ON CONFLICT itself.
2. EXPLAIN ANALYZE of the bulk INSERT per variant: total and trigger time.
3. The plans of the generated trigger's statement (auto_explain, nested).
4. Plan stickiness: PL/pgSQL caches the trigger statement's plan per session,
   made for the transition table size of the first call; single-row INSERTs
   after a bulk one in the same session, and the other way round.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable

import psycopg
from psycopg import sql

from bench.trigger_overhead import database
from bench.trigger_overhead.database import VARIANTS, Server, Variant

DIAGNOSE_FILE = database.HERE / "diagnose.sql"

PARTS: tuple[Variant, ...] = (
    Variant("d_empty", "orders_d_empty", "PL/pgSQL statement trigger, empty body"),
    Variant("d_tt", "orders_d_tt", "d_empty + REFERENCING NEW TABLE"),
    Variant("d_secdef", "orders_d_secdef", "d_tt + SECURITY DEFINER SET search_path"),
    Variant("d_guard", "orders_d_guard", "d_secdef + IF NOT EXISTS(1 `when`) early exit"),
    Variant("d_guard20", "orders_d_guard20", "d_secdef + IF NOT EXISTS(20 `when`s OR-ed)"),
)

LOOP_STATEMENTS = 10_000
LOOP_REPEATS = 3
STICKY_SINGLES = 200


def _loop(conn: psycopg.Connection, variant: Variant, statements: int, *, commit: bool) -> float:
    """Microseconds per single-row INSERT statement in a server-side loop."""
    database.reset(conn, variant)
    body = (
        "DO $bench$ BEGIN FOR i IN 1.." + str(statements) + " LOOP "
        "INSERT INTO bench." + variant.table + " (account_id, status, amount, note) "
        "VALUES (1 + i % 1000, 'closed', (i % 100001) / 100.0, 'loop'); "
        + ("COMMIT; " if commit else "")
        + "END LOOP; END $bench$"
    )
    started = time.perf_counter()
    conn.execute(body)  # our own names
    return (time.perf_counter() - started) / statements * 1e6


def per_statement(conn: psycopg.Connection) -> None:
    variants = (*VARIANTS, *PARTS)
    modes = (False, True)
    costs: dict[tuple[str, bool], list[float]] = {(v.name, m): [] for v in variants for m in modes}
    for v in variants:  # warm up: compile functions, cache plans
        _loop(conn, v, 500, commit=True)
    for _ in range(LOOP_REPEATS):
        for v in variants:
            for commit in modes:
                costs[v.name, commit].append(_loop(conn, v, LOOP_STATEMENTS, commit=commit))
    base = {m: statistics.median(costs["none", m]) for m in modes}
    print()
    print(
        f"1. single-row INSERT, {LOOP_STATEMENTS} statements in a server-side loop (no network), "
        f"median of {LOOP_REPEATS}"
    )
    print(f"  {'':<10} {'one transaction':>17} {'COMMIT after each':>19}")
    print(f"  {'variant':<10} {'us/stmt':>8} {'+us':>8} {'us/stmt':>9} {'+us':>9}  what")
    for v in variants:
        one = statistics.median(costs[v.name, False])
        each = statistics.median(costs[v.name, True])
        print(
            f"  {v.name:<10} {one:8.2f} {one - base[False]:8.2f} {each:9.2f} "
            f"{each - base[True]:9.2f}  {v.description}"
        )


_TRIGGER = re.compile(r"^Trigger (\S+): time=([0-9.]+) calls=(\d+)", re.M)
_EXECUTION = re.compile(r"^Execution Time: ([0-9.]+) ms", re.M)


def bulk_explain(conn: psycopg.Connection, rows: int) -> None:
    print()
    print(f"2. EXPLAIN (ANALYZE) of the bulk INSERT of {rows} rows (rolled back)")
    print(f"  {'variant':<10} {'total ms':>9} {'trigger ms':>11}  trigger")
    for v in (*VARIANTS, *PARTS):
        database.reset(conn, v)
        query = sql.SQL("EXPLAIN (ANALYZE) ") + database.bulk_statement(v)
        with conn.transaction(force_rollback=True):
            text = "\n".join(str(r[0]) for r in conn.execute(query, (rows,)))
        total = _EXECUTION.search(text)
        triggers = _TRIGGER.findall(text)
        spent = sum(float(t[1]) for t in triggers)
        names = ", ".join(f"{t[0]} (calls={t[2]})" for t in triggers) or "-"
        print(f"  {v.name:<10} {float(total.group(1)) if total else 0:9.1f} {spent:11.1f}  {names}")


def _nested_plans(conn: psycopg.Connection, run: Callable[[], None], first_node: str) -> list[str]:
    """auto_explain output of nested statements whose plan starts with ``first_node``."""
    messages: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        if diag.message_primary:
            messages.append(diag.message_primary)

    conn.execute("LOAD 'auto_explain'")
    for name, value in (
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_analyze", "on"),
        ("auto_explain.log_nested_statements", "on"),
        ("auto_explain.log_timing", "on"),
        ("client_min_messages", "log"),
    ):
        conn.execute(sql.SQL("SET {} = {}").format(sql.Identifier(*name.split(".")), value))
    conn.add_notice_handler(collect)
    try:
        run()
    finally:
        conn.remove_notice_handler(collect)
        conn.execute("RESET client_min_messages")
        conn.execute("RESET auto_explain.log_min_duration")
    plans = []
    for message in messages:
        lines = message.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(first_node)), None)
        if start is not None:
            plans.append("\n".join([lines[0], *lines[start:]]))
    return plans


def _tail(lines: list[str]) -> list[str]:
    """The JIT summary at the end of a plan, if any."""
    start = next((i for i, line in enumerate(lines) if line.startswith("JIT:")), len(lines))
    return lines[start:]


def trigger_plans(conn: psycopg.Connection, rows: int) -> None:
    print()
    print("3. plan of the generated trigger's INSERT ... ON CONFLICT (auto_explain, analyze)")
    for name, count, limit in (
        ("nomatch", 1, 60),
        ("nomatch", rows, 60),
        ("nobody", rows, 60),
        ("match4", 1, 60),
        ("match4", rows, 60),
        ("rules20", 1, 40),
        ("rules20", rows, 40),
    ):
        v = database.BY_NAME[name]
        database.reset(conn, v)

        def run(v: Variant = v, count: int = count) -> None:
            with conn.transaction(force_rollback=True):
                conn.execute(database.bulk_statement(v), (count,))

        plans = _nested_plans(conn, run, "Insert on outbox")
        print(f"\n--- {name}, INSERT of {count} row(s) ---")
        for plan in plans:
            lines = plan.splitlines()
            if len(lines) <= limit:
                print(plan)
                continue
            tail = _tail(lines)
            head = lines[: max(limit - len(tail), 10)]
            print("\n".join(head))
            print(f"  ... {len(lines) - len(head) - len(tail)} lines left out ...")
            print("\n".join(tail))


def _singles(conn: psycopg.Connection, variant: Variant, count: int) -> float:
    """Microseconds per single-row INSERT sent from here, each in its own transaction."""
    started = time.perf_counter()
    for i in range(count):
        statement = database.single_row_statement(variant, str(1 + i % 1000), "12345")
        conn.execute(statement)  # our own names
    return (time.perf_counter() - started) / count * 1e6


def _bulk(conn: psycopg.Connection, variant: Variant, rows: int) -> float:
    started = time.perf_counter()
    conn.execute(database.bulk_statement(variant), (rows,))
    return time.perf_counter() - started


def stickiness(server: Server, admin: psycopg.Connection, rows: int) -> None:
    """Each measurement in a new session, after emptying the tables from ``admin``."""
    print()
    print(
        f"4. plan stickiness: {STICKY_SINGLES} single-row INSERTs (us each, with network) and "
        f"one bulk INSERT of {rows} rows (s),"
    )
    print("   each first in a new session, and after the other kind in the same session")
    print(
        f"  {'variant':<9} {'singles first':>14} {'after bulk':>11} {'bulk first':>11} "
        f"{'after singles':>14}"
    )
    for v in VARIANTS:
        if v.name == "rowlevel":
            continue
        database.reset(admin, v)
        with server.connect() as conn:
            singles_first = _singles(conn, v, STICKY_SINGLES)
            bulk_after = _bulk(conn, v, rows)
        database.reset(admin, v)
        with server.connect() as conn:
            bulk_first = _bulk(conn, v, rows)
            singles_after = _singles(conn, v, STICKY_SINGLES)
        print(
            f"  {v.name:<9} {singles_first:14.1f} {singles_after:11.1f} {bulk_first:11.4f} "
            f"{bulk_after:14.4f}"
        )


def run(server: Server, conn: psycopg.Connection, *, rows: int) -> None:
    with conn.transaction():
        conn.execute(DIAGNOSE_FILE.read_text("utf-8"))  # our own file
    per_statement(conn)
    bulk_explain(conn, rows)
    trigger_plans(conn, rows)
    stickiness(server, conn, rows)
