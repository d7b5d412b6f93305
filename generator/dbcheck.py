"""``pushsync check --dsn``: check a rule set against a live database.

:func:`check` asks the database what the YAML alone cannot tell: that tables,
columns and keys exist, that every SQL fragment plans where the generated
functions run, and that nothing the rules use is owned by a role the rules
file does not trust. The checks and their messages are in ``docs/rules.md``
("Errors", "Who owns what rules use").
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pushsync import queries
from pushsync.db import first_line
from pushsync.errors import Location, Problems
from pushsync.generator import allowed, fragments, passes, render
from pushsync.generator.model import Fragment, Poll, Publication, PublishedTable, Rule, RuleSet

TABLE_KINDS = {"r", "p"}  # ordinary and partitioned tables can carry these triggers
RELATION_KINDS = {
    "r": "a table",
    "p": "a partitioned table",
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
}
_TRUST = render.named_blocks("dbcheck.sql.j2")


@dataclass(frozen=True, slots=True)
class Role:
    """The role that applies the migration, which the generated functions run as."""

    name: str
    superuser: bool


def migrating_role(conn: psycopg.Connection) -> Role:
    """Who is connected: the owner the migration's ``SECURITY DEFINER`` functions get."""
    row = conn.execute(_TRUST["migrating_role"]).fetchone()
    if row is None:
        raise RuntimeError("the role query returned no row")
    return Role(name=str(row[0]), superuser=bool(row[1]))


