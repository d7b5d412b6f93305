"""A device of the trucking example's publication ``driver``, synchronized in this process.

:func:`device_config` writes a device's listener config for a dispatcher's SYNC
server; :func:`sync` runs one synchronization with the real client; the
``local_*`` functions read the device's SQLite file and :func:`write_locally`
edits it as the application on the device would.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.listener.config import ListenerConfig, load_config
from pushsync.listener.connection import open_session
from pushsync.listener.sync import SyncFailed, SyncResult, Transport, local_database, sync_once
from pushsync.wire import protocol
from tests.integration.trucking import RULES
from tests.support.dispatching import SECRET, server_address
from tests.support.keys import write_key


def device_config(tmp_path: Path, dispatcher: Dispatcher, device: str) -> ListenerConfig:
    directory = tmp_path / device
    directory.mkdir(exist_ok=True)
    write_key(directory / "device.key", SECRET)
    path = directory / "listener.yaml"
    path.write_text(
        f"""\
device: {device}
secret_file: device.key
state_dir: state
publication: driver
channels:
  sync: {{server: "{server_address(dispatcher)}"}}
handlers:
  - name: sync
    subject: sync
    action: sync
""",
        encoding="utf-8",
    )
    return load_config(path)


def local(config: ListenerConfig, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(config.state_dir / "local.db") as conn:
        return conn.execute(sql, params).fetchall()


def local_routes(config: ListenerConfig) -> list[tuple[Any, ...]]:
    return local(config, "SELECT route_id, route_name, driver_id FROM routes ORDER BY route_id")


def local_stops(config: ListenerConfig) -> list[tuple[Any, ...]]:
    return local(config, "SELECT route_id, seq, location_id FROM route_stops ORDER BY 1, 2")


def local_reports(config: ListenerConfig) -> list[tuple[Any, ...]]:
    return local(config, "SELECT location_id, status FROM disruption_reports ORDER BY 1")


async def sync(config: ListenerConfig) -> SyncResult:
    return await sync_once(config, SECRET)


def write_locally(config: ListenerConfig, sql: str, *params: Any) -> None:
    db = local_database(config)
    try:
        db.connection.execute(sql, params)
    finally:
        db.close()


class Cut:
    """A transport that loses the connection when ``cut`` says so."""

    def __init__(self, inner: Transport, cut: Any) -> None:
        self.inner = inner
        self.cut = cut
        self.seen: list[protocol.FrameType] = []

    def send(self, data: bytes) -> bool:
        return self.inner.send(data)

    async def recv(self, timeout: float | None = None) -> protocol.Frame | None:  # noqa: ASYNC109  the wrapped connection's own signature
        frame = await self.inner.recv(timeout)
        if frame is not None:
            self.seen.append(frame.type)
            if self.cut(frame, self.seen):
                return None
        return frame


async def sync_cut(config: ListenerConfig, dispatcher: Dispatcher, cut: Any) -> None:
    """Synchronize ``config``'s device through a :class:`Cut` connection: it must fail."""
    session = await open_session(server_address(dispatcher), device=config.device, secret=SECRET)
    try:
        with pytest.raises(SyncFailed):
            await sync_once(config, SECRET, Cut(session, cut))
    finally:
        await session.close()


ATOMIC = RULES.read_text().replace(
    "  - name: driver\n", "  - name: driver\n    upload: atomic\n", 1
)
"""The trucking example's rules with its ``driver`` publication's upload atomic."""
