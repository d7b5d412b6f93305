"""One uploaded change written to its table: the shell around :func:`conflicts.decide`.

Every statement names the published table and its functions, so it is composed
here from the catalog's names (``psycopg.sql.Identifier``); values travel as
JSON and become typed rows through ``jsonb_populate_record``. :func:`write`
raises :class:`~pushsync.dispatcher.sync_errors.Rejected` when the change may
not be applied; the caller's savepoint then undoes whatever was written,
triggers' work included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from pushsync.dispatcher import conflicts
from pushsync.dispatcher.conflicts import Action, Facts, Found, Need, Refusal
from pushsync.dispatcher.sync_errors import Rejected
from pushsync.dispatcher.sync_store import AsyncConn
from pushsync.dispatcher.sync_tables import ServerTable
from pushsync.wire.sync import Change, Row


@dataclass(frozen=True, slots=True)
class _Current:
    """The server's row an uploaded change finds, locked."""

    text: str
    """The row as JSON (``to_jsonb``)."""
    record: str
    """The row as PostgreSQL's text of a record of the table: exact, for the upload check."""
    theirs: bool
    """Whether the device's download returns it."""

    @property
    def values(self) -> dict[str, Any]:
        values: dict[str, Any] = json.loads(self.text, parse_float=str)
        return values


async def write(db: AsyncConn, table: ServerTable, change: Change, device: str) -> None:
    """Apply one admissible change for ``device`` under the table's conflict policy.

    The download function runs in this transaction after the write, so it sees
    the row as written (and as the table's triggers left it).
    """
    params: dict[str, Any] = {"key": json.dumps(change.key), "device": device}
    where = _key_match(table, sql.Placeholder("key"))
    current = await _current(db, table, where, params)
    facts = Facts(found=_found(current))
    while isinstance(outcome := conflicts.decide(table, change, facts), Need):
        assert current is not None  # noqa: S101  narrowing; decide() asks only of a found row
        facts = facts.learnt(outcome, await _learn(db, table, change, current, outcome))
    if isinstance(outcome, Refusal):
        raise Rejected(outcome.reason)
    if outcome is Action.NOTHING:
        return
    old = None if current is None else current.record
    if outcome is Action.DELETE:
        await _upload_check(db, table, device, None, old)
        await db.execute(
            sql.SQL("DELETE FROM {table} AS t WHERE {where}").format(
                table=table.ident(), where=where
            ),
            params,
        )
        return
    assert change.new is not None  # noqa: S101  narrowing; admissible: it has its new row
    on = where if outcome is Action.UPDATE else None
    written = await _write_row(db, table, change.new, on, params)
    await _after(db, table, written, old, device)


def _found(current: _Current | None) -> Found:
    if current is None:
        return Found.NONE
    return Found.THEIRS if current.theirs else Found.NOT_THEIRS


async def _learn(
    db: AsyncConn, table: ServerTable, change: Change, current: _Current, need: Need
) -> bool:
    if need is Need.SAME:
        assert change.old is not None  # noqa: S101  narrowing; SAME is asked only with an old row
        return await _same(db, table, change.old, current.values)
    return await _newer(db, table, change.new, current.text)


async def _current(
    db: AsyncConn, table: ServerTable, where: sql.Composable, params: dict[str, Any]
) -> _Current | None:
    """The server's row of the change's key, locked, and whether the device holds it."""
    query = sql.SQL(
        "SELECT to_jsonb(t)::text, t::text, {theirs} "
        "FROM {table} AS t WHERE {where} FOR UPDATE OF t"
    )
    cur = await db.execute(
        query.format(theirs=_theirs(table), table=table.ident(), where=where), params
    )
    row = await cur.fetchone()
    if row is None:
        return None
    return _Current(text=row[0], record=row[1], theirs=bool(row[2]))


async def _write_row(
    db: AsyncConn,
    table: ServerTable,
    new: Row,
    where: sql.Composable | None,
    params: dict[str, Any],
) -> str:
    """Insert ``new`` (no ``where``), or update the row ``where`` picks to it.

    Returns the row written, as the text of a record.
    """
    columns = [sql.Identifier(c) for c in new]
    values = sql.SQL(
        "SELECT {xcols} FROM jsonb_populate_record(NULL::{table}, %(new)s::jsonb) AS x"
    ).format(
        xcols=sql.SQL(", ").join(sql.SQL("x.{}").format(c) for c in columns),
        table=table.ident(),
    )
    parts: dict[str, sql.Composable] = {
        "table": table.ident(),
        "cols": sql.SQL(", ").join(columns),
        "values": values,
    }
    if where is None:
        statement = sql.SQL("INSERT INTO {table} AS t ({cols}) {values} RETURNING t::text")
        what = f"the insert into {table.name}"
    else:
        statement = sql.SQL(
            "UPDATE {table} AS t SET ({cols}) = ({values}) WHERE {where} RETURNING t::text"
        )
        parts["where"] = where
        what = f"the update of {table.name}"
    cur = await db.execute(statement.format(**parts), {**params, "new": json.dumps(new)})
    row = await cur.fetchone()
    if row is None:  # a rule or an INSTEAD trigger took it elsewhere
        raise Rejected(f"{what} wrote no row")
    return str(row[0])


