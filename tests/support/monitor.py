"""The web console in this process on 127.0.0.1:0, and rows for it to show."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

import psycopg

from pushsync.monitor.server import Console, MonitorSettings

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def monitoring_role_statements(role: str) -> list[str]:
    """docs/operations.md's block creating the monitoring role, for a role named ``role``."""
    blocks = re.findall(r"```sql\n(.*?)```", OPERATIONS.read_text(encoding="utf-8"), re.DOTALL)
    block = next(b for b in blocks if "CREATE ROLE pushsync_monitor" in b)
    return [s.strip().replace("pushsync_monitor", role) for s in block.split(";") if s.strip()]


@asynccontextmanager
async def console(
    dsn: str,
    *,
    token: str | None = None,
    listen: str = "127.0.0.1:0",
    pulse_every: float = 0.1,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
) -> AsyncIterator[Console]:
    """A :class:`~pushsync.monitor.server.Console` serving for the block."""
    settings = MonitorSettings(
        dsn=dsn,
        listen=listen,
        token=token,
        pulse_every=pulse_every,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
    )
    served = Console(settings)
    await served.start()
    try:
        yield served
    finally:
        await served.close()


def finished(
    db: psycopg.Connection,
    device: str,
    *,
    rule: str = "route_disruption",
    content: str = "detour",
    state: str = "confirmed",
    gateway: str = "sync",
    created: datetime,
    sent_after: float = 0.02,
    confirmed_after: float = 0.05,
) -> uuid.UUID:
    """One row of ``outbox_history``, as the dispatcher would have archived it."""
    request_id = uuid.uuid4()
    sent = created + timedelta(seconds=sent_after)
    confirmed = sent + timedelta(seconds=confirmed_after) if state == "confirmed" else None
    ended = confirmed or created + timedelta(hours=1)
    db.execute(
        "INSERT INTO pushsync.outbox_history (request_id, rule, device_id, subject, content,"
        " priority, gateway, coalesced, created_at, expires_at, attempts, state, sent_at,"
        " gateway_used, confirmed_at, finished_at) VALUES (%s, %s, %s, 'sync', %s, 'normal',"
        " 'auto', 0, %s, %s, 1, %s, %s, %s, %s, %s)",
        (request_id, rule, device, content, created, created + timedelta(hours=1), state,
         sent, gateway, confirmed, ended),
    )  # fmt: skip
    return request_id


def synchronized(
    db: psycopg.Connection,
    device: str,
    *,
    started: datetime,
    seconds: float = 0.2,
    uploaded: int = 0,
    downloaded: int = 0,
    conflicts: int = 0,
    outcome: str = "ok",
) -> None:
    """One row of ``sync_sessions``."""
    db.execute(
        "INSERT INTO pushsync.sync_sessions (device_id, publication, started_at, finished_at,"
        " upload_rows, download_rows, conflicts, outcome) VALUES (%s, 'driver', %s, %s, %s,"
        " %s, %s, %s)",
        (device, started, started + timedelta(seconds=seconds), uploaded, downloaded,
         conflicts, outcome),
    )  # fmt: skip
