"""Fan-out and connections: one INSERT for N devices, over UDP and over N SYNC connections.

Everything is real: a throwaway PostgreSQL, the compiled rule of ``rules.yaml``,
``pushsync dispatch`` as a subprocess, and the devices in another process
(``devices.py``). Times are from the INSERT's commit returning to the last
message counted by the devices; memory is the dispatcher's resident set size
before and after the SYNC connections were opened.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.dispatcher_process import dispatcher_process, throwaway_database
from bench.sync_fanout.devices import CONNECT_AT_ONCE, SECRET, device_id
from pushsync import generator, schema

HERE = Path(__file__).resolve().parent
DBNAME = "bench"
TARGETS = {"udp_seconds": 1.0, "sync_seconds": 2.0, "kib_per_connection": 15.0}


def prepare(conn: psycopg.Connection, devices: int) -> None:
    schema.migrate(conn)
    conn.execute("CREATE TABLE public.fleet (device_id text PRIMARY KEY)")
    conn.execute("CREATE TABLE public.alerts (id bigserial PRIMARY KEY, note text)")
    rules_sql = generator.compile_rules(generator.load(HERE / "rules.yaml"), "rules.yaml")
    schema.migrate(conn, rules_sql)
    ids = [device_id(n) for n in range(devices)]
    with conn.transaction():
        conn.execute(
            "INSERT INTO pushsync.devices (device_id, secret) "
            "SELECT id, %s FROM unnest(%s::text[]) AS id",
            (SECRET, ids),
        )
        conn.execute("INSERT INTO public.fleet SELECT unnest(%s::text[])", (ids,))


def _devices(*args: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.sync_fanout.devices", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    out, _ = process.communicate(timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def _alert(conn: psycopg.Connection) -> float:
    """Insert one alert (autocommit); the wall-clock time its commit returned."""
    conn.execute("INSERT INTO public.alerts (note) VALUES ('bench')")
    return time.time()


def run(devices: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": devices}
    with throwaway_database(DBNAME) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        prepare(conn, devices)
        # every device connects from 127.0.0.1: see devices.CONNECT_AT_ONCE
        per_address = ("--sync-max-handshakes-per-address", str(CONNECT_AT_ONCE))
        with dispatcher_process(dsn, *per_address) as node:
            # UDP: every device's manual address is one receiving socket.
            receiver = _devices("udp", devices)
            assert receiver.stdout is not None
            port = int(receiver.stdout.readline())
            conn.execute(
                "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
                "SELECT device_id, 'udp', 'manual', %s FROM pushsync.devices",
                (f"127.0.0.1:{port}",),
            )
            committed = _alert(conn)
            udp = _result(receiver)
            figures["udp_received"] = udp["received"]
            figures["udp_seconds"] = udp["last"] - committed
            # Nothing of the UDP round may be resent over the new connections.
            conn.execute("UPDATE pushsync.outbox SET state = 'confirmed'")
            # SYNC: one connection per device, held by the dispatcher.
            time.sleep(1.0)
            before = node.rss_kib()
            clients = _devices("sync", "127.0.0.1", node.sync_port, devices, devices)
            assert clients.stdout is not None
            if clients.stdout.readline().strip() != "ready":
                raise RuntimeError("the SYNC devices did not connect")
            _wait_connected(conn, devices)
            time.sleep(1.0)
            after = node.rss_kib()
            figures["rss_before_kib"] = before
            figures["rss_after_kib"] = after
            figures["kib_per_connection"] = (after - before) / devices
            committed = _alert(conn)
            sync = _result(clients)
            figures["sync_received"] = sync["received"]
            figures["sync_seconds"] = sync["last"] - committed
            figures["connect_seconds"] = sync["connect_seconds"]
    return figures


def _wait_connected(conn: psycopg.Connection, devices: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = conn.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone()
        if row is not None and row[0] >= devices:
            return
        time.sleep(0.1)
    raise RuntimeError("the dispatcher did not record every connection")


def report(figures: dict[str, Any]) -> str:
    n = figures["devices"]
    rows = [
        ("fan-out over UDP", f"{figures['udp_received']}/{n} in {figures['udp_seconds']:.3f} s",
         f"<= {TARGETS['udp_seconds']:g} s", figures["udp_seconds"] <= TARGETS["udp_seconds"]),
        ("fan-out over SYNC", f"{figures['sync_received']}/{n} in {figures['sync_seconds']:.3f} s",
         f"<= {TARGETS['sync_seconds']:g} s", figures["sync_seconds"] <= TARGETS["sync_seconds"]),
        ("memory per SYNC connection", f"{figures['kib_per_connection']:.1f} KiB",
         f"<= {TARGETS['kib_per_connection']:g} KiB",
         figures["kib_per_connection"] <= TARGETS["kib_per_connection"]),
    ]  # fmt: skip
    lines = [f"devices: {n}; {n} SYNC connections opened in {figures['connect_seconds']:.1f} s"]
    lines.append(
        f"dispatcher RSS: {figures['rss_before_kib'] / 1024:.1f} MiB idle, "
        f"{figures['rss_after_kib'] / 1024:.1f} MiB holding {n} connections"
    )
    for what, measured, target, ok in rows:
        lines.append(f"{what:<28} {measured:<28} target {target:<12} {'ok' if ok else 'MISSED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sync_fanout", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000, help="devices (default 10000)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    figures = run(args.devices)
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0
