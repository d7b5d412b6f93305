"""The application role attacks through what rules call and read.

A rule that calls a function the application role owns let that role become
superuser: it redefined the function to ``ALTER ROLE ... SUPERUSER`` and
wrote a row; the trigger, ``SECURITY DEFINER``, ran it with the migrating
role's rights. ``check --dsn`` and ``migrate`` refuse rules that call a
function, or read a view or table, owned by a role other than the migrating
role or a superuser, unless the rules file lists the owner under
``trusted_owners:`` — through the real CLI, with exit status 2, the object and
its owner named, and nothing changed; and afterwards the application's attempt
changes nothing either. ``migrate`` as a superuser warns; the owner role of
docs/operations.md migrates without a warning.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.integration import trucking
from tests.support.cli import run_cli
from tests.support.rules_attacks import (
    RULE_HEAD,
    Roles,
    as_role,
    refused_everywhere,
    snapshot,
    write,
)


def own(db: psycopg.Connection, owner: str, statement: str, kind: str, name: str) -> None:
    """Run ``statement`` (our own test SQL), then give ``kind name`` to ``owner``."""
    db.execute(statement)
    db.execute(
        sql.SQL("ALTER {} {} OWNER TO {}").format(
            sql.SQL(kind), sql.SQL(name), sql.Identifier(owner)
        )
    )


@pytest.fixture
def application(fleet: psycopg.Connection, roles: Roles) -> str:
    """The application role: writes the reports, owns a function, a view and a table."""
    app = roles("app")
    fleet.execute(
        sql.SQL(
            "GRANT CREATE ON SCHEMA public TO {app}; "
            "GRANT INSERT ON public.disruption_reports TO {app}"
        ).format(app=sql.Identifier(app))
    )
    own(
        fleet,
        app,
        "CREATE FUNCTION public.app_is_open(text) RETURNS boolean "
        "LANGUAGE sql STABLE AS $$ SELECT $1 = 'open' $$",
        "FUNCTION",
        "public.app_is_open(text)",
    )
    own(
        fleet,
        app,
        "CREATE VIEW public.app_drivers AS SELECT driver_id, device_id FROM public.drivers",
        "VIEW",
        "public.app_drivers",
    )
    own(
        fleet,
        app,
        "CREATE TABLE public.app_shifts (driver_id integer PRIMARY KEY, on_duty boolean)",
        "TABLE",
        "public.app_shifts",
    )
    return app


def become_superuser(dsn: str, app: str) -> bool:
    """The application redefines its function to make itself superuser, and writes a row."""
    with psycopg.connect(as_role(dsn, app), autocommit=True) as session:
        session.execute(
            sql.SQL(
                "CREATE OR REPLACE FUNCTION public.app_is_open(text) RETURNS boolean "
                "LANGUAGE plpgsql AS $$ BEGIN EXECUTE {}; RETURN true; END $$"
            ).format(sql.Literal(f'ALTER ROLE "{app}" SUPERUSER'))
        )
        session.execute(
            "INSERT INTO public.disruption_reports (location_id, reported_by) VALUES (100, 1)"
        )
        row = session.execute(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    return bool(row and row[0])


APPLICATION_OWNED = [
    pytest.param(
        RULE_HEAD + "    when: public.app_is_open(new.status)\n    recipients: all\n",
        ["public.app_is_open()", "trusted_functions"],
        True,
        id="an untrusted function",
    ),
    pytest.param(
        "trusted_functions: [public.app_is_open]\n"
        + RULE_HEAD
        + "    when: public.app_is_open(new.status)\n    recipients: all\n",
        ["public.app_is_open(text)", "owned by {app}"],
        False,
        id="a trusted function the application owns",
    ),
    pytest.param(
        RULE_HEAD + "    recipients: SELECT a.device_id FROM public.app_drivers a "
        "WHERE a.driver_id <> new.reported_by\n",
        ["public.app_drivers", "a view owned by {app}"],
        False,
        id="a view the application owns",
    ),
    pytest.param(
        RULE_HEAD
        + """\
    recipients: |
      SELECT d.device_id FROM public.drivers d
      JOIN public.app_shifts s ON s.driver_id = d.driver_id AND s.on_duty
""",
        ["public.app_shifts", "a table owned by {app}"],
        False,
        id="a table the application owns",
    ),
]


@pytest.mark.parametrize(("text", "named", "compiles"), APPLICATION_OWNED)
def test_rules_may_not_use_what_the_application_can_redefine(
    fleet: psycopg.Connection,
    dsn: str,
    tmp_path: Path,
    application: str,
    text: str,
    named: list[str],
    compiles: bool,
) -> None:
    path = write(tmp_path, text)
    names = [n.format(app=application) for n in named]
    refused_everywhere(fleet, dsn, path, *names, compiles=not compiles)
    before = snapshot(fleet)
    assert not become_superuser(dsn, application)
    after = snapshot(fleet)
    assert after["roles"] == before["roles"]
    assert after["triggers"] == before["triggers"]


def test_trusting_functions_and_owners_is_explicit_and_checked(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, application: str
) -> None:
    fleet.execute(
        "CREATE FUNCTION public.is_open(text) RETURNS boolean "
        "LANGUAGE sql STABLE AS $$ SELECT $1 = 'open' $$; "
        "CREATE FUNCTION public.is_open_as_owner(text) RETURNS boolean SECURITY DEFINER "
        "LANGUAGE sql STABLE AS $$ SELECT $1 = 'open' $$"
    )
    definer = write(
        tmp_path,
        "trusted_functions: [public.is_open_as_owner]\n"
        + RULE_HEAD
        + "    when: public.is_open_as_owner(new.status)\n    recipients: all\n",
        "definer.yaml",
    )
    refused_everywhere(
        fleet, dsn, definer, "public.is_open_as_owner(text) is SECURITY DEFINER", compiles=True
    )

    trusted = write(
        tmp_path,
        f"trusted_functions: [public.is_open]\ntrusted_owners: [{application}]\n"
        + RULE_HEAD
        + """\
    when: public.is_open(new.status)
    recipients: |
      SELECT d.device_id FROM public.drivers d
      JOIN public.app_shifts s ON s.driver_id = d.driver_id AND s.on_duty
