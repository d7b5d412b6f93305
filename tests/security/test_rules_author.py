"""A rules author attacks through the rules file.

Every attack goes through the real ``pushsync`` CLI against a real PostgreSQL
holding the trucking example with its rules applied. A hostile file must be
refused by ``check``, ``compile`` and ``migrate`` with exit status 2 and
located errors (``file:line:col``) that name the function, type or table, and
the database must be as before: functions, triggers, roles and their
settings, pushsync's rules and device secrets.

* Nothing of pushsync's own (device secrets, the outbox) and no catalog of
  roles or settings is readable from rules, polls or publications.
* Rules SQL calls only the built-ins of the allow-list, the functions listed
  under ``trusted_functions:``, and casts only to built-in types: ``ts_stat``
  and ``ts_rewrite`` (which run SQL given as text) are refused however they
  are written.
* A string literal means what its author wrote even when the application's
  session has ``standard_conforming_strings`` off.

What rules call or read must not be redefinable by the application role:
``test_rules_owners.py``; both use ``tests/support/rules_attacks.py``.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.integration import trucking
from tests.support.cli import run_cli
from tests.support.rules_attacks import (
    RULE_HEAD,
    Roles,
    as_role,
    refused_everywhere,
    write,
)

# ----------------------------------------------------------------------------- pushsync's own


OWN_TABLES = [
    pytest.param(
        """\
version: 1
publications:
  - name: secrets
    tables:
      - table: pushsync.devices
        download: SELECT * FROM pushsync.devices
""",
        "pushsync.devices",
        id="publication of the devices and their secrets",
    ),
    pytest.param(
        """\
version: 1
publications:
  - name: driver
    tables:
      - table: public.routes
        download: |
          SELECT r.* FROM public.routes r
          JOIN pushsync.devices d ON d.device_id = :device_id
          WHERE d.secret IS NOT NULL
""",
        "pushsync.devices",
        id="download joined to the devices",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    recipients: SELECT d.device_id, encode(d.secret, 'hex') AS secret FROM pushsync.devices d
    content: "{recipient.secret}"
""",
        "pushsync.devices",
        id="every secret in a message",
    ),
    pytest.param(
        """\
version: 1
polls:
  - name: leak
    every: 1m
    query: |
      SELECT o.device_id, o.content FROM pushsync.outbox AS o
""",
        "pushsync.outbox",
        id="poll of the outbox",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    when: EXISTS (SELECT FROM pg_catalog.pg_authid AS a WHERE a.rolsuper)
    recipients: all
""",
        "pg_catalog.pg_authid",
        id="roles and password hashes",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    recipients: |
      SELECT d.device_id, s.setting FROM public.drivers d
      CROSS JOIN LATERAL (SELECT setting FROM pg_catalog.pg_settings
                          WHERE name = 'data_directory') AS s
    content: "{recipient.setting}"
""",
        "pg_catalog.pg_settings",
        id="settings",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    recipients: |
      WITH u AS (SELECT usename FROM pg_catalog.pg_user) SELECT 'truck-1' AS device_id FROM u
""",
        "pg_catalog.pg_user",
        id="users in a CTE",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    recipients: SELECT 'truck-1' AS device_id, grantee FROM information_schema.role_table_grants
""",
        "information_schema.role_table_grants",
        id="information_schema",
    ),
    pytest.param(
        RULE_HEAD.replace("public.disruption_reports", "pushsync.devices").replace(
            "insert", "update"
        )
        + """\
    recipients: all
    content: "{new.secret}"
""",
        "pushsync.devices",
        id="a rule watching the devices",
    ),
]


@pytest.mark.parametrize(("text", "named"), OWN_TABLES)
def test_pushsync_and_the_catalogs_are_not_readable_from_rules(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, text: str, named: str
) -> None:
    refused_everywhere(fleet, dsn, write(tmp_path, text), named)


# ----------------------------------------------------------------------------- the allow-list


HIJACK = "pg_catalog.set_config(''session_replication_role'', ''replica'', false)"

