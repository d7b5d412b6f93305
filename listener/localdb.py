"""The device's local database: published rows, the changes made to them, watermarks.

One SQLite file per device (WAL, ``synchronous=FULL``): the sync client fills
it with downloads (:meth:`LocalDatabase.apply`), the application reads and
writes the rows through :attr:`LocalDatabase.connection`, and triggers capture
each local write for upload (:meth:`~LocalDatabase.pending`). Table names,
column types, change capture and schema drift: ``docs/sync-types.md``.
Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sqlite3
import string
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, cast

from pushsync.errors import PushsyncError
from pushsync.wire.sync import OPS, Change, Op

logger = logging.getLogger(__name__)


FORMAT: Final = 1
"""The layout of the meta tables; a file of a newer layout is refused."""

BUSY_TIMEOUT: Final = 10.0
"""Seconds to wait for another connection holding the file's write lock."""

IMAGE_CHUNK: Final = 50
"""Columns per ``json_object()`` call in a change image (it takes at most 127 arguments)."""


class LocalDatabaseError(PushsyncError):
    """The local database could not be opened or used, or a download could not be applied."""


class LocalDatabaseMismatch(LocalDatabaseError):
    """The local database belongs to another device or publication: a configuration mistake."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True, slots=True)
class Column:
    """A column of a published table."""

    name: str
    pgtype: str
    """PostgreSQL ``format_type()`` text: ``integer``, ``numeric(10,2)``, ``text[]``, …"""


@dataclass(frozen=True, slots=True)
class TableSchema:
    """A published table as the server defines it."""

    name: str
    """Schema-qualified server name, e.g. ``public.routes``."""
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    """The key columns: not empty, each one of ``columns``."""


@dataclass(frozen=True, slots=True)
class TableDownload:
    """What the server sends for one table."""

    schema: TableSchema
    full: bool
    """Whether the table is downloaded in full: afterwards it holds exactly ``upserts``."""
    upserts: Sequence[Mapping[str, Any]]
    """Whole rows, values as decoded from the server's JSON."""
    deletes: Sequence[Mapping[str, Any]]
    """Key values of rows to delete; rows that are not there are ignored."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A change the server refused, kept with its reason."""

    change: Change
    reason: str
    at: float
    """When it was reported refused (seconds since the epoch)."""


@dataclass(frozen=True, slots=True)
class ApplyStats:
    """What :meth:`LocalDatabase.apply` did."""

    upserted: int
    """Rows written (inserted or replaced)."""
    deleted: int
    """Rows removed: by key, and by a full download."""
    rebuilt: tuple[str, ...]
    """Server names of the tables whose local definition changed."""


# --------------------------------------------------------------------------- names and SQL text

_META: Final = "_pushsync_meta"
_TABLES: Final = "_pushsync_tables"
_WATERMARKS: Final = "_pushsync_watermarks"
_CHANGES: Final = "_pushsync_changes"
_REJECTED: Final = "_pushsync_rejected"
_REBUILD: Final = "_pushsync_rebuild"
_KEEP: Final = "_pushsync_keep"
_RESERVED_PREFIXES: Final = ("sqlite_", "_pushsync_")
_ASCII_LOWER: Final = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def _quote(name: str) -> str:
    """``name`` as an SQL identifier: in double quotes, inner ``"`` doubled."""
    if "\0" in name:
        raise LocalDatabaseError(f"name {name!r} holds a NUL character")
    return '"' + name.replace('"', '""') + '"'


def _literal(text: str) -> str:
    """``text`` as an SQL string literal: in single quotes, inner ``'`` doubled."""
    if "\0" in text:
        raise LocalDatabaseError(f"text {text!r} holds a NUL character")
    return "'" + text.replace("'", "''") + "'"


def _fold(name: str) -> str:
    """``name`` as SQLite compares identifiers: ASCII letters in lower case."""
    return name.translate(_ASCII_LOWER)


def _local_name(table: str) -> str:
    """The SQLite name of server table ``table``; see the module docstring."""
    schema, dot, name = table.partition(".")
    if not dot or not schema or not name or "\0" in table:
        raise LocalDatabaseError(f"table name {table!r} is not schema-qualified (schema.name)")
    local = name if schema == "public" else f"{schema}__{name}"
    if _fold(local).startswith(_RESERVED_PREFIXES):
        local = "_" + local
    return local


