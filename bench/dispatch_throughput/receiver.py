"""Stdlib-only UDP receiver for the dispatch benchmarks: a plain blocking socket.

Run as a script (it imports nothing from pushsync, so it starts fast and costs
the machine as little as a receiver can):

    python receiver.py count N        # throughput: stop once N distinct request ids arrived
    python receiver.py record FILE    # latency: write every datagram's arrival time to FILE

It binds 127.0.0.1 port 0 with a large receive buffer and prints ``port P``.

* ``count`` reads datagrams, takes the 16 request-id bytes of each (offset 4,
  docs/protocol.md) into a set, and when the set holds N ids prints
  ``done RECEIVED DISTINCT FIRST LAST`` and exits. It verifies nothing.
* ``record`` keeps ``(arrival time, datagram)`` in memory; on SIGTERM it writes
  one line ``TIME HEX`` per datagram to FILE, prints ``done RECEIVED`` and exits.

Times are ``CLOCK_MONOTONIC`` seconds: one clock for every process on the
machine, so the benchmark compares them with its own. On SIGTERM ``count``
prints what it has (``done`` with fewer ids than asked for).
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from types import FrameType

BUFFER = 32 * 1024 * 1024
"""Receive buffer asked for: bursts of a whole claimed batch must not overflow it."""

_clock = time.clock_gettime
_MONOTONIC = time.CLOCK_MONOTONIC


class Stop(Exception):
    """SIGTERM arrived."""


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise Stop


def open_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force = getattr(socket, "SO_RCVBUFFORCE", None)
    try:  # as root the system-wide cap (net.core.rmem_max) does not apply
        if force is None:
            raise PermissionError
        sock.setsockopt(socket.SOL_SOCKET, force, BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFFER)
    sock.bind(("127.0.0.1", 0))
    return sock


def count(sock: socket.socket, expected: int) -> None:
    ids: set[bytes] = set()
    received = 0
    first = last = 0.0
    buf = bytearray(2048)
    recv_into = sock.recv_into
    add = ids.add
    try:
        while len(ids) < expected:
            size = recv_into(buf)
            last = _clock(_MONOTONIC)
            if not received:
                first = last
            received += 1
            if size >= 20:
                add(bytes(buf[4:20]))
    except Stop:
        pass
    print(f"done {received} {len(ids)} {first:.6f} {last:.6f}", flush=True)


def record(sock: socket.socket, path: str) -> None:
    got: list[tuple[float, bytes]] = []
    append = got.append
    recv = sock.recv
    try:
        while True:
            data = recv(2048)
            append((_clock(_MONOTONIC), data))
    except Stop:
        pass
    with open(path, "w", encoding="ascii") as out:
        out.writelines(f"{t:.6f} {data.hex()}\n" for t, data in got)
    print(f"done {len(got)}", flush=True)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGTERM, _on_term)
    mode, arg = argv[0], argv[1]
    sock = open_socket()
    print(f"port {sock.getsockname()[1]}", flush=True)
    if mode == "count":
        count(sock, int(arg))
    elif mode == "record":
        record(sock, arg)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
