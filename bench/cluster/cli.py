"""Many dispatchers, many devices: D ``pushsync dispatch`` processes on one database,
N SYNC devices spread over them, one INSERT whose rule names every device.

Everything is real: a throwaway PostgreSQL, the broadcast rule of
``bench/sync_fanout/rules.yaml``, the dispatchers as subprocesses, and the
devices in P processes of their own (``devices.py``), each connecting from its
own loopback address (127.0.0.2, 127.0.0.3, …) so that none runs out of
ephemeral ports. Measured: connecting and recording the N connections; one
INSERT to the last of the N messages received; the dispatchers' resident set
size per connection; then one dispatcher is killed (SIGKILL) and a second
INSERT committed at once: the time until its devices are connected to the
others again, recorded there, and every device has the new message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from typing import TYPE_CHECKING, Any, LiteralString

from bench import fanout
from bench.dispatcher_process import DispatcherProcess, dispatcher_process, throwaway_database
from bench.sync_fanout.devices import CONNECT_AT_ONCE
from bench.sync_fanout.machine import measure, raise_nofile, summary

if TYPE_CHECKING:
    import psycopg

DBNAME = "bench"
TARGETS = {"fanout_seconds": 3.0, "kib_per_connection": 10.0, "rehome_reach_seconds": 15.0}
RESERVED_FILES = 64
RECORD_TIMEOUT = 600.0


class Devices:
    """One device process: devices ``first`` … ``first + count - 1`` from ``source``."""

    def __init__(self, source: str, first: int, count: int, servers: list[str]) -> None:
        self.first, self.count = first, count
        command = [
            sys.executable, "-m", "bench.cluster.devices", source, str(first), str(count),
            *servers,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def ask(self, command: str) -> list[str]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def tell(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def answer(self) -> list[str]:
        assert self.process.stdout is not None
        words = self.process.stdout.readline().split()
        if not words:
            raise RuntimeError(f"device process {self.first}… ended")
        return words

    def homed_at(self, index: int, dispatchers: int) -> int:
        """How many of this process's devices connected first to dispatcher ``index``."""
        return sum(
            1 for n in range(self.first, self.first + self.count) if n % dispatchers == index
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                self.tell("quit")
                self.process.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(10)


def _owner(conn: psycopg.Connection, node: DispatcherProcess) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT owner FROM pushsync.dispatchers WHERE pid = %s", (node.process.pid,)
        ).fetchone()
        if row is not None:
            return str(row[0])
        time.sleep(0.05)
    raise RuntimeError(f"dispatcher {node.process.pid} never heartbeated")


def _wait(
    conn: psycopg.Connection, query: LiteralString, params: tuple[Any, ...], done: Any
) -> float:
    """Poll ``query`` until ``done(value)``; the wall-clock time then."""
    deadline = time.monotonic() + RECORD_TIMEOUT
    while time.monotonic() < deadline:
        row = conn.execute(query, params).fetchone()
        if row is not None and done(row[0]):
            return time.time()
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for: {query}")


def _count(clients: list[Devices]) -> None:
    """Every device process counts the messages from now on, until all its devices have one."""
    for client in clients:
        if client.ask(f"count {client.count}") != ["counting"]:
            raise RuntimeError("a device process did not start counting")


def _received(clients: list[Devices]) -> tuple[int, float]:
    got, last = 0, 0.0
    for client in clients:
        words = client.answer()
        got += int(words[1])
        last = max(last, float(words[2]))
    return got, last


def _start(
    stack: ExitStack, dsn: str, count: int, *extra: str, nofile: int
) -> list[DispatcherProcess]:
    """``count`` dispatchers, started side by side; each stopped when ``stack`` closes."""
    managers = [dispatcher_process(dsn, *extra, nofile=nofile) for _ in range(count)]
    with ThreadPoolExecutor(count) as pool:
        entering = [pool.submit(manager.__enter__) for manager in managers]
    nodes = []
    for manager, entered in zip(managers, entering, strict=True):
        if entered.exception() is None:
            stack.push(manager.__exit__)
            nodes.append(entered.result())
    for entered in entering:
        entered.result()  # the first failure, once every started one will be stopped
    return nodes


