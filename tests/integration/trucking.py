"""The trucking example on a real database: schema, rules, devices, helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pushsync import generator

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trucking"
RULES = EXAMPLE / "rules.yaml"


def apply_rules(db: psycopg.Connection, text: str | None = None) -> str:
    """Compile rules (the example's unless ``text``) and apply them; return the SQL."""
    rules = generator.load(RULES) if text is None else generator.loads(text, "rules.yaml")
    sql = generator.compile_rules(rules)
    with db.transaction():
        db.execute(sql)
    return sql


def setup(db: psycopg.Connection) -> None:
    """Schema, rules and a small fleet.

    Drivers 1-4 carry devices truck-1..truck-4; driver 5's device is not
    registered with pushsync. Routes and the locations they pass:
    north (1): 100, 101 - south (2): 100 - east (3): 300 - west (4): 100 twice.
    """
    db.execute((EXAMPLE / "schema.sql").read_text())
    apply_rules(db)
    add_devices(db, "truck-1", "truck-2", "truck-3", "truck-4")
    db.execute(
        "INSERT INTO public.drivers (driver_id, name, device_id) VALUES "
        "(1, 'Ann', 'truck-1'), (2, 'Bo', 'truck-2'), (3, 'Cy', 'truck-3'), "
        "(4, 'Di', 'truck-4'), (5, 'Ed', 'truck-5')"
    )
    db.execute(
        "INSERT INTO public.routes VALUES (10, 'north', 1), (20, 'south', 2), "
        "(30, 'east', 3), (40, 'west', 4), (50, 'spare', 5)"
    )
    db.execute(
        "INSERT INTO public.route_stops VALUES (10, 1, 100), (10, 2, 101), (20, 1, 100), "
        "(30, 1, 300), (40, 1, 100), (40, 2, 100), (50, 1, 100)"
    )
    clear_outbox(db)


def add_devices(
    db: psycopg.Connection, *device_ids: str, publications: tuple[str, ...] = ("driver",)
) -> None:
    """Register devices, each allowed to synchronize ``publications``."""
    for device_id in device_ids:
        db.execute(
            "INSERT INTO pushsync.devices (device_id, secret) VALUES (%s, %s)",
            (device_id, b"0123456789abcdef"),
        )
        db.execute(
            "INSERT INTO pushsync.device_publications (device_id, publication) "
            "SELECT %s, unnest(%s::text[])",
            (device_id, list(publications)),
        )


def clear_outbox(db: psycopg.Connection) -> None:
    db.execute("DELETE FROM pushsync.outbox")


def outbox(db: psycopg.Connection, rule: str | None = None) -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute(
            "SELECT rule, device_id, subject, content, priority, gateway, coalesced, state, "
            "expires_at - created_at AS ttl, resend_every "
            "FROM pushsync.outbox WHERE %(rule)s::text IS NULL OR rule = %(rule)s "
            "ORDER BY rule, device_id, content, state",
            {"rule": rule},
        )
        return cur.fetchall()


def devices_of(db: psycopg.Connection, rule: str | None = None) -> list[str]:
    return [row["device_id"] for row in outbox(db, rule)]


def report(db: psycopg.Connection, location: int, by: int, status: str = "open") -> None:
    db.execute(
        "INSERT INTO public.disruption_reports (location_id, reported_by, status) "
        "VALUES (%s, %s, %s)",
        (location, by, status),
    )
