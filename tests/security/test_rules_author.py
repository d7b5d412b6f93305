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
``test_rules_owners.py``, with the helpers of this file.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.integration import trucking
from tests.reliability.harness import run_cli

LOCATED = re.compile(r"^(?P<path>.+):(?P<line>\d+):(?P<column>\d+): ")

SNAPSHOT = {
    "relations": "SELECT n.nspname, c.relname, c.relkind, pg_get_userbyid(c.relowner) "
    "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2",
    "functions": "SELECT p.oid::regprocedure::text, md5(p.prosrc), p.prosecdef, "
    "p.proconfig::text, pg_get_userbyid(p.proowner) FROM pg_proc p "
    "JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    "triggers": "SELECT tgrelid::regclass::text, tgname, md5(pg_get_triggerdef(oid)) "
    "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
    "roles": "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
    "FROM pg_roles ORDER BY 1",
    "memberships": "SELECT roleid::regrole::text, member::regrole::text FROM pg_auth_members "
    "ORDER BY 1, 2",
    "role_settings": "SELECT setdatabase, setrole::regrole::text, setconfig::text "
    "FROM pg_db_role_setting ORDER BY 1, 2",
    "secrets": "SELECT device_id, md5(secret), enabled FROM pushsync.devices ORDER BY 1",
    "rules": "SELECT to_jsonb(r)::text FROM pushsync.rules r ORDER BY 1",
    "publications": "SELECT to_jsonb(p)::text FROM pushsync.publication_tables p ORDER BY 1",
    "outbox": "SELECT rule, device_id, content FROM pushsync.outbox ORDER BY 1, 2, 3",
}
"""What an attack could change: code, roles, settings, pushsync's rules, secrets and messages."""


def snapshot(db: psycopg.Connection) -> dict[str, list[tuple[str, ...]]]:
    return {
        name: [tuple(map(str, row)) for row in db.execute(query)]
        for name, query in SNAPSHOT.items()
    }


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    """The trucking example with its rules applied, four devices with secrets, no messages."""
    trucking.setup(db)
    return db


class Roles:
    """Roles with names of their own (roles are cluster-wide), dropped after the test."""

    def __init__(self, db: psycopg.Connection) -> None:
        self.db = db
        self.names: list[str] = []

    def name(self, kind: str) -> str:
        """A fresh name for a role that the test itself creates."""
        self.names.append(f"{kind}_{uuid.uuid4().hex[:10]}")
        return self.names[-1]

    def __call__(self, kind: str) -> str:
        """A new login role."""
        name = self.name(kind)
        self.db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
        return name

    def drop(self) -> None:
        for name in reversed(self.names):
            if self.db.execute("SELECT FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                role = sql.Identifier(name)
                self.db.execute(sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(role))
                self.db.execute(sql.SQL("DROP OWNED BY {}").format(role))
                self.db.execute(sql.SQL("DROP ROLE {}").format(role))

    @classmethod
    def dropped_after(cls, db: psycopg.Connection) -> Iterator[Roles]:
        """For a fixture: the roles, dropped when the test is over."""
        made = cls(db)
        try:
            yield made
        finally:
            made.drop()


@pytest.fixture
def roles(db: psycopg.Connection) -> Iterator[Roles]:
    yield from Roles.dropped_after(db)


def as_role(dsn: str, role: str) -> str:
    """``dsn`` logging in as ``role`` (the test server trusts local connections)."""
    return make_conninfo(dsn, user=role)


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(result: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    """The located problems of a refused run; fails unless it exited 2 with nothing else."""
    assert result.returncode == 2, f"exit {result.returncode}: {result.stdout}{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [
        line
        for line in result.stderr.splitlines()
        if line.strip() and not line.startswith("sqlglot: ")
    ]
    assert lines, "refused without a reason"
    for line in lines:
        found = LOCATED.match(line)
        assert found and found["path"] == str(path), f"not located in {path}: {line}"
    return lines


def refused_everywhere(
    db: psycopg.Connection, dsn: str, path: Path, *named: str, compiles: bool = False
) -> list[str]:
    """``check --dsn``, ``compile`` and ``migrate`` refuse ``path`` naming each of ``named``,
    and change nothing. ``compiles``: only the database can tell (``compile`` succeeds)."""
    before = snapshot(db)
    said: list[str] = []
    runs = [("check", str(path), "--dsn", dsn), ("migrate", "--dsn", dsn, str(path))]
    if not compiles:
        runs.append(("compile", str(path), "-o", str(path.with_suffix(".sql"))))
    for args in runs:
        lines = problems(run_cli(*args), path)
        for name in named:
            assert any(name in line for line in lines), f"{args[0]}: {name} not named: {lines}"
        said += lines
    assert not path.with_suffix(".sql").exists(), "compile wrote a migration"
    assert snapshot(db) == before, "the refused migration changed the database"
    return said


# ----------------------------------------------------------------------------- pushsync's own


RULE_HEAD = """\
version: 1
rules:
  - name: leak
    table: public.disruption_reports
    on: insert
"""

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
            assert PINNED <= set(config or []), f"{name} runs with the caller's settings: {config}"
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
