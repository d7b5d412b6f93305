"""The golden SQL files apply to a real database, twice, and do what they say."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.integration import trucking
from tests.support.golden import CASES, GOLDEN


@pytest.fixture
def shop(db: psycopg.Connection) -> psycopg.Connection:
    db.execute((GOLDEN / "schema.sql").read_text())
    trucking.add_devices(db, "phone-1", "phone-2")
    db.execute("INSERT INTO shop.customers VALUES (1, 'phone-1', 'ann'), (2, 'phone-2', 'bo')")
    return db


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_golden_sql_applies_twice(shop: psycopg.Connection, case: Path) -> None:
    sql = case.with_suffix(".sql").read_text()
    for _ in range(2):
        with shop.transaction():
            shop.execute(sql)


def test_insert_basic_behaves(shop: psycopg.Connection) -> None:
    shop.execute((GOLDEN / "insert_basic.sql").read_text())
    shop.execute("INSERT INTO shop.orders VALUES (10, 1, 50), (11, 1, 150), (12, 2, 300)")
    rows = shop.execute(
        "SELECT device_id, subject, content FROM pushsync.outbox ORDER BY device_id"
    ).fetchall()
    assert rows == [
        ("phone-1", "order", "ann: order 11 for 150"),
        ("phone-2", "order", "bo: order 12 for 300"),
    ]


def test_price_drop_compares_old_and_new(shop: psycopg.Connection) -> None:
    shop.execute((GOLDEN / "update_columns_and_old.sql").read_text())
    shop.execute("INSERT INTO shop.products VALUES (1, 'kettle', 30), (2, 'mug', 5)")
    shop.execute("INSERT INTO shop.watchers VALUES (1, 'phone-1'), (2, 'phone-1')")
    shop.execute("UPDATE shop.products SET price = price + CASE name WHEN 'mug' THEN 1 ELSE -5 END")
    rows = shop.execute("SELECT rule, device_id, content, priority, gateway FROM pushsync.outbox")
    assert rows.fetchall() == [("price_drop", "phone-1", "kettle: 30 -> 25, {sale}", "high", "udp")]


def test_poll_function_queues_once_until_confirmed(shop: psycopg.Connection) -> None:
    shop.execute((GOLDEN / "delete_and_polls.sql").read_text())
    shop.execute("INSERT INTO shop.stale_devices VALUES ('phone-1'), ('phone-1'), ('unknown')")
    assert shop.execute('SELECT pushsync."poll__catalog_refresh"()').fetchone() == (1,)
    assert shop.execute('SELECT pushsync."poll__catalog_refresh"()').fetchone() == (1,)  # folded
    shop.execute("UPDATE pushsync.outbox SET state = 'sent'")
    assert shop.execute('SELECT pushsync."poll__catalog_refresh"()').fetchone() == (0,)
    rows = shop.execute("SELECT rule, device_id, subject, content, coalesced FROM pushsync.outbox")
    assert rows.fetchall() == [("catalog_refresh", "phone-1", "sync", "catalog", 1)]
    assert shop.execute('SELECT pushsync."poll__bare"()').fetchone() == (1,)
    bare = shop.execute("SELECT subject, content FROM pushsync.outbox WHERE rule = 'bare'")
    assert bare.fetchall() == [("bare", "")]
    registered = shop.execute(
        "SELECT name, kind, every, function_name FROM pushsync.rules WHERE kind = 'poll' "
        "ORDER BY name"
    ).fetchall()
    assert [(r[0], r[2].total_seconds(), r[3]) for r in registered] == [
        ("bare", 90.0, "poll__bare"),
        ("catalog_refresh", 60.0, "poll__catalog_refresh"),
    ]


def test_delete_rules_and_gateway(shop: psycopg.Connection) -> None:
    shop.execute((GOLDEN / "delete_and_polls.sql").read_text())
    shop.execute("DELETE FROM shop.customers WHERE customer_id = 1")
    rows = shop.execute(
        "SELECT rule, device_id, subject, content, gateway FROM pushsync.outbox "
        "ORDER BY rule, device_id"
    ).fetchall()
    assert rows == [
        ("account_closed", "phone-1", "bye", "it's been a pleasure, ann", "smtp"),
        ("all_devices_on_delete", "phone-1", "all_devices_on_delete", "", "auto"),
        ("all_devices_on_delete", "phone-2", "all_devices_on_delete", "", "auto"),
    ]


def test_renamed_reaches_every_device_once_from_one_picked_row(shop: psycopg.Connection) -> None:
    shop.execute((GOLDEN / "update_columns_and_old.sql").read_text())
    shop.execute("INSERT INTO shop.products SELECT i, 'p' || i, 10 FROM generate_series(1, 100) i")
    shop.execute("UPDATE shop.products SET name = upper(name) WHERE product_id <= 70")
    shop.execute("UPDATE shop.products SET price = price WHERE product_id > 70")  # no rename
    rows = shop.execute(
        "SELECT rule, device_id, subject, coalesced FROM pushsync.outbox ORDER BY device_id"
    ).fetchall()
    assert rows == [("renamed", "phone-1", "renamed", 0), ("renamed", "phone-2", "renamed", 0)]
