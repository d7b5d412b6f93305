"""The bare relay: the least any relay of the outbox does per notification, in its own process.

    python -m bench.dispatch_latency.bare_relay DSN

One blocking psycopg connection LISTENs on ``pushsync``, a second does the
work: on each notification it runs the ``claim`` block of
``sql/dispatcher.sql`` (as the dispatcher does), signs each claimed row with
:func:`pushsync.wire.protocol.encode_message` and sends it with one
``sendto`` on a plain UDP socket to the row's UDP address, then records the
batch sent in one statement (the ``sent_many`` block). No asyncio, no tasks, no
per-row statement, no resolver (addresses are ``127.0.0.1:PORT``), no logging. Prints ``ready`` once
it listens; exits on SIGTERM.
"""

from __future__ import annotations

import signal
import socket
import sys
import uuid
from datetime import timedelta
from types import FrameType

import psycopg
from psycopg.rows import class_row

from pushsync.dispatcher.gateways import split_address, to_message
from pushsync.dispatcher.outbox import Claimed, query
from pushsync.wire import protocol

OWNER = "bench-bare-relay"


def main(argv: list[str]) -> int:
    (dsn,) = argv
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    claim = query("claim")
    params = {"owner": OWNER, "limit": 100, "lease": timedelta(seconds=30)}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    targets: dict[str, tuple[str, int]] = {}
    with (
        psycopg.connect(dsn, autocommit=True) as listen,
        psycopg.connect(dsn, autocommit=True) as work,
    ):
        listen.execute("LISTEN pushsync")
        print("ready", flush=True)
        while not stopping:
            for _ in listen.notifies(timeout=0.2, stop_after=1):
                while True:
                    with work.cursor(row_factory=class_row(Claimed)) as cur:
                        items = cur.execute(claim, params).fetchall()
                    if not items:
                        break
                    sent: list[uuid.UUID] = []
                    for item in items:
                        if item.udp_address is None:
                            continue
                        target = targets.get(item.udp_address)
                        if target is None:
                            target = targets[item.udp_address] = split_address(item.udp_address)
                        sock.sendto(protocol.encode_message(to_message(item), item.secret), target)
                        sent.append(item.request_id)
                    gateways = ["udp"] * len(sent)
                    record = {"request_ids": sent, "gateways": gateways, "owner": OWNER}
                    work.execute(query("sent_many"), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
