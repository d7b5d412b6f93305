"""The nothing-changed phase: devices synchronizing one after the other, as listeners do.

``python -m bench.fleet_sync.idle PORT LIST held|ahead`` (LIST: a file of
listener config paths, one a line) holds each device's local database open the
way its listener does (:class:`KeptDatabase`, opened as the listener starts),
and with ``held`` each device's SYNC connection too, as a running listener
holds it; prints ``ready N``, and on a line on its standard input synchronizes
the devices one after the other with the listener's own call (``sync_once``
with the kept database, under ``sync.lock``) over that connection (``ahead``:
over a connection opened while the ones before synchronized). It then prints
one JSON line: each synchronization's seconds as the device saw them, the rows
and bytes it received, and the wall time from the start signal to the last one.

Each device holds three files (its WAL database) and a socket, so a fleet of
10,000 runs in a few of these processes, one after the other (``cli.py``).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from pushsync.listener.config import ListenerConfig, load_config, read_secret_file
from pushsync.listener.connection import Session, open_session
from pushsync.listener.sync import KeptDatabase, sync_once
from pushsync.wire import protocol
from pushsync.wire.addresses import Address

OPEN_AHEAD = 4
"""``ahead``: connections opened ahead of the device synchronizing."""
FILES_PER_DEVICE = 4
"""The database, its WAL, its shared-memory index, and the device's SYNC connection."""
HANDSHAKES = 64
"""Connections opened at once before the phase (the dispatcher admits a bounded number)."""


class Counting:
    """A SYNC session that counts the bytes of the frames the server sends."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.received = 0

    def send(self, data: bytes) -> bool:
        return self.session.send(data)

    async def recv(self, timeout: float | None = None) -> protocol.Frame | None:  # noqa: ASYNC109  the Transport interface
        frame = await self.session.recv(timeout)
        if frame is not None:
            self.received += len(frame.payload)
        return frame


def devices_per_process() -> int:
    """How many kept databases one process may hold within its hard limit of open files."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 10_000
    return max(1, (hard - 100 - 2 * OPEN_AHEAD) // FILES_PER_DEVICE)


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


Devices = list[tuple[ListenerConfig, bytes, KeptDatabase]]


async def _connect(server: Address, config: ListenerConfig, secret: bytes) -> Session:
    return await open_session(server, device=config.device, secret=secret)


async def _held(server: Address, devices: Devices, go: asyncio.Future[None]) -> dict[str, Any]:
    """Every device's connection opened first; then each synchronizes over its own."""
    gate = asyncio.Semaphore(HANDSHAKES)

    async def connect(config: ListenerConfig, secret: bytes) -> Session:
        async with gate:
            return await _connect(server, config, secret)

    sessions = await asyncio.gather(*(connect(c, s) for c, s, _ in devices))
    print(f"ready {len(devices)}", flush=True)
    await go
    seconds: list[float] = []
    rows = received = 0
    started = time.perf_counter()
    for session, (config, secret, kept) in zip(sessions, devices, strict=True):
        counting = Counting(session)
        began = time.perf_counter()
        result = await sync_once(config, secret, counting, kept=kept)
        seconds.append(time.perf_counter() - began)
        rows += result.upserted + result.deleted
        received += counting.received
    wall = time.perf_counter() - started
    await asyncio.gather(*(session.close("done") for session in sessions))
    return {"seconds": seconds, "rows": rows, "bytes": received, "wall_seconds": wall}


async def _ahead(server: Address, devices: Devices, go: asyncio.Future[None]) -> dict[str, Any]:
    """Each device synchronizes over a connection opened while the ones before did."""
    print(f"ready {len(devices)}", flush=True)
    await go

    async def connect(config: ListenerConfig, secret: bytes) -> Session:
        return await _connect(server, config, secret)

    opening = [asyncio.create_task(connect(c, s)) for c, s, _ in devices[:OPEN_AHEAD]]
    closing: list[asyncio.Task[None]] = []
    seconds: list[float] = []
    rows = received = 0
    started = time.perf_counter()
    for n, (config, secret, kept) in enumerate(devices):
        session = await opening[n]
        if n + OPEN_AHEAD < len(devices):
            ahead, key, _ = devices[n + OPEN_AHEAD]
            opening.append(asyncio.create_task(connect(ahead, key)))
        counting = Counting(session)
        try:
            began = time.perf_counter()
            result = await sync_once(config, secret, counting, kept=kept)
            seconds.append(time.perf_counter() - began)
        finally:
            closing.append(asyncio.create_task(session.close("sync done")))
        rows += result.upserted + result.deleted
        received += counting.received
    wall = time.perf_counter() - started
    await asyncio.gather(*closing)
    return {"seconds": seconds, "rows": rows, "bytes": received, "wall_seconds": wall}


async def _run(server: Address, devices: Devices, held: bool) -> dict[str, Any]:
    go = asyncio.get_running_loop().create_future()

    async def signal() -> None:
        await asyncio.to_thread(sys.stdin.readline)
        go.set_result(None)

    waiting = asyncio.create_task(signal())
    try:
        return await (_held if held else _ahead)(server, devices, go)
    finally:
        await waiting


def main() -> int:
    _raise_file_limit()
    port, listing, mode = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    configs = [load_config(Path(line)) for line in listing.read_text().splitlines() if line]
    devices = []
    for config in configs:
        kept = KeptDatabase()
        kept.open(config)  # as the listener opened it when it started
        devices.append((config, read_secret_file(config), kept))
    server = Address(host="127.0.0.1", port=port)
    try:
        figures = asyncio.run(_run(server, devices, held=mode == "held"))
    finally:
        for _, _, kept in devices:
            kept.close()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
