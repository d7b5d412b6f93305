"""Connections to the consolidated database, with driver errors translated once, here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pushsync.errors import DatabaseError

DSN_VARIABLE = "PUSHSYNC_DSN"


def resolve_dsn(dsn: str | None) -> str:
    """``--dsn``, else ``PUSHSYNC_DSN``, else empty: libpq then reads its ``PG*`` variables."""
    return dsn or os.environ.get(DSN_VARIABLE, "")


def describe(dsn: str) -> str:
    """The DSN without its password, for messages and logs."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(unparsable DSN)"
    params.pop("password", None)
    shown = " ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return shown or "(libpq defaults)"


@contextmanager
def connect(dsn: str | None, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    """A connection to ``dsn``; any driver error comes out as :class:`DatabaseError`."""
    target = resolve_dsn(dsn)
    try:
        conn = psycopg.connect(target, autocommit=autocommit, application_name="pushsync")
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to {describe(target)}: {first_line(exc)}") from exc
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        raise DatabaseError(first_line(exc)) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
