"""The device's local database: downloads, change capture, uploads, schema drift, durability."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushsync.errors import PushsyncError
from pushsync.listener import localdb
from pushsync.listener.localdb import (
    ApplyStats,
    Column,
    LocalDatabase,
    LocalDatabaseError,
    TableDownload,
    TableSchema,
)
from pushsync.wire.sync import Change

ROUTES = TableSchema(
    name="public.routes",
    columns=(Column("route_id", "integer"), Column("name", "text"), Column("driver_id", "bigint")),
    key=("route_id",),
)

# Every kind of column the type mapping knows.
VALUES = TableSchema(
    name="public.values",
    columns=(
        Column("id", "integer"),
        Column("amount", "numeric(30,3)"),
        Column("ratio", "double precision"),
        Column("small", "real"),
        Column("flag", "boolean"),
        Column("raw", "bytea"),
        Column("doc", "jsonb"),
        Column("plain", "json"),
        Column("tags", "text[]"),
        Column("label", "character varying(40)"),
        Column("day", "date"),
        Column("at", "timestamp with time zone"),
        Column("uid", "uuid"),
        Column("span", "interval"),
    ),
    key=("id",),
)


def route(route_id: int, name: str | None = "north", driver_id: int | None = 1) -> dict[str, Any]:
    return {"route_id": route_id, "name": name, "driver_id": driver_id}


def download(
    schema: TableSchema,
    upserts: Sequence[Mapping[str, Any]] = (),
    deletes: Sequence[Mapping[str, Any]] = (),
    *,
    full: bool = False,
) -> TableDownload:
    return TableDownload(schema=schema, full=full, upserts=upserts, deletes=deletes)


def rows(db: LocalDatabase, table: str = "public.routes") -> list[tuple[Any, ...]]:
    name = localdb._quote(db.local_name(table))
    return db.connection.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()


def columns_of(db: LocalDatabase, local: str) -> list[tuple[str, str, int]]:
    """(name, declared type, position in the primary key) of each column of ``local``."""
    info = db.connection.execute(f"PRAGMA table_info({localdb._quote(local)})").fetchall()
    return [(name, declared, pk) for _, name, declared, _, _, pk in info]


@pytest.fixture
def db(tmp_path: Path) -> Any:
    with LocalDatabase.open(tmp_path / "local.sqlite3") as opened:
        yield opened


# --------------------------------------------------------------------------- opening


def test_open_creates_an_empty_database_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "state" / "local.sqlite3"
    with LocalDatabase.open(path) as db:
        assert db.schema() == {}
        assert db.watermark("routes") is None
        assert db.pending() == []
        assert db.rejected() == []
        assert db.connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    assert path.is_file()


def test_open_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "local.sqlite3"
    path.write_bytes(b"not a database, clearly" * 100)
    with pytest.raises(LocalDatabaseError, match="cannot use the local database") as caught:
        LocalDatabase.open(path)
    assert isinstance(caught.value, PushsyncError)


def test_open_refuses_a_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "local.sqlite3"
    LocalDatabase.open(path).close()
    connection = sqlite3.connect(path)
    with connection:
        connection.execute("UPDATE _pushsync_meta SET value = 99 WHERE name = 'format'")
    connection.close()
    with pytest.raises(LocalDatabaseError, match="format 99"):
        LocalDatabase.open(path)


def test_closed_database_refuses(tmp_path: Path) -> None:
    db = LocalDatabase.open(tmp_path / "local.sqlite3")
    db.close()
    db.close()  # twice is fine
    with pytest.raises(LocalDatabaseError, match="closed"):
        db.pending()
    with pytest.raises(LocalDatabaseError, match="closed"):
        _ = db.connection


# --------------------------------------------------------------------------- local names


def test_local_names(db: LocalDatabase) -> None:
    assert db.local_name("public.routes") == "routes"
    assert db.local_name("sales.orders") == "sales__orders"
    assert db.local_name("public.Mixed Case") == "Mixed Case"
    assert db.local_name('public.a"b.c') == 'a"b.c'  # split at the first dot
    assert db.local_name("public.sqlite_stat") == "_sqlite_stat"
    assert db.local_name("public.SQLITE_x") == "_SQLITE_x"
    assert db.local_name("public._pushsync_changes") == "__pushsync_changes"
    assert db.local_name("sqlite_s.t") == "_sqlite_s__t"
    for bad in ("routes", ".routes", "public.", ""):
        with pytest.raises(LocalDatabaseError, match="not schema-qualified"):
            db.local_name(bad)


def test_quote_doubles_quotes() -> None:
    assert localdb._quote("select") == '"select"'
    assert localdb._quote('a"b') == '"a""b"'
    assert localdb._literal("it's") == "'it''s'"


def test_type_mapping() -> None:
    expected = {
        "integer": "integer",
        "bigint": "integer",
        "smallint": "integer",
        "real": "real",
        "double precision": "real",
        "numeric(10,2)": "numeric",
        "numeric": "numeric",
        "boolean": "boolean",
        "bytea": "bytea",
        "json": "json",
        "jsonb": "json",
        "text[]": "json",
        "integer[]": "json",
        "character varying(40)[]": "json",
        "text": "text",
        "character varying(40)": "text",
        "uuid": "text",
        "date": "text",
        "timestamp with time zone": "text",
        "timestamp(3) without time zone": "text",
        "time without time zone": "text",
        "interval": "text",
        "mood": "text",
        '"Integer"': "text",
    }
    assert {pgtype: localdb._kind(pgtype) for pgtype in expected} == expected


# --------------------------------------------------------------------------- applying downloads


def test_apply_creates_the_table_and_stores_the_watermark(db: LocalDatabase) -> None:
    stats = db.apply("trucks", [download(ROUTES, [route(1), route(2, "south", None)])], "w1")
    assert stats == ApplyStats(upserted=2, deleted=0, rebuilt=())
    assert rows(db) == [(1, "north", 1), (2, "south", None)]
    assert db.schema() == {"public.routes": ROUTES}
    assert db.watermark("trucks") == "w1"
    assert db.watermark("other") is None
    assert columns_of(db, "routes") == [
        ("route_id", "INT", 1),
        ("name", "TEXT", 0),
        ("driver_id", "INT", 0),
    ]


def test_the_declared_affinities(db: LocalDatabase) -> None:
    db.apply("p", [download(VALUES)], "w")
    declared = {name: kind for name, kind, _ in columns_of(db, "values")}
    assert declared == {
        "id": "INT",
        "amount": "TEXT",
        "ratio": "REAL",
        "small": "REAL",
        "flag": "INT",
        "raw": "BLOB",
        "doc": "TEXT",
        "plain": "TEXT",
        "tags": "TEXT",
        "label": "TEXT",
        "day": "TEXT",
        "at": "TEXT",
        "uid": "TEXT",
        "span": "TEXT",
    }


def test_upserts_and_deletes(db: LocalDatabase) -> None:
    db.apply("trucks", [download(ROUTES, [route(1), route(2), route(3)])], "w1")
    stats = db.apply(
        "trucks",
        [
            download(
                ROUTES,
                upserts=[route(2, "changed", 7), route(4, "new")],
                deletes=[{"route_id": 3}, {"route_id": 99}],  # 99 is not there: ignored
            )
        ],
        "w2",
    )
    assert stats == ApplyStats(upserted=2, deleted=1, rebuilt=())
    assert rows(db) == [(1, "north", 1), (2, "changed", 7), (4, "new", 1)]
    assert db.watermark("trucks") == "w2"


def test_a_row_both_deleted_and_upserted_is_there_afterwards(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1)])], "w1")
    db.apply("p", [download(ROUTES, [route(1, "again")], [{"route_id": 1}])], "w2")
    assert rows(db) == [(1, "again", 1)]


def test_full_download_replaces_the_table(db: LocalDatabase) -> None:
    db.apply("trucks", [download(ROUTES, [route(1), route(2), route(3)])], "w1")
    stats = db.apply(
        "trucks", [download(ROUTES, [route(2, "kept"), route(5, "new")], full=True)], "w2"
    )
    assert stats == ApplyStats(upserted=2, deleted=2, rebuilt=())
    assert rows(db) == [(2, "kept", 1), (5, "new", 1)]

    stats = db.apply("trucks", [download(ROUTES, full=True)], "w3")
    assert stats == ApplyStats(upserted=0, deleted=2, rebuilt=())
    assert rows(db) == []


def test_full_download_compares_keys_as_stored(db: LocalDatabase) -> None:
    """A numeric key sent as an int is stored as text; a full download keeps it."""
    schema = TableSchema(
        "public.prices",
        (Column("code", "numeric"), Column("region", "text"), Column("price", "numeric(10,2)")),
        ("code", "region"),
    )
    first = [
        {"code": 5, "region": "n", "price": "1.50"},
        {"code": "6.5", "region": "n", "price": 2},
    ]
    db.apply("p", [download(schema, first)], "w1")
    stats = db.apply("p", [download(schema, first[:1], full=True)], "w2")
    assert stats.deleted == 1
    assert rows(db, "public.prices") == [("5", "n", "1.50")]


def test_only_the_downloaded_tables_change(db: LocalDatabase) -> None:
    stops = TableSchema("public.stops", (Column("id", "integer"),), ("id",))
    db.apply("p", [download(ROUTES, [route(1)]), download(stops, [{"id": 1}])], "w1")
    db.apply("p", [download(stops, [{"id": 2}], full=True)], "w2")
    assert rows(db) == [(1, "north", 1)]
    assert rows(db, "public.stops") == [(2,)]


def test_a_key_only_table(db: LocalDatabase) -> None:
    pairs = TableSchema("public.pairs", (Column("a", "integer"), Column("b", "text")), ("a", "b"))
    db.apply("p", [download(pairs, [{"a": 1, "b": "x"}, {"a": 1, "b": "x"}])], "w1")
    assert rows(db, "public.pairs") == [(1, "x")]


def test_tables_in_other_schemas(db: LocalDatabase) -> None:
    orders = TableSchema("sales.orders", (Column("id", "integer"),), ("id",))
    db.apply("p", [download(orders, [{"id": 1}])], "w")
    assert db.connection.execute('SELECT id FROM "sales__orders"').fetchall() == [(1,)]
    assert list(db.schema()) == ["sales.orders"]


def test_watermarks_are_per_publication_and_forget_drops_one(db: LocalDatabase) -> None:
    db.apply("a", [download(ROUTES, [route(1)])], "a1")
    db.apply("b", [], "b1")
    db.forget("a")
    assert db.watermark("a") is None
    assert db.watermark("b") == "b1"
    assert rows(db) == [(1, "north", 1)]  # forgetting keeps the rows
    db.forget("never")  # nothing to forget: fine


# --------------------------------------------------------------------------- refused downloads


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (TableSchema("routes", ROUTES.columns, ("route_id",)), "not schema-qualified"),
        (TableSchema("public.t", (), ("id",)), "no columns"),
        (TableSchema("public.t", ROUTES.columns, ()), "no key"),
        (TableSchema("public.t", ROUTES.columns, ("nope",)), "key column 'nope' is not one"),
        (TableSchema("public.t", ROUTES.columns, ("name", "name")), "appears twice"),
        (
            TableSchema("public.t", (Column("Id", "integer"), Column("id", "text")), ("Id",)),
            "differ only in case",
        ),
        (
            TableSchema("public.t", (Column("id", "integer"), Column("id", "text")), ("id",)),
            "column 'id' appears twice",
        ),
        (TableSchema("public.t", (Column("", "integer"),), ("",)), "bad column name"),
        (TableSchema("public.t", (Column("id", " "),), ("id",)), "has no type"),
    ],
)
def test_bad_schemas_are_refused(db: LocalDatabase, schema: TableSchema, message: str) -> None:
    with pytest.raises(LocalDatabaseError, match=message):
        db.apply("p", [download(schema)], "w")
    assert db.schema() == {}
    assert db.watermark("p") is None


def test_a_table_twice_in_one_download_is_refused(db: LocalDatabase) -> None:
    with pytest.raises(LocalDatabaseError, match="appears twice in one download"):
        db.apply("p", [download(ROUTES, [route(1)]), download(ROUTES, [route(2)])], "w")


def test_names_that_differ_only_in_case_are_refused(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1)])], "w1")
    other = TableSchema("public.Routes", ROUTES.columns, ROUTES.key)
    with pytest.raises(LocalDatabaseError, match="would both be the local table"):
        db.apply("p", [download(other, [route(2)])], "w2")
    assert rows(db) == [(1, "north", 1)]
    assert db.watermark("p") == "w1"


def test_a_table_the_application_made_is_not_taken_over(db: LocalDatabase) -> None:
    db.connection.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    notes = TableSchema("public.notes", (Column("id", "integer"),), ("id",))
    with pytest.raises(LocalDatabaseError, match="already has a table named 'notes'"):
        db.apply("p", [download(notes, [{"id": 1}])], "w")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"name": "x", "driver_id": 1}, "row 1 lacks column 'route_id'"),
        ({"route_id": 1, "name": "x"}, "row 1 lacks column 'driver_id'"),
        ({**route(1), "extra": 1}, r"row 1 has unknown columns \['extra'\]"),
        ({"route_id": None, "name": "x", "driver_id": 1}, "NOT NULL"),
        ({"route_id": [1], "name": "x", "driver_id": 1}, "cannot be a JSON list"),
    ],
)
def test_a_failing_apply_leaves_everything_as_before(
    db: LocalDatabase, row: dict[str, Any], message: str
) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2)])], "w1")
    db.connection.execute("UPDATE routes SET name = 'local' WHERE route_id = 2")
    pending = db.pending()
    stops = TableSchema("public.stops", (Column("id", "integer"),), ("id",))
    wider = TableSchema("public.routes", (*ROUTES.columns, Column("note", "text")), ROUTES.key)

    # A new table, a rebuilt one, deletes and upserts, then the bad row: none of it stays.
    with pytest.raises(LocalDatabaseError, match=message):
        db.apply(
            "p",
            [
                download(stops, [{"id": 1}]),
                download(
                    wider, [{**route(3), "note": "n"}, {**row, "note": None}], [{"route_id": 1}]
                ),
            ],
            "w2",
        )
    assert rows(db) == [(1, "north", 1), (2, "local", 1)]
    assert [name for name, _, _ in columns_of(db, "routes")] == ["route_id", "name", "driver_id"]
    assert db.schema() == {"public.routes": ROUTES}
    assert db.watermark("p") == "w1"
    assert db.pending() == pending
    assert db.connection.execute(
        "SELECT count(*) FROM sqlite_schema WHERE name = 'stops'"
    ).fetchone() == (0,)
    # The triggers still capture, and an apply works again.
    db.connection.execute("DELETE FROM routes WHERE route_id = 1")
    assert [change.op for change in db.pending()] == ["update", "delete"]
    db.apply("p", [download(ROUTES, [route(1)])], "w3")
    assert db.watermark("p") == "w3"


def test_a_delete_without_its_key_fails(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1)])], "w1")
    with pytest.raises(LocalDatabaseError, match="delete 0 lacks column 'route_id'"):
        db.apply("p", [download(ROUTES, deletes=[{"name": "north"}])], "w2")
    assert rows(db) == [(1, "north", 1)]


def test_bad_bytea_is_refused(db: LocalDatabase) -> None:
    schema = TableSchema("public.blobs", (Column("id", "integer"), Column("b", "bytea")), ("id",))
    for bad in ("0a0b", "\\xzz", 5):
        with pytest.raises(LocalDatabaseError, match="bytea value must be text like"):
            db.apply("p", [download(schema, [{"id": 1, "b": bad}])], "w")
    assert db.schema() == {}


def test_apply_refuses_while_the_application_holds_a_transaction(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1)])], "w1")
    db.connection.execute("BEGIN")
    db.connection.execute("UPDATE routes SET name = 'open'")
    with pytest.raises(LocalDatabaseError, match="transaction open"):
        db.apply("p", [download(ROUTES, [route(2)])], "w2")
    db.connection.execute("ROLLBACK")
    assert rows(db) == [(1, "north", 1)]


# --------------------------------------------------------------------------- change capture


def test_triggers_record_inserts_updates_and_deletes(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2)])], "w1")
    assert db.pending() == []  # the download itself is not a local change
    connection = db.connection
    connection.execute("INSERT INTO routes VALUES (3, 'east', 4)")
    connection.execute("UPDATE routes SET name = 'west' WHERE route_id = 1")
    connection.execute("UPDATE routes SET route_id = 10 WHERE route_id = 2")  # a key change
    connection.execute("DELETE FROM routes WHERE route_id = 3")
    changes = db.pending()
    assert [(c.op, c.key) for c in changes] == [
        ("insert", {"route_id": 3}),
        ("update", {"route_id": 1}),
        ("update", {"route_id": 2}),  # the old key
        ("delete", {"route_id": 3}),
    ]
    assert all(c.table == "public.routes" for c in changes)
    assert [c.seq for c in changes] == sorted({c.seq for c in changes})
    insert, update, rekey, delete = changes
    assert insert.old is None
    assert insert.new == {"route_id": 3, "name": "east", "driver_id": 4}
    assert update.old == {"route_id": 1, "name": "north", "driver_id": 1}
    assert update.new == {"route_id": 1, "name": "west", "driver_id": 1}
    assert rekey.old == {"route_id": 2, "name": "north", "driver_id": 1}
    assert rekey.new == {"route_id": 10, "name": "north", "driver_id": 1}
    assert delete.old == {"route_id": 3, "name": "east", "driver_id": 4}
    assert delete.new is None


def test_apply_records_nothing_and_keeps_local_changes(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2), route(3)])], "w1")
    db.connection.execute("UPDATE routes SET name = 'mine' WHERE route_id = 1")
    before = db.pending()
    db.apply(
        "p",
        [download(ROUTES, [route(2, "server"), route(4)], [{"route_id": 3}])],
        "w2",
    )
    db.apply("p", [download(ROUTES, [route(4)], full=True)], "w3")
    assert db.pending() == before
    assert len(before) == 1


def test_writes_of_another_connection_are_recorded(db: LocalDatabase, tmp_path: Path) -> None:
    db.apply("p", [download(ROUTES, [route(1)])], "w1")
    other = sqlite3.connect(tmp_path / "local.sqlite3", isolation_level=None)
    try:
        other.execute("INSERT INTO routes VALUES (2, 'other', NULL)")
    finally:
        other.close()
    assert [(c.op, c.key) for c in db.pending()] == [("insert", {"route_id": 2})]


def test_a_rolled_back_write_leaves_no_change(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1)])], "w1")
    connection = db.connection
    connection.execute("BEGIN")
    connection.execute("INSERT INTO routes VALUES (2, 'gone', NULL)")
    connection.execute("ROLLBACK")
    assert db.pending() == []


def test_pending_limit(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES)], "w1")
    for route_id in range(5):
        db.connection.execute("INSERT INTO routes VALUES (?, 'x', 1)", (route_id,))
    assert [c.key["route_id"] for c in db.pending(limit=2)] == [0, 1]
    assert len(db.pending()) == 5
    assert db.pending(limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        db.pending(limit=-1)


def test_a_wide_table_records_every_column(db: LocalDatabase) -> None:
    wide = TableSchema(
        "public.wide",
        tuple(Column(f"c{n}", "integer") for n in range(130)),
        ("c0", "c129"),
    )
    row = {f"c{n}": n for n in range(130)}
    db.apply("p", [download(wide, [row])], "w")
    db.connection.execute('UPDATE wide SET "c64" = -1')
    (change,) = db.pending()
    assert change.key == {"c0": 0, "c129": 129}
    assert change.old == row
    assert change.new == {**row, "c64": -1}


# --------------------------------------------------------------------------- uploads


def test_uploaded_removes_applied_and_keeps_rejected(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES)], "w1")
    for route_id in range(4):
        db.connection.execute("INSERT INTO routes VALUES (?, 'x', 1)", (route_id,))
    seqs = [c.seq for c in db.pending()]
    changes = {c.seq: c for c in db.pending()}
    db.uploaded([seqs[0], seqs[2], 12345], {seqs[1]: "driver 1 is not yours", 67890: "gone"})
    assert [c.seq for c in db.pending()] == [seqs[3]]
    (rejected,) = db.rejected()
    assert rejected.change == changes[seqs[1]]
    assert rejected.reason == "driver 1 is not yours"
    assert rejected.at > 1_600_000_000

    db.uploaded([seqs[0]], {seqs[1]: "again"})  # the same answer again: nothing changes
    assert db.rejected() == [rejected]
    db.uploaded([seqs[3]], {seqs[3]: "both: rejected wins"})
    assert db.pending() == []
    assert [r.reason for r in db.rejected()] == ["driver 1 is not yours", "both: rejected wins"]


def test_uploaded_is_one_transaction(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES)], "w1")
    for route_id in range(3):
        db.connection.execute("INSERT INTO routes VALUES (?, 'x', 1)", (route_id,))
    before = db.pending()
    first, second, third = (c.seq for c in before)
    # Make moving the last rejected change fail, after the rest was done.
    db.connection.execute(
        f"CREATE TRIGGER refuse BEFORE INSERT ON {localdb._REJECTED} WHEN NEW.reason = 'boom'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with pytest.raises(LocalDatabaseError, match="refused"):
        db.uploaded([first], {second: "fine", third: "boom"})
    assert db.pending() == before
    assert db.rejected() == []
    db.connection.execute("DROP TRIGGER refuse")
    db.uploaded([first], {second: "fine", third: "boom"})
    assert db.pending() == []
    assert [r.change.seq for r in db.rejected()] == [second, third]


# --------------------------------------------------------------------------- schema drift


def test_drift_column_added(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2)])], "w1")
    db.connection.execute("UPDATE routes SET name = 'mine' WHERE route_id = 1")
    before = db.pending()
    wider = TableSchema("public.routes", (*ROUTES.columns, Column("note", "text")), ROUTES.key)
    stats = db.apply("p", [download(wider, [{**route(3), "note": "new"}])], "w2")
    assert stats == ApplyStats(upserted=1, deleted=0, rebuilt=("public.routes",))
    assert rows(db) == [(1, "mine", 1, None), (2, "north", 1, None), (3, "north", 1, "new")]
    assert db.schema() == {"public.routes": wider}
    assert db.pending() == before
    # The new triggers capture the new column.
    db.connection.execute("UPDATE routes SET note = 'local' WHERE route_id = 2")
    change = db.pending()[-1]
    assert change.new == {**route(2), "note": "local"}
    # The same schema again is no rebuild.
    assert db.apply("p", [download(wider)], "w3").rebuilt == ()


def test_drift_column_dropped(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2)])], "w1")
    db.connection.execute("DELETE FROM routes WHERE route_id = 2")
    before = db.pending()
    narrower = TableSchema("public.routes", ROUTES.columns[:2], ROUTES.key)
    stats = db.apply("p", [download(narrower)], "w2")
    assert stats.rebuilt == ("public.routes",)
    assert rows(db) == [(1, "north")]
    assert [name for name, _, _ in columns_of(db, "routes")] == ["route_id", "name"]
    assert db.pending() == before  # recorded with the old columns, kept as recorded
    db.connection.execute("INSERT INTO routes VALUES (5, 'five')")
    assert db.pending()[-1].new == {"route_id": 5, "name": "five"}


def test_drift_type_changed(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1, "7", 3), route(2, "x", None)])], "w1")
    changed = TableSchema(
        "public.routes",
        (Column("route_id", "integer"), Column("name", "integer"), Column("driver_id", "numeric")),
        ROUTES.key,
    )
    assert db.apply("p", [download(changed)], "w2").rebuilt == ("public.routes",)
    assert columns_of(db, "routes") == [
        ("route_id", "INT", 1),
        ("name", "INT", 0),
        ("driver_id", "TEXT", 0),
    ]
    typed = db.connection.execute(
        "SELECT route_id, name, typeof(name), driver_id, typeof(driver_id) FROM routes"
        " ORDER BY route_id"
    ).fetchall()
    assert typed == [(1, 7, "integer", "3", "text"), (2, "x", "text", None, "null")]


def test_drift_of_the_type_only_keeps_the_table(db: LocalDatabase) -> None:
    """varchar(40) to varchar(80): same SQLite table; the definition and triggers change."""
    before = TableSchema("public.t", (Column("id", "integer"), Column("v", "text")), ("id",))
    after = TableSchema("public.t", (Column("id", "integer"), Column("v", "jsonb")), ("id",))
    db.apply("p", [download(before, [{"id": 1, "v": '{"a":1}'}])], "w1")
    db.connection.execute("CREATE INDEX t_v ON t (v)")
    assert db.apply("p", [download(after)], "w2").rebuilt == ("public.t",)
    assert db.schema()["public.t"] == after
    db.connection.execute("UPDATE t SET v = '{\"a\":2}'")
    assert db.pending()[-1].new == {"id": 1, "v": {"a": 2}}  # captured as JSON now
    assert db.connection.execute("SELECT name FROM sqlite_schema WHERE name = 't_v'").fetchone()


def test_drift_key_changed_leaves_out_rows_without_the_new_key(db: LocalDatabase) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2)])], "w1")
    rekeyed = TableSchema(
        "public.routes", (*ROUTES.columns, Column("day", "date")), ("route_id", "day")
    )
    stats = db.apply("p", [download(rekeyed, [{**route(1), "day": "2024-05-01"}])], "w2")
    assert stats.rebuilt == ("public.routes",)
    assert rows(db) == [(1, "north", 1, "2024-05-01")]


def test_drift_keeps_the_applications_indexes_triggers_and_views(
    db: LocalDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    db.apply("p", [download(ROUTES, [route(1), route(2, "south")])], "w1")
    connection = db.connection
    connection.execute("CREATE TABLE audit (what TEXT)")
    connection.execute("CREATE INDEX routes_name ON routes (name)")
    connection.execute("CREATE INDEX routes_driver ON routes (driver_id)")
    connection.execute(
        "CREATE TRIGGER routes_audit AFTER UPDATE ON routes"
        " BEGIN INSERT INTO audit VALUES (NEW.name); END"
    )
    connection.execute("CREATE VIEW route_names AS SELECT name FROM routes")
    narrower = TableSchema("public.routes", ROUTES.columns[:2], ROUTES.key)
    with caplog.at_level(logging.WARNING, logger="pushsync.listener.localdb"):
        db.apply("p", [download(narrower)], "w2")
    names = {name for (name,) in connection.execute("SELECT name FROM sqlite_schema")}
    assert {"routes_name", "routes_audit", "route_names"} <= names
    assert "routes_driver" not in names  # its column is gone
    assert "routes_driver" in caplog.text
    assert connection.execute("SELECT name FROM route_names ORDER BY name").fetchall() == [
        ("north",),
        ("south",),
    ]
    connection.execute("UPDATE routes SET name = 'west' WHERE route_id = 1")
    assert connection.execute("SELECT what FROM audit").fetchall() == [("west",)]
    assert db.pending()[-1].new == {"route_id": 1, "name": "west"}


# --------------------------------------------------------------------------- identifiers


def test_identifiers_that_need_quotes(db: LocalDatabase) -> None:
    odd = TableSchema(
        name='sales.Order "Lines"',
        columns=(
            Column("select", "integer"),
            Column('a"b', "text"),
            Column("it's", "text"),
            Column("with space", "boolean"),
            Column("group", "jsonb"),
        ),
        key=("select", 'a"b'),
    )
    local = db.local_name(odd.name)
    assert local == 'sales__Order "Lines"'
    row = {"select": 1, 'a"b': "x'y", "it's": "z", "with space": True, "group": {"k": 1}}
    db.apply("p", [download(odd, [row])], "w1")
    table = localdb._quote(local)
    assert db.connection.execute(f"SELECT * FROM {table}").fetchall() == [
        (1, "x'y", "z", 1, '{"k":1}')
    ]
    db.connection.execute(f'UPDATE {table} SET "it\'s" = \'w\', "a""b" = \'q\'')
    db.connection.execute(f'DELETE FROM {table} WHERE "select" = 1')
    update, delete = db.pending()
    assert update.table == odd.name
    assert update.key == {"select": 1, 'a"b': "x'y"}
    assert update.new == {**row, "it's": "w", 'a"b': "q"}
    assert delete.key == {"select": 1, 'a"b': "q"}
    # A rebuild of it, and a full download of it.
    wider = TableSchema(odd.name, (*odd.columns, Column("from", "text")), odd.key)
    db.apply("p", [download(wider, [{**row, "from": "f"}], full=True)], "w2")
    assert db.connection.execute(f"SELECT * FROM {table}").fetchall() == [
        (1, "x'y", "z", 1, '{"k":1}', "f")
    ]


def test_reserved_local_names(db: LocalDatabase) -> None:
    stat = TableSchema("public.sqlite_stat", (Column("id", "integer"),), ("id",))
    ours = TableSchema("public._pushsync_changes", (Column("id", "integer"),), ("id",))
    db.apply("p", [download(stat, [{"id": 1}]), download(ours, [{"id": 2}])], "w")
    assert db.connection.execute('SELECT id FROM "_sqlite_stat"').fetchall() == [(1,)]
    assert db.connection.execute('SELECT id FROM "__pushsync_changes"').fetchall() == [(2,)]
    assert db.pending() == []


# --------------------------------------------------------------------------- values


def test_values_are_stored_with_their_local_types(db: LocalDatabase) -> None:
    row = {
        "id": 1,
        "amount": "12345678901234567890.123",
        "ratio": "0.1",
        "small": "1.5",
        "flag": True,
        "raw": "\\x0a0bff",
        "doc": {"a": [1, "x", None], "b": {"c": "1.25"}},
        "plain": [1, 2],
        "tags": ["a", "b,c"],
        "label": "héllo",
        "day": "2024-05-01",
        "at": "2024-05-01T12:00:00+02:00",
        "uid": "12345678-1234-5678-1234-567812345678",
        "span": "1 day 02:00:00",
    }
    db.apply("p", [download(VALUES, [row, {name: None for name in row} | {"id": 2}])], "w")
    stored = db.connection.execute(
        'SELECT *, typeof(amount), typeof(ratio), typeof(flag), typeof(raw) FROM "values"'
        " WHERE id = 1"
    ).fetchone()
    assert stored == (
        1,
        "12345678901234567890.123",
        0.1,
        1.5,
        1,
        b"\n\x0b\xff",
        '{"a":[1,"x",null],"b":{"c":"1.25"}}',
        "[1,2]",
        '["a","b,c"]',
        "héllo",
        "2024-05-01",
        "2024-05-01T12:00:00+02:00",
        "12345678-1234-5678-1234-567812345678",
        "1 day 02:00:00",
        "text",
        "real",
        "integer",
        "blob",
    )
    assert db.connection.execute('SELECT * FROM "values" WHERE id = 2').fetchone() == (
        (2,) + (None,) * 13
    )


def test_values_round_trip_to_the_upload_form(db: LocalDatabase) -> None:
    row: dict[str, Any] = {
        "id": 1,
        "amount": "12345678901234567890.123",
        "ratio": "0.30000000000000004",
        "small": "-2.5e-10",
        "flag": True,
        "raw": "\\x0a0bff",
        "doc": {"a": [1, "x", None, True], "b": {}},
        "plain": "just a string",
        "tags": ["a", "b,c", None],
        "label": "héllo",
        "day": "2024-05-01",
        "at": "2024-05-01T12:00:00+02:00",
        "uid": "12345678-1234-5678-1234-567812345678",
        "span": "1 day 02:00:00",
    }
    nulls = {name: None for name in row} | {"id": 2}
    db.apply("p", [download(VALUES, [row, nulls])], "w")
    db.connection.execute('DELETE FROM "values"')
    first, second = db.pending()
    expected = row | {"ratio": 0.30000000000000004, "small": -2.5e-10}
    assert first.old == expected
    assert second.old == nulls
    # What pending() gives back, applied as a download, stores the same rows.
    db.apply("p", [download(VALUES, [first.old, second.old])], "w2")
    db.connection.execute('UPDATE "values" SET flag = 0 WHERE id = 1')
    assert db.pending()[-1].new == expected | {"flag": False}


def test_float_edge_values(db: LocalDatabase) -> None:
    schema = TableSchema("public.f", (Column("id", "integer"), Column("x", "real")), ("id",))
    texts = ["1.7976931348623157e308", "5e-324", "-0.1", "1e16", "Infinity", "-Infinity", "NaN"]
    db.apply("p", [download(schema, [{"id": n, "x": t} for n, t in enumerate(texts)])], "w")
    db.connection.execute("DELETE FROM f")
    got = [c.old["x"] for c in db.pending() if c.old is not None]
    assert got[:4] == [1.7976931348623157e308, 5e-324, -0.1, 1e16]
    assert got[4:] == ["Infinity", "-Infinity", "NaN"]
    # Every double the application writes comes back exactly.
    doubles = [0.1 + 0.2, 1 / 3, 2.2250738585072014e-308, 123456789.12345679, math.pi]
    db.uploaded([c.seq for c in db.pending()], {})
    db.connection.executemany("INSERT INTO f VALUES (?, ?)", enumerate(doubles))
    assert [c.new["x"] for c in db.pending() if c.new is not None] == doubles


def test_values_that_fit_no_sqlite_integer(db: LocalDatabase) -> None:
    with pytest.raises(LocalDatabaseError, match="64-bit"):
        db.apply("p", [download(ROUTES, [route(2**63)])], "w")
    domains = TableSchema(
        "public.d",
        (Column("id", "integer"), Column("yes", "yesno"), Column("big", "bigcount")),
        ("id",),
    )
    db.apply("p", [download(domains, [{"id": 1, "yes": True, "big": 2**70}])], "w")
    assert rows(db, "public.d") == [(1, "true", str(2**70))]


def test_invalid_json_in_a_json_column_fails_the_write(db: LocalDatabase) -> None:
    db.apply("p", [download(VALUES)], "w")
    with pytest.raises(sqlite3.OperationalError, match="malformed JSON"):
        db.connection.execute("INSERT INTO \"values\" (id, doc) VALUES (1, '{not json')")
    assert db.pending() == []


# --------------------------------------------------------------------------- durability


def test_everything_is_still_there_after_reopening(tmp_path: Path) -> None:
    path = tmp_path / "local.sqlite3"
    with LocalDatabase.open(path) as db:
        db.apply("p", [download(ROUTES, [route(1), route(2)])], "w1")
        db.connection.execute("UPDATE routes SET name = 'mine' WHERE route_id = 1")
        db.connection.execute("DELETE FROM routes WHERE route_id = 2")
        seqs = [c.seq for c in db.pending()]
        db.uploaded([], {seqs[1]: "no"})
        pending, rejected = db.pending(), db.rejected()
    with LocalDatabase.open(path) as db:
        assert rows(db) == [(1, "mine", 1)]
        assert db.schema() == {"public.routes": ROUTES}
        assert db.watermark("p") == "w1"
        assert db.pending() == pending
        assert db.rejected() == rejected
        db.connection.execute("INSERT INTO routes VALUES (3, 'three', NULL)")
        assert db.pending()[-1].seq > seqs[-1]  # sequence numbers are never reused
        db.apply("p", [download(ROUTES, [route(4)])], "w2")
        assert len(db.pending()) == 2


def test_imports_only_the_standard_library() -> None:
    probe = """
