"""The latency floor's receiver: a plain psycopg LISTEN loop, in its own process.

    python -m bench.dispatch_latency.listen_floor DSN CHANNEL FILE

It LISTENs on CHANNEL on an autocommit connection, prints ``ready``, and keeps
``(arrival time, payload)`` of every notification. On SIGTERM it writes one
line ``TIME PAYLOAD`` per notification to FILE and prints ``done COUNT``.
Times are ``CLOCK_MONOTONIC`` seconds, the clock the benchmark reads.
"""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

import psycopg
from psycopg import sql


def main(argv: list[str]) -> int:
    dsn, channel, path = argv
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    got: list[tuple[float, str]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        print("ready", flush=True)
        while not stopping:
            # The timeout only ends an idle wait so that SIGTERM is noticed;
            # a notification is yielded as soon as it arrives.
            for note in conn.notifies(timeout=0.2):
                got.append((time.clock_gettime(time.CLOCK_MONOTONIC), note.payload))
    with open(path, "w", encoding="ascii") as out:
        out.writelines(f"{t:.6f} {payload}\n" for t, payload in got)
    print(f"done {len(got)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
