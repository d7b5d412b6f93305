"""Command line: start the server, pace commits through each path, pair them, report."""

from __future__ import annotations

import argparse
import json
import math
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg
from pgqueuer.db import SyncPsycopgDriver
from pgqueuer.queries import SyncQueries

from bench.dispatch_throughput import database, machine, procs
from bench.dispatch_throughput.database import now
from bench.dispatch_throughput.pgqueuer_proc import ENTRYPOINT, driver_available
from bench.trigger_overhead.database import running_server, server_options, settings
from pushsync import generator, schema
from pushsync.wire import protocol

HERE = Path(__file__).resolve().parent
RULES_FILE = HERE / "rules.yaml"
SCHEMA_FILE = HERE / "schema.sql"
DEVICE_PREFIX = "lat-"
ACCOUNTS = 1000
FLOOR_CHANNEL = "bench_floor"
PATHS = ("floor", "relay", "dispatcher", "pgqueuer")

TARGET_P99_MS = 5.0

INSERT_ORDER = "INSERT INTO bench.orders (account_id, status) VALUES (%s, 'open') RETURNING id"
INSERT_FLOOR = (
    "WITH i AS (INSERT INTO bench.orders_plain (account_id, status) VALUES (%s, 'open') "  # noqa: S608  constants; the value is a parameter
    "RETURNING id) "
    f"SELECT id, pg_notify('{FLOOR_CHANNEL}', id::text) FROM i"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dispatch_latency",
        description=(
            "Latency from a committed INSERT to the notification's arrival, at a steady rate: "
            "trigger -> dispatcher -> UDP datagram, against a bare INSERT + pg_notify seen by "
            "a LISTEN loop (the floor) and pgqueuer's commit -> handler, on one server."
        ),
    )
    parser.add_argument(
        "--seconds", type=float, help="measured seconds per path (default 30; --quick: 3)"
    )
    parser.add_argument("--rate", type=float, default=200.0, help="commits/s (default 200)")
    parser.add_argument(
        "--warmup",
        type=float,
        help="seconds of commits sent first and left out of the figures (default 2; --quick: 0.5)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="split each path's seconds into this many interleaved rounds, each with fresh "
        "processes and its own warm-up; samples pooled (default 3; --quick: 1)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: --seconds 3 --rounds 1")
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help="which paths to measure, comma-separated (default floor,relay,dispatcher,pgqueuer)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=500,
        help="pushsync dispatch --batch (default 500, the command's default)",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=100,
        help="registered devices (default 100); every order notifies one of the first 1000",
    )
    parser.add_argument(
        "--pgqueuer-batch", type=int, default=10, help="pgqueuer batch_size (default 10)"
    )
    parser.add_argument(
        "--pgqueuer-driver",
        choices=("asyncpg", "psycopg"),
        help="pgqueuer's driver (default asyncpg if installed, as pgqueuer's CLI does)",
    )
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
        help="afterwards: one more dispatcher round under cProfile, top functions",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 30.0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.warmup is None:
        args.warmup = 0.5 if args.quick else 2.0
    args.paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for path in args.paths:
        if path not in PATHS:
            parser.error(f"unknown path {path!r}; choose from {', '.join(PATHS)}")
    if min(args.seconds, args.rate, args.batch, args.rounds, args.devices) <= 0 or args.warmup < 0:
        parser.error("--seconds, --rate, --batch, --rounds, --devices must be positive")
    if args.pgqueuer_driver is None:
        args.pgqueuer_driver = "asyncpg" if driver_available("asyncpg") else "psycopg"
    elif not driver_available(args.pgqueuer_driver):
        parser.error(f"{args.pgqueuer_driver} is not installed (pip install 'pgqueuer[asyncpg]')")
    args.extra = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--set expects NAME=VALUE, not {item!r}")
        args.extra[name.strip()] = value.strip()
    return args


# --------------------------------------------------------------------------- measurements


