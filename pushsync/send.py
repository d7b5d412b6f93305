"""``pushsync send``: a test push through the real outbox, and waiting for its outcome.

The row is what a rule would write (``docs/schema.md``), under the rule name
:data:`RULE`, which no rules file can use; the dispatchers send it as any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from pushsync import queries
from pushsync.errors import UsageError

RULE = "(send)"
"""The ``rule`` of a row ``pushsync send`` wrote: not a rule name a rules file allows."""

GATEWAYS = ("auto", "sync", "mqtt", "udp", "smtp")
FINISHED = ("confirmed", "expired", "failed")
EXPIRY_GRACE = 15.0
"""Seconds ``--wait`` waits past the time to live: dispatchers mark rows expired on their
housekeeping round (every 5 s by default), not at the instant."""


@dataclass(frozen=True, slots=True)
class Push:
    device_id: str
    subject: str
    content: str = ""
    gateway: str = "auto"
    ttl: timedelta = timedelta(minutes=10)
    resend_every: timedelta = timedelta(seconds=30)


@dataclass(frozen=True, slots=True)
class Outcome:
    request_id: str
    state: str
    gateway_used: str | None
    attempts: int
    last_error: str | None


def send(conn: psycopg.Connection, push: Push) -> str:
    """Queue ``push`` and wake the dispatchers; its request id. UsageError if the device
    is unknown or disabled (a rule would skip it too)."""
    with conn.transaction():
        row = conn.execute(
            queries.get("send_push"),
            {
                "rule": RULE,
                "device_id": push.device_id,
                "subject": push.subject,
                "content": push.content,
                "gateway": push.gateway,
                "ttl": push.ttl,
                "resend_every": push.resend_every,
            },
        ).fetchone()
        if row is None:
            state = conn.execute(
                queries.get("device_enabled"), {"device_id": push.device_id}
            ).fetchone()
            if state is None:
                raise UsageError(f"there is no device {push.device_id}")
            raise UsageError(
                f"device {push.device_id} is disabled: pushsync device enable it first"
            )
        conn.execute("SELECT pg_notify('pushsync', '')")
    return str(row[0])


def outcome(conn: psycopg.Connection, request_id: str) -> Outcome | None:
    """Where the push is now, in the outbox or its history; None if it is in neither."""
    row: Any = conn.execute(queries.get("send_outcome"), {"request_id": request_id}).fetchone()
    if row is None:
        return None
    return Outcome(request_id, row[0], row[1], row[2], row[3])


def wait(conn: psycopg.Connection, request_id: str, timeout: float, every: float = 0.1) -> Outcome:
    """Poll :func:`outcome` until the push is confirmed, expired or failed, or ``timeout``
    seconds pass (then its state then, e.g. ``sent``)."""
    deadline = time.monotonic() + timeout
    while True:
        found = outcome(conn, request_id)
        if found is None:
            raise UsageError(f"request {request_id} is neither in the outbox nor in its history")
        if found.state in FINISHED or time.monotonic() >= deadline:
            return found
        time.sleep(every)
