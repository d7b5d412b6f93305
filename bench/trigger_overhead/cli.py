"""Command line: start the server, set up, measure round-robin, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from bench.trigger_overhead import database, machine, report
from bench.trigger_overhead.database import (
    EXPECTED_SINGLE,
    VARIANTS,
    Pgbench,
    Server,
    Setup,
)

DEFAULTS = {"rounds": 7, "seconds": 4, "rows": 100_000}
QUICK = {"rounds": 2, "seconds": 1, "rows": 20_000}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trigger_overhead",
        description=(
            "Overhead of pushsync's generated triggers on single-row (pgbench) and bulk "
            "INSERTs, as ratios against a table without trigger on the same server."
        ),
    )
    parser.add_argument(
        "--rounds", type=int, help=f"interleaved rounds (default {DEFAULTS['rounds']})"
    )
    parser.add_argument(
        "--seconds", type=int, help=f"pgbench -T per run (default {DEFAULTS['seconds']})"
    )
    parser.add_argument(
        "--rows", type=int, help=f"rows of the bulk INSERT (default {DEFAULTS['rows']})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="about 30 s: --rounds {rounds} --seconds {seconds} --rows {rows}".format(**QUICK),
    )
    parser.add_argument("--clients", type=int, default=2, help="pgbench -c (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="pgbench -j (default 2)")
    parser.add_argument(
        "--protocol",
        choices=("simple", "extended", "prepared"),
        default="simple",
        help="pgbench -M (default simple)",
    )
    parser.add_argument("--fsync-off", action="store_true", help="run the server with fsync=off")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server setting, e.g. --set jit=off (repeatable)",
    )
    parser.add_argument(
        "--override-sql",
        type=Path,
        help="SQL applied after the generated migration, e.g. a hand-edited trigger function",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also save the results here")
    parser.add_argument(
        "--dump-sql", type=Path, metavar="FILE", help="write the compiled rules SQL here"
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="instead of the benchmark: per-statement costs, EXPLAIN ANALYZE, trigger plans",
    )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.rounds < 1 or args.seconds < 1 or args.rows < 1:
        parser.error("--rounds, --seconds and --rows must be positive")
    return args


def _extra_settings(items: list[str]) -> dict[str, str]:
    extra: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"--set expects NAME=VALUE, not {item!r}")
        extra[name.strip()] = value.strip()
    return extra


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_setup(conn: psycopg.Connection, setup: Setup) -> None:
    print(f"rules: {database.RULES_FILE.name}, {setup.rule_count} rules compiled by the generator")
    print(f"  compiled SQL sha256 {setup.rules_sha256[:16]}, {len(setup.rules_sql)} chars")
    print("variants (one table each, identical columns; triggers found on the table):")
    for v in VARIANTS:
        found = ", ".join(database.triggers_on(conn, v)) or "-"
        print(f"  {v.name:<9} bench.{v.table:<16} {v.description}; {found}")
    print("sanity, one single-row INSERT (outbox rows, event rows):")
    bad = []
    for v in VARIANTS:
        got = database.sanity_single(conn, v)
        ok = got == EXPECTED_SINGLE[v.name]
        bad += [] if ok else [v.name]
        print(f"  {v.name:<9} {got}  expected {EXPECTED_SINGLE[v.name]}  {'ok' if ok else 'WRONG'}")
    if bad:
        raise SystemExit(f"setup is wrong for {', '.join(bad)}; not benchmarking")


def warm_up(conn: psycopg.Connection, pgbench: Pgbench, setup: Setup, rows: int) -> None:
    """One untimed bulk run and a 1-second pgbench per variant; checks what was written."""
    expected_devices = database.count(
        conn,
        "SELECT count(DISTINCT device_id) FROM bench.watchers WHERE account_id <= %s",
        min(rows, setup.accounts),
    )
    print("sanity, after one bulk INSERT (outbox rows, event rows):")
    for v in VARIANTS:
        database.bulk_insert(conn, v, rows)
        got = (database.outbox_rows(conn), database.event_rows(conn))
        want = {"match4": (expected_devices, 0), "rowlevel": (0, rows)}.get(v.name, (0, 0))
        status = "ok" if got == want else "WRONG"
        print(f"  {v.name:<9} {got}  expected {want}  {status}")
        if got != want:
            raise SystemExit(f"bulk setup is wrong for {v.name}; not benchmarking")
    short = dataclasses.replace(pgbench, seconds=1)
    for v in VARIANTS:
        short.run(conn, v, setup.accounts)


def measure(
    conn: psycopg.Connection, pgbench: Pgbench, setup: Setup, rounds: int, rows: int
) -> report.Results:
    res = report.Results()
    for number in range(1, rounds + 1):
        for v in VARIANTS:
            result = pgbench.run(conn, v, setup.accounts)
            res.pgbench.setdefault(v.name, []).append(result)
            progress(f"round {number}/{rounds} pgbench {v.name:<9} {result.tps:9.1f} tps")
        for v in VARIANTS:
            bulk = database.bulk_insert(conn, v, rows)
            res.bulk.setdefault(v.name, []).append(bulk.seconds)
            if bulk.cpu_seconds is not None:
                res.bulk_cpu.setdefault(v.name, []).append(bulk.cpu_seconds)
            progress(f"round {number}/{rounds} bulk    {v.name:<9} {bulk.seconds:9.4f} s")
    return res


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = database.server_options(fsync=not args.fsync_off, extra=_extra_settings(args.set))
    started = time.monotonic()
    with (
        database.running_server(options) as server,
        server.connect() as conn,
        tempfile.TemporaryDirectory(prefix="pushsync-bench-") as scripts,
    ):
        facts = machine.measure(conn)
        setup = database.prepare(conn, args.override_sql)
        if args.dump_sql is not None:
            args.dump_sql.write_text(setup.rules_sql, "utf-8")
        shown = database.settings(conn)
        _print_header(server, options, shown, args, facts)
        check_setup(conn, setup)
        if args.override_sql is not None:
            print(f"NOTE: {args.override_sql} was applied after the generated migration")
        if args.diagnose:
            from bench.trigger_overhead import diagnose

            diagnose.run(
                server, conn, rows=args.rows, options=options, override_sql=args.override_sql
            )
            return 0
        pgbench = Pgbench(
            server=server,
            script_dir=Path(scripts),
            clients=args.clients,
            threads=args.threads,
            seconds=args.seconds,
            protocol=args.protocol,
        )
        warm_up(conn, pgbench, setup, args.rows)
        res = measure(conn, pgbench, setup, args.rounds, args.rows)
    elapsed = time.monotonic() - started
    text = report.render(
        res, rounds=args.rounds, rows=args.rows, pgbench_command=pgbench.describe()
    )
    print(text)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n(total wall time {elapsed:.0f} s; load average at the end {load})")
    if args.json is not None:
        meta = {
            "rounds": args.rounds,
            "seconds": args.seconds,
            "rows": args.rows,
            "clients": args.clients,
            "threads": args.threads,
            "protocol": args.protocol,
            "pgbench_command": pgbench.describe(),
            "server_options": options,
            "override_sql": str(args.override_sql) if args.override_sql else None,
            "rules_sql_sha256": setup.rules_sha256,
            "wall_seconds": elapsed,
            "machine": facts.to_json(),
        }
        data = report.to_json(res, meta=meta, settings=shown)
        args.json.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
        print(f"results saved to {args.json}")
    return 0


def _print_header(
    server: Server,
    options: dict[str, str],
    shown: dict[str, str],
    args: argparse.Namespace,
    facts: machine.Facts,
) -> None:
    print("pushsync trigger-overhead benchmark")
    for line in facts.lines():
        print(line)
    print(f"server: {server.bindir}/postgres on {server.host}:{server.port}")
    print("  started with: " + " ".join(f"{k}={v}" for k, v in options.items()))
    print("  in effect:    " + " ".join(f"{k}={v}" for k, v in shown.items()))
    print(
        f"run: --rounds {args.rounds} --seconds {args.seconds} --rows {args.rows} "
        f"(pgbench -c {args.clients} -j {args.threads} -M {args.protocol})"
    )
