"""A rules author's attacks through the real CLI: what was refused, and that nothing changed.

:func:`refused_everywhere` runs ``check --dsn``, ``migrate`` and ``compile`` on
a hostile rules file and asserts each exits 2 with located problems naming what
was refused, and that :func:`snapshot` of the database is as before.
:class:`Roles` makes login roles of the test's own and drops them after.
"""

from __future__ import annotations

import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.support.cli import run_cli

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
        assert found, f"not located in {path}: {line}"
        assert found["path"] == str(path), f"not located in {path}: {line}"
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


RULE_HEAD = """\
version: 1
rules:
  - name: leak
    table: public.disruption_reports
    on: insert
"""
"""The start of a rule on ``public.disruption_reports``; an attack appends the rest."""