def run(devices: int, dispatchers: int, processes: int, dsn: str | None) -> dict[str, Any]:
    import psycopg  # here: a mistake in the arguments is said without loading the server side

    figures: dict[str, Any] = {
        "devices": devices,
        "dispatchers": dispatchers,
        "device_processes": processes,
        "machine": measure().to_json(),
    }
    nofile = raise_nofile()
    # Each device process has CONNECT_AT_ONCE handshakes in flight, and after the kill
    # they may all be at one dispatcher: it must not close them as too many.
    handshakes = (
        "--sync-max-handshakes", str(max(256, processes * CONNECT_AT_ONCE)),
        "--sync-max-handshakes-per-address", str(CONNECT_AT_ONCE),
    )  # fmt: skip
    with (
        nullcontext(dsn) if dsn else throwaway_database(DBNAME) as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
        ExitStack() as stack,
    ):
        fanout.prepare(conn, devices)
        nodes = _start(stack, dsn, dispatchers, *handshakes, nofile=nofile)
        owners = [_owner(conn, node) for node in nodes]
        servers = [f"127.0.0.1:{node.sync_port}" for node in nodes]
        before = sum(node.rss_kib() for node in nodes)
        size = -(-devices // processes)
        clients: list[Devices] = []
        for k, first in enumerate(range(0, devices, size)):
            client = Devices(f"127.0.0.{2 + k}", first, min(size, devices - first), servers)
            stack.callback(client.stop)
            clients.append(client)
        recorded_at = _wait(
            conn, "SELECT count(*) FROM pushsync.sync_connections", (), lambda n: n >= devices
        )
        ready = [client.answer() for client in clients]
        started = min(float(r[1]) for r in ready)
        figures["connect_seconds"] = max(float(r[1]) + float(r[2]) for r in ready) - started
        figures["recorded_seconds"] = recorded_at - started
        figures["handshake_retries"] = sum(int(r[3]) for r in ready)
        time.sleep(1.0)
        after = [node.rss_kib() for node in nodes]
        figures["rss_before_kib"] = before
        figures["rss_after_kib"] = sum(after)
        figures["kib_per_connection"] = (sum(after) - before) / devices

        # One INSERT, every device.
        _count(clients)
        committed = fanout.alert(conn)
        got, last = _received(clients)
        figures["fanout_received"] = got
        figures["fanout_seconds"] = last - committed
        # Nothing of the first round may be resent to the devices that move. Once the
        # dispatchers have recorded every send, rows are locked in request_id order, as
        # the dispatchers' own batch statements lock them (no deadlock with them).
        _wait(
            conn,
            "SELECT count(*) FILTER (WHERE state IN ('pending', 'sending')) FROM pushsync.outbox",
            (),
            lambda n: n == 0,
        )
        conn.execute(
            "UPDATE pushsync.outbox SET state = 'confirmed' WHERE request_id IN "
            "(SELECT request_id FROM pushsync.outbox ORDER BY request_id FOR UPDATE)"
        )

        # Kill one dispatcher; a second INSERT at once.
        victim = 0
        moving = [client.homed_at(victim, dispatchers) for client in clients]
        figures["rehomed_devices"] = sum(moving)
        _count(clients)
        killed = time.time()
        nodes[victim].process.kill()
        committed = fanout.alert(conn)
        recorded = _wait(
            conn,
            "SELECT count(*) FILTER (WHERE owner = %s) = 0 AND count(*) >= %s "
            "FROM pushsync.sync_connections",
            (owners[victim], devices),
            bool,
        )
        got, last = _received(clients)
        back = [client.ask(f"rehomed {m}") for client, m in zip(clients, moving, strict=True)]
        figures["rehome_received"] = got
        figures["rehome_reach_seconds"] = last - killed
        figures["rehome_insert_after_kill"] = committed - killed
        figures["reconnected_seconds"] = max(float(b[2]) for b in back) - killed
        figures["rehome_recorded_seconds"] = recorded - killed
        figures["rehome_back"] = sum(int(b[1]) for b in back)
        figures["rehome_retries"] = sum(int(b[3]) for b in back)
    return figures


def report(figures: dict[str, Any]) -> str:
    n, d = figures["devices"], figures["dispatchers"]
    moved = figures["rehomed_devices"]
    lines = [
        summary(figures["machine"]),
        f"{d} dispatchers, {n} SYNC devices in {figures['device_processes']} processes "
        f"(one loopback address each): connected in {figures['connect_seconds']:.2f} s, "
        f"recorded in {figures['recorded_seconds']:.2f} s "
        f"({figures['handshake_retries']} rounds of handshakes retried)",
        f"dispatchers' RSS: {figures['rss_before_kib'] / 1024:.1f} MiB idle, "
        f"{figures['rss_after_kib'] / 1024:.1f} MiB holding {n} connections",
    ]
    rows = [
        ("one INSERT to every device", f"{figures['fanout_received']}/{n} in "
         f"{figures['fanout_seconds']:.3f} s", "fanout_seconds", "s"),
        ("memory per SYNC connection", f"{figures['kib_per_connection']:.1f} KiB",
         "kib_per_connection", "KiB"),
        ("one dispatcher killed", f"{figures['rehome_received']}/{n} reached "
         f"{figures['rehome_reach_seconds']:.2f} s after", "rehome_reach_seconds", "s"),
    ]  # fmt: skip
    for what, measured, key, unit in rows:
        ok = figures[key] <= TARGETS[key]
        target = f"<= {TARGETS[key]:g} {unit}"
        lines.append(f"{what:<28} {measured:<34} target {target:<12} {'ok' if ok else 'MISSED'}")
    lines += [
        f"  after the kill: {figures['rehome_back']}/{moved} of its devices connected elsewhere "
        f"{figures['reconnected_seconds']:.2f} s after, all recorded with live dispatchers "
        f"{figures['rehome_recorded_seconds']:.2f} s after "
        f"({figures['rehome_retries']} rounds of handshakes waited a backoff); "
        f"the second INSERT committed {figures['rehome_insert_after_kill']:.3f} s after",
        "same run:",
        f"  re-homing {moved} devices / connecting all {n}: "
        f"{figures['reconnected_seconds'] / figures['connect_seconds']:.2f} "
        f"({moved / n:.2f} of the devices)",
        f"  fan-out per 1,000 devices: {figures['fanout_seconds'] / n * 1000:.3f} s",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    parser.add_argument("--devices", type=int, default=40_000, help="devices (default 40000)")
    parser.add_argument(
        "--dispatchers", type=int, default=4, help="dispatcher processes (default 4)"
    )
    parser.add_argument(
        "--processes", type=int, default=4, help="device processes (default 4), at most 250"
    )
    parser.add_argument(
        "--dsn",
        help="a new, empty database to run in (default: a throwaway PostgreSQL server); "
        "the pushsync schema is migrated into it and two tables created",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if args.dispatchers < 2:
        parser.error("--dispatchers: at least 2 (one is killed)")
    if not 1 <= args.processes <= 250:
        parser.error("--processes: between 1 and 250 (one loopback address 127.0.0.x each)")
    if args.devices < args.dispatchers:
        parser.error("--devices: at least one per dispatcher")
    most = raise_nofile() - RESERVED_FILES
    per_process = -(-args.devices // args.processes)
    per_dispatcher = -(-args.devices // (args.dispatchers - 1))  # after one was killed
    if per_process > most or per_dispatcher > most:
        parser.error(
            f"--devices {args.devices}: {per_process} per device process and up to "
            f"{per_dispatcher} per dispatcher once one is killed, but one process may hold "
            f"{most} connections here (ulimit -Hn); add --processes or --dispatchers"
        )
    figures = run(args.devices, args.dispatchers, args.processes, args.dsn)
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0
