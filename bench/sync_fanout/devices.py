"""The devices of the benchmark, in a process of their own (so they do not share the
dispatcher's CPU accounting): ``python -m bench.sync_fanout.devices MODE ...``.

* ``sync HOST PORT COUNT EXPECTED``: open COUNT authenticated SYNC connections
  (devices ``dev-0`` …, all with the benchmark's secret), print ``ready``, then
  count MESSAGE frames until EXPECTED arrived; print one JSON line.
* ``udp EXPECTED``: bind a UDP socket on 127.0.0.1, print its port, count
  datagrams (plain blocking socket) until EXPECTED arrived; print one JSON line.

Messages are counted, not verified or acked: the benchmark measures the
dispatcher's fan-out, and verifying would measure this process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time

from pushsync.listener.connection import Session, open_session
from pushsync.wire.addresses import Address
from pushsync.wire.protocol import FrameType, encode_frame, encode_subscribe

SECRET = bytes(range(32))
CONNECT_AT_ONCE = 200
"""Handshakes in flight. All devices here share 127.0.0.1, so the benchmark's dispatcher
allows that many unauthenticated connections from one address (the default is 32)."""
TIMEOUT = 60.0


def device_id(n: int) -> str:
    return f"dev-{n}"


async def _sync(host: str, port: int, count: int, expected: int) -> dict[str, float | int]:
    server = Address(host=host, port=port)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)

    async def connect(n: int) -> Session:
        async with gate:
            session = await open_session(
                server, device=device_id(n), secret=SECRET, timeout=TIMEOUT
            )
            session.send(encode_subscribe())  # push my messages here
            return session

    started = time.time()
    sessions = await asyncio.gather(*(connect(n) for n in range(count)))
    connected = time.time() - started
    received = 0
    last = 0.0
    done = asyncio.Event()

    async def read(session: Session) -> None:
        nonlocal received, last
        while (frame := await session.recv()) is not None:
            if frame.type == FrameType.MESSAGE:
                received += 1
                last = time.time()
                if received >= expected:
                    done.set()
            elif frame.type == FrameType.PING:
                # Not within a run (heartbeats are 30 s), but a device answers.
                session.send(encode_frame(FrameType.PONG, frame.payload))

    readers = [asyncio.create_task(read(s)) for s in sessions]
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TIMEOUT)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for session in sessions:
        session.writer.close()
    return {"received": received, "last": last, "connect_seconds": connected}


def _udp(expected: int) -> dict[str, float | int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024 * 1024)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    print(sock.getsockname()[1], flush=True)
    received = 0
    last = 0.0
    try:
        while received < expected:
            sock.recv(2048)
            received += 1
            last = time.time()
    except TimeoutError:
        pass
    return {"received": received, "last": last}


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "sync":
        host, port, count, expected = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        result = asyncio.run(_sync(host, port, count, expected))
    else:
        result = _udp(int(argv[1]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