""",
        "trusted.yaml",
    )
    migrated = run_cli("migrate", "--dsn", dsn, str(trusted))
    assert migrated.returncode == 0, migrated.stderr
    superuser = conninfo_to_dict(dsn)["user"]
    assert (
        f"migrating as superuser {superuser}: pushsync's SECURITY DEFINER functions will be "
        f"owned by {superuser}" in migrated.stderr
    ), migrated.stderr
    fleet.execute("INSERT INTO public.app_shifts VALUES (2, true), (3, false)")
    trucking.report(fleet, location=100, by=1)
    assert trucking.devices_of(fleet, "leak") == ["truck-2"]


def test_the_documented_owner_role_migrates_without_a_warning(
    db: psycopg.Connection, dsn: str, roles: Roles
) -> None:
    owner = roles.name("pushsync_owner")  # the documentation creates it
    app = roles("app")
    database = f"appdb_{uuid.uuid4().hex[:10]}"
    names = {"pushsync_owner": owner, "app": app, "appdb": database}
    db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        fresh = make_conninfo(dsn, dbname=database)
        with psycopg.connect(fresh, autocommit=True) as admin:
            admin.execute((trucking.EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
            for statement in owner_role_statements():
                # our own documentation's SQL, with this test's names
                admin.execute(
                    re.sub(r"\b(pushsync_owner|appdb|app)\b", lambda m: names[m[1]], statement)
                )
        migrated = run_cli("migrate", "--dsn", as_role(fresh, owner), str(trucking.RULES))
        assert migrated.returncode == 0, migrated.stderr
        assert "superuser" not in migrated.stderr, migrated.stderr
        with psycopg.connect(as_role(fresh, app), autocommit=True) as session:
            session.execute("INSERT INTO public.drivers (driver_id, name) VALUES (9, 'Flo')")
        with psycopg.connect(fresh, autocommit=True) as admin:
            owners = admin.execute(
                "SELECT DISTINCT pg_get_userbyid(p.proowner)::text FROM pg_proc p "
                "WHERE p.pronamespace = 'pushsync'::regnamespace AND p.prosecdef"
            ).fetchall()
            assert owners == [(owner,)]
            assert admin.execute("SELECT count(*) FROM pushsync.rules").fetchone() == (5,)
    finally:
        db.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(database)))


def owner_role_statements() -> list[str]:
    """The SQL of docs/operations.md that sets up the owner role, statement by statement."""
    docs = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
    blocks = re.findall(r"```sql\n(.*?)```", docs.read_text(encoding="utf-8"), re.DOTALL)
    block = next(b for b in blocks if "CREATE ROLE pushsync_owner" in b)
    lines = [line for line in block.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def test_check_runs_nothing_it_refuses(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, application: str
) -> None:
    """Planning folds an immutable call on constants: it would run the application's code."""
    fleet.execute("CREATE SEQUENCE public.app_calls")
    own(
        fleet,
        application,
        "CREATE FUNCTION public.app_counted(text) RETURNS boolean IMMUTABLE LANGUAGE plpgsql "
        "AS $$ BEGIN PERFORM pg_catalog.nextval('public.app_calls'); RETURN true; END $$",
        "FUNCTION",
        "public.app_counted(text)",
    )
    path = write(
        tmp_path,
        "trusted_functions: [public.app_counted]\n"
        + RULE_HEAD
        + "    when: public.app_counted('open') AND new.status = 'open'\n    recipients: all\n",
    )
    refused_everywhere(fleet, dsn, path, f"owned by {application}", compiles=True)
    calls = fleet.execute("SELECT is_called FROM public.app_calls").fetchone()
    assert calls == (False,), "check --dsn ran the function it refused"


def test_a_column_type_the_application_owns_is_refused(
    fleet: psycopg.Connection, dsn: str, tmp_path: Path, application: str
) -> None:
    """Its owner can add a cast from it: ``{new.mood}`` (``mood::text``) would run that."""
    own(
        fleet,
        application,
        "CREATE TYPE public.app_mood AS ENUM ('calm', 'cross')",
        "TYPE",
        "public.app_mood",
    )
    fleet.execute("ALTER TABLE public.disruption_reports ADD COLUMN mood public.app_mood")
    path = write(tmp_path, RULE_HEAD + '    recipients: all\n    content: "mood {new.mood}"\n')
    refused_everywhere(
        fleet,
        dsn,
        path,
        "column public.disruption_reports.mood is of type public.app_mood",
        f"owned by {application}",
        compiles=True,
    )
    before = snapshot(fleet)
    with psycopg.connect(as_role(dsn, application), autocommit=True) as session:
        session.execute(
            sql.SQL(
                "CREATE FUNCTION public.app_mood_text(public.app_mood) RETURNS text "
                "LANGUAGE plpgsql AS $$ BEGIN EXECUTE {}; RETURN 'calm'; END $$; "
                "CREATE CAST (public.app_mood AS text) "
                "WITH FUNCTION public.app_mood_text(public.app_mood)"
            ).format(sql.Literal(f'ALTER ROLE "{application}" SUPERUSER'))
        )
        session.execute(
            "INSERT INTO public.disruption_reports (location_id, reported_by, mood) "
            "VALUES (100, 1, 'calm')"
        )
    assert snapshot(fleet)["roles"] == before["roles"]
