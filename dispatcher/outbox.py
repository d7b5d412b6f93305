"""The outbox relay's store: claim due notifications, record what became of them.

A small synchronous store over one psycopg 3 connection; every method is one
statement from the named blocks of ``sql/dispatcher.sql`` (the async
dispatcher runs the same blocks). Methods take effect in the connection's
current transaction, or at once on an autocommit connection.

States and the claim contract are in ``docs/schema.md``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import class_row

from pushsync import queries


def query(name: str) -> str:
    """The named block ``name`` of ``sql/dispatcher.sql``."""
    return queries.get(name, "dispatcher.sql")


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A notification claimed for sending, with what a sender needs to send it."""

    request_id: uuid.UUID
    rule: str
    device_id: str
    subject: str
    content: str
    priority: str
    gateway: str
    created_at: datetime
    expires_at: datetime
    attempts: int
    secret: bytes
    udp_address: str | None
    email_address: str | None


class OutboxStore:
    """Claims and finishes outbox rows as the dispatcher ``owner``."""

    def __init__(self, conn: psycopg.Connection[Any], owner: str) -> None:
        self.conn = conn
        self.owner = owner

    def claim(self, limit: int, lease: timedelta) -> list[Claimed]:
        """Up to ``limit`` due rows, now ``sending`` under a lease of ``lease``."""
        with self.conn.cursor(row_factory=class_row(Claimed)) as cur:
            cur.execute(query("claim"), {"owner": self.owner, "limit": limit, "lease": lease})
            return cur.fetchall()

    def sent(self, request_id: uuid.UUID, gateway: str) -> bool:
        """Record a send through ``gateway``; False if this owner no longer holds the row."""
        params = {"owner": self.owner, "request_id": request_id, "gateway": gateway}
        return self._changed("sent", params) == 1

    def release(self, request_ids: Iterable[uuid.UUID]) -> int:
        """Give back rows this owner holds, unsent; how many were given back."""
        params = {"owner": self.owner, "request_ids": list(request_ids)}
        return self._changed("release", params)

    def failed(self, request_id: uuid.UUID, error: str, *, final: bool) -> bool:
        """Record a failed send: ``final`` → ``failed``, else retried at the next resend."""
        params = {"owner": self.owner, "request_id": request_id, "error": error, "final": final}
        return self._changed("failed", params) == 1

    def confirm(self, request_id: uuid.UUID, device_id: str) -> bool:
        """``device_id`` has the message; False if it is not that device's or not sent."""
        params = {"request_id": request_id, "device_id": device_id}
        row = self.conn.execute(query("confirm"), params).fetchone()
        return bool(row and row[0])

    def expire(self) -> int:
        """Mark rows past their ``expires_at`` as ``expired``; how many."""
        return self._changed("expire", {})

    def archive(self, batch: int) -> int:
        """Move up to ``batch`` finished rows to ``outbox_history``; how many."""
        return self._changed("archive", {"batch": batch})

    def _changed(self, name: str, params: dict[str, Any]) -> int:
        with self.conn.cursor() as cur:
            cur.execute(query(name), params)
            return cur.rowcount
