"""What the local database writes when a synchronization brings nothing.

A listener opens (or keeps) its SQLite file and stores the watermark of each
answer; a file already set up is opened without a write, and an empty answer
writes its watermark alone, or nothing when it is the one stored. Another
connection's ``PRAGMA data_version`` tells whether anything was committed.
Real SQLite files; no server needed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from pushsync.listener.localdb import (
    Column,
    LocalDatabase,
    LocalDatabaseError,
    TableDownload,
    TableSchema,
)

ROUTES = TableSchema(
    name="public.routes",
    columns=(Column("route_id", "integer"), Column("name", "text")),
    key=("route_id",),
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    path = tmp_path / "state" / "local.db"
    with LocalDatabase.open(path) as db:
        db.apply("p", [TableDownload(ROUTES, True, [{"route_id": 1, "name": "a"}], [])], "w1")
    return path


@pytest.fixture
def observer(path: Path) -> Iterator[sqlite3.Connection]:
    """The application's connection: it sees every commit of the others."""
    connection = sqlite3.connect(path, isolation_level=None)
    yield connection
    connection.close()


def committed(observer: sqlite3.Connection, before: int) -> bool:
    """Whether another connection committed since ``data_version`` was ``before``."""
    return version(observer) != before


def version(observer: sqlite3.Connection) -> int:
    return int(observer.execute("PRAGMA data_version").fetchone()[0])


def test_opening_a_set_up_file_writes_nothing(path: Path, observer: sqlite3.Connection) -> None:
    """Not even a write lock: the application may hold its own write transaction meanwhile
    (a set-up transaction would wait for it, BUSY_TIMEOUT, and fail)."""
    before = version(observer)
    observer.execute("BEGIN IMMEDIATE")
    try:
        with LocalDatabase.open(path) as db:
            assert db.watermark("p") == "w1"
            assert db.connection.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        observer.execute("ROLLBACK")
    assert not committed(observer, before)


def test_an_empty_answer_writes_only_a_new_watermark(
    path: Path, observer: sqlite3.Connection
) -> None:
    with LocalDatabase.open(path) as db:
        before = version(observer)
        stats = db.apply("p", [], "w1")
        assert (stats.upserted, stats.deleted, stats.rebuilt) == (0, 0, ())
        assert not committed(observer, before)
        db.apply("p", [], "w2")
        assert committed(observer, before)
        assert db.watermark("p") == "w2"
        # The capture triggers still record the application's writes.
        observer.execute("UPDATE routes SET name = 'mine' WHERE route_id = 1")
        assert [(c.op, c.key) for c in db.pending()] == [("update", {"route_id": 1})]


def test_an_empty_answer_for_a_new_publication_stores_its_watermark(path: Path) -> None:
    with LocalDatabase.open(path) as db:
        db.apply("q", [], "w9")
        assert (db.watermark("p"), db.watermark("q")) == ("w1", "w9")


def test_a_file_not_set_up_completely_is_set_up_again(
    path: Path, observer: sqlite3.Connection
) -> None:
    """A flag left set (it would silence the capture triggers), a meta table dropped:
    the full set-up runs, in one transaction, as for a new file."""
    observer.execute("UPDATE _pushsync_meta SET value = 1 WHERE name = 'applying'")
    observer.execute("DROP TABLE _pushsync_rejected")
    with LocalDatabase.open(path) as db:
        assert db.rejected() == []
        observer.execute("UPDATE routes SET name = 'mine' WHERE route_id = 1")
        assert len(db.pending()) == 1
    flag = observer.execute("SELECT value FROM _pushsync_meta WHERE name = 'applying'")
    assert flag.fetchone() == (0,)


def test_a_newer_format_is_still_refused(path: Path, observer: sqlite3.Connection) -> None:
    observer.execute("UPDATE _pushsync_meta SET value = 2 WHERE name = 'format'")
    with pytest.raises(LocalDatabaseError, match="has format 2; this pushsync reads format 1"):
        LocalDatabase.open(path)


def test_a_file_left_in_rollback_journal_mode_is_put_back_in_wal(path: Path) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    assert connection.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    connection.close()
    with LocalDatabase.open(path) as db:
        assert db.connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.watermark("p") == "w1"
