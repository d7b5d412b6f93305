"""``pushsync check --dsn``: check a rule set against a live database.

Tables and every column a rule names must exist, an update rule that pairs
rows needs a key, and each SQL fragment must plan (EXPLAIN) in the environment
the trigger runs in. Each published table must exist with a key, name existing
columns, and its download must plan and return the table's rows. Nothing is
written: all of it happens in a transaction that is rolled back.
"""

from __future__ import annotations

import psycopg

from pushsync import queries
from pushsync.db import first_line
from pushsync.errors import Location, Problems
from pushsync.generator import passes, render
from pushsync.generator.model import Poll, Publication, PublishedTable, Rule, RuleSet

TABLE_KINDS = {"r", "p"}  # ordinary and partitioned tables can carry these triggers


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
                f"SELECT 1 FROM {rows} WHERE {render.sql(rule.when)}",
                rule.when.location,
                rule.label,
                "when",
            )
        if rule.recipients is not None:
            self.explain(
                f"SELECT 1 FROM {rows} CROSS JOIN LATERAL ({render.sql(rule.recipients)}) AS r",
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
                f"SELECT (d::{target}).* FROM ({download}) AS d",
                published.download.location,
                label,
                "download",
            )


def check(conn: psycopg.Connection, rules: RuleSet, problems: Problems) -> None:
    """Add to ``problems`` everything the database says is wrong with ``rules``."""
    plan = passes.plan(rules)
    checker = _Checker(conn, problems)
    with conn.transaction(force_rollback=True):
        # The environment of the generated trigger functions.
        conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
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