@dataclass(slots=True)
class PathResult:
    path: str
    sent: int
    """Commits made, warm-up included."""
    measured: int
    """Commits after the warm-up: the ones the figures are about."""
    received: int
    """Of the measured, how many arrived."""
    latencies_ms: list[float] = field(repr=False)
    """Per measured commit that arrived: commit returned (to the client) -> arrival."""
    from_sent_ms: list[float] = field(repr=False)
    """The same, from the moment the INSERT was sent (so including the INSERT and commit)."""
    notes: dict[str, float] = field(default_factory=dict)

    def summary(self, *, from_sent: bool = False) -> dict[str, float]:
        values = sorted(self.from_sent_ms if from_sent else self.latencies_ms)
        if not values:
            return dict.fromkeys(("min", "p50", "p90", "p99", "max"), math.nan)
        return {
            "min": values[0],
            "p50": percentile(values, 50),
            "p90": percentile(values, 90),
            "p99": percentile(values, 99),
            "max": values[-1],
        }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of sorted ``ordered``."""
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


@dataclass(frozen=True, slots=True)
class Commit:
    key: str
    sent: float
    """Just before the INSERT (autocommit: INSERT and commit) was sent."""
    returned: float
    """Just after it returned: the commit is done."""


def pace(rate: float, seconds: float, fire: Callable[[int], str]) -> list[Commit]:
    """Call ``fire(i)`` at ``rate``/s for ``seconds``; each call's key and times, in order.

    Each call is scheduled at ``start + i / rate``; a late call is not made up
    for by a burst, the next one simply follows at its own time.
    """
    count = max(1, round(rate * seconds))
    start = now() + 0.05
    done: list[Commit] = []
    for i in range(count):
        delay = start + i / rate - now()
        if delay > 0:
            time.sleep(delay)
        sent = now()
        key = fire(i)
        done.append(Commit(key, sent, now()))
    return done


def read_arrivals(path: Path) -> list[tuple[float, str]]:
    """``TIME REST`` lines as (time, rest)."""
    arrivals = []
    for line in path.read_text("ascii").splitlines():
        stamp, _, rest = line.partition(" ")
        arrivals.append((float(stamp), rest))
    return arrivals


def pair(
    path: str,
    commits: list[Commit],
    arrivals: dict[str, float],
    warmup_count: int,
    notes: dict[str, float],
) -> PathResult:
    measured = [c for c in commits[warmup_count:] if c.key in arrivals]
    return PathResult(
        path=path,
        sent=len(commits),
        measured=len(commits) - warmup_count,
        received=len(measured),
        latencies_ms=[(arrivals[c.key] - c.returned) * 1000 for c in measured],
        from_sent_ms=[(arrivals[c.key] - c.sent) * 1000 for c in measured],
        notes=notes,
    )


def merge(a: PathResult, b: PathResult) -> PathResult:
    """Two rounds of one path as one: samples pooled, counts and seconds added."""
    notes = {k: a.notes.get(k, 0.0) + b.notes.get(k, 0.0) for k in {*a.notes, *b.notes}}
    return PathResult(
        path=a.path,
        sent=a.sent + b.sent,
        measured=a.measured + b.measured,
        received=a.received + b.received,
        latencies_ms=a.latencies_ms + b.latencies_ms,
        from_sent_ms=a.from_sent_ms + b.from_sent_ms,
        notes=notes,
    )


def account(i: int) -> int:
    return 1 + i % ACCOUNTS


class Bench:
    def __init__(self, conn: psycopg.Connection, dsn: str, args: argparse.Namespace, tmp: Path):
        self.conn = conn
        self.dsn = dsn
        self.args = args
        self.tmp = tmp
        self.warmup_count = round(args.rate * args.warmup)

    def _run(self, fire: Callable[[int], str]) -> list[Commit]:
        seconds = self.args.warmup + self.args.seconds / self.args.rounds
        return pace(self.args.rate, seconds, fire)

    def floor(self) -> PathResult:
        file = self.tmp / "floor.txt"
        listener = procs.Proc(
            [
                sys.executable,
                "-m",
                "bench.dispatch_latency.listen_floor",
                self.dsn,
                FLOOR_CHANNEL,
                str(file),
            ],
            "LISTEN loop",
            self.tmp / "floor.log",
        )
        try:
            listener.expect("ready", 60)

            def fire(i: int) -> str:
                row = self.conn.execute(INSERT_FLOOR, (account(i),)).fetchone()
                assert row is not None
                return str(row[0])

            commits = self._run(fire)
            time.sleep(0.5)
        finally:
            listener.stop()
        listener.expect("done", 30)
        arrivals: dict[str, float] = {}
        for stamp, payload in read_arrivals(file):
            arrivals.setdefault(payload, stamp)
        return pair("floor", commits, arrivals, self.warmup_count, {})

    def dispatcher(self, profile: Path | None = None) -> PathResult:
        log = self.tmp / "dispatcher.log"
        return self._udp_path(
            "dispatcher", lambda: procs.dispatcher(self.dsn, self.args.batch, log, profile=profile)
        )

    def relay(self) -> PathResult:
        def start() -> procs.Proc:
            argv = [sys.executable, "-m", "bench.dispatch_latency.bare_relay", self.dsn]
            proc = procs.Proc(argv, "bare relay", self.tmp / "relay.log")
            proc.expect("ready", 60)
            return proc

        return self._udp_path("relay", start)

    def _udp_path(self, name: str, start: Callable[[], procs.Proc]) -> PathResult:
        """INSERT into the watched table -> trigger -> ``start()``'s process -> UDP receiver."""
        self.conn.execute("TRUNCATE pushsync.outbox, pushsync.outbox_history")
        file = self.tmp / f"{name}-datagrams.txt"
        receiver, port = procs.receiver("record", str(file))
        try:
            database.point_devices_at(self.conn, port)
            relay = start()
            try:
                cpu_before, wall_before = relay.cpu(), now()

                def fire(i: int) -> str:
                    row = self.conn.execute(INSERT_ORDER, (account(i),)).fetchone()
                    assert row is not None
                    return str(row[0])

                commits = self._run(fire)
                sent = database.wait_until(
                    lambda: database.sent_rows(self.conn) >= len(commits), 30
                )
                cpu_seconds, wall_seconds = relay.cpu() - cpu_before, now() - wall_before
            finally:
                relay.stop()
            text = relay.log.read_text(errors="replace") if relay.log else ""
        finally:
            receiver.stop()
        receiver.expect("done", 30)
        arrivals: dict[str, float] = {}
        bad = 0
        for stamp, hexdata in read_arrivals(file):
            data = bytes.fromhex(hexdata)
            try:
                message = protocol.decode_message(
                    data, database.secret_of(protocol.peek_device(data)), time.time()
                )
            except protocol.ProtocolError:
                bad += 1
                continue
            arrivals.setdefault(message.content.removeprefix("order "), stamp)
        notes = {
            "not_all_recorded": float(sent is None),
            "bad_datagrams": float(bad),
            "tracebacks": float(text.count("Traceback")),
            "cpu_seconds": round(cpu_seconds, 3),
            "wall_seconds": round(wall_seconds, 3),
        }
        return pair(name, commits, arrivals, self.warmup_count, notes)

    def pgqueuer(self) -> PathResult:
        self.conn.execute("TRUNCATE pgqueuer, pgqueuer_log, pgqueuer_statistics")
        file = self.tmp / "jobs.txt"
        worker = procs.pgqueuer_worker(
            self.dsn,
            "record",
            str(file),
            batch=self.args.pgqueuer_batch,
            consumers=1,
            driver=self.args.pgqueuer_driver,
            uvloop=False,
            log=self.tmp / "pgqueuer.log",
        )
        try:
            queries = SyncQueries(SyncPsycopgDriver(self.conn))

            def fire(i: int) -> str:
                queries.enqueue(ENTRYPOINT, str(i).encode())
                return str(i)

            commits = self._run(fire)
            time.sleep(0.5)
        finally:
            worker.stop()
        worker.expect("done", 30)
        arrivals: dict[str, float] = {}
        for stamp, payload in read_arrivals(file):
            arrivals.setdefault(payload, stamp)
        return pair("pgqueuer", commits, arrivals, self.warmup_count, {})


