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

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.listener.config import ListenerConfig, load_config
from pushsync.listener.sync import SyncResult, local_database, sync_once
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
