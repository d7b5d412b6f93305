"""The SQL of docs/operations.md does what the text says, on a real database.

The statements are taken from the documentation itself: the monitoring role
can run ``pushsync status`` and ``pushsync device list`` and cannot read device
secrets; the two ways of pruning ``outbox_history`` delete what is older than
30 days and keep the rest.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pushsync import devices, status

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def sql_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)


def statements(block: str) -> list[str]:
    return [s.strip() for s in block.split(";") if s.strip()]


@pytest.fixture
def monitor(db: psycopg.Connection) -> Iterator[str]:
    """A role made by the documented block, under a name of its own."""
    role = f"pushsync_monitor_{uuid.uuid4().hex[:8]}"
    block = next(b for b in sql_blocks() if "CREATE ROLE pushsync_monitor" in b)
    for statement in statements(block):
        db.execute(statement.replace("pushsync_monitor", role))  # our own documentation's SQL
    try:
        yield role
    finally:
        db.execute(f'DROP OWNED BY "{role}"')
        db.execute(f'DROP ROLE "{role}"')


def test_the_monitoring_role_runs_status_and_device_list(
    db: psycopg.Connection, dsn: str, monitor: str
) -> None:
    db.execute(
        "INSERT INTO pushsync.devices (device_id, secret) VALUES ('truck-1', %s)", (bytes(32),)
    )
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "VALUES ('truck-1', 'udp', 'tracking', '198.51.100.4:5001')"
    )
    db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, expires_at, resend_every) "
        "VALUES ('r', 'truck-1', now() + interval '1 hour', '5 minutes')"
    )
    with psycopg.connect(make_conninfo(dsn, user=monitor), autocommit=True) as conn:
        figures = status.collect(conn)
        assert figures["outbox"]["pending"] == 1
        (listed,) = devices.listing(conn)
        assert listed["device_id"] == "truck-1"
        assert [a["address"] for a in listed["addresses"]] == ["198.51.100.4:5001"]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT secret FROM pushsync.devices")


@pytest.mark.parametrize("which", ["at once", "in batches"])
def test_pruning_outbox_history(db: psycopg.Connection, which: str) -> None:
    db.execute(
        "INSERT INTO pushsync.outbox_history (request_id, rule, device_id, subject, content, "
        "priority, gateway, coalesced, created_at, expires_at, attempts, state, finished_at) "
        "SELECT gen_random_uuid(), 'r', 'truck-1', 'sync', '', 'normal', 'auto', 0, "
        "now() - d * interval '1 day', now() - d * interval '1 day', 1, 'confirmed', "
        "now() - (d + 0.5) * interval '1 day' FROM generate_series(0, 59) AS d"
    )
    prunes = [b for b in sql_blocks() if b.startswith("DELETE FROM pushsync.outbox_history")]
    assert len(prunes) == 2
    (statement,) = statements(prunes[0 if which == "at once" else 1])
    deleted = db.execute(statement).rowcount
    assert deleted == 30  # finished 30.5 to 59.5 days ago
    left = db.execute(
        "SELECT min(finished_at) > now() - interval '30 days' FROM pushsync.outbox_history"
    ).fetchone()
    assert left == (True,)
    assert db.execute(statement).rowcount == 0
