"""Command line: start the server, run floor / dispatcher / pgqueuer round-robin, report."""

from __future__ import annotations

import argparse
import functools
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from bench.dispatch_throughput import database, machine, procs
from bench.dispatch_throughput.database import now
from bench.dispatch_throughput.pgqueuer_proc import ENTRYPOINT, driver_available
from bench.trigger_overhead.database import running_server, server_options, settings

DEFAULTS = {"rows": 20_000, "rounds": 3}
QUICK = {"rows": 2_000, "rounds": 1}

DEFAULT_BATCH = 500
"""``pushsync dispatch --batch`` unless told otherwise."""
TARGET_FLOOR = 0.8
"""The dispatcher at the default batch, against the floor."""
TARGET_PGQUEUER = 1.5
"""The dispatcher at the default batch, against pgqueuer's best configuration."""
TARGET_CPU_US = 50.0
"""The dispatcher's own CPU time per notification at the default batch, microseconds."""
TIMEOUT = 300.0
"""Seconds any one run may take before it is called failed."""


@dataclass(frozen=True, slots=True)
class PgqConfig:
    batch: int
    consumers: int

    @property
    def name(self) -> str:
        return f"pgqueuer b={self.batch} c={self.consumers}"


@dataclass(slots=True)
class Run:
    """One measurement: ``rows`` items from commit to done."""

    target: str
    rows: int
    seconds: float
    """Commit returned -> every row recorded as done in the database."""
    delivered_seconds: float
    """Commit returned -> the last datagram received / the last handler called."""
    cpu_seconds: float = 0.0
    """CPU time of the dispatcher or worker process meanwhile (0 for the floor, in-process)."""
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dispatch_throughput",
        description=(
            "Notifications/s the dispatcher delivers over UDP from a full outbox, against "
            "the floor (claim + mark only, no sending) and pgqueuer draining no-op jobs, "
            "all on one throwaway PostgreSQL server."
        ),
    )
    parser.add_argument("--rows", type=int, help=f"rows per run (default {DEFAULTS['rows']})")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"interleaved rounds, median taken (default {DEFAULTS['rounds']})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of a few seconds: --rows {rows} --rounds {rounds}".format(**QUICK),
    )
    parser.add_argument(
        "--batches",
        default="100,500,2000",
        help="dispatcher batch sizes (pushsync dispatch --batch) to run, comma-separated "
        "(default 100,500,2000; 500 is the command's default)",
    )
    parser.add_argument(
        "--floor-batch", type=int, default=500, help="rows per claim in the floor (default 500)"
    )
    parser.add_argument(
        "--pgqueuer",
        default="10x1,100x1,500x1,1000x1",
        help="pgqueuer configurations BATCHxCONSUMERS, comma-separated; the best one is "
        "compared against (default 10x1,100x1,500x1,1000x1)",
    )
    parser.add_argument(
        "--pgqueuer-durability",
        choices=("durable", "balanced", "volatile"),
        default="balanced",
        help="pgqueuer's table durability (default balanced: the queue table is logged, "
        "its log and statistics tables are not)",
    )
    parser.add_argument(
        "--pgqueuer-driver",
        choices=("asyncpg", "psycopg"),
        help="pgqueuer's driver (default asyncpg if installed, as pgqueuer's CLI does; its "
        "psycopg driver holds the connection up to 1 s while waiting for a NOTIFY)",
    )
    parser.add_argument("--uvloop", action="store_true", help="run the pgqueuer worker on uvloop")
    parser.add_argument("--devices", type=int, default=100, help="devices (default 100)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra server setting, e.g. --set synchronous_commit=on (repeatable)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards: one dispatcher run (batch 500 if measured, else the first) under "
        "cProfile, top functions",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
        args.pgqueuer = [
            PgqConfig(*(int(part) for part in item.strip().split("x", 1)))
            for item in args.pgqueuer.split(",")
            if item.strip()
        ]
    except (TypeError, ValueError):
        parser.error("--batches takes N,N,... and --pgqueuer BATCHxCONSUMERS,...")
    if args.pgqueuer_driver is None:
        args.pgqueuer_driver = "asyncpg" if driver_available("asyncpg") else "psycopg"
    elif not driver_available(args.pgqueuer_driver):
        parser.error(f"{args.pgqueuer_driver} is not installed (pip install 'pgqueuer[asyncpg]')")
    if args.rows < 1 or args.rounds < 1 or args.devices < 1:
        parser.error("--rows, --rounds and --devices must be positive")
    if not args.batches or any(b < 1 for b in args.batches):
        parser.error("--batches needs at least one positive batch size")
    if any(c.batch < 1 or c.consumers < 1 for c in args.pgqueuer):
        parser.error("--pgqueuer configurations must be positive")
    args.extra = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--set expects NAME=VALUE, not {item!r}")
        args.extra[name.strip()] = value.strip()
    return args


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the three targets


class Bench:
    def __init__(self, conn: psycopg.Connection, dsn: str, args: argparse.Namespace, tmp: Path):
        self.conn = conn
        self.dsn = dsn
        self.args = args
        self.tmp = tmp
        self.rows: int = args.rows

    def floor(self) -> Run:
        database.reset(self.conn)
        started = database.fill_outbox(self.conn, self.rows, self.args.devices)
        done = database.floor(self.conn, self.args.floor_batch, "bench-floor")
        ended = now()
        return Run(
            target=f"floor b={self.args.floor_batch}",
            rows=self.rows,
            seconds=ended - started,
            delivered_seconds=ended - started,
            notes={"claimed": done},
        )

    def dispatcher(self, batch: int, *, profile: Path | None = None) -> Run:
        database.reset(self.conn)
        receiver, port = procs.receiver("count", str(self.rows))
        try:
            database.point_devices_at(self.conn, port)
            log = self.tmp / f"dispatcher-{batch}.log"
            dispatcher = procs.dispatcher(self.dsn, batch, log, profile=profile)
            try:
                cpu_before = dispatcher.cpu()
                started = database.fill_outbox(self.conn, self.rows, self.args.devices)
                received, distinct, _first, last = receiver.expect("done", TIMEOUT)
                recorded = database.wait_until(
                    lambda: database.sent_rows(self.conn) >= self.rows, 30
                )
                cpu = dispatcher.cpu() - cpu_before
            finally:
                status = dispatcher.stop()
            text = log.read_text(errors="replace")
        finally:
            receiver.kill()
        if recorded is None:
            raise RuntimeError(f"dispatcher b={batch}: rows not all recorded as sent")
        return Run(
            target=f"dispatcher b={batch}",
            rows=self.rows,
            seconds=recorded - started,
            delivered_seconds=float(last) - started,
            cpu_seconds=cpu,
            notes={
                "datagrams": int(received),
                "distinct": int(distinct),
                "exit_status": status,
                "tracebacks": text.count("Traceback"),
                "warnings": text.count("lost the lease") + text.count("not sent, will retry"),
            },
        )

    def pgqueuer(self, config: PgqConfig) -> Run:
        database.reset(self.conn)
        log = self.tmp / f"pgqueuer-{config.batch}x{config.consumers}.log"
        worker = procs.pgqueuer_worker(
            self.dsn,
            "count",
            str(self.rows),
            batch=config.batch,
            consumers=config.consumers,
            driver=self.args.pgqueuer_driver,
            uvloop=self.args.uvloop,
            log=log,
        )
        try:
            cpu_before = worker.cpu()
            started = database.enqueue_jobs(self.dsn, self.rows, ENTRYPOINT)
            seen, _first, last = worker.expect("done", TIMEOUT)
            recorded = database.wait_until(lambda: database.queued_jobs(self.conn) == 0, 30)
            cpu = worker.cpu() - cpu_before
        finally:
            status = worker.stop()
        if recorded is None:
            raise RuntimeError(f"{config.name}: jobs still queued after the last handler ran")
        return Run(
            target=config.name,
            rows=self.rows,
            seconds=recorded - started,
            delivered_seconds=float(last) - started,
            cpu_seconds=cpu,
            notes={"handled": int(seen), "exit_status": status},
        )


# --------------------------------------------------------------------------- report


def summarise(runs: list[Run]) -> list[dict[str, object]]:
    by_target: dict[str, list[Run]] = {}
    for run in runs:
        by_target.setdefault(run.target, []).append(run)
    rows: list[dict[str, object]] = []
    for target, group in by_target.items():
        rows.append(
            {
                "target": target,
                "rows": group[0].rows,
                "rounds": len(group),
                "rate": statistics.median(r.rate for r in group),
                "rates": [round(r.rate, 1) for r in group],
                "delivered_rate": statistics.median(r.rows / r.delivered_seconds for r in group),
                "cpu_share": statistics.median(r.cpu_seconds / r.seconds for r in group),
                "cpu_us": statistics.median(r.cpu_seconds / r.rows * 1e6 for r in group),
            }
        )
    return rows


def verdicts(rows: list[dict[str, object]]) -> dict[str, object]:
    """The targets, as ratios of this run's figures: the dispatcher at the default batch
    (else its best batch, said so) against the floor and against pgqueuer's best."""

    def rate(row: dict[str, object]) -> float:
        return float(row["rate"])  # type: ignore[arg-type]

    floor = next(r for r in rows if str(r["target"]).startswith("floor"))
    dispatchers = [r for r in rows if str(r["target"]).startswith("dispatcher")]
    queues = [r for r in rows if str(r["target"]).startswith("pgqueuer")]
    best = max(dispatchers, key=rate)
    shipped = next((r for r in dispatchers if r["target"] == f"dispatcher b={DEFAULT_BATCH}"), None)
    judged = shipped if shipped is not None else best
    cpu_us = float(judged["cpu_us"])  # type: ignore[arg-type]
    result: dict[str, object] = {
        "dispatcher": judged["target"],
        "dispatcher_rate": rate(judged),
        "best_dispatcher": best["target"],
        "best_dispatcher_rate": rate(best),
        "floor_rate": rate(floor),
        "dispatcher_vs_floor": rate(judged) / rate(floor),
        "cpu_us_per_notification": cpu_us,
        "pass_cpu": cpu_us <= TARGET_CPU_US,
    }
    result["pass_floor"] = rate(judged) / rate(floor) >= TARGET_FLOOR
    if queues:
        top = max(queues, key=rate)
        result["pgqueuer"] = top["target"]
        result["pgqueuer_rate"] = rate(top)
        result["dispatcher_vs_pgqueuer"] = rate(judged) / rate(top)
        result["pass_pgqueuer"] = rate(judged) / rate(top) >= TARGET_PGQUEUER
        result["pgqueuer_cpu_us"] = float(top["cpu_us"])  # type: ignore[arg-type]
    return result


def print_report(rows: list[dict[str, object]], result: dict[str, object]) -> None:
    print()
    header = (
        f"{'target':<24} {'rows':>6} {'rounds':>6} {'notif/s':>9} {'delivered/s':>11} "
        f"{'CPU':>5} {'µs/notif':>8}  per round"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rates = ", ".join(f"{r:,.0f}" for r in row["rates"])  # type: ignore[attr-defined]
        cpu = f"{row['cpu_us']:>8.0f}" if row["cpu_us"] else f"{'-':>8}"
        print(
            f"{row['target']!s:<24} {row['rows']!s:>6} "
            f"{row['rounds']!s:>6} {row['rate']:>9,.0f} {row['delivered_rate']:>11,.0f} "
            f"{row['cpu_share']:>5.0%} {cpu}  {rates}"
        )
    print()
    judged = f"{result['dispatcher']} {result['dispatcher_rate']:,.0f}"
    if result["dispatcher"] != f"dispatcher b={DEFAULT_BATCH}":
        judged += f" (the default batch {DEFAULT_BATCH} was not run)"
    verdict(
        "dispatcher/floor",
        float(result["dispatcher_vs_floor"]),  # type: ignore[arg-type]
        ">=",
        TARGET_FLOOR,
        f"{judged} / floor {result['floor_rate']:,.0f}",
    )
    if "pgqueuer" in result:
        verdict(
            "dispatcher/pgqueuer",
            float(result["dispatcher_vs_pgqueuer"]),  # type: ignore[arg-type]
            ">=",
            TARGET_PGQUEUER,
            f"{judged} / {result['pgqueuer']} {result['pgqueuer_rate']:,.0f}, its best",
        )
    cpu_note = f"{result['dispatcher']}'s own CPU time / rows"
    if "pgqueuer_cpu_us" in result:
        cpu_note += f"; {result['pgqueuer']}: {result['pgqueuer_cpu_us']:.0f} µs"
    verdict(
        "dispatcher CPU µs/notif",
        float(result["cpu_us_per_notification"]),  # type: ignore[arg-type]
        "<=",
        TARGET_CPU_US,
        cpu_note,
    )
    if result["best_dispatcher"] != result["dispatcher"]:
        print(
            f"(best batch: {result['best_dispatcher']} {result['best_dispatcher_rate']:,.0f} "
            f"notif/s, {float(result['best_dispatcher_rate']) / float(result['floor_rate']):.2f} "  # type: ignore[arg-type]
            "of the floor)"
        )


def verdict(label: str, value: float, op: str, limit: float, detail: str) -> None:
    passed = value >= limit if op == ">=" else value <= limit
    print(
        f"{label:<24} {value:7.2f}, target {op} {limit:g}: {'PASS' if passed else 'FAIL'}  "
        f"({detail})"
    )


def print_profile(path: Path, top: int = 30) -> None:
    print()
    print(f"cProfile of the dispatcher process ({path.name}), by own time:")
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    print("by cumulative time:")
    stats.sort_stats("cumulative").print_stats(top)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = server_options(fsync=True, extra=args.extra)
    wall = time.monotonic()
    runs: list[Run] = []
    with (
        running_server(options) as server,
        server.connect() as conn,
        tempfile.TemporaryDirectory(prefix="dispatch-throughput-") as tmpdir,
    ):
        dsn = database.dsn(server, "bench")
        database.prepare(conn, args.devices)
        database.install_pgqueuer(dsn, args.pgqueuer_durability)
        shown = settings(conn)
        found = machine.facts(conn)
        print("pushsync dispatch-throughput benchmark")
        print(f"machine: {machine.describe(found)}; python {sys.version.split()[0]}")
        print("server: " + " ".join(f"{k}={v}" for k, v in shown.items()))
        print(
            f"run: --rows {args.rows} --rounds {args.rounds} --devices {args.devices}; "
            f"dispatcher batches {','.join(map(str, args.batches))}; floor batch "
            f"{args.floor_batch}; pgqueuer "
            + ", ".join(f"{c.batch}x{c.consumers}" for c in args.pgqueuer)
            + f" (durability {args.pgqueuer_durability}, "
            f"{'uvloop' if args.uvloop else 'asyncio'} loop, {args.pgqueuer_driver} driver)"
        )
        bench = Bench(conn, dsn, args, Path(tmpdir))
        progress("warm-up: one untimed run of the floor, the dispatcher and pgqueuer")
        bench.floor()
        bench.dispatcher(args.batches[0])
        if args.pgqueuer:
            bench.pgqueuer(args.pgqueuer[-1])
        for number in range(1, args.rounds + 1):
            plan: list[Callable[[], Run]] = [
                bench.floor,
                *(functools.partial(bench.dispatcher, b) for b in args.batches),
                *(functools.partial(bench.pgqueuer, c) for c in args.pgqueuer),
            ]
            for measure in plan:
                run = measure()
                runs.append(run)
                print(
                    f"  round {number} {run.target:<22} {run.rate:>9,.0f} notif/s "
                    f"({run.rows} in {run.seconds:.3f} s, last delivered at "
                    f"{run.delivered_seconds:.3f} s, CPU {run.cpu_seconds:.2f} s) {run.notes}",
                    flush=True,
                )
        rows = summarise(runs)
        result = verdicts(rows)
        print_report(rows, result)
        if args.profile:
            profile = Path(tmpdir) / "dispatcher.prof"
            batch = DEFAULT_BATCH if DEFAULT_BATCH in args.batches else args.batches[0]
            run = bench.dispatcher(batch, profile=profile)
            print(
                f"\nprofiled run, batch {batch}: {run.rate:,.0f} notif/s (cProfile slows it down)"
            )
            print_profile(profile)
    print(f"\n(total wall time {time.monotonic() - wall:.0f} s)")
    if args.json is not None:
        data = {
            "settings": {
                "rows": args.rows,
                "rounds": args.rounds,
                "devices": args.devices,
                "batches": args.batches,
                "floor_batch": args.floor_batch,
                "pgqueuer": [asdict(c) for c in args.pgqueuer],
                "pgqueuer_durability": args.pgqueuer_durability,
                "uvloop": args.uvloop,
                "pgqueuer_driver": args.pgqueuer_driver,
                "server": shown,
                "machine": found,
            },
            "targets": {
                "floor": TARGET_FLOOR,
                "pgqueuer": TARGET_PGQUEUER,
                "cpu_us": TARGET_CPU_US,
            },
            "summary": rows,
            "verdicts": result,
            "runs": [asdict(r) | {"rate": r.rate} for r in runs],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    return 0