# --------------------------------------------------------------------------- set-up and report


def prepare(conn: psycopg.Connection, dsn: str, devices: int) -> None:
    """Schema, devices, the app's tables and watchers, the compiled rules, pgqueuer."""
    schema.migrate(conn)
    database.add_devices(conn, DEVICE_PREFIX, devices)
    with conn.transaction():
        conn.execute(SCHEMA_FILE.read_text("utf-8"))  # our own file
        conn.execute(
            "INSERT INTO bench.watchers (account_id, device_id) "
            "SELECT a, %(prefix)s || (a %% %(devices)s) FROM generate_series(1, %(accounts)s) AS a",
            {"prefix": DEVICE_PREFIX, "devices": devices, "accounts": ACCOUNTS},
        )
    rules = generator.load(RULES_FILE)
    schema.migrate(conn, generator.compile_rules(rules, "bench/dispatch_latency/rules.yaml"))
    conn.execute("ANALYZE")
    database.install_pgqueuer(dsn, "balanced")


Target = tuple[str, float, str, float, bool]
"""(what, value, comparison, limit, passed)"""


def verdicts(results: dict[str, PathResult]) -> list[Target]:
    """The targets the measured paths allow.

    Both from commit returned: the dispatcher's p50 below pgqueuer's, its p99
    at most :data:`TARGET_P99_MS`. The floor and the bare relay are printed for
    reference (README: no relay can come near the floor).
    """
    found: list[Target] = []
    if "dispatcher" not in results:
        return found
    mine = results["dispatcher"].summary()
    if "pgqueuer" in results:
        ratio = mine["p50"] / results["pgqueuer"].summary()["p50"]
        found.append(("p50 dispatcher / pgqueuer", ratio, "<", 1.0, ratio < 1.0))
    p99 = mine["p99"]
    found.append(("p99 dispatcher, ms", p99, "<=", TARGET_P99_MS, p99 <= TARGET_P99_MS))
    return found