import sys
before = set(sys.modules)
import pushsync.listener.localdb
new = set(sys.modules) - before
own = {"pushsync", "pushsync.errors", "pushsync.listener", "pushsync.listener.localdb",
       "pushsync.wire", "pushsync.wire.protocol", "pushsync.wire.limits", "pushsync.wire.sync"}
print(",".join(sorted(
    m for m in new if m not in own and m.split(".")[0] not in sys.stdlib_module_names
)))
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


# --------------------------------------------------------------------------- replaying changes

REPLAYED = TableSchema(
    name="public.replayed",
    columns=(
        Column("region", "text"),
        Column("id", "bigint"),
        Column("name", "text"),
        Column("amount", "numeric(20,3)"),
        Column("ratio", "double precision"),
        Column("flag", "boolean"),
        Column("raw", "bytea"),
        Column("doc", "jsonb"),
        Column("tags", "text[]"),
    ),
    key=("region", "id"),
)
NAMES = [c.name for c in REPLAYED.columns]
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=8)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# What the application writes, column by column (key columns aside).
LOCAL_VALUES = {
    "name": st.none() | TEXT,
    "amount": st.none() | st.decimals(places=3, min_value=-(10**12), max_value=10**12).map(str),
    "ratio": st.none() | st.floats(allow_nan=False),
    "flag": st.none() | st.booleans(),
    "raw": st.none() | st.binary(max_size=6),
    "doc": st.none() | JSON.filter(lambda v: v is not None).map(compact),
    "tags": st.none() | st.lists(st.none() | TEXT, max_size=3).map(compact),
}
KEYS = st.tuples(st.sampled_from(["north", 'a"b', "o'k", "Süd"]), st.integers(-5, 5))