class _Checker:
    def __init__(self, conn: psycopg.Connection, problems: Problems) -> None:
        self.conn = conn
        self.problems = problems
        self._columns: dict[str, set[str]] = {}

    def columns(self, table: str) -> set[str]:
        if table not in self._columns:
            rows = self.conn.execute(queries.get("table_columns"), {"table": table})
            self._columns[table] = {row[0] for row in rows}
        return self._columns[table]

    def explain(self, sql: str, where: Location, label: str, field: str) -> None:
        """Plan ``sql``, a rule's SQL as the parser re-rendered it, with the names in it quoted
        by :func:`render.ident`: planned, never run; what the database refuses is a problem."""
        try:
            with self.conn.transaction():
                self.conn.execute("EXPLAIN " + sql)
        except psycopg.Error as exc:
            self.problems.add(where, f"{field}: the database refuses it: {first_line(exc)}", label)

    def rule(self, rule: Rule, plan: passes.Plan) -> None:
        table = str(rule.table)
        kind = self.conn.execute(queries.get("table_kind"), {"table": table}).fetchone()
        if kind is None:
            self.problems.add(rule.table_location, f"table {table} does not exist", rule.label)
            return
        if kind[0] not in TABLE_KINDS:
            self.problems.add(
                rule.table_location, f"{table} is not a table (triggers need one)", rule.label
            )
            return
        before = len(self.problems)
        self._named_columns(rule, self.columns(table))
        self._key(rule, plan)
        if len(self.problems) == before:  # the database would only repeat them
            self._probe(rule)

    def _named_columns(self, rule: Rule, known: set[str]) -> None:
        for key in ("columns", "key"):
            for column in getattr(rule, key):
                if column not in known:
                    self.problems.add(
                        rule.where(key), f"{key}: {rule.table} has no column {column}", rule.label
                    )
        for scope, column, where in passes.rule_refs(rule):
            if column not in known:
                self.problems.add(
                    where, f"{scope}.{column}: {rule.table} has no column {column}", rule.label
                )

    def _key(self, rule: Rule, plan: passes.Plan) -> None:
        trigger = next(
            (t for t in plan.triggers if t.table == rule.table and t.event == "update"), None
        )
        if trigger is None or not trigger.pairs_rows(rule) or trigger.key:
            return
        row = self.conn.execute(queries.get("primary_key"), {"table": str(rule.table)}).fetchone()
        if not row or not row[0]:
            self.problems.add(
                rule.location,
                f"{rule.table} has no primary key to pair old and new rows: "
                "give the rule a key: [column, ...]",
                rule.label,
            )

    def _probe(self, rule: Rule) -> None:
        table = f"{render.ident(rule.table.schema)}.{render.ident(rule.table.name)}"
        rows = f'{table} AS "new" CROSS JOIN {table} AS "old"'
        if rule.when is not None:
            self.explain(
                f"SELECT 1 FROM {rows} WHERE {render.sql(rule.when)}",  # noqa: S608  see explain()
                rule.when.location,
                rule.label,
                "when",
            )
        if rule.recipients is not None:
            self.explain(
                f"SELECT 1 FROM {rows} CROSS JOIN LATERAL ({render.sql(rule.recipients)}) AS r",  # noqa: S608  see explain()
                rule.recipients.location,
                rule.label,
                "recipients",
            )

    def poll(self, poll: Poll) -> None:
        self.explain(render.sql(poll.query), poll.query.location, poll.label, "query")

    def published(self, publication: Publication, published: PublishedTable) -> None:
        """The table, its key, the columns named, and that the download plans."""
        label = publication.label
        table = str(published.table)
        kind = self.conn.execute(queries.get("table_kind"), {"table": table}).fetchone()
        if kind is None:
            self.problems.add(published.where("table"), f"table {table} does not exist", label)
            return
        if kind[0] not in TABLE_KINDS:
            self.problems.add(
                published.where("table"), f"{table} is not a table (it cannot be captured)", label
            )
            return
        known = self.columns(table)
        before = len(self.problems)
        for column in published.key:
            if column not in known:
                self.problems.add(
                    published.where("key"), f"key: {table} has no column {column}", label
                )
        if not published.key:
            row = self.conn.execute(queries.get("primary_key"), {"table": table}).fetchone()
            if not row or not row[0]:
                self.problems.add(
                    published.where("table"),
                    f"{table} has no primary key: give the publication table a key: [column, ...]",
                    label,
                )
        if published.newest_column is not None and published.newest_column not in known:
            self.problems.add(
                published.where("conflict"),
                f"conflict: {table} has no column {published.newest_column}",
                label,
            )
        if len(self.problems) == before:
            # $1 is the device id; the function's return type must be the table's rows.
            download = render.sql(published.download).replace("$1", "NULL::text")
            target = f"{render.ident(published.table.schema)}.{render.ident(published.table.name)}"
            self.explain(
                f"SELECT (d::{target}).* FROM ({download}) AS d",  # noqa: S608  see explain()
                published.download.location,
                label,
                "download",
            )
            if published.upload_check is not None:
                self._upload_check(published, known, target, label)

    def _upload_check(
        self, published: PublishedTable, known: set[str], target: str, label: str
    ) -> None:
        """The columns ``upload_check`` names exist, and it plans over ``new`` and ``old``."""
        check = published.upload_check
        if check is None:
            raise ValueError(f"{published.table} has no upload_check")
        before = len(self.problems)
        for ref in fragments.row_references(check.tree):
            if ref.column not in known:
                self.problems.add(
                    check.locate(ref.line, ref.column_number),
                    f"upload_check: {ref.scope}.{ref.column}: {published.table} has no column "
                    f"{ref.column}",
                    label,
                )
        if len(self.problems) == before:
            condition = render.sql(check).replace("$1", "NULL::text")
            self.explain(
                f'SELECT ({condition}) FROM {target} AS "new" CROSS JOIN {target} AS "old"',  # noqa: S608  see explain()
                check.location,
                label,
                "upload_check",
            )