def print_table(results: dict[str, PathResult], *, from_sent: bool) -> None:
    header = (
        f"{'path':<11} {'measured':>8} {'received':>8} {'min ms':>7} {'p50 ms':>7} "
        f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7}"
    )
    print(header)
    print("-" * len(header))
    for result in results.values():
        s = result.summary(from_sent=from_sent)
        print(
            f"{result.path:<11} {result.measured:>8} {result.received:>8} {s['min']:>7.3f} "
            f"{s['p50']:>7.3f} {s['p90']:>7.3f} {s['p99']:>7.3f} {s['max']:>7.3f}"
        )


def print_report(results: dict[str, PathResult], targets: list[Target]) -> None:
    print()
    print("latency from commit returned (to the inserting client) to arrival:")
    print_table(results, from_sent=False)
    print()
    print("latency from INSERT sent (autocommit: INSERT + commit) to arrival:")
    print_table(results, from_sent=True)
    print()
    for label, value, op, limit, passed in targets:
        print(f"{label:<31} {value:7.2f}, target {op} {limit:g}: {'PASS' if passed else 'FAIL'}")
    if "dispatcher" in results and "relay" in results:
        ratio = results["dispatcher"].summary()["p50"] / results["relay"].summary()["p50"]
        print(f"{'p50 dispatcher / bare relay':<31} {ratio:7.2f} (for reference, no target)")
    if "dispatcher" in results and "floor" in results:
        ratio = (
            results["dispatcher"].summary(from_sent=True)["p50"]
            / results["floor"].summary(from_sent=True)["p50"]
        )
        print(f"{'p50 dispatcher / floor (sent)':<31} {ratio:7.2f} (for reference, no target)")
    for result in results.values():
        if result.notes:
            notes = result.notes
            share = notes["cpu_seconds"] / notes["wall_seconds"] if notes["wall_seconds"] else 0
            print(
                f"{result.path}: CPU {share:.1%} of one core; datagrams failing verification "
                f"{notes['bad_datagrams']:g}; rounds with rows not recorded as sent "
                f"{notes['not_all_recorded']:g}; tracebacks logged {notes['tracebacks']:g}"
            )


