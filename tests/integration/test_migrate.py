"""Applying the base schema and compiled rules: idempotent, atomic, cleaning up."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pushsync import generator, schema
from pushsync.errors import SchemaError
from tests.integration import trucking
from tests.support.postgres import wrapper_info

SNAPSHOT = {
    "functions": """
        SELECT p.proname::text, pg_get_functiondef(p.oid), p.prosecdef, p.proconfig::text
        FROM pg_proc p WHERE p.pronamespace = 'pushsync'::regnamespace ORDER BY 1""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname::text, pg_get_triggerdef(t.oid)
        FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid
        JOIN pg_class AS c ON c.oid = t.tgrelid
        WHERE NOT t.tgisinternal AND p.pronamespace = 'pushsync'::regnamespace
          AND c.relnamespace <> 'pushsync'::regnamespace  -- the rules' triggers only
        ORDER BY 1, 2""",
    "rules": "SELECT xmin::text, * FROM pushsync.rules ORDER BY name",
    "versions": "SELECT version, name FROM pushsync.schema_version ORDER BY version",
    "acl": """
        SELECT p.proname::text, p.proacl::text FROM pg_proc p
        WHERE p.pronamespace = 'pushsync'::regnamespace ORDER BY 1""",
}


def snapshot(db: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {name: db.execute(query).fetchall() for name, query in SNAPSHOT.items()}


def test_base_schema_is_in_the_template(db: psycopg.Connection) -> None:
    versions = [m.version for m in schema.migrations()]
    assert versions == list(range(1, len(versions) + 1))  # numbered without gaps
    assert schema.applied_versions(db) == set(versions)
    assert schema.migrate(db) == []  # nothing left to apply


TRUCKING_TRIGGERS = 5 + 4 * 3
"""The example's rule triggers, and change capture (insert, update, delete) on the four
tables its publication reads."""


def test_applying_the_rules_twice_changes_nothing(db: psycopg.Connection) -> None:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    trucking.apply_rules(db)
    before = snapshot(db)
    assert len(before["triggers"]) == TRUCKING_TRIGGERS
    trucking.apply_rules(db)
    assert snapshot(db) == before  # xmin of the registry rows included: not rewritten


def test_trigger_functions_are_security_definer_with_pinned_search_path(
    db: psycopg.Connection,
) -> None:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    trucking.apply_rules(db)
    rows = db.execute(
        "SELECT proname, prosecdef, proconfig, proacl::text FROM pg_proc "
        "WHERE pronamespace = 'pushsync'::regnamespace AND proname LIKE 'on\\_%'"
    ).fetchall()
    assert len(rows) == 5
    for name, definer, config, acl in rows:
        assert definer, name
        pinned = ["search_path=pg_catalog, pg_temp", "standard_conforming_strings=on", "jit=off"]
        assert config == pinned, name
        grantees = [entry.split("=")[0] for entry in acl.strip("{}").split(",")]
        assert "" not in grantees, name  # PUBLIC may not execute it


def test_removing_a_rule_removes_its_trigger_and_function(db: psycopg.Connection) -> None:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    trucking.apply_rules(db)
    text = trucking.RULES.read_text()
    start = text.index("  - name: route_removed")
    end = text.index("  - name: fleet_notice")
    trucking.apply_rules(db, text[:start] + text[end:])
    triggers = [row[:2] for row in snapshot(db)["triggers"]]
    assert ("routes", "pushsync_delete") not in triggers
    assert ("routes", "pushsync_update") in triggers
    functions = [row[0] for row in snapshot(db)["functions"]]
    assert "on_delete__public__routes" not in functions
    names = [row[0] for row in db.execute("SELECT name FROM pushsync.rules ORDER BY name")]
    assert names == ["disruption_cleared", "fleet_notice", "route_disruption", "route_reassigned"]
    # An empty rules file removes everything generated.
    trucking.apply_rules(db, "version: 1\n")
    assert snapshot(db)["triggers"] == []
    base_functions = [
        "attempt_logged",
        "capture",
        "capture_changes",
        "device_access_changed",
        "flow_events",
        "key_join",
        "latency_bucket",
        "latency_events",
        "outbox_history_rollup",
        "sync_sessions_rollup",
        "uncapture_except",
    ]
    assert [r[0] for r in snapshot(db)["functions"]] == base_functions


def test_failed_migration_leaves_nothing_behind(db: psycopg.Connection) -> None:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    before = snapshot(db)
    rules = generator.load(trucking.RULES)
    sql = generator.compile_rules(rules) + "\nSELECT 1/0;\n"
    with pytest.raises(psycopg.errors.DivisionByZero):
        schema.migrate(db, sql)
    assert snapshot(db) == before


def test_migration_file_applies_with_psql(db: psycopg.Connection, dsn: str, tmp_path: Path) -> None:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    migration = tmp_path / "rules.sql"
    migration.write_text(generator.compile_rules(generator.load(trucking.RULES)))
    psql = str(Path(wrapper_info().bindir) / "psql")
    for _ in range(2):
        subprocess.run(
            [psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-1", "-f", str(migration), dsn],
            check=True,
            capture_output=True,
        )
    assert len(snapshot(db)["triggers"]) == TRUCKING_TRIGGERS


def test_concurrent_migrations_are_serialised(pg_server: Any, postgresql: Any) -> None:
    # A database without the base schema, migrated by two sessions at once.
    info = postgresql.info
    postgresql.autocommit = True
    postgresql.execute("CREATE DATABASE empty_db")
    dsn = f"host={info.host} port={info.port} user={info.user} dbname=empty_db"
    errors: list[BaseException] = []
    applied: list[int] = []

    def run() -> None:
        try:
            with psycopg.connect(dsn) as conn:
                applied.extend(m.version for m in schema.migrate(conn))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    versions = [m.version for m in schema.migrations()]
    assert applied == versions  # one session applied them, the other found them done
    with psycopg.connect(dsn) as conn:
        assert schema.applied_versions(conn) == set(versions)


def test_a_missing_middle_migration_is_named(db: psycopg.Connection) -> None:
    """A schema lacking a migration below its newest says which, not 'at version N, needs N'."""
    schema.require_current(db)
    db.execute("DELETE FROM pushsync.schema_version WHERE version = 2")
    with pytest.raises(SchemaError) as refused:
        schema.require_current(db)
    assert str(refused.value) == "the pushsync schema lacks migration 2: run `pushsync migrate`"
