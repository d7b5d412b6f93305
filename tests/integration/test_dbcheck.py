"""`check --dsn`: what only the database can tell, located in the rules file."""

from __future__ import annotations

import psycopg
import pytest

from pushsync import generator
from pushsync.errors import Problems
from pushsync.generator import dbcheck
from tests.integration import trucking


@pytest.fixture
def trucking_db(db: psycopg.Connection) -> psycopg.Connection:
    db.execute((trucking.EXAMPLE / "schema.sql").read_text())
    return db


def problems_for(db: psycopg.Connection, text: str) -> list[str]:
    problems = Problems()
    dbcheck.check(db, generator.loads(text, "rules.yaml"), problems)
    return sorted(str(p) for p in problems)


def test_the_example_checks_clean(trucking_db: psycopg.Connection) -> None:
    problems = Problems()
    dbcheck.check(trucking_db, generator.load(trucking.RULES), problems)
    assert not problems


def test_missing_table_and_columns_are_located(trucking_db: psycopg.Connection) -> None:
    text = """\
version: 1
rules:
  - name: a
    table: public.no_such_table
    on: insert
    recipients: all
  - name: b
    table: public.disruption_reports
    on: update
    columns: [status, severity]
    when: new.priority > 2
    recipients: all
    content: "{old.locaton_id}"
"""
    assert problems_for(trucking_db, text) == [
        "rules.yaml:10:5: rule b: columns: public.disruption_reports has no column severity",
        "rules.yaml:11:11: rule b: new.priority: public.disruption_reports has no column priority",
        "rules.yaml:13:15: rule b: old.locaton_id: public.disruption_reports has no column "
        "locaton_id",
        "rules.yaml:4:12: rule a: table public.no_such_table does not exist",
    ]


def test_recipients_that_do_not_plan_are_reported(trucking_db: psycopg.Connection) -> None:
    text = """\
version: 1
rules:
  - name: a
    table: public.disruption_reports
    on: insert
    recipients: |
      SELECT d.device_id FROM public.drivers d
      JOIN public.routes r ON r.driver = d.driver_id
"""
    assert problems_for(trucking_db, text) == [
        "rules.yaml:6:17: rule a: recipients: the database refuses it: column r.driver "
        "does not exist",
    ]


def test_trusted_functions_are_checked(trucking_db: psycopg.Connection) -> None:
    trucking_db.execute(
        "CREATE FUNCTION public.is_open(text) RETURNS boolean "
        "LANGUAGE sql AS $$ SELECT $1 = 'open' $$;"
        "CREATE FUNCTION public.is_open(integer) RETURNS boolean SECURITY DEFINER "
        "LANGUAGE sql AS $$ SELECT $1 = 1 $$"
    )
    text = """\
version: 1
trusted_functions: [public.is_open, public.no_such_function]
rules:
  - name: a
    table: public.disruption_reports
    on: insert
    when: public.is_open(new.status)
    recipients: all
"""
    assert problems_for(trucking_db, text) == [
        "rules.yaml:2:21: trusted_functions: public.is_open(integer) is SECURITY DEFINER: it "
        "runs as its owner postgres, not as the rules do; rules may call only functions that "
        "run as their caller",
        "rules.yaml:2:37: trusted_functions: public.no_such_function does not exist",
    ]
    trucking_db.execute("DROP FUNCTION public.is_open(integer)")
    assert problems_for(trucking_db, text.replace(", public.no_such_function", "")) == []


def test_update_rule_on_table_without_key(trucking_db: psycopg.Connection) -> None:
    trucking_db.execute("CREATE TABLE public.log (device_id text, n int)")
    text = """\
version: 1
rules:
  - name: a
    table: public.log
    on: update
    columns: [n]
    recipients: all
"""
    assert problems_for(trucking_db, text) == [
        "rules.yaml:3:5: rule a: public.log has no primary key to pair old and new rows: "
        "give the rule a key: [column, ...]",
    ]
    assert problems_for(trucking_db, text + "    key: [device_id]\n") == []


def test_view_is_not_a_table(trucking_db: psycopg.Connection) -> None:
    trucking_db.execute(
        "CREATE VIEW public.open_reports AS SELECT * FROM public.disruption_reports"
    )
    text = "version: 1\nrules:\n  - name: a\n    table: public.open_reports\n"
    text += "    on: insert\n    recipients: all\n"
    assert problems_for(trucking_db, text) == [
        "rules.yaml:4:12: rule a: public.open_reports is not a table (triggers need one)",
    ]


def test_check_writes_nothing(trucking_db: psycopg.Connection) -> None:
    triggers = (
        "SELECT count(*) FROM pg_trigger "
        "WHERE NOT tgisinternal AND tgrelid::regclass::text NOT LIKE 'pushsync.%'"
    )
    before = trucking_db.execute(triggers).fetchone()  # the example's own detour planner
    problems = Problems()
    dbcheck.check(trucking_db, generator.load(trucking.RULES), problems)
    assert trucking_db.execute(triggers).fetchone() == before == (1,)


def test_publications_are_checked_against_the_database(trucking_db: psycopg.Connection) -> None:
    trucking_db.execute("CREATE TABLE public.keyless (a int, b text)")
    text = """\
version: 1
publications:
  - name: p
    tables:
      - table: public.no_such_table
        download: SELECT * FROM public.no_such_table
      - table: public.keyless
        download: SELECT * FROM public.keyless
      - table: public.routes
        key: [route_code]
        download: SELECT r.* FROM public.routes AS r
        upload: [update]
        conflict: {newest: changed_at}
      - table: public.route_stops
        download: |
          SELECT s.* FROM public.route_stops AS s WHERE s.location = :device_id
"""
    found = problems_for(trucking_db, text)
    assert found == [
        "rules.yaml:10:9: publication p: key: public.routes has no column route_code",
        "rules.yaml:13:9: publication p: conflict: public.routes has no column changed_at",
        "rules.yaml:15:19: publication p: download: the database refuses it: column s.location "
        "does not exist",
        "rules.yaml:5:9: publication p: table public.no_such_table does not exist",
        "rules.yaml:7:9: publication p: public.keyless has no primary key: give the "
        "publication table a key: [column, ...]",
    ], "\n".join(found)


def test_upload_checks_are_checked_against_the_database(trucking_db: psycopg.Connection) -> None:
    text = """\
version: 1
publications:
  - name: p
    tables:
      - table: public.disruption_reports
        download: SELECT * FROM public.disruption_reports
        upload: [insert, update]
        upload_check: new.filed_by = 1 AND old.status = 'open'
      - table: public.routes
        download: SELECT * FROM public.routes
        upload: [update]
        upload_check: |
          new.driver_id = (SELECT d.driver_id FROM public.drivers d WHERE d.device = :device_id)
"""
    found = problems_for(trucking_db, text)
    assert found == [
        "rules.yaml:12:23: publication p: upload_check: the database refuses it: column "
        "d.device does not exist",
        "rules.yaml:8:23: publication p: upload_check: new.filed_by: public.disruption_reports "
        "has no column filed_by",
    ], "\n".join(found)