def table_rows(db: LocalDatabase) -> list[tuple[Any, ...]]:
    return db.connection.execute('SELECT * FROM "replayed" ORDER BY region, id').fetchall()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_replaying_pending_changes_reproduces_the_table(data: st.DataObject) -> None:
    start = [
        {"region": "north", "id": 1, "name": "a", "amount": "1.500", "ratio": "0.25"}
        | {"flag": False, "raw": "\\x00ff", "doc": {"k": [1]}, "tags": ["x"]},
        {"region": "o'k", "id": -2} | {name: None for name in NAMES[2:]},
    ]
    with (
        tempfile.TemporaryDirectory() as directory,
        LocalDatabase.open(Path(directory) / "device.sqlite3") as device,
        LocalDatabase.open(Path(directory) / "copy.sqlite3") as copy,
    ):
        for db in (device, copy):
            db.connection.execute("PRAGMA synchronous=OFF")  # fsyncs only slow this down
            db.apply("p", [download(REPLAYED, start)], "w0")
        keys = {("north", 1), ("o'k", -2)}
        connection = device.connection
        for _ in range(data.draw(st.integers(0, 25), label="writes")):
            op = data.draw(st.sampled_from(["insert", "update", "delete"] if keys else ["insert"]))
            if op == "insert":
                key = data.draw(KEYS.filter(lambda k: k not in keys), label="new key")
                values = {n: data.draw(LOCAL_VALUES[n], label=n) for n in NAMES[2:]}
                connection.execute(
                    f'INSERT INTO "replayed" VALUES ({", ".join("?" * len(NAMES))})',
                    (*key, *values.values()),
                )
                keys.add(key)
                continue
            key = data.draw(st.sampled_from(sorted(keys)), label="key")
            where = "region = ? AND id = ?"
            if op == "delete":
                connection.execute(f'DELETE FROM "replayed" WHERE {where}', key)
                keys.remove(key)
                continue
            changed = data.draw(st.lists(st.sampled_from(NAMES[2:]), unique=True))
            values = {n: data.draw(LOCAL_VALUES[n], label=n) for n in changed}
            new_key = key
            if data.draw(st.booleans(), label="change the key"):
                new_key = data.draw(KEYS, label="to key")
                if new_key in keys:
                    new_key = key
                values |= {"region": new_key[0], "id": new_key[1]}
            if not values:
                values = {"name": "touched"}
            assignments = ", ".join(f"{localdb._quote(n)} = ?" for n in values)
            connection.execute(
                f'UPDATE "replayed" SET {assignments} WHERE {where}', (*values.values(), *key)
            )
            keys.discard(key)
            keys.add(new_key)

        changes = device.pending(limit=10_000)
        replay(copy, changes)
        assert table_rows(copy) == table_rows(device)
        assert copy.pending() == []


