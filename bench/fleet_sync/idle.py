"""The nothing-changed phase: devices synchronizing one after the other, as listeners do.

``python -m bench.fleet_sync.idle PORT LIST`` (LIST: a file of listener config
paths, one a line) holds each device's local database open the way its
listener does after its first ``sync`` action (:class:`KeptDatabase`), prints
``ready N``, and on a line on its standard input synchronizes the devices one
after the other with the listener's own call (``sync_once`` with the kept
database, under ``sync.lock``), each over a SYNC connection opened while the
ones before synchronized (a listener holds its connection). It then prints one
JSON line: each synchronization's seconds as the device saw them, the rows and
bytes it received, and the wall time from the start signal to the last one.

Each open WAL database holds three files, so a fleet of 10,000 runs in a few
of these processes, one after the other (``cli.py``).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from bench.fleet_sync.cli import OPEN_AHEAD, Counting
from pushsync.listener.config import ListenerConfig, load_config, read_secret_file
from pushsync.listener.connection import Session, open_session
from pushsync.listener.sync import KeptDatabase, sync_once
from pushsync.wire.addresses import Address

FILES_PER_DATABASE = 3
"""The database, its WAL and its shared-memory index."""


def devices_per_process() -> int:
    """How many kept databases one process may hold within its hard limit of open files."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        return 10_000
    return max(1, (hard - 100 - 2 * OPEN_AHEAD) // FILES_PER_DATABASE)


def _raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _one_by_one(
    server: Address, devices: list[tuple[ListenerConfig, bytes, KeptDatabase]]
) -> dict[str, Any]:
    async def connect(config: ListenerConfig, secret: bytes) -> Session:
        return await open_session(server, device=config.device, secret=secret)

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


def main() -> int:
    _raise_file_limit()
    port, listing = int(sys.argv[1]), Path(sys.argv[2])
    configs = [load_config(Path(line)) for line in listing.read_text().splitlines() if line]
    devices = []
    for config in configs:
        kept = KeptDatabase()
        kept.open(config)  # as the listener's first sync action left it
        devices.append((config, read_secret_file(config), kept))
    print(f"ready {len(devices)}", flush=True)
    sys.stdin.readline()
    try:
        figures = asyncio.run(_one_by_one(Address(host="127.0.0.1", port=port), devices))
    finally:
        for _, _, kept in devices:
            kept.close()
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
