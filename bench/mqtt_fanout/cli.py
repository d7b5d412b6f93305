"""Fan-out over MQTT: one INSERT for N devices through a real Mosquitto, against UDP.

Everything is real: a throwaway PostgreSQL, the compiled rule of
``bench/sync_fanout/rules.yaml`` (:mod:`bench.fanout`),
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
from pathlib import Path
from typing import Any

import psycopg

from bench import fanout
from bench.dispatcher_process import dispatcher_process, throwaway_database
from tests.support.mosquitto import DISPATCHER_PASSWORD, Broker

DBNAME = "bench"
RECEIVER = ("bench-devices", "bench-devices-pw")
TARGETS = {"mqtt_seconds": 2.0}


def _command(*args: object) -> list[str]:
    return [sys.executable, "-m", "bench.mqtt_fanout.receivers", *map(str, args)]


def _receiver(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(_command(*args), stdout=subprocess.PIPE, text=True)


def run(devices: int, clients: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"devices": devices, "clients": clients, "cpus": os.cpu_count()}
    with (
        tempfile.TemporaryDirectory(prefix="mqtt-fanout-") as folder,
        throwaway_database(DBNAME) as dsn,
        psycopg.connect(dsn, autocommit=True) as conn,
    ):
        fanout.prepare(conn, devices)
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
                received, seconds = fanout.udp_round(conn, _command("udp", devices))
                figures["udp_received"], figures["udp_seconds"] = received, seconds
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
                committed = fanout.alert(conn)
                mqtt = fanout.result(receiver)
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