def _trigger_name(op: Op, local: str) -> str:
    return f"_pushsync_{op}_{local}"


_SCHEMA: Final = (
    f"CREATE TABLE IF NOT EXISTS {_META} (name TEXT PRIMARY KEY, value)",
    f"CREATE TABLE IF NOT EXISTS {_TABLES} ("
    " server_name TEXT PRIMARY KEY,"
    " local_name TEXT NOT NULL UNIQUE COLLATE NOCASE,"
    " definition TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_WATERMARKS} ("
    " publication TEXT PRIMARY KEY,"
    " watermark TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_CHANGES} ("
    " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    ' "table" TEXT NOT NULL,'
    " op TEXT NOT NULL CHECK (op IN ('insert', 'update', 'delete')),"
    ' "key" TEXT NOT NULL,'
    " old TEXT,"
    " new TEXT)",
    f"CREATE TABLE IF NOT EXISTS {_REJECTED} ("
    " seq INTEGER PRIMARY KEY,"
    ' "table" TEXT NOT NULL,'
    " op TEXT NOT NULL,"
    ' "key" TEXT NOT NULL,'
    " old TEXT,"
    " new TEXT,"
    " reason TEXT NOT NULL,"
    " at REAL NOT NULL)",
    f"INSERT OR IGNORE INTO {_META} (name, value) VALUES ('format', {FORMAT}), ('applying', 0)",
)

_STORE_WATERMARK: Final = (
    f"INSERT INTO {_WATERMARKS} (publication, watermark) VALUES (?, ?)"
    " ON CONFLICT (publication) DO UPDATE SET watermark = excluded.watermark"
)

_META_TABLES: Final = (_META, _TABLES, _WATERMARKS, _CHANGES, _REJECTED)

_READY: Final = (
    f"SELECT (SELECT value FROM {_META} WHERE name = 'format'),"
    f" (SELECT value FROM {_META} WHERE name = 'applying'),"
    " (SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN"
    f" ({', '.join(_literal(name) for name in _META_TABLES)}))"
)
"""A file already set up answers ``(FORMAT, 0, 5)``: it is opened without writing."""

# --------------------------------------------------------------------------- types

_Kind = Literal["integer", "real", "numeric", "boolean", "bytea", "json", "text"]

_KINDS: Final[Mapping[str, _Kind]] = {
    **dict.fromkeys(
        (
            "smallint",
            "integer",
            "bigint",
            "int",
            "int2",
            "int4",
            "int8",
            "smallserial",
            "serial",
            "bigserial",
            "serial2",
            "serial4",
            "serial8",
        ),
        "integer",
    ),
    **dict.fromkeys(("real", "double precision", "float", "float4", "float8"), "real"),
    **dict.fromkeys(("numeric", "decimal"), "numeric"),
    **dict.fromkeys(("boolean", "bool"), "boolean"),
    "bytea": "bytea",
    **dict.fromkeys(("json", "jsonb"), "json"),
}

_DECLARED: Final[Mapping[_Kind, str]] = {
    "integer": "INT",
    "real": "REAL",
    "numeric": "TEXT",
    "boolean": "INT",
    "bytea": "BLOB",
    "json": "TEXT",
    "text": "TEXT",
}

_DBL_MAX: Final = "1.7976931348623157e308"
_INT64_MIN: Final = -(2**63)
_INT64_MAX: Final = 2**63 - 1


def _kind(pgtype: str) -> _Kind:
    """How a column of PostgreSQL type ``pgtype`` is stored and captured."""
    text = " ".join(pgtype.lower().split())
    if text.endswith("]"):
        return "json"  # to_jsonb writes arrays as JSON arrays
    return _KINDS.get(text.split("(", 1)[0].strip(), "text")


def _declared(column: Column) -> str:
    return _DECLARED[_kind(column.pgtype)]


class _BadValue(Exception):
    """A download value that cannot be stored in its column."""


def _to_local(kind: _Kind, value: Any) -> Any:
    """A download value (as decoded from the server's JSON) as it is stored locally."""
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    if isinstance(value, dict | list):
        if kind == "text":
            return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        raise _BadValue(f"a {kind} value cannot be a JSON {type(value).__name__}")
    if kind == "integer" or kind == "boolean":
        if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
            raise _BadValue(f"{value} does not fit SQLite's 64-bit integers")
        return int(value) if isinstance(value, bool) else value
    if kind == "real":
        return _to_real(value)
    if kind == "numeric":
        if isinstance(value, bool):
            raise _BadValue(f"a numeric value cannot be {value!r}")
        return str(value) if isinstance(value, int | float) else value
    if kind == "bytea":
        return _to_bytes(value)
    if isinstance(value, bool):  # e.g. a domain over boolean: PostgreSQL's text for it
        return "true" if value else "false"
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        return str(value)
    return value


