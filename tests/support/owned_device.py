"""A device as its owner holds it: a valid key, a listener config and the SQLite file.

The security tests play a device owner who edits the local database by hand —
the published tables, and the change log the sync client uploads from
(``_pushsync_changes``: forged rows, forged or missing ``old`` images) — and
then synchronizes with the real client (:func:`pushsync.listener.sync.sync_once`)
or the real ``pushsync sync`` command. :func:`server_state` takes what such a
device could change on the server, to compare before and after.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pushsync.listener.config import ListenerConfig, load_config
from pushsync.listener.localdb import LocalDatabase
from pushsync.listener.sync import SyncResult, sync_once
from pushsync.wire.protocol import format_secret

SECRET = bytes(range(32))
"""The key of the tests' devices (``trucking.setup`` gives every device another one)."""

APPLICATION_TABLES = (
    "public.drivers",
    "public.routes",
    "public.route_stops",
    "public.disruption_reports",
)


@dataclass(frozen=True, slots=True)
class OwnedDevice:
    """One device's directory: ``listener.yaml``, its key and ``state/local.db``."""

    name: str
    directory: Path
    secret: bytes = SECRET

    @classmethod
    def make(
        cls,
        root: Path,
        name: str,
        server: str,
        *,
        publication: str | None = "driver",
        label: str | None = None,
        secret: bytes = SECRET,
        key_file: Path | None = None,
    ) -> OwnedDevice:
        """Write the device's config (and key, unless ``key_file`` holds one already) in
        ``root/label`` (``label``: the device's name unless a second copy is wanted)."""
        directory = root / (label or name)
        directory.mkdir(parents=True, exist_ok=True)
        key = key_file or directory / "device.key"
        if key_file is None:
            key.write_text(format_secret(secret), encoding="ascii")
            key.chmod(0o600)
        named = f"publication: {publication}\n" if publication is not None else ""
        (directory / "listener.yaml").write_text(
            f"device: {name}\nsecret_file: {key}\nstate_dir: state\n{named}"
            f'channels:\n  sync: {{server: "{server}"}}\n'
            "handlers:\n  - name: sync\n    subject: sync\n    action: sync\n",
            encoding="utf-8",
        )
        return cls(name=name, directory=directory, secret=secret)

    @property
    def config_path(self) -> Path:
        return self.directory / "listener.yaml"

    @property
    def config(self) -> ListenerConfig:
        return load_config(self.config_path)

    @property
    def local_db(self) -> Path:
        return self.config.state_dir / "local.db"

    async def sync(self) -> SyncResult:
        """One synchronization with the real client, over a connection of its own."""
        return await sync_once(self.config, self.secret)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        """Run ``query`` on the local database, as the owner may (committed at once)."""
        LocalDatabase.open(self.local_db).close()  # the file and its meta tables exist
        with sqlite3.connect(self.local_db) as conn:
            return conn.execute(query, params).fetchall()

    def forge(
        self,
        table: str,
        op: str,
        key: dict[str, Any],
        *,
        old: dict[str, Any] | None = None,
        new: dict[str, Any] | None = None,
    ) -> int:
        """Write a change into the change log by hand; its seq."""
        self.sql(
            'INSERT INTO _pushsync_changes ("table", op, "key", old, new) VALUES (?, ?, ?, ?, ?)',
            table,
            op,
            json.dumps(key),
            None if old is None else json.dumps(old),
            None if new is None else json.dumps(new),
        )
        [(seq,)] = self.sql("SELECT max(seq) FROM _pushsync_changes")
        return int(seq)

    def rejected(self) -> list[str]:
        """The reasons the server gave for the changes it refused, in order."""
        db = LocalDatabase.open(self.local_db)
        try:
            return [r.reason for r in db.rejected()]
        finally:
            db.close()

    def pending(self) -> int:
        db = LocalDatabase.open(self.local_db)
        try:
            return len(db.pending())
        finally:
            db.close()


def server_state(db: psycopg.Connection) -> dict[str, Any]:
    """Everything a device's synchronization could change on the server, comparable."""
    state: dict[str, Any] = {}
    for table in APPLICATION_TABLES:
        row = db.execute(
            f"SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY to_jsonb(t)::text), '[]') "
            f"FROM {table} AS t"  # a constant of this module
        ).fetchone()
        assert row is not None
        state[table] = row[0]
    queries = {
        "outbox": "SELECT rule, device_id, subject, content, state FROM pushsync.outbox "
        "ORDER BY 1, 2, 3, 4",
        "changes": "SELECT table_name, key::text FROM pushsync.changes ORDER BY 1, 2",
        "devices": "SELECT device_id, enabled, secret FROM pushsync.devices ORDER BY 1",
    }
    if db.execute("SELECT to_regclass('pushsync.device_publications')").fetchone() != (None,):
        queries["grants"] = (
            "SELECT device_id, publication FROM pushsync.device_publications ORDER BY 1, 2"
        )
    for name, query in queries.items():
        state[name] = db.execute(query).fetchall()
    return state
