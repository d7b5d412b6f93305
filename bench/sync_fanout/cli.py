"""Fan-out and connections: one INSERT for N devices, over UDP and over N SYNC connections.

Everything is real: a throwaway PostgreSQL, the compiled rule of ``rules.yaml``,
``pushsync dispatch`` as a subprocess, and the devices in other processes
(``devices.py``). Connecting is timed from the first device's connection to
the last handshake done, and to the moment ``pushsync.sync_connections``
holds every device (recorded); fan-out from the INSERT's commit returning to
the last message counted by the devices; memory is the dispatcher's resident
set size before and after the SYNC connections were opened. The database work
of a handshake (secret lookup, connection record) is also timed in the same
run one statement at a time and in batches, on a pool of the same size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any

import psycopg

from bench import fanout
from bench.dispatcher_process import DispatcherProcess, dispatcher_process, throwaway_database
from bench.fanout import device_id
from bench.machine import cpu_seconds
from bench.sync_fanout.devices import CONNECT_AT_ONCE
from bench.sync_fanout.machine import measure, raise_nofile, summary

DBNAME = "bench"
TARGETS = {
    "udp_seconds": 1.0,
    "sync_seconds": 2.0,
    "recorded_seconds": 10.0,
    "kib_per_connection": 15.0,
}
PER_PROCESS = 10_000
"""Devices per device process (each holds a socket per device)."""
RESERVED_FILES = 64
"""Files the dispatcher needs besides one per connection (database, listening sockets)."""
RECORD_TIMEOUT = 600.0
BASELINE_SAMPLE = 1_000
POOL_SIZE = 4
"""As the dispatcher's pool (``PoolStore``'s default)."""


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "bench.sync_fanout.devices", *map(str, args)]


def _devices(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(_command(*args), stdout=subprocess.PIPE, text=True)


def _ready(process: subprocess.Popen[str]) -> tuple[float, float, int, float]:
    """A device process's ``ready`` line: when it started, how long it took, retries,
    its CPU seconds."""
    assert process.stdout is not None
    words = process.stdout.readline().split()
    if not words or words[0] != "ready":
        raise RuntimeError("the SYNC devices did not connect")
    return float(words[1]), float(words[2]), int(words[3]), float(words[4])


def run(devices: int, dsn: str | None = None) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": devices, "machine": measure().to_json()}
    nofile = raise_nofile()
    database = nullcontext(dsn) if dsn else throwaway_database(DBNAME)
    with database as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        fanout.prepare(conn, devices)
        # each device process has CONNECT_AT_ONCE handshakes in flight, all from 127.0.0.1
        in_flight = -(-devices // PER_PROCESS) * CONNECT_AT_ONCE
        handshakes = (
            "--sync-max-handshakes", str(max(256, in_flight)),
            "--sync-max-handshakes-per-address", str(in_flight),
        )  # fmt: skip
        with dispatcher_process(dsn, *handshakes, nofile=nofile) as node:
            received, seconds = fanout.udp_round(conn, _command("udp", devices))
            figures["udp_received"], figures["udp_seconds"] = received, seconds
            # Nothing of the UDP round may be resent over the new connections.
            conn.execute("UPDATE pushsync.outbox SET state = 'confirmed'")
            time.sleep(1.0)
            _sync_round(conn, node, devices, figures)
        figures.update(asyncio.run(handshake_baseline(dsn, min(BASELINE_SAMPLE, devices))))
    return figures


def _sync_round(
    conn: psycopg.Connection, node: DispatcherProcess, devices: int, figures: dict[str, Any]
) -> None:
    """One connection per device held by the dispatcher; connecting, recording, fan-out."""
    before = node.rss_kib()
    cpu_before = cpu_seconds(node.process.pid)
    clients = []
    for first in range(0, devices, PER_PROCESS):
        count = min(PER_PROCESS, devices - first)
        clients.append(_devices("sync", "127.0.0.1", node.sync_port, first, count, count))
    recorded_at = _wait_recorded(conn, devices)
    cpu_after = cpu_seconds(node.process.pid)
    ready = [_ready(client) for client in clients]
    started = min(r[0] for r in ready)
    figures["connect_seconds"] = max(r[0] + r[1] for r in ready) - started
    figures["recorded_seconds"] = recorded_at - started
    figures["handshake_retries"] = sum(r[2] for r in ready)
    figures["dispatcher_cpu_connecting"] = cpu_after - cpu_before
    figures["devices_cpu_connecting"] = sum(r[3] for r in ready)
    time.sleep(1.0)
    after = node.rss_kib()
    figures["rss_before_kib"] = before
    figures["rss_after_kib"] = after
    figures["kib_per_connection"] = (after - before) / devices
    committed = fanout.alert(conn)
    results = [fanout.result(client) for client in clients]
    figures["sync_received"] = sum(r["received"] for r in results)
    figures["sync_dropped"] = sum(r["dropped"] for r in results)
    figures["sync_seconds"] = max(r["last"] for r in results) - committed


def _wait_recorded(conn: psycopg.Connection, devices: int) -> float:
    """Until ``pushsync.sync_connections`` holds every device; the wall-clock time then."""
    deadline = time.monotonic() + RECORD_TIMEOUT
    recorded = 0
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone()
        recorded = 0 if row is None else int(row[0])
        if recorded >= devices:
            return time.time()
        time.sleep(0.02)
    raise RuntimeError(
        f"the dispatcher recorded {recorded} of {devices} connections in {RECORD_TIMEOUT:g} s"
    )


async def handshake_baseline(dsn: str, sample: int) -> dict[str, Any]:
    """The database work of ``sample`` handshakes (a secret lookup, then a connection
    record), :data:`CONNECT_AT_ONCE` at a time on a pool of :data:`POOL_SIZE`: one
    statement each (as before batching), then as the dispatcher does it now."""
    from psycopg_pool import AsyncConnectionPool

    from pushsync.dispatcher.nodes import PoolStore
    from pushsync.dispatcher.outbox import OutboxStore, PoolExecutor

    async def handshakes(store: OutboxStore) -> float:
        gate = asyncio.Semaphore(CONNECT_AT_ONCE)

        async def one(n: int) -> None:
            async with gate:
                if await store.secret(device_id(n)) is None:
                    raise RuntimeError(f"no secret for {device_id(n)}")
                await store.connected(device_id(n), f"127.0.0.2:{10_000 + n}")

        started = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(sample)))
        return time.perf_counter() - started

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn, min_size=POOL_SIZE, max_size=POOL_SIZE, kwargs={"autocommit": True}, open=False
    )
    async with pool:
        single = await handshakes(OutboxStore(PoolExecutor(pool, 30.0), "bench-single"))
    batched_store = PoolStore(dsn, "bench-batched", max_size=POOL_SIZE, timeout=30.0)
    await batched_store.open()
    try:
        batched = await handshakes(batched_store)
    finally:
        await batched_store.close()
    return {"baseline_sample": sample, "single_seconds": single, "batched_seconds": batched}


def report(figures: dict[str, Any]) -> str:
    n = figures["devices"]
    rows = [
        ("fan-out over UDP", f"{figures['udp_received']}/{n} in {figures['udp_seconds']:.3f} s",
         "udp_seconds", "s"),
        ("fan-out over SYNC", f"{figures['sync_received']}/{n} in {figures['sync_seconds']:.3f} s"
         + (f" ({figures['sync_dropped']} dropped)" if figures["sync_dropped"] else ""),
         "sync_seconds", "s"),
        ("SYNC connections recorded", f"{n} in {figures['recorded_seconds']:.2f} s",
         "recorded_seconds", "s"),
        ("memory per SYNC connection", f"{figures['kib_per_connection']:.1f} KiB",
         "kib_per_connection", "KiB"),
    ]  # fmt: skip
    lines = [
        summary(figures["machine"]),
        f"devices: {n}; SYNC connections opened in {figures['connect_seconds']:.2f} s "
        f"({figures['handshake_retries']} handshakes refused and retried), "
        f"dispatcher CPU {figures['dispatcher_cpu_connecting']:.2f} s "
        f"({figures['dispatcher_cpu_connecting'] / n * 1e6:.0f} µs per connection), "
        f"devices' CPU {figures['devices_cpu_connecting']:.2f} s",
        f"dispatcher RSS: {figures['rss_before_kib'] / 1024:.1f} MiB idle, "
        f"{figures['rss_after_kib'] / 1024:.1f} MiB holding {n} connections",
    ]
    for what, measured, key, unit in rows:
        ok = figures[key] <= TARGETS[key]
        target = f"<= {TARGETS[key]:g} {unit}"
        lines.append(f"{what:<28} {measured:<28} target {target:<12} {'ok' if ok else 'MISSED'}")
    single, batched = figures["single_seconds"], figures["batched_seconds"]
    lines += [
        "same run:",
        f"  SYNC fan-out / UDP fan-out: {figures['sync_seconds'] / figures['udp_seconds']:.2f}",
        f"  recorded / opened: {figures['recorded_seconds'] / figures['connect_seconds']:.2f} "
        "(1.00: every record written by the time the last handshake ended)",
        f"  database work of {figures['baseline_sample']} handshakes, {CONNECT_AT_ONCE} at a "
        f"time on a pool of {POOL_SIZE}: one statement each {single:.2f} s, in batches "
        f"{batched:.2f} s ({single / batched:.1f}x faster)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_fanout", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000, help="devices (default 10000)")
    parser.add_argument(
        "--dsn",
        help="a new, empty database to run in (default: a throwaway PostgreSQL server); "
        "the pushsync schema is migrated into it and two tables created",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices: at least 1")
    most = raise_nofile() - RESERVED_FILES
    if args.devices > most:
        parser.error(
            f"--devices {args.devices}: the dispatcher holds one open file per connection, "
            f"and this machine allows {most + RESERVED_FILES} per process (ulimit -Hn), "
            f"so at most {most} devices"
        )
    figures = run(args.devices, args.dsn)
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0