def _to_real(value: Any) -> Any:
    """A float from the exact text (or an int); text that is no number, or NaN, stays text."""
    if isinstance(value, bool):
        raise _BadValue(f"a floating-point value cannot be {value!r}")
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return value if math.isnan(number) else number
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return str(value)
    return value


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str) and value.startswith("\\x"):
        try:
            return bytes.fromhex(value[2:])
        except ValueError:
            pass
    shown = value if not isinstance(value, str) or len(value) <= 40 else value[:40] + "…"
    raise _BadValue(f"a bytea value must be text like '\\x0a0b' (bytea_output hex), not {shown!r}")


def _capture(kind: _Kind, ref: str) -> str:
    """SQL for the upload form of column reference ``ref`` (e.g. ``NEW."a"``)."""
    if kind == "real":
        # json_object() writes a REAL with 15 digits, which loses some doubles; SQLite's
        # printf is not correctly rounded at 17 digits; with 21 the double comes back.
        return (
            f"CASE WHEN typeof({ref}) <> 'real' THEN {ref}"
            f" WHEN abs({ref}) <= {_DBL_MAX} THEN json(printf('%!.20e', {ref}))"
            f" WHEN {ref} > 0 THEN 'Infinity' ELSE '-Infinity' END"
        )
    if kind == "boolean":
        return f"CASE {ref} WHEN 1 THEN json('true') WHEN 0 THEN json('false') ELSE {ref} END"
    if kind == "bytea":
        return f"CASE WHEN {ref} IS NULL THEN NULL ELSE '\\x' || lower(hex({ref})) END"
    if kind == "json":
        return f"json({ref})"
    return ref


def _image(columns: Sequence[Column], row: str) -> str:
    """SQL building the JSON image of ``columns`` of trigger row ``row`` (``NEW``/``OLD``)."""
    pairs = [
        f"{_literal(c.name)}, {_capture(_kind(c.pgtype), f'{row}.{_quote(c.name)}')}"
        for c in columns
    ]
    chunks = [
        f"json_object({', '.join(pairs[at : at + IMAGE_CHUNK])})"
        for at in range(0, len(pairs), IMAGE_CHUNK)
    ]
    return chunks[0] if len(chunks) == 1 else f"json_array({', '.join(chunks)})"


