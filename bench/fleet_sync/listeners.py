"""Devices' real listeners for the push -> synced phase, many in one process.

``python -m bench.fleet_sync.listeners LIST`` (LIST: a file of listener config
paths, one a line) runs pushsync's own :class:`Listener` for each config: its
SYNC channel, and the handler that runs the built-in ``sync`` action on the
message ``sync`` (the real client, over the listener's own connection). It
prints ``ready N`` once the N listeners are connected, then ``synced DEVICE
EPOCH OK`` each time one's ``sync`` action ends, and stops when its standard
input closes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from pathlib import Path

from pushsync.listener.actions import Outcome
from pushsync.listener.channels import SyncChannel
from pushsync.listener.config import load_config
from pushsync.listener.runtime import Listener

READY_TIMEOUT = 600.0
"""Seconds every listener has to connect (the dispatcher admits a bounded number of
handshakes at once; the others retry)."""


class TimedListener(Listener):
    """A listener that says when each of its ``sync`` actions ended."""

    async def _synchronize(self) -> Outcome:
        outcome = await super()._synchronize()
        print(f"synced {self.config.device} {time.time():.6f} {int(outcome.ok)}", flush=True)
        return outcome


async def _connected(listener: Listener) -> None:
    await listener.started.wait()
    await listener.channel(SyncChannel).connected.wait()


async def run(paths: list[Path]) -> None:
    stop = asyncio.Event()
    listeners = [TimedListener(load_config(path)) for path in paths]
    tasks = [asyncio.create_task(listener.run(stop)) for listener in listeners]
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await asyncio.gather(*(_connected(listener) for listener in listeners))
        print(f"ready {len(listeners)}", flush=True)
        await asyncio.to_thread(sys.stdin.read)  # until the benchmark closes it
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> int:
    logging.basicConfig(level=logging.ERROR)  # a failed sync action: its `synced` line says
    paths = [Path(line) for line in Path(sys.argv[1]).read_text().splitlines() if line]
    asyncio.run(run(paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
