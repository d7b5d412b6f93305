"""Connections to the consolidated database, with driver errors translated once, here."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import make_conninfo

from pushsync.errors import DatabaseError, DsnError

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


def check_dsn(dsn: str) -> None:
    """:class:`DsnError` unless libpq can read ``dsn`` (keywords, URI syntax, port numbers).

    psycopg resolves host names itself, so a port that is not a number would otherwise
    come back as a failed name lookup.
    """
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DsnError(first_line(exc)) from exc
    for port in str(params.get("port", "")).split(","):
        if port and not (port.isascii() and port.isdigit()):
            raise DsnError(f'invalid integer value "{port}" for connection option "port"')


# libpq's words for a connection option it cannot use, as opposed to a server it cannot reach.
_BAD_OPTION = re.compile(r"(?:connection is bad: )?((?:invalid|bad value for) .*)")


@contextmanager
def connect(
    dsn: str | None, *, autocommit: bool = False, connect_timeout: int | None = None
) -> Iterator[psycopg.Connection]:
    """A connection to ``dsn``; any driver error comes out as :class:`DatabaseError`.

    A connection string libpq cannot use raises :class:`DsnError` (a mistake in the
    input, not a failure of the database). ``connect_timeout`` (seconds, at least 2 for
    libpq) overrides the DSN's own.
    """
    target = resolve_dsn(dsn)
    check_dsn(target)
    if connect_timeout is not None:
        target = make_conninfo(target, connect_timeout=connect_timeout)
    try:
        conn = psycopg.connect(target, autocommit=autocommit, application_name="pushsync")
    except psycopg.Error as exc:
        bad_option = _BAD_OPTION.fullmatch(first_line(exc))
        if isinstance(exc, psycopg.ProgrammingError) or bad_option:
            raise DsnError(bad_option.group(1) if bad_option else first_line(exc)) from exc
        raise DatabaseError(f"cannot connect to {describe(target)}: {first_line(exc)}") from exc
    try:
        with conn:
            yield conn
    except psycopg.Error as exc:
        raise DatabaseError(first_line(exc)) from exc


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