async def _after(
    db: AsyncConn, table: ServerTable, written: str, old: str | None, device: str
) -> None:
    """The row as written must be one the device downloads, and pass the upload check."""
    check: sql.Composable = sql.SQL("true")
    if table.check_function is not None:
        check = sql.SQL("pushsync.{}(%(device)s, t, %(old)s::{})").format(
            sql.Identifier(table.check_function), table.ident()
        )
    query = sql.SQL(
        "SELECT {theirs}, {check} "
        "FROM {table} AS t, (SELECT (%(written)s::{table}).*) AS w WHERE {same}"
    ).format(
        theirs=_theirs(table), check=check, table=table.ident(), same=_same_key(table, "t", "w")
    )
    cur = await db.execute(query, {"device": device, "old": old, "written": written})
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise Rejected(f"the row as written would not be one of this device's rows of {table.name}")
    if not row[1]:
        raise Rejected(f"the upload_check of {table.name} refuses this change")


async def _upload_check(
    db: AsyncConn, table: ServerTable, device: str, new: str | None, old: str | None
) -> None:
    if table.check_function is None:
        return
    cur = await db.execute(
        sql.SQL("SELECT pushsync.{}(%s, %s::{table}, %s::{table})").format(
            sql.Identifier(table.check_function), table=table.ident()
        ),
        (device, new, old),
    )
    row = await cur.fetchone()
    if row is None or not row[0]:
        raise Rejected(f"the upload_check of {table.name} refuses this change")


def _theirs(table: ServerTable) -> sql.Composable:
    """Whether the device's download returns row ``t`` (the device is ``%(device)s``)."""
    return sql.SQL(
        "EXISTS (SELECT 1 FROM pushsync.{function}(%(device)s) AS f WHERE {mine})"
    ).format(function=sql.Identifier(table.function), mine=_same_key(table, "f", "t"))


def _key_match(table: ServerTable, key: sql.Composable) -> sql.Composable:
    """``t``'s key equals the key in the JSON object ``key``, typed as the table's."""
    columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL(
        "({lhs}) = (SELECT {rhs} FROM jsonb_populate_record(NULL::{table}, {key}::jsonb) AS k)"
    ).format(
        lhs=sql.SQL(", ").join(sql.SQL("t.{}").format(c) for c in columns),
        rhs=sql.SQL(", ").join(sql.SQL("k.{}").format(c) for c in columns),
        table=table.ident(),
        key=key,
    )


def _same_key(table: ServerTable, left: str, right: str) -> sql.Composable:
    """``(left.k1, …) = (right.k1, …)`` over the table's key."""
    columns = [sql.Identifier(k) for k in table.key]
    return sql.SQL("({}) = ({})").format(
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(left), c) for c in columns),
        sql.SQL(", ").join(sql.SQL("{}.{}").format(sql.Identifier(right), c) for c in columns),
    )


async def _same(db: AsyncConn, table: ServerTable, old: Row, current: dict[str, Any]) -> bool:
    """Whether the device's pre-image equals the server's row, in the columns it names."""
    cur = await db.execute(
        sql.SQL("SELECT to_jsonb(jsonb_populate_record(NULL::{table}, %s::jsonb))::text").format(
            table=table.ident()
        ),
        (json.dumps(old),),
    )
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("the normalizing SELECT returned no row")
    normal = json.loads(row[0], parse_float=str)
    return all(normal.get(c) == current.get(c) for c in old)


async def _newer(db: AsyncConn, table: ServerTable, new: Row | None, current: str) -> bool:
    """Whether ``new``'s ``newest`` column is greater than the server's row's (``current``)."""
    if table.newest is None:
        raise ValueError(f"{table.name} names no newest column")
    if new is None:
        return False
    column = sql.Identifier(table.newest)
    cur = await db.execute(
        sql.SQL(
            "SELECT coalesce(x.{col} > y.{col}, x.{col} IS NOT NULL) "
            "FROM jsonb_populate_record(NULL::{table}, %s::jsonb) AS x, "
            "jsonb_populate_record(NULL::{table}, %s::jsonb) AS y"
        ).format(col=column, table=table.ident()),
        (json.dumps(new), current),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


__all__ = ["write"]