def replay(copy: LocalDatabase, changes: Sequence[Change]) -> None:
    """Apply each change's images to ``copy``: delete by key, then write the new row."""
    for change in changes:
        assert change.table == "public.replayed"
        upserts = [] if change.new is None else [change.new]
        deletes = [] if change.op == "insert" else [change.key]
        if change.op != "insert":
            assert change.old is not None
            assert {k: change.old[k] for k in REPLAYED.key} == change.key
        copy.apply("p", [download(REPLAYED, upserts, deletes)], f"w{change.seq}")


def test_forget_rejected_drops_what_the_application_dealt_with(tmp_path: Path) -> None:
    from pushsync.listener.localdb import Column, LocalDatabase, TableDownload, TableSchema

    db = LocalDatabase.open(tmp_path / "forget.db")
    try:
        schema = TableSchema(
            name="public.t", columns=(Column("id", "integer"), Column("v", "text")), key=("id",)
        )
        db.apply("p", [TableDownload(schema=schema, full=True, upserts=[], deletes=[])], "w1")
        for n in range(3):
            db.connection.execute("INSERT INTO t VALUES (?, 'x')", (n,))
        seqs = [c.seq for c in db.pending()]
        db.uploaded([], {seq: "no" for seq in seqs})
        assert len(db.rejected()) == 3
        assert db.forget_rejected([seqs[0]]) == 1
        assert [r.change.seq for r in db.rejected()] == seqs[1:]
        assert db.forget_rejected() == 2
        assert db.rejected() == []
    finally:
        db.close()