FUNCTIONS = [
    pytest.param(
        RULE_HEAD + f"    when: ts_stat('SELECT {HIJACK}') IS NOT NULL\n    recipients: all\n",
        "ts_stat()",
        id="ts_stat",
    ),
    pytest.param(
        RULE_HEAD
        + f"    when: pg_catalog.ts_stat('SELECT {HIJACK}') IS NOT NULL\n    recipients: all\n",
        "pg_catalog.ts_stat()",
        id="ts_stat schema-qualified",
    ),
    pytest.param(
        RULE_HEAD + "    when: |\n"
        "      \"ts_rewrite\"('a'::tsquery, 'SELECT pg_catalog.nextval(''public.s'')') "
        "IS NOT NULL\n    recipients: all\n",
        "ts_rewrite()",
        id="ts_rewrite quoted",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    recipients: |
      SELECT d.device_id FROM public.drivers d
      CROSS JOIN LATERAL pg_catalog.ts_stat(
        'SELECT pg_catalog.to_tsvector(pg_catalog.pg_read_file(''/etc/hostname''))') AS s
""",
        "pg_catalog.ts_stat()",
        id="ts_stat in FROM reading a file",
    ),
    pytest.param(
        """\
version: 1
polls:
  - name: sleeper
    every: 1m
    query: SELECT d.device_id FROM public.drivers d WHERE pg_sleep(1) IS NULL
""",
        "pg_sleep()",
        id="pg_sleep in a poll",
    ),
    pytest.param(
        """\
version: 1
publications:
  - name: files
    tables:
      - table: public.routes
        download: |
          SELECT r.* FROM public.routes r
          WHERE pg_catalog.pg_read_file('/etc/hostname') IS NOT NULL
""",
        "pg_catalog.pg_read_file()",
        id="pg_read_file in a download",
    ),
    pytest.param(
        RULE_HEAD + "    when: current_setting('is_superuser') = 'on'\n    recipients: all\n",
        "current_setting()",
        id="current_setting",
    ),
    pytest.param(
        RULE_HEAD + "    when: new.note::public.anything IS NOT NULL\n    recipients: all\n",
        "type public.anything",
        id="cast to a type outside the allow-list",
    ),
    pytest.param(
        RULE_HEAD + "    when: new.note::regprocedure IS NOT NULL\n    recipients: all\n",
        "type REGPROCEDURE",
        id="cast to regprocedure",
    ),
]


@pytest.mark.parametrize(("text", "named"), FUNCTIONS)
def test_functions_outside_the_allow_list_are_refused(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, text: str, named: str
) -> None:
    refused_everywhere(fleet, dsn, write(tmp_path, text), named)


# ----------------------------------------------------------------------------- literals

SMUGGLED = (
    "\\' OR pg_catalog.set_config($q$session_replication_role$q$, $q$replica$q$, false) "
    "IS NOT NULL) --"
)
"""Harmless text with standard_conforming_strings on; code after ``'\\''`` with it off."""

BACKSLASHED = "C:\\new\\table"
"""Read with standard_conforming_strings off, ``\\n`` and ``\\t`` would be a newline and a tab."""

LITERALS = f"""\
version: 1
rules:
  - name: smuggled
    table: public.disruption_reports
    on: insert
    when: |
      new.note = $a${SMUGGLED}$a$
    recipients: |
      SELECT d.device_id, $a${BACKSLASHED}$a$ AS said
      FROM public.drivers d WHERE d.driver_id = new.reported_by
    content: "{{recipient.said}}"
  - name: every_report
    table: public.disruption_reports
    on: insert
    recipients: all
polls:
  - name: smuggled_poll
    every: 1h
    query: |
      SELECT d.device_id, $a${BACKSLASHED}$a$ AS content FROM public.drivers d WHERE d.driver_id = 2
publications:
  - name: smuggled_publication
    tables:
      - table: public.routes
        download: SELECT r.* FROM public.routes r WHERE r.route_name = $a$\\' OR true --$a$
"""

PINNED = {"search_path=pg_catalog, pg_temp", "standard_conforming_strings=on", "jit=off"}


def test_literals_mean_what_was_written_without_standard_conforming_strings(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, roles: Roles
) -> None:
    migrated = run_cli("migrate", "--dsn", dsn, str(write(tmp_path, LITERALS)))
    assert migrated.returncode == 0, migrated.stderr
    generated = fleet.execute(
        "SELECT p.proname::text, p.proconfig FROM pg_proc p "
        "WHERE p.pronamespace = 'pushsync'::regnamespace "
        "AND p.proname ~ '^(on_(insert|update|delete)|poll|pub)__'"
    ).fetchall()
    assert len(generated) == 3
    for name, config in generated:
        if name.startswith("pub__"):  # inlined: the dispatcher's transaction pins them
            assert config is None, f"{name} has SET clauses and cannot be inlined: {config}"
        else:
            assert set(config or []) >= PINNED, f"{name} runs with the caller's settings: {config}"
    trucking.clear_outbox(fleet)

    app = roles("app")
    fleet.execute(
        sql.SQL("GRANT INSERT ON public.disruption_reports TO {}").format(sql.Identifier(app))
    )
    with psycopg.connect(as_role(dsn, app), autocommit=True) as session:
        session.execute("SET standard_conforming_strings = off")
        insert = (
            "INSERT INTO public.disruption_reports (location_id, reported_by, note) "
            "VALUES (%s, %s, %s)"
        )
        session.execute(insert, (100, 3, "a plain report"))
        session.execute(insert, (300, 1, SMUGGLED))
        role = session.execute("SHOW session_replication_role").fetchone()
        assert role == ("origin",), "the rule's literal ran as code in the application's session"
    # only the report whose note is the literal, and the text exactly as written
    assert [(m["device_id"], m["content"]) for m in trucking.outbox(fleet, "smuggled")] == [
        ("truck-1", BACKSLASHED)
    ]
    assert len(trucking.outbox(fleet, "every_report")) == 4  # both reports, one per device

    with psycopg.connect(dsn, autocommit=True) as dispatcher:
        dispatcher.execute("SET standard_conforming_strings = off")
        dispatcher.execute('SELECT pushsync."poll__smuggled_poll"()')
        assert dispatcher.execute("SHOW session_replication_role").fetchone() == ("origin",)
        rows = dispatcher.execute(
            'SELECT count(*) FROM pushsync."pub__smuggled_publication__public__routes"(%s)',
            ("truck-1",),
        ).fetchone()
        assert rows == (0,), "the download's literal was read as code"
    assert [(m["device_id"], m["content"]) for m in trucking.outbox(fleet, "smuggled_poll")] == [
        ("truck-2", BACKSLASHED)
    ]
