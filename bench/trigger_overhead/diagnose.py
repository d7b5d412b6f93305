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
5. The ``nobody`` rule (no ``when``, recipients found by a join that finds
   nobody) against its floor, the hand-written statement trigger of
   ``floor.sql`` doing the same join: wall and server CPU time of the bulk
   INSERT, interleaved repeats.
6. The same comparison in instructions executed (valgrind, if installed; see
   ``instructions.py``), which other load on the machine cannot blur, and the
   verdict: whether the generated trigger is at its floor.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql

from bench.trigger_overhead import database, instructions
from bench.trigger_overhead.database import VARIANTS, Server, Variant

DIAGNOSE_FILE = database.HERE / "diagnose.sql"

PARTS: tuple[Variant, ...] = (
    Variant("d_empty", "orders_d_empty", "PL/pgSQL statement trigger, empty body"),
    Variant("d_tt", "orders_d_tt", "d_empty + REFERENCING NEW TABLE"),
    Variant("d_secdef", "orders_d_secdef", "d_tt + SECURITY DEFINER SET search_path"),
    Variant("d_guard", "orders_d_guard", "d_secdef + IF NOT EXISTS(1 `when`) early exit"),
    Variant("d_guard20", "orders_d_guard20", "d_secdef + IF NOT EXISTS(20 `when`s OR-ed)"),
)

FLOOR_REPEATS = 11
FLOOR_LIMIT = 1.05
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
        ("floor", rows, 60),
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


def against_floor(conn: psycopg.Connection, rows: int) -> None:
    """The generated ``nobody`` trigger against the hand-written one doing the same join."""
    compared = ("none", "d_tt", "floor", "nobody")
    variants = [database.BY_NAME.get(n) or next(p for p in PARTS if p.name == n) for n in compared]
    sizes = sorted({rows, min(rows, 1000)})
    print()
    print("5. nobody (generated: no `when`, recipients by a join that finds nobody) against floor")
    print(
        f"   (floor.sql: the same join hand-written), the bulk INSERT, {FLOOR_REPEATS} "
        "interleaved repeats; medians,"
    )
    print("   ratios = median of the per-repeat ratios; cpu = the server process's CPU time")
    print(f"  {'rows':>7} {'variant':<8} {'wall ms':>9} {'cpu ms':>9} {'cpu above d_tt':>15}")
    verdicts = []
    for size in sizes:
        for v in variants:  # warm up: compile, cache the floor's plan
            database.bulk_insert(conn, v, size)
        wall: dict[str, list[float]] = {n: [] for n in compared}
        cpu: dict[str, list[float]] = {n: [] for n in compared}
        for _ in range(FLOOR_REPEATS):
            for v in variants:
                bulk = database.bulk_insert(conn, v, size)
                wall[v.name].append(bulk.seconds * 1e3)
                cpu[v.name].append((bulk.cpu_seconds or 0.0) * 1e3)
        has_cpu = all(cpu["none"])
        capture = statistics.median(cpu["d_tt"])
        for name in compared:
            own = statistics.median(cpu[name])
            print(
                f"  {size:7d} {name:<8} {statistics.median(wall[name]):9.2f} "
                + (f"{own:9.2f} {own - capture:15.2f}" if has_cpu else f"{'-':>9} {'-':>15}")
            )
        by_wall = statistics.median(
            [a / b for a, b in zip(wall["nobody"], wall["floor"], strict=True)]
        )
        line = f"  {size:7d} nobody / floor: wall {by_wall:.3f}"
        ratio = by_wall
        if has_cpu:
            ratio = statistics.median(
                [a / b for a, b in zip(cpu["nobody"], cpu["floor"], strict=True)]
            )
            extra = statistics.median(cpu["nobody"]) - statistics.median(cpu["floor"])
            line += f", cpu {ratio:.3f} ({extra * 1e3 / size:+.3f} us per row)"
        print(line)
        verdicts.append((size, ratio, "cpu" if has_cpu else "wall"))
    size, ratio, kind = verdicts[-1]
    print(
        f"  at {size} rows: {ratio:.3f}x the floor ({kind}); differences of a few per cent drown "
        "in the noise of"
    )
    print("  a busy machine here: part 6 counts instructions instead")


def counted(rows: int, options: dict[str, str], override_sql: Path | None) -> None:
    """Part 6: instructions per bulk INSERT, and the verdict on the floor."""
    compared = ("none", "d_tt", "floor", "nobody")
    variants = [database.BY_NAME.get(n) or next(p for p in PARTS if p.name == n) for n in compared]
    print()
    print(
        f"6. instructions the server executes for the bulk INSERT of {rows} rows "
        "(valgrind --tool=cachegrind,"
    )
    print("   postgres --single; warm-up excluded): the same on a busy machine as on an idle one")
    if instructions.valgrind() is None:
        print("  skipped: valgrind is not installed (Debian: apt-get install valgrind)")
        return
    counts = instructions.count(
        variants, rows, options, extra_files=(DIAGNOSE_FILE,), override_sql=override_sql
    )
    base, capture = counts["none"], counts["d_tt"]
    print(
        f"  {'variant':<8} {'instructions':>14} {'per row':>9} {'x none':>8} "
        f"{'per row above d_tt':>19}"
    )
    for name in compared:
        n = counts[name]
        print(f"  {name:<8} {n:14,d} {n / rows:9.0f} {n / base:8.4f} {(n - capture) / rows:19.1f}")
    statement = counts["nobody"] / counts["floor"]
    own = (counts["nobody"] - capture) / (counts["floor"] - capture)
    print(
        f"  nobody / floor: {statement:.4f} for the statement, {own:.4f} for the trigger's own "
        "work (above d_tt)"
    )
    if statement <= FLOOR_LIMIT:
        print(
            f"  verdict: the generated trigger is at its floor ({statement:.4f} <= {FLOOR_LIMIT}). "
            "What it adds to the insert is"
        )
        print(
            "  the transition table (d_tt) and the join of every row with the recipients, which "
            "the hand-written"
        )
        print(
            "  trigger pays too; above the join nothing sees a row (plans in 3.), and what is "
            "left is a constant per"
        )
        print("  statement (planning the query for its size, the pinned settings).")
    else:
        print(
            f"  verdict: the generated trigger costs {statement:.4f}x its floor "
            f"(target <= {FLOOR_LIMIT})"
        )


def run(
    server: Server,
    conn: psycopg.Connection,
    *,
    rows: int,
    options: dict[str, str],
    override_sql: Path | None = None,
) -> None:
    with conn.transaction():
        conn.execute(DIAGNOSE_FILE.read_text("utf-8"))  # our own file
    per_statement(conn)
    bulk_explain(conn, rows)
    trigger_plans(conn, rows)
    stickiness(server, conn, rows)
    against_floor(conn, rows)
    counted(rows, options, override_sql)