class _Trust:
    """Who may change what the rules call and read: the migrating role, superusers, and
    the roles under ``trusted_owners:``."""

    def __init__(self, conn: psycopg.Connection, rules: RuleSet, problems: Problems) -> None:
        self.conn = conn
        self.problems = problems
        self.role = migrating_role(conn)
        self.owners = {t.name for t in rules.trusted_owners}

    def trusted(self, owner: str, superuser: bool) -> bool:
        return superuser or owner == self.role.name or owner in self.owners

    def advice(self, owner: str) -> str:
        return (
            f"make {self.role.name} (the role that migrates) its owner, or list {owner} under "
            "trusted_owners if it may run code with that role's rights"
        )

    def owners_exist(self, rules: RuleSet) -> None:
        names = [t.name for t in rules.trusted_owners]
        rows = self.conn.execute(_TRUST["roles"], {"names": names}).fetchall()
        known = {str(row[0]) for row in rows}
        for trusted in rules.trusted_owners:
            if trusted.name not in known:
                self.problems.add(
                    trusted.location, f"trusted_owners: there is no role {trusted.name}"
                )

    def functions(self, rules: RuleSet) -> None:
        for trusted in rules.trusted_functions:
            schema, _, name = trusted.name.partition(".")
            rows = self.conn.execute(_TRUST["functions"], {"schema": schema, "name": name})
            found = rows.fetchall()
            if not found:
                self.problems.add(
                    trusted.location, f"trusted_functions: {trusted.name} does not exist"
                )
            for signature, owner, superuser, definer in found:
                if definer:
                    self.problems.add(
                        trusted.location,
                        f"trusted_functions: {signature} is SECURITY DEFINER: it runs as its "
                        f"owner {owner}, not as the rules do; rules may call only functions "
                        "that run as their caller",
                    )
                if not self.trusted(owner, superuser):
                    self.problems.add(
                        trusted.location,
                        f"trusted_functions: {signature} is owned by {owner}, who could redefine "
                        f"it to run anything with the rights of {self.role.name}; "
                        + self.advice(owner),
                    )

    def reads(self, label: str, key: str, fragment: Fragment) -> None:
        for read in allowed.reads(fragment.tree):
            where = fragment.locate(read.line, read.column)
            self.relation(label, key, read.schema, read.name, where)

    def relation(self, label: str, key: str, schema: str, name: str, where: Location) -> None:
        """A relation the generated functions read, or whose rows a trigger sees."""
        args = {"schema": schema, "name": name}
        row = self.conn.execute(_TRUST["relation"], args).fetchone()
        if row is None:
            return  # the other checks say it does not exist
        kind, owner, superuser = str(row[0]), str(row[1]), bool(row[2])
        if not self.trusted(owner, superuser):
            what = RELATION_KINDS.get(kind, "a relation")
            self.problems.add(
                where,
                f"{key}: {schema}.{name} is {what} owned by {owner}, who could change what "
                "the generated functions run through it (a view's query, a row-level security "
                f"policy, a column's type, a view in its place) with the rights of "
                f"{self.role.name}; " + self.advice(owner),
                label,
            )
            return
        for column, type_, owner, superuser in self.conn.execute(_TRUST["column_types"], args):
            if not self.trusted(owner, superuser):
                self.problems.add(
                    where,
                    f"{key}: column {schema}.{name}.{column} is of type {type_}, owned by "
                    f"{owner}, who could add casts and checks to it that run with the rights "
                    f"of {self.role.name}; " + self.advice(owner),
                    label,
                )


def _trust(conn: psycopg.Connection, rules: RuleSet, problems: Problems) -> None:
    trust = _Trust(conn, rules, problems)
    trust.owners_exist(rules)
    trust.functions(rules)
    for rule in rules.rules:  # its trigger sees the table's rows and their types
        table = rule.table
        trust.relation(rule.label, "table", table.schema, table.name, rule.where("table"))
    for found in passes.sql_fragments(rules):
        assert isinstance(found.value, Fragment)  # noqa: S101  type narrowing; sql_fragments() yields only fragments
        trust.reads(found.label, found.key, found.value)


def check(conn: psycopg.Connection, rules: RuleSet, problems: Problems) -> None:
    """Add to ``problems`` everything the database says is wrong with ``rules``.

    First who owns what: every trusted function, every relation a fragment
    reads, every watched table and its column types must belong to the
    migrating role, a superuser or a ``trusted_owners:`` role, and a trusted
    function may not be ``SECURITY DEFINER``. If that finds a problem, nothing
    is planned (planning runs immutable functions on constants and expands
    views: the very code refused). Then each rule (table, columns, a key to
    pair rows, fragments planned with EXPLAIN), poll and published table
    (exists with a key, named columns exist, the download plans and returns
    the table's rows). All in a transaction that is rolled back, under the
    generated functions' ``search_path`` and ``standard_conforming_strings``.
    """
    plan = passes.plan(rules)
    checker = _Checker(conn, problems)
    with conn.transaction(force_rollback=True):
        # The environment of the generated functions.
        conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
        conn.execute("SET LOCAL standard_conforming_strings = on")
        before = len(problems)
        _trust(conn, rules, problems)
        if len(problems) > before:
            return  # planning would run the code it refuses (constant folding, views)
        for rule in rules.rules:
            checker.rule(rule, plan)
        for poll in rules.polls:
            checker.poll(poll)
        for publication in rules.publications:
            for published in publication.tables:
                checker.published(publication, published)


def require(conn: psycopg.Connection, rules: RuleSet) -> None:
    """Raise :class:`~pushsync.errors.RulesError` listing what the database finds wrong."""
    problems = Problems()
    check(conn, rules, problems)
    problems.raise_if_any()
