"""Apply the base schema (``sql/NNNN_name.sql``) and compiled rules to a database.

Everything happens in one transaction under an advisory lock: two migrations
started at once run one after the other, and a failure leaves nothing behind.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import psycopg

from pushsync import queries
from pushsync.errors import SchemaError

log = logging.getLogger(__name__)

_MIGRATION = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql\Z")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The base schema's migrations, in order."""
    found = []
    for entry in resources.files("pushsync.sql").iterdir():
        match = _MIGRATION.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8")))
    return sorted(found, key=lambda m: m.version)


def applied_versions(conn: psycopg.Connection) -> set[int]:
    exists = conn.execute(queries.get("schema_exists")).fetchone()
    if not exists or not exists[0]:
        return set()
    return {row[0] for row in conn.execute(queries.get("applied_versions"))}


def require_current(conn: psycopg.Connection) -> None:
    """Refuse to go on (:class:`SchemaError`) unless every base-schema migration is applied.

    Commands that read or write the ``pushsync`` schema call this first, so that
    running one before ``pushsync migrate`` says so instead of failing on a
    missing table.
    """
    done = applied_versions(conn)
    needed = {m.version for m in migrations()}
    if not done:
        raise SchemaError("the pushsync schema is missing: run `pushsync migrate`")
    missing = sorted(needed - done)
    if missing and missing[0] > max(done):
        raise SchemaError(
            f"the pushsync schema is at version {max(done)}, this pushsync needs "
            f"{max(needed)}: run `pushsync migrate`"
        )
    if missing:
        names = ", ".join(str(version) for version in missing)
        raise SchemaError(f"the pushsync schema lacks migration {names}: run `pushsync migrate`")


def migrate(conn: psycopg.Connection, rules_sql: str | None = None) -> list[Migration]:
    """Bring the base schema up to date, then apply ``rules_sql`` if given.

    Returns the migrations that were applied now (empty when up to date).
    """
    applied_now: list[Migration] = []
    with conn.transaction():
        conn.execute("SET LOCAL client_min_messages = warning")
        conn.execute(queries.get("migrate_lock"))
        done = applied_versions(conn)
        for migration in migrations():
            if migration.version in done:
                continue
            log.debug("applying %04d_%s", migration.version, migration.name)
            conn.execute(migration.sql)  # a file of ours
            applied_now.append(migration)
        if rules_sql is not None:
            conn.execute(rules_sql)  # compiled by the generator
    return applied_now


@dataclass(frozen=True, slots=True)
class Status:
    """What ``pushsync migrate --status`` reports."""

    applied: list[tuple[int, str, datetime]]
    """Base-schema migrations applied: version, name, when."""
    pending: list[Migration]
    """Base-schema migrations this pushsync has and the database lacks."""
    rules: list[tuple[str, str, str, str]]
    """The rules and polls applied: kind, name, source file, its sha256."""


def status(conn: psycopg.Connection) -> Status:
    """The base schema's migrations applied and pending, and the rules applied."""
    if not applied_versions(conn):
        return Status(applied=[], pending=migrations(), rules=[])
    applied = [(int(v), str(n), at) for v, n, at in conn.execute(queries.get("schema_applied"))]
    done = {version for version, _, _ in applied}
    rules = [
        (str(kind), str(name), str(source), str(sha))
        for kind, name, source, sha in conn.execute(queries.get("rules_applied"))
    ]
    return Status(
        applied=applied,
        pending=[m for m in migrations() if m.version not in done],
        rules=rules,
    )