def _decode_image(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if isinstance(value, list):  # a wide table: objects of IMAGE_CHUNK columns
        merged: dict[str, Any] = {}
        for part in value:
            merged.update(part)
        return merged
    return cast(dict[str, Any], value)


# --------------------------------------------------------------------------- schemas


def _normalized(schema: TableSchema) -> TableSchema:
    """``schema`` with tuples (a caller may pass lists), checked; raises LocalDatabaseError."""
    columns = tuple(Column(str(c.name), str(c.pgtype)) for c in schema.columns)
    key = tuple(str(k) for k in schema.key)
    where = f"table {schema.name!r}"
    _local_name(schema.name)
    if not columns:
        raise LocalDatabaseError(f"{where} has no columns")
    seen: dict[str, str] = {}
    for column in columns:
        if not column.name or "\0" in column.name:
            raise LocalDatabaseError(f"{where}: bad column name {column.name!r}")
        if not column.pgtype.strip():
            raise LocalDatabaseError(f"{where}: column {column.name!r} has no type")
        other = seen.get(_fold(column.name))
        if other == column.name:
            raise LocalDatabaseError(f"{where}: column {column.name!r} appears twice")
        if other is not None:
            raise LocalDatabaseError(
                f"{where}: columns {other!r} and {column.name!r} differ only in case,"
                " which SQLite ignores"
            )
        seen[_fold(column.name)] = column.name
    names = {c.name for c in columns}
    if not key:
        raise LocalDatabaseError(f"{where} has no key")
    if len(set(key)) != len(key):
        raise LocalDatabaseError(f"{where}: a key column appears twice in {list(key)}")
    for name in key:
        if name not in names:
            raise LocalDatabaseError(f"{where}: key column {name!r} is not one of its columns")
    return TableSchema(name=schema.name, columns=columns, key=key)


def _encode_schema(schema: TableSchema) -> str:
    return json.dumps(
        {"columns": [[c.name, c.pgtype] for c in schema.columns], "key": list(schema.key)},
        ensure_ascii=False,
    )


def _decode_schema(name: str, text: str) -> TableSchema:
    definition = json.loads(text)
    return TableSchema(
        name=name,
        columns=tuple(Column(str(n), str(t)) for n, t in definition["columns"]),
        key=tuple(str(k) for k in definition["key"]),
    )


def _key_columns(schema: TableSchema) -> list[Column]:
    by_name = {c.name: c for c in schema.columns}
    return [by_name[name] for name in schema.key]


def _create_sql(local: str, schema: TableSchema) -> str:
    key = set(schema.key)
    columns = [
        f"{_quote(c.name)} {_declared(c)}{' NOT NULL' if c.name in key else ''}"
        for c in schema.columns
    ]
    primary = ", ".join(_quote(k) for k in schema.key)
    return f"CREATE TABLE {_quote(local)} ({', '.join(columns)}, PRIMARY KEY ({primary}))"


def _trigger_sql(local: str, schema: TableSchema) -> list[str]:
    """The three capture triggers of ``local`` (server table ``schema.name``)."""
    when = f"coalesce((SELECT value FROM {_META} WHERE name = 'applying'), 0) = 0"
    key = _key_columns(schema)
    statements = []
    for op, key_row, old_row, new_row in (
        ("insert", "NEW", None, "NEW"),
        ("update", "OLD", "OLD", "NEW"),
        ("delete", "OLD", "OLD", None),
    ):
        old = _image(schema.columns, old_row) if old_row else "NULL"
        new = _image(schema.columns, new_row) if new_row else "NULL"
        statements.append(
            f"CREATE TRIGGER {_quote(_trigger_name(cast(Op, op), local))}"
            f" AFTER {op.upper()} ON {_quote(local)} WHEN {when} BEGIN"
            f' INSERT INTO {_CHANGES} ("table", op, "key", old, new) VALUES'
            f" ({_literal(schema.name)}, '{op}', {_image(key, key_row)}, {old}, {new});"
            " END"
        )
    return statements


# --------------------------------------------------------------------------- opening


def _ready(connection: sqlite3.Connection) -> bool:
    """Whether the file is set up and needs no write to be used: WAL mode (kept in the
    file), the meta tables of :data:`FORMAT`, no ``applying`` flag left behind."""
    mode = connection.execute("PRAGMA journal_mode").fetchone()
    if mode is None or str(mode[0]).lower() != "wal":
        return False
    try:
        row = connection.execute(_READY).fetchone()
    except sqlite3.OperationalError:  # no meta table yet: a new file
        return False
    return row is not None and tuple(row) == (FORMAT, 0, len(_META_TABLES))


def _set_up(connection: sqlite3.Connection, path: Path) -> None:
    """Put the file in WAL mode and create the meta tables, in one transaction."""
    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()
    if mode is None or str(mode[0]).lower() != "wal":
        raise LocalDatabaseError(f"cannot use the local database {path}: WAL mode refused")
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in _SCHEMA:
            connection.execute(statement)
        row = connection.execute(f"SELECT value FROM {_META} WHERE name = 'format'").fetchone()
        if row is None or row[0] != FORMAT:
            raise LocalDatabaseError(
                f"the local database {path} has format {row[0] if row else None!r};"
                f" this pushsync reads format {FORMAT}"
            )
        # A committed flag would silence the triggers for good; apply never commits one.
        connection.execute(f"UPDATE {_META} SET value = 0 WHERE name = 'applying'")
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


# --------------------------------------------------------------------------- the database


class LocalDatabase:
    """The local SQLite database of a device; see the module docstring.

    Open it with :meth:`open`. A context manager: ``with LocalDatabase.open(path)
    as db: ...`` closes it.
    """

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        """Wrap an open, prepared connection; use :meth:`open`."""
        self._connection: sqlite3.Connection | None = connection
        self._path = path
        self._lock = threading.RLock()

    @classmethod
    def open(cls, path: Path) -> LocalDatabase:
        """Open the database file ``path``, creating it (and its directory) if missing.

        Sets WAL mode and ``synchronous=FULL`` and creates the meta tables. A file
        already set up (WAL mode, the meta tables of :data:`FORMAT`, no ``applying``
        flag left) is checked with one read and not written: opening it costs no fsync.
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LocalDatabaseError(f"cannot create the directory {path.parent}: {exc}") from None
        try:
            connection = sqlite3.connect(
                path,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,  # autocommit; transactions say BEGIN
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise LocalDatabaseError(f"cannot open the local database {path}: {exc}") from None
        try:
            connection.execute("PRAGMA synchronous=FULL")
            if not _ready(connection):
                _set_up(connection, path)
        except sqlite3.Error as exc:
            connection.close()
            raise LocalDatabaseError(f"cannot use the local database {path}: {exc}") from None
        except BaseException:
            connection.close()
            raise
        return cls(connection, path)

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Close the file; closing twice is fine. The database cannot be used afterwards."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    def __enter__(self) -> LocalDatabase:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connection(self) -> sqlite3.Connection:
        """The connection, for the application to read and write the local rows."""
        return self._open()

    # ------------------------------------------------------------------ queries

    def local_name(self, table: str) -> str:
        """The SQLite table name of server table ``table``; see the module docstring.

        ``public.routes`` → ``routes``, ``sales.orders`` → ``sales__orders``.
        Always quote it in SQL.
        """
        return _local_name(table)

    def schema(self) -> dict[str, TableSchema]:
        """The published tables this database holds, by server name."""
        rows = self._query(f"SELECT server_name, definition FROM {_TABLES} ORDER BY server_name")
        return {str(name): _decode_schema(str(name), str(text)) for name, text in rows}

    def claim(self, device: str, publication: str) -> None:
        """Record that this file holds ``device``'s rows of ``publication``, or check that it
        does: :class:`LocalDatabaseMismatch` when it holds another device's or publication's.

        Two devices (or one device's two publications) sharing a file would take each
        other's watermark and keep each other's rows. The first claim of a file records
        the owner, in the same transaction as the check.
        """
        wanted = {"device": device, "publication": publication}
        with self._transaction("claim") as connection:
            rows = connection.execute(
                f"SELECT name, value FROM {_META} WHERE name IN ('device', 'publication')"
            ).fetchall()
            held = {str(name): str(value) for name, value in rows}
            if held and held != wanted:
                raise LocalDatabaseMismatch(
                    f"{self._path} holds the data of device {held.get('device')} "
                    f"(publication {held.get('publication')}), not of device {device} "
                    f"(publication {publication})"
                )
            if not held:
                connection.executemany(
                    f"INSERT INTO {_META} (name, value) VALUES (?, ?)", list(wanted.items())
                )

    def watermark(self, publication: str) -> str | None:
        """The watermark of the last download of ``publication``; ``None`` before the first."""
        rows = self._query(
            f"SELECT watermark FROM {_WATERMARKS} WHERE publication = ?", (publication,)
        )
        return str(rows[0][0]) if rows else None

    def pending(self, limit: int = 1000) -> list[Change]:
        """The oldest ``limit`` captured changes not yet uploaded, oldest first."""
        if limit < 0:
            raise ValueError(f"limit must not be negative, not {limit}")
        rows = self._query(
            f'SELECT seq, "table", op, "key", old, new FROM {_CHANGES} ORDER BY seq LIMIT ?',
            (limit,),
        )
        return [_change(row) for row in rows]

    def rejected(self) -> list[Rejected]:
        """The changes the server refused, oldest first, with its reasons."""
        rows = self._query(
            f'SELECT seq, "table", op, "key", old, new, reason, at FROM {_REJECTED} ORDER BY seq'
        )
        return [Rejected(_change(row[:6]), str(row[6]), float(row[7])) for row in rows]

    def forget_rejected(self, seqs: Iterable[int] | None = None) -> int:
        """Drop refused changes once the application has dealt with them (all if ``seqs``
        is None); how many were dropped."""
        with self._transaction("forget rejected changes") as connection:
            if seqs is None:
                cursor = connection.execute(f"DELETE FROM {_REJECTED}")
            else:
                cursor = connection.executemany(
                    f"DELETE FROM {_REJECTED} WHERE seq = ?", [(int(seq),) for seq in seqs]
                )
            return int(cursor.rowcount)

    # ------------------------------------------------------------------ writes

    def uploaded(self, applied: Iterable[int], rejected: Mapping[int, str]) -> None:
        """Record the server's answer to an upload, in one transaction.

        The changes ``applied`` leave the change log; the changes ``rejected``
        move to the rejected table with their reasons (a change in both counts
        as rejected). Sequence numbers no longer in the change log are ignored,
        so telling the same answer twice is harmless.
        """
        refused = {int(seq): str(reason) for seq, reason in rejected.items()}
        done = [(seq,) for seq in {int(seq) for seq in applied} if seq not in refused]
        at = time.time()
        with self._transaction("uploaded") as connection:
            connection.executemany(f"DELETE FROM {_CHANGES} WHERE seq = ?", done)
            connection.executemany(
                f'INSERT INTO {_REJECTED} (seq, "table", op, "key", old, new, reason, at)'
                f' SELECT seq, "table", op, "key", old, new, ?, ? FROM {_CHANGES} WHERE seq = ?',
                [(reason, at, seq) for seq, reason in refused.items()],
            )
            connection.executemany(
                f"DELETE FROM {_CHANGES} WHERE seq = ?", [(seq,) for seq in refused]
            )

    def apply(
        self, publication: str, downloads: Sequence[TableDownload], watermark: str
    ) -> ApplyStats:
        """Apply a download of ``publication`` and store its ``watermark``, in one transaction.

        Creates missing tables, rebuilds tables whose schema changed, deletes
        the ``deletes`` by key, writes the ``upserts``, and for a ``full``
        table deletes every other row. The capture triggers record none of it.
        On any error nothing of it stays and :class:`LocalDatabaseError` is raised.

        An empty download (an untouched synchronization) only stores the watermark:
        one small transaction, none at all when it is the one already stored.
        """
        if not downloads:
            self._store_watermark(publication, watermark)
            return ApplyStats(upserted=0, deleted=0, rebuilt=())
        schemas = [_normalized(download.schema) for download in downloads]
        seen: set[str] = set()
        for schema in schemas:
            if schema.name in seen:
                raise LocalDatabaseError(f"table {schema.name!r} appears twice in one download")
            seen.add(schema.name)
        with self._transaction(f"apply {publication!r}") as connection:
            connection.execute(f"UPDATE {_META} SET value = 1 WHERE name = 'applying'")
            stored = {
                str(name): (str(local), _decode_schema(str(name), str(text)))
                for name, local, text in connection.execute(
                    f"SELECT server_name, local_name, definition FROM {_TABLES}"
                )
            }
            upserted = deleted = 0
            rebuilt: list[str] = []
            for download, schema in zip(downloads, schemas, strict=True):
                local = _local_name(schema.name)
                before = stored.get(schema.name)
                if before is None:
                    _create(connection, local, schema)
                elif before[1] != schema:
                    _rebuild(connection, local, before[1], schema)
                    rebuilt.append(schema.name)
                deleted += _delete(connection, local, schema, download.deletes)
                keys = _upsert(connection, local, schema, download.upserts)
                upserted += len(download.upserts)
                if download.full:
                    deleted += _keep_only(connection, local, schema, keys)
            connection.execute(_STORE_WATERMARK, (publication, watermark))
            connection.execute(f"UPDATE {_META} SET value = 0 WHERE name = 'applying'")
        return ApplyStats(upserted=upserted, deleted=deleted, rebuilt=tuple(rebuilt))

    def _store_watermark(self, publication: str, watermark: str) -> None:
        """Store ``watermark`` alone, unless it is already the stored one."""
        with self._lock:
            if self.watermark(publication) == watermark:
                return
            with self._transaction(f"apply {publication!r}") as connection:
                connection.execute(_STORE_WATERMARK, (publication, watermark))

    def forget(self, publication: str) -> None:
        """Drop the watermark of ``publication``: its next sync is a full download."""
        with self._transaction(f"forget {publication!r}") as connection:
            connection.execute(f"DELETE FROM {_WATERMARKS} WHERE publication = ?", (publication,))

    # ------------------------------------------------------------------ internals

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise LocalDatabaseError(f"local database {self._path} is closed")
        return self._connection

    def _query(self, sql: str, parameters: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            connection = self._open()
            try:
                return connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise LocalDatabaseError(f"local database {self._path}: {exc}") from None

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed if the block ends normally, else rolled back."""
        with self._lock:
            connection = self._open()
            if connection.in_transaction:
                raise LocalDatabaseError(
                    f"local database {self._path}: {what}: the connection has a transaction"
                    " open; commit or roll it back first"
                )
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    yield connection
                    connection.execute("COMMIT")
                except BaseException:
                    if connection.in_transaction:
                        connection.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise LocalDatabaseError(f"local database {self._path}: {what}: {exc}") from None


def _change(row: Sequence[Any]) -> Change:
    seq, table, op, key, old, new = row
    if op not in OPS:
        raise LocalDatabaseError(f"change {seq} has an unknown operation {op!r}")
    return Change(
        seq=int(seq),
        table=str(table),
        op=cast(Op, op),
        key=_decode_image(key),
        old=None if old is None else _decode_image(old),
        new=None if new is None else _decode_image(new),
    )


# --------------------------------------------------------------------------- applying


def _create(connection: sqlite3.Connection, local: str, schema: TableSchema) -> None:
    """Create the local table of ``schema`` with its triggers, and record it."""
    taken = connection.execute(
        f"SELECT server_name FROM {_TABLES} WHERE local_name = ? COLLATE NOCASE", (local,)
    ).fetchone()
    if taken is not None:
        raise LocalDatabaseError(
            f"tables {taken[0]!r} and {schema.name!r} would both be the local table {local!r}"
            " (SQLite ignores the case of names)"
        )
    exists = connection.execute(
        "SELECT type, name FROM sqlite_schema WHERE name = ? COLLATE NOCASE", (local,)
    ).fetchone()
    if exists is not None:
        raise LocalDatabaseError(
            f"cannot create the local table {local!r} for {schema.name!r}:"
            f" the database already has a {exists[0]} named {exists[1]!r}"
        )
    connection.execute(_create_sql(local, schema))
    for statement in _trigger_sql(local, schema):
        connection.execute(statement)
    connection.execute(
        f"INSERT INTO {_TABLES} (server_name, local_name, definition) VALUES (?, ?, ?)",
        (schema.name, local, _encode_schema(schema)),
    )


def _drop_triggers(connection: sqlite3.Connection, local: str) -> None:
    for op in OPS:
        connection.execute(f"DROP TRIGGER IF EXISTS {_quote(_trigger_name(op, local))}")


def _rebuild(
    connection: sqlite3.Connection, local: str, old: TableSchema, new: TableSchema
) -> None:
    """Make ``local`` (made from ``old``) a table of ``new``, keeping the common columns."""
    connection.execute(
        f"UPDATE {_TABLES} SET definition = ? WHERE server_name = ?",
        (_encode_schema(new), new.name),
    )
    _drop_triggers(connection, local)
    if _create_sql(local, old) != _create_sql(local, new):
        # The application's own indexes and triggers (the capture triggers are gone).
        saved = [
            (str(kind), str(name), str(sql))
            for kind, name, sql in connection.execute(
                "SELECT type, name, sql FROM sqlite_schema WHERE tbl_name = ? COLLATE NOCASE"
                " AND type IN ('index', 'trigger') AND sql IS NOT NULL",
                (local,),
            )
        ]
        connection.execute(f"DROP TABLE IF EXISTS {_REBUILD}")
        connection.execute(_create_sql(_REBUILD, new))
        before = {c.name for c in old.columns}
        common = ", ".join(_quote(c.name) for c in new.columns if c.name in before)
        if common:
            # OR IGNORE: rows that break a changed key are left out.
            connection.execute(
                f"INSERT OR IGNORE INTO {_REBUILD} ({common}) SELECT {common} FROM {_quote(local)}"
            )
        connection.execute(f"DROP TABLE {_quote(local)}")
        # Legacy renaming leaves views alone: they name the table, which is gone for a moment.
        ((legacy,),) = connection.execute("PRAGMA legacy_alter_table").fetchall()
        connection.execute("PRAGMA legacy_alter_table = ON")
        try:
            connection.execute(f"ALTER TABLE {_REBUILD} RENAME TO {_quote(local)}")
        finally:
            connection.execute(f"PRAGMA legacy_alter_table = {'ON' if legacy else 'OFF'}")
        for kind, name, sql in saved:
            connection.execute("SAVEPOINT _pushsync_restore")
            try:
                connection.execute(sql)
            except sqlite3.Error as exc:
                connection.execute("ROLLBACK TO _pushsync_restore")
                logger.warning(
                    "%s %r on %r dropped: it does not fit the new schema of %s: %s",
                    kind,
                    name,
                    local,
                    new.name,
                    exc,
                )
            connection.execute("RELEASE _pushsync_restore")
    for statement in _trigger_sql(local, new):
        connection.execute(statement)


def _values(
    schema: TableSchema, columns: Sequence[Column], row: Mapping[str, Any], what: str
) -> tuple[Any, ...]:
    """The local values of ``columns`` of download ``row``."""
    values = []
    for column in columns:
        if column.name not in row:
            raise LocalDatabaseError(f"{schema.name}: {what} lacks column {column.name!r}")
        try:
            values.append(_to_local(_kind(column.pgtype), row[column.name]))
        except _BadValue as exc:
            raise LocalDatabaseError(
                f"{schema.name}: {what}: column {column.name!r} ({column.pgtype}): {exc}"
            ) from None
    return tuple(values)


def _where_key(schema: TableSchema) -> str:
    return " AND ".join(f"{_quote(k)} = ?" for k in schema.key)


def _delete(
    connection: sqlite3.Connection,
    local: str,
    schema: TableSchema,
    deletes: Sequence[Mapping[str, Any]],
) -> int:
    """Delete the rows of these keys; how many there were."""
    if not deletes:
        return 0
    key = _key_columns(schema)
    keys = [_values(schema, key, row, f"delete {at}") for at, row in enumerate(deletes)]
    cursor = connection.executemany(f"DELETE FROM {_quote(local)} WHERE {_where_key(schema)}", keys)
    return max(cursor.rowcount, 0)


def _upsert(
    connection: sqlite3.Connection,
    local: str,
    schema: TableSchema,
    upserts: Sequence[Mapping[str, Any]],
) -> list[tuple[Any, ...]]:
    """Insert or replace whole rows; their local key values."""
    names = {c.name for c in schema.columns}
    rows = []
    for at, row in enumerate(upserts):
        unknown = [name for name in row if name not in names]
        if unknown:
            raise LocalDatabaseError(f"{schema.name}: row {at} has unknown columns {unknown}")
        rows.append(_values(schema, schema.columns, row, f"row {at}"))
    if not rows:
        return []
    quoted = [_quote(c.name) for c in schema.columns]
    others = [_quote(c.name) for c in schema.columns if c.name not in schema.key]
    on_conflict = (
        f"ON CONFLICT ({', '.join(_quote(k) for k in schema.key)}) DO UPDATE SET "
        + ", ".join(f"{name} = excluded.{name}" for name in others)
        if others
        else "ON CONFLICT DO NOTHING"
    )
    connection.executemany(
        f"INSERT INTO {_quote(local)} ({', '.join(quoted)})"
        f" VALUES ({', '.join('?' * len(quoted))}) {on_conflict}",
        rows,
    )
    positions = [schema.columns.index(column) for column in _key_columns(schema)]
    return [tuple(row[p] for p in positions) for row in rows]


def _keep_only(
    connection: sqlite3.Connection,
    local: str,
    schema: TableSchema,
    keys: Sequence[tuple[Any, ...]],
) -> int:
    """Delete every row of ``local`` whose key is not one of ``keys``; how many.

    The keys go into a temporary table with the key columns' affinities, so
    SQLite compares them exactly as it compared them when the rows were written.
    """
    key = _key_columns(schema)
    keep = f"temp.{_KEEP}"
    columns = ", ".join(f"{_quote(c.name)} {_declared(c)}" for c in key)
    primary = ", ".join(_quote(c.name) for c in key)
    connection.execute(f"DROP TABLE IF EXISTS {keep}")
    connection.execute(f"CREATE TABLE {keep} ({columns}, PRIMARY KEY ({primary})) WITHOUT ROWID")
    connection.executemany(
        f"INSERT OR IGNORE INTO {keep} VALUES ({', '.join('?' * len(key))})", keys
    )
    match = " AND ".join(f"k.{_quote(c.name)} = t.{_quote(c.name)}" for c in key)
    cursor = connection.execute(
        f"DELETE FROM main.{_quote(local)} AS t"
        f" WHERE NOT EXISTS (SELECT 1 FROM {keep} AS k WHERE {match})"
    )
    connection.execute(f"DROP TABLE {keep}")  # on failure, the rollback drops it
    return max(cursor.rowcount, 0)