def print_profile(path: Path, top: int = 25) -> None:
    print(f"cProfile of the dispatcher process ({path.name}):")
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = server_options(fsync=True, extra=args.extra)
    wall = time.monotonic()
    results: dict[str, PathResult] = {}
    with (
        running_server(options) as server,
        server.connect() as conn,
        tempfile.TemporaryDirectory(prefix="dispatch-latency-") as tmpdir,
    ):
        dsn = database.dsn(server, "bench")
        prepare(conn, dsn, args.devices)
        shown = settings(conn)
        found = machine.facts(conn)
        print("pushsync dispatch-latency benchmark")
        print(f"machine: {machine.describe(found)}; python {sys.version.split()[0]}")
        print("server: " + " ".join(f"{k}={v}" for k, v in shown.items()))
        print(
            f"run: {args.rate:g} commits/s for {args.seconds:g} s per path in {args.rounds} "
            f"round(s), each after {args.warmup:g} s of warm-up; {args.devices} devices; paths "
            f"{','.join(args.paths)}; dispatcher batch "
            f"{args.batch}; pgqueuer batch {args.pgqueuer_batch}, {args.pgqueuer_driver} driver"
        )
        bench = Bench(conn, dsn, args, Path(tmpdir))
        runners: dict[str, Callable[[], PathResult]] = {
            "floor": bench.floor,
            "relay": bench.relay,
            "dispatcher": bench.dispatcher,
            "pgqueuer": bench.pgqueuer,
        }
        for number in range(1, args.rounds + 1):
            for path in args.paths:
                print(f"  measuring {path} ...", file=sys.stderr, flush=True)
                result = runners[path]()
                s = result.summary()
                print(
                    f"  round {number} {path:<10} {result.received}/{result.measured} received, "
                    f"p50 {s['p50']:.3f} ms, p99 {s['p99']:.3f} ms {result.notes or ''}",
                    flush=True,
                )
                results[path] = merge(results[path], result) if path in results else result
        targets = verdicts(results)
        print_report(results, targets)
        if args.profile:
            profile = Path(tmpdir) / "dispatcher.prof"
            profiled = bench.dispatcher(profile)
            print(
                f"\nprofiled round: p50 {profiled.summary()['p50']:.3f} ms "
                f"(cProfile slows it down); {profiled.notes}"
            )
            print_profile(profile)
    print(f"\n(total wall time {time.monotonic() - wall:.0f} s)")
    if args.json is not None:
        data = {
            "settings": {
                "rate": args.rate,
                "seconds": args.seconds,
                "warmup": args.warmup,
                "rounds": args.rounds,
                "devices": args.devices,
                "paths": args.paths,
                "batch": args.batch,
                "pgqueuer_batch": args.pgqueuer_batch,
                "pgqueuer_driver": args.pgqueuer_driver,
                "server": shown,
                "machine": found,
            },
            "results": {
                name: {
                    k: v for k, v in asdict(r).items() if k not in ("latencies_ms", "from_sent_ms")
                }
                | {"from_commit": r.summary(), "from_sent": r.summary(from_sent=True)}
                for name, r in results.items()
            },
            "targets": [
                {"label": label, "value": value, "op": op, "limit": limit, "passed": passed}
                for label, value, op, limit, passed in targets
            ],
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n", "utf-8")
    return 0
