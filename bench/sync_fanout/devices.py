"""The devices of the benchmark, in a process of their own (so they do not share the
dispatcher's CPU accounting): ``python -m bench.sync_fanout.devices MODE ...``.

* ``sync HOST PORT FIRST COUNT EXPECTED [SOURCE]``: open COUNT authenticated SYNC
  connections (devices ``dev-FIRST`` …, all with the benchmark's secret; from the
  local address SOURCE if given), print ``ready STARTED SECONDS RETRIES CPU`` (the
  wall-clock time the first connection began, how long opening them all took,
  how many handshakes were refused and tried again, and this process's CPU
  seconds so far), then count MESSAGE frames until EXPECTED arrived; print one
  JSON line (with how many connections the server closed meanwhile).
* ``udp EXPECTED``: bind a UDP socket on 127.0.0.1, print its port, count
  datagrams (plain blocking socket) until EXPECTED arrived; print one JSON line.

Messages are counted, not verified or acked: the benchmark measures the
dispatcher's fan-out, and verifying would measure this process instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

from bench.fanout import SECRET, device_id, receive_udp
from pushsync.listener.connection import Refused, Session, open_session
from pushsync.wire.addresses import Address
from pushsync.wire.protocol import FrameType, encode_frame, encode_subscribe

CONNECT_AT_ONCE = 200
"""Handshakes in flight. All devices here share 127.0.0.1, so the benchmark's dispatcher
allows that many unauthenticated connections from one address (the default is 32)."""
TIMEOUT = 60.0
ATTEMPTS = 5
"""Handshakes per device before the run fails (a refused one is tried again, as a
listener would, and counted)."""


async def _sync(
    host: str, port: int, first: int, count: int, expected: int, source: str | None
) -> dict[str, float | int]:
    server = Address(host=host, port=port)
    gate = asyncio.Semaphore(CONNECT_AT_ONCE)
    retries = 0

    async def connect(n: int) -> Session:
        nonlocal retries
        async with gate:
            for attempt in range(ATTEMPTS):
                try:
                    session = await open_session(
                        server,
                        device=device_id(n),
                        secret=SECRET,
                        timeout=TIMEOUT,
                        local_host=source,
                    )
                except (OSError, Refused):
                    if attempt + 1 == ATTEMPTS:
                        raise
                    retries += 1
                    await asyncio.sleep(0.2 * (attempt + 1))
                else:
                    session.send(encode_subscribe())  # push my messages here
                    return session
        raise AssertionError("unreachable")

    received = 0
    dropped = 0
    last = 0.0
    done = asyncio.Event()

    async def read(session: Session) -> None:
        """From the moment the device is connected, as a listener would: a device that
        did not answer the server's PINGs while the others connect would be dropped."""
        nonlocal received, dropped, last
        while (frame := await session.recv()) is not None:
            if frame.type == FrameType.MESSAGE:
                received += 1
                last = time.time()
                if received >= expected:
                    done.set()
            elif frame.type == FrameType.PING:
                session.send(encode_frame(FrameType.PONG, frame.payload))
        dropped += 1

    readers: list[asyncio.Task[None]] = []

    async def connect_and_read(n: int) -> Session:
        session = await connect(n)
        readers.append(asyncio.create_task(read(session)))
        return session

    started = time.time()
    sessions = await asyncio.gather(*(connect_and_read(n) for n in range(first, first + count)))
    connected = time.time() - started
    cpu = time.process_time()
    print(f"ready {started} {connected} {retries} {cpu}", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), TIMEOUT)
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    for session in sessions:
        session.writer.close()
    return {
        "received": received,
        "last": last,
        "connect_seconds": connected,
        "retries": retries,
        "dropped": dropped,
    }


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "sync":
        host, port = argv[1], int(argv[2])
        first, count, expected = int(argv[3]), int(argv[4]), int(argv[5])
        source = argv[6] if len(argv) > 6 else None
        result = asyncio.run(_sync(host, port, first, count, expected, source))
    else:
        result = receive_udp(int(argv[1]))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
