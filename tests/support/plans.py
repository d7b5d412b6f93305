"""Plans of batch statements, run for real (EXPLAIN ANALYZE): how many rows each
part read, which tells a plan that costs milliseconds from one that costs seconds
whatever the machine.

A batch statement joins the outbox with its batch (an ``unnest`` of arrays, or a
CTE). Planned on statistics that guess ten rows for the batch, or a nearly empty
outbox, a nested loop may put the batch on its inner side and read it again for
every outbox row: thousands of rows times a batch of hundreds. Tests bound the
rows every part of the plan read (returned or filtered out, in all its runs) by
the batch's size, not the time it took.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg import sql

LOOPS = re.compile(r"loops=(\d+)")
NODE = re.compile(r"\(actual time=[\d.]+\.\.[\d.]+ rows=(\d+) loops=(\d+)\)")
REMOVED = re.compile(r"Rows Removed by (?:Join )?Filter: (\d+)")


def placeholders(statement: str) -> list[str]:
    """The names of ``%(name)s`` placeholders in the order of their first use ($1, $2…)."""
    return list(dict.fromkeys(re.findall(r"%\((\w+)\)s", statement)))


def run_plan(
    conn: psycopg.Connection[Any], statement: str, params: dict[str, Any], *, generic: bool
) -> list[str]:
    """EXPLAIN ANALYZE of ``statement`` with ``params``, in a transaction rolled back:
    planned for its parameters (as an unprepared statement is), or ``generic`` (as a
    statement psycopg has prepared, after its first runs). ``conn`` must be autocommit."""
    with conn.transaction(force_rollback=True):
        if not generic:
            explain = sql.SQL("EXPLAIN ANALYZE ") + sql.SQL(statement)
            return [row[0] for row in conn.execute(explain, params)]
        names = placeholders(statement)
        numbered = re.sub(
            r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", statement
        ).replace("%%", "%")
        conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        conn.execute(sql.SQL("PREPARE pushsync_plan AS ") + sql.SQL(numbered))
        try:
            explain = sql.SQL("EXPLAIN ANALYZE EXECUTE pushsync_plan({})").format(
                sql.SQL(", ").join(sql.Literal(params[name]) for name in names)
            )
            return [row[0] for row in conn.execute(explain)]
        finally:
            conn.execute("DEALLOCATE pushsync_plan")


def most_loops(plan: list[str]) -> int:
    """The most times any part of ``plan`` ran."""
    return max((int(n) for line in plan for n in LOOPS.findall(line)), default=0)


def most_rows(plan: list[str]) -> int:
    """The most rows any part of ``plan`` read in all its runs: returned, or removed by
    its filter or join filter. EXPLAIN gives both per run; each is multiplied by the
    runs of its part. A join that compares every row of one side with every row of the
    other shows here, while its loops stay within the batch."""
    most = 0
    loops = 1
    for line in plan:
        if node := NODE.search(line):
            rows, loops = int(node.group(1)), int(node.group(2))
            most = max(most, rows * loops)
        elif removed := REMOVED.search(line):
            most = max(most, int(removed.group(1)) * loops)
    return most
