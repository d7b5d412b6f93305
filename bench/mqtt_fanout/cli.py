"""Fan-out over MQTT: one INSERT for N devices through a real Mosquitto, against UDP.

Everything is real: a throwaway PostgreSQL, the compiled rule of ``rules.yaml``,
``pushsync dispatch --mqtt`` as a subprocess, a Mosquitto broker with the ACL of
docs/operations.md (``tests/support/mosquitto.py``), and the devices in another
process (``receivers.py``). Both rounds run in this one run, UDP first: times
are from the INSERT's commit returning to the last message counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.dispatcher_process import dispatcher_process, throwaway_database
from bench.mqtt_fanout.receivers import device_id
from pushsync import generator, schema
from tests.support.mosquitto import DISPATCHER_PASSWORD, Broker

HERE = Path(__file__).resolve().parent
DBNAME = "bench"
SECRET = bytes(range(32))
RECEIVER = ("bench-devices", "bench-devices-pw")
TARGETS = {"mqtt_seconds": 2.0}


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


def _receiver(*args: object) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.mqtt_fanout.receivers", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)


def _result(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, _ = process.communicate(timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def _alert(conn: psycopg.Connection) -> float:
    """Insert one alert (autocommit); the wall-clock time its commit returned."""
    conn.execute("INSERT INTO public.alerts (note) VALUES ('bench')")
    return time.time()


def run(devices: int, clients: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": devices, "clients": clients, "cpus": os.cpu_count()}
    with (
        tempfile.TemporaryDirectory(prefix="mqtt-fanout-") as folder,
        throwaway_database(DBNAME) as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        prepare(conn, devices)
        broker = Broker(
            Path(folder) / "broker",
            [],
            extra_acl=f"\nuser {RECEIVER[0]}\ntopic read pushsync/+/in\n",
            extra_users=[RECEIVER],
        )
        broker.start()
        password = Path(folder) / "mqtt-password"
        password.write_text(DISPATCHER_PASSWORD)
        try:
            options = ("--mqtt", broker.url, "--mqtt-password-file", str(password))
            with dispatcher_process(dsn, *options):
                # UDP: every device's manual address is one receiving socket.
                receiver = _receiver("udp", devices)
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
                conn.execute("UPDATE pushsync.outbox SET state = 'confirmed'")
                # MQTT: every device has a subscription on record, so auto routing
                # publishes to the broker; the receivers hold the N subscriptions.
                receiver = _receiver("mqtt", broker.port, *RECEIVER, devices, clients)
                assert receiver.stdout is not None
                if receiver.stdout.readline().strip() != "ready":
                    raise RuntimeError("the receivers did not subscribe")
                conn.execute(
                    "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
                    "SELECT device_id, 'mqtt', 'manual', 'on' FROM pushsync.devices"
                )
                committed = _alert(conn)
                mqtt = _result(receiver)
                figures["mqtt_received"] = mqtt["received"]
                figures["mqtt_seconds"] = mqtt["last"] - committed
        finally:
            broker.stop()
    figures["ratio_mqtt_to_udp"] = figures["mqtt_seconds"] / max(figures["udp_seconds"], 1e-6)
    return figures


def report(figures: dict[str, Any]) -> str:
    n = figures["devices"]
    ok = figures["mqtt_seconds"] <= TARGETS["mqtt_seconds"]
    return "\n".join(
        [
            f"devices: {n}; receiving side: {figures['clients']} paho clients in one process; "
            f"CPUs: {figures['cpus']}",
            f"fan-out over UDP   {figures['udp_received']}/{n} in {figures['udp_seconds']:.3f} s",
            f"fan-out over MQTT  {figures['mqtt_received']}/{n} in "
            f"{figures['mqtt_seconds']:.3f} s  target <= {TARGETS['mqtt_seconds']:g} s  "
            f"{'ok' if ok else 'MISSED'}",
            f"MQTT / UDP: {figures['ratio_mqtt_to_udp']:.2f}x",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mqtt_fanout", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000, help="devices (default 10000)")
    parser.add_argument(
        "--clients", type=int, default=20, help="paho clients on the receiving side (default 20)"
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    figures = run(args.devices, args.clients)
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0
