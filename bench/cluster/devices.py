"""One process of the cluster benchmark's devices:
``python -m bench.cluster.devices SOURCE FIRST COUNT HOST:PORT...``.

Devices ``dev-FIRST`` … ``dev-(FIRST+COUNT-1)`` connect from the local address
SOURCE (one loopback address per process, so that no process runs out of
ephemeral ports), device ``n`` to dispatcher ``n mod D`` of the D given, and
subscribe. A device whose connection ends reconnects as a listener does
(a jittered backoff, :class:`~pushsync.listener.connection.Backoff`), to the
next dispatcher that answers. Then the process prints
``ready STARTED SECONDS RETRIES CPU`` and obeys lines on stdin:

* ``count M``: from now on count MESSAGE frames; print ``counting`` at once and
  ``received N LAST`` once M arrived (or the time ran out), LAST the wall-clock
  time of the last.
* ``rehomed K``: print ``rehomed BACK LAST RETRIES`` once K devices whose
  connection ended are connected again (or the time ran out): how many are
  back, the wall-clock time the last one was, and how many rounds of
  handshakes were refused everywhere and waited a backoff.
* ``quit``: close every connection and exit.

Messages are counted, not verified or acked (that would measure this process).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field

from bench.fanout import SECRET, device_id
from bench.sync_fanout.devices import CONNECT_AT_ONCE
from pushsync.listener.connection import Backoff, Refused, Session, open_session
from pushsync.wire.addresses import Address
from pushsync.wire.protocol import FrameType, encode_frame, encode_subscribe

TIMEOUT = 120.0
HANDSHAKE_TIMEOUT = 30.0


@dataclass
class Devices:
    servers: list[Address]
    source: str
    gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(CONNECT_AT_ONCE))
    retries: int = 0
    counting: int = 0
    received: int = 0
    last: float = 0.0
    enough: asyncio.Event = field(default_factory=asyncio.Event)
    back: int = 0
    back_at: float = 0.0
    awaited: int = 0
    all_back: asyncio.Event = field(default_factory=asyncio.Event)
    sessions: dict[int, Session] = field(default_factory=dict)
    homes: dict[int, int] = field(default_factory=dict)
    """Device → the index of the dispatcher it is connected to."""

    async def connect(self, n: int, start: int) -> Session:
        """Device ``n`` connected and subscribed, trying dispatcher ``start`` first, then
        the next ones; a refused or failed handshake waits a backoff and tries again."""
        backoff = Backoff(first=0.5, most=5.0)
        attempt = 0
        while True:
            home = (start + attempt) % len(self.servers)
            server = self.servers[home]
            async with self.gate:
                try:
                    session = await open_session(
                        server,
                        device=device_id(n),
                        secret=SECRET,
                        timeout=HANDSHAKE_TIMEOUT,
                        local_host=self.source,
                    )
                except (OSError, Refused):
                    session = None
            if session is not None:
                session.send(encode_subscribe())  # push my messages here
                self.sessions[n] = session
                self.homes[n] = home
                return session
            attempt += 1
            if attempt % len(self.servers) == 0:  # none answered: wait, as a listener does
                self.retries += 1
                await asyncio.sleep(backoff.next())

    async def live(self, n: int, session: Session) -> None:
        """Read device ``n``'s frames; reconnect elsewhere when the connection ends."""
        while True:
            while (frame := await session.recv()) is not None:
                if frame.type == FrameType.MESSAGE:
                    self.received += 1
                    self.last = time.time()
                    if self.counting and self.received >= self.counting:
                        self.enough.set()
                elif frame.type == FrameType.PING:
                    session.send(encode_frame(FrameType.PONG, frame.payload))
            session = await self.connect(n, self.homes[n] + 1)
            self.back += 1
            self.back_at = time.time()
            if self.awaited and self.back >= self.awaited:
                self.all_back.set()


def _address(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host=host, port=int(port))


async def _commands(devices: Devices) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        if line[0] == "count":
            devices.received = 0
            devices.counting = int(line[1])
            devices.enough.clear()
            print("counting", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(devices.enough.wait(), TIMEOUT)
            print(f"received {devices.received} {devices.last}", flush=True)
        elif line[0] == "rehomed":
            devices.awaited = int(line[1])
            if devices.back >= devices.awaited:
                devices.all_back.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(devices.all_back.wait(), TIMEOUT)
            print(f"rehomed {devices.back} {devices.back_at} {devices.retries}", flush=True)
        elif line[0] == "quit":
            return


async def _main(source: str, first: int, count: int, servers: list[Address]) -> None:
    devices = Devices(servers=servers, source=source)
    readers: list[asyncio.Task[None]] = []

    async def connect(n: int) -> None:
        """Connect device ``n`` and read from then on (it answers the server's PINGs
        while the others connect, as a listener would)."""
        session = await devices.connect(n, n % len(servers))
        readers.append(asyncio.create_task(devices.live(n, session)))

    started = time.time()
    await asyncio.gather(*(connect(n) for n in range(first, first + count)))
    connected = time.time() - started
    print(f"ready {started} {connected} {devices.retries} {time.process_time()}", flush=True)
    try:
        await _commands(devices)
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for session in devices.sessions.values():
            session.writer.close()


def main(argv: list[str]) -> int:
    source, first, count = argv[0], int(argv[1]), int(argv[2])
    servers = [_address(text) for text in argv[3:]]
    asyncio.run(_main(source, first, count, servers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
