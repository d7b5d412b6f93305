"""The fleet of the fan-out benchmarks (``sync_fanout``, ``mqtt_fanout``, ``cluster``).

N devices ``dev-0``, ``dev-1`` … share one secret and are listed in
``public.fleet``; the rule of ``bench/sync_fanout/rules.yaml`` notifies every
one of them at each row inserted into ``public.alerts``. The UDP round is the
same in each: every device's manual address is one socket in another process
(:func:`receive_udp`), which counts the datagrams.

The device processes import this module for :func:`device_id`, :data:`SECRET`
and :func:`receive_udp`: it loads nothing of the server side until
:func:`prepare` runs.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

SECRET = bytes(range(32))
RULES = Path(__file__).resolve().parent / "sync_fanout" / "rules.yaml"
RECEIVE_TIMEOUT = 60.0
"""Seconds a receiving process waits for the next datagram before it reports."""


def device_id(n: int) -> str:
    return f"dev-{n}"


def prepare(conn: psycopg.Connection, devices: int) -> None:
    """The pushsync schema, the fleet of ``devices`` devices and the broadcast rule."""
    from pushsync import generator, schema

    schema.migrate(conn)
    conn.execute("CREATE TABLE public.fleet (device_id text PRIMARY KEY)")
    conn.execute("CREATE TABLE public.alerts (id bigserial PRIMARY KEY, note text)")
    rules_sql = generator.compile_rules(generator.load(RULES), "rules.yaml")
    schema.migrate(conn, rules_sql)
    ids = [device_id(n) for n in range(devices)]
    with conn.transaction():
        conn.execute(
            "INSERT INTO pushsync.devices (device_id, secret) "
            "SELECT id, %s FROM unnest(%s::text[]) AS id",
            (SECRET, ids),
        )
        conn.execute("INSERT INTO public.fleet SELECT unnest(%s::text[])", (ids,))


def alert(conn: psycopg.Connection) -> float:
    """Insert one alert (autocommit); the wall-clock time its commit returned."""
    conn.execute("INSERT INTO public.alerts (note) VALUES ('bench')")
    return time.time()


def result(process: subprocess.Popen[str]) -> dict[str, Any]:
    """The JSON line a device process prints last, once it has ended."""
    out, _ = process.communicate(timeout=120)
    return dict(json.loads(out.strip().splitlines()[-1]))


def udp_round(conn: psycopg.Connection, receiver: list[str]) -> tuple[int, float]:
    """Start ``receiver`` (a command running :func:`receive_udp`), give every device its
    socket as manual UDP address, insert one alert: how many datagrams arrived, and the
    seconds from the commit to the last."""
    process = subprocess.Popen(receiver, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    port = int(process.stdout.readline())
    conn.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "SELECT device_id, 'udp', 'manual', %s FROM pushsync.devices",
        (f"127.0.0.1:{port}",),
    )
    committed = alert(conn)
    received = result(process)
    return int(received["received"]), float(received["last"]) - committed


def receive_udp(expected: int) -> dict[str, Any]:
    """Bind a UDP socket on 127.0.0.1, print its port, count datagrams until ``expected``
    arrived (or none for :data:`RECEIVE_TIMEOUT`): ``received`` and ``last`` (the
    wall-clock time of the last one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(RECEIVE_TIMEOUT)
        print(sock.getsockname()[1], flush=True)
        received, last = 0, 0.0
        try:
            while received < expected:
                sock.recv(2048)
                received += 1
                last = time.time()
        except TimeoutError:
            pass
    return {"received": received, "last": last}


__all__ = [
    "RULES",
    "SECRET",
    "alert",
    "device_id",
    "prepare",
    "receive_udp",
    "result",
    "udp_round",
]
