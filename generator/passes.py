"""Checks that need the whole rule set, then the plan the templates render.

Like an optimizer, this is an ordered tuple of passes; each takes the rule set
and a :class:`Problems` collector, so each can be run and tested alone.
:func:`plan` then groups rules into one trigger function per (table, event).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import sqlglot.expressions as exp

from pushsync.errors import Location, Problems
from pushsync.generator import allowed, fragments
from pushsync.generator.model import (
    Event,
    Fragment,
    Poll,
    Publication,
    PublishedTable,
    Rule,
    RuleSet,
    TableName,
    Template,
)
from pushsync.wire.limits import MAX_MESSAGE_TEXT

Pass = Callable[[RuleSet, Problems], None]

# Which row images each event has.
SCOPES: dict[Event, frozenset[str]] = {
    "insert": frozenset({"new"}),
    "update": frozenset({"new", "old"}),
    "delete": frozenset({"old"}),
}


@dataclass(frozen=True, slots=True)
class Found:
    """A value somewhere in the model: whose it is (``label``), under which key, in what."""

    label: str
    key: str
    value: object
    holder: object

    @property
    def where(self) -> Location:
        if isinstance(self.value, Fragment):
            return self.value.location
        where = getattr(self.holder, "where", None)
        return where(self.key) if callable(where) else Location("", 1, 1)


def model_values(rules: RuleSet, kinds: tuple[type, ...]) -> Iterator[Found]:
    """Every value of one of ``kinds`` that the rules file holds, wherever the model keeps it.

    The model is walked through its dataclass fields, so a key added to the model
    later (a new kind of SQL fragment) is found without being named here.
    """
    yield from _walk(rules, kinds, "", "", rules)


def _walk(
    value: object, kinds: tuple[type, ...], label: str, key: str, holder: object
) -> Iterator[Found]:
    if isinstance(value, kinds):
        yield Found(label, key, value, holder)
    elif isinstance(value, tuple):
        for item in value:
            yield from _walk(item, kinds, label, key, holder)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        label = getattr(value, "label", label)
        for field in dataclasses.fields(value):
            yield from _walk(getattr(value, field.name), kinds, label, field.name, value)


def sql_fragments(rules: RuleSet) -> Iterator[Found]:
    """Every SQL fragment of the file: ``when``, ``recipients``, ``query``, ``download``, ..."""
    return model_values(rules, (Fragment,))


def allowed_sql(rules: RuleSet, problems: Problems) -> None:
    """Rules SQL calls, casts to and reads only what the allow-lists accept."""
    trusted = frozenset(t.name for t in rules.trusted_functions)
    for found in sql_fragments(rules):
        fragment = found.value
        assert isinstance(fragment, Fragment)  # noqa: S101  type narrowing; sql_fragments() yields only fragments
        said: set[str] = set()
        for refusal in allowed.refusals(fragment.tree, trusted):
            if refusal.message not in said:
                said.add(refusal.message)
                where = fragment.locate(refusal.line, refusal.column)
                problems.add(where, f"{found.key}: {refusal.message}", found.label)
    for found in model_values(rules, (TableName,)):
        table = found.value
        assert isinstance(table, TableName)  # noqa: S101  type narrowing; asked for TableName only
        if allowed.closed(table.schema):
            problems.add(
                found.where,
                f"{found.key} {table}: tables of {table.schema} cannot be watched or published",
                found.label,
            )


def unique_names(rules: RuleSet, problems: Problems) -> None:
    """Rule and poll names share one namespace: the outbox's ``rule`` column."""
    seen: dict[str, Location] = {}
    items: tuple[Rule | Poll, ...] = (*rules.rules, *rules.polls)
    for item in items:
        where = item.where("name")
        if item.name in seen:
            first = seen[item.name]
            problems.add(
                where, f"duplicate name {item.name!r} (first used at line {first.line})", item.label
            )
        else:
            seen[item.name] = where


def _fragment_refs(fragment: Fragment | None) -> Iterator[tuple[str, str, Location]]:
    if fragment is None:
        return
    for ref in fragments.row_references(fragment.tree):
        yield ref.scope, ref.column, fragment.locate(ref.line, ref.column_number)


def _template_refs(template: Template) -> Iterator[tuple[str, str, Location]]:
    for placeholder in template.placeholders:
        if placeholder.scope != "recipient":
            yield placeholder.scope, placeholder.column, placeholder.location


def rule_refs(rule: Rule) -> Iterator[tuple[str, str, Location]]:
    yield from _fragment_refs(rule.when)
    yield from _fragment_refs(rule.recipients)
    yield from _template_refs(rule.subject)
    yield from _template_refs(rule.content)


def row_scopes(rules: RuleSet, problems: Problems) -> None:
    """``old`` only where every event of the rule has an old row; ``new`` likewise."""
    for rule in rules.rules:
        available = frozenset.intersection(*(SCOPES[e] for e in rule.events))
        for scope, column, where in rule_refs(rule):
            if scope not in available:
                lacking = next(e for e in rule.events if scope not in SCOPES[e])
                problems.add(
                    where, f"{scope}.{column}: {lacking} rules have no {scope} row", rule.label
                )


def update_only_keys(rules: RuleSet, problems: Problems) -> None:
    """``columns`` and ``key`` only mean something for updates."""
    for rule in rules.rules:
        for key, value in (("columns", rule.columns), ("key", rule.key)):
            if value and "update" not in rule.events:
                problems.add(rule.where(key), f"{key} applies only to update rules", rule.label)


def recipient_columns(rules: RuleSet, problems: Problems) -> None:
    """The recipients query returns ``device_id`` and every ``{recipient.x}`` used."""
    for rule in rules.rules:
        if rule.recipients is None:
            available: list[str] | None = ["device_id"]
        else:
            clash = fragments.table_aliases(rule.recipients.tree) & {"new", "old"}
            if clash:
                problems.add(
                    rule.recipients.location,
                    f"recipients: do not name a table {sorted(clash)[0]!r}; it means the "
                    "changed row",
                    rule.label,
                )
            available = _query_columns(rule.recipients, "recipients", rule.label, problems)
        if available is None:
            continue
        for template in (rule.subject, rule.content):
            for placeholder in template.placeholders:
                if placeholder.scope == "recipient" and placeholder.column not in available:
                    problems.add(
                        placeholder.location,
                        f"recipient.{placeholder.column} is not a column of the recipients "
                        f"query (it returns {', '.join(available)})",
                        rule.label,
                    )


def _query_columns(
    fragment: Fragment, key: str, label: str, problems: Problems
) -> list[str] | None:
    assert isinstance(fragment.tree, exp.Query)  # noqa: S101  type narrowing; parsed by parse_query
    columns = fragments.output_columns(fragment.tree)
    if columns is None:
        problems.add(
            fragment.location,
            f"{key}: list the columns instead of *, so device_id can be found",
            label,
        )
        return None
    if "device_id" not in columns:
        problems.add(fragment.location, f"{key}: the query must return a device_id column", label)
        return None
    return columns


def poll_columns(rules: RuleSet, problems: Problems) -> None:
    """A poll query returns device_id, and may return subject and content."""
    for poll in rules.polls:
        _query_columns(poll.query, "query", poll.label, problems)


def message_size(rules: RuleSet, problems: Problems) -> None:
    """Static subject + content must leave room in a datagram for the values."""
    for rule in rules.rules:
        size = len((rule.subject.static_text + rule.content.static_text).encode())
        if size > MAX_MESSAGE_TEXT:
            problems.add(
                rule.where("content"),
                f"subject and content take {size} bytes before any placeholder is filled; "
                f"a message carries at most {MAX_MESSAGE_TEXT} (one UDP datagram)",
                rule.label,
            )


def key_conflicts(rules: RuleSet, problems: Problems) -> None:
    """Rules on one table that set ``key`` must agree on it."""
    keys: dict[TableName, tuple[str, ...]] = {}
    for rule in rules.rules:
        if not rule.key:
            continue
        first = keys.setdefault(rule.table, rule.key)
        if first != rule.key:
            problems.add(
                rule.where("key"),
                f"key {list(rule.key)} differs from {list(first)} given for {rule.table} "
                "by an earlier rule",
                rule.label,
            )


RESERVED = "/*pushsync:"
"""Text the generated SQL uses as a marker; rules may not contain it anywhere."""


def reserved_text(rules: RuleSet, problems: Problems) -> None:
    """Keep the marker that the migration replaces out of everything users write."""
    for rule in rules.rules:
        texts = [
            (rule.subject.location, rule.subject.static_text),
            (rule.content.location, rule.content.static_text),
        ]
        for fragment in (rule.when, rule.recipients):
            if fragment is not None:
                texts.append((fragment.location, fragments.render(fragment.tree)))
        for where, text in texts:
            if RESERVED in text:
                problems.add(where, f"the text {RESERVED!r} is reserved by pushsync", rule.label)


def publications(rules: RuleSet, problems: Problems) -> None:
    """Names, one entry per table, the download's shape, one key per table."""
    seen: dict[str, Publication] = {}
    keys: dict[TableName, tuple[tuple[str, ...], Location]] = {}
    for publication in rules.publications:
        context = publication.label
        if publication.name in seen:
            problems.add(
                publication.location,
                f"publication name {publication.name!r} is used twice",
                context,
            )
        seen[publication.name] = publication
        tables: set[TableName] = set()
        for published in publication.tables:
            if published.table in tables:
                problems.add(
                    published.where("table"),
                    f"table {published.table} is in this publication twice",
                    context,
                )
            tables.add(published.table)
            _download_shape(published, problems, context)
            if published.key:
                known = keys.get(published.table)
                if known is not None and known[0] != published.key:
                    problems.add(
                        published.where("key"),
                        f"key of {published.table} differs from the one at {known[1]}: "
                        "a table is captured by one key",
                        context,
                    )
                keys.setdefault(published.table, (published.key, published.where("key")))
            if published.conflict == "newest" and "update" not in published.upload:
                problems.add(
                    published.where("conflict"),
                    "conflict: newest decides between updates, but upload does not allow update",
                    context,
                )
            _upload_check_scopes(published, problems, context)


def _upload_check_scopes(published: PublishedTable, problems: Problems, context: str) -> None:
    """An ``upload_check`` needs uploads, and rows that some uploaded operation has."""
    if published.upload_check is None:
        return
    if not published.upload:
        problems.add(
            published.where("upload_check"),
            "upload_check: upload allows nothing, so there is nothing to check",
            context,
        )
        return
    available = frozenset().union(*(SCOPES[op] for op in published.upload))
    for scope, column, where in _fragment_refs(published.upload_check):
        if scope not in available:
            problems.add(
                where,
                f"{scope}.{column}: uploaded {' and '.join(published.upload)}s have no {scope} row",
                context,
            )


def _download_shape(published: PublishedTable, problems: Problems, context: str) -> None:
    query = published.download.tree
    assert isinstance(query, exp.Query)  # noqa: S101  type narrowing; parsed by parse_query
    table = published.table
    names = fragments.table_alias_of(query, table.schema, table.name)
    where = published.where("download")
    if not names:
        problems.add(where, f"download must read {table} (the published table)", context)
        return
    star = fragments.star_source(query)
    reads = fragments.download_tables(query)
    if star == "*" and len(reads) == 1:
        return
    if star is not None and star in names:
        return
    alias = names[0]
    shown = f"{alias}.*" if alias != table.name or len(reads) > 1 else "*"
    problems.add(
        where,
        f"download must select whole rows of {table}: SELECT {shown} FROM ...",  # noqa: S608  a message, not a query
        context,
    )


PASSES: tuple[Pass, ...] = (
    allowed_sql,
    unique_names,
    row_scopes,
    update_only_keys,
    recipient_columns,
    poll_columns,
    message_size,
    key_conflicts,
    reserved_text,
    publications,
)


def check(rules: RuleSet, problems: Problems) -> None:
    for run in PASSES:
        run(rules, problems)


# --- planning -----------------------------------------------------------------

_SIMPLE = re.compile(r"[a-z][a-z0-9]*(_[a-z0-9]+)*\Z")
MAX_IDENTIFIER = 63


def _object_name(prefix: str, *words: str) -> str:
    """A readable, unique function name; hashed when the words would be ambiguous or long."""
    name = "__".join((prefix, *words))
    if all(_SIMPLE.match(w) for w in words) and len(name) <= MAX_IDENTIFIER:
        return name
    digest = hashlib.sha256(".".join(words).encode()).hexdigest()[:16]
    return f"{prefix}__{digest}"


@dataclass(frozen=True, kw_only=True, slots=True)
class TriggerPlan:
    """One trigger and its function: every rule on ``table`` for ``event``."""

    table: TableName
    event: Event
    rules: tuple[Rule, ...]
    function: str
    trigger: str

    @property
    def key(self) -> tuple[str, ...]:
        """Columns that pair old and new rows, if the rules set them."""
        return next((r.key for r in self.rules if r.key), ())

    def pairs_rows(self, rule: Rule) -> bool:
        """Whether ``rule`` needs each new row matched with its old row."""
        if self.event != "update":
            return False
        if rule.columns:
            return True
        scopes = {scope for scope, _, _ in rule_refs(rule)}
        return scopes == {"new", "old"}

    def reads(self, rule: Rule) -> str:
        """Which transition table a rule that does not pair rows scans."""
        if self.event == "delete":
            return "old"
        if self.event == "update" and {s for s, _, _ in rule_refs(rule)} == {"old"}:
            return "old"
        return "new"

    def scopes(self, rule: Rule) -> tuple[str, ...]:
        """The row images ``rule`` reads: both when it pairs rows, else one."""
        return ("new", "old") if self.pairs_rows(rule) else (self.reads(rule),)

    def filtered(self, rule: Rule) -> bool:
        """Whether ``rule`` has a condition of its own (``when``, or ``columns`` on update)."""
        return rule.when is not None or (self.event == "update" and bool(rule.columns))

    def guard(self) -> tuple[tuple[Rule, ...], ...]:
        """Rules grouped by the rows they scan, for the early exit.

        Empty when some rule has no condition: then every statement that
        changed a row has work to do, and a guard would only cost.
        """
        if not all(self.filtered(rule) for rule in self.rules):
            return ()
        groups: dict[tuple[str, ...], list[Rule]] = {}
        for rule in self.rules:
            groups.setdefault(self.scopes(rule), []).append(rule)
        return tuple(tuple(group) for group in groups.values())

    @property
    def rows_table(self) -> str:
        """The transition table whose size says how big the statement was."""
        return "pushsync_old" if self.event == "delete" else "pushsync_new"

    @property
    def needs_key(self) -> bool:
        return any(self.pairs_rows(r) for r in self.rules)


def _columns_of(fragment: Fragment) -> list[str]:
    assert isinstance(fragment.tree, exp.Query)  # noqa: S101  type narrowing; parsed by parse_query
    return fragments.output_columns(fragment.tree) or []


@dataclass(frozen=True, kw_only=True, slots=True)
class PollPlan:
    poll: Poll
    function: str
    columns: tuple[str, ...]


@dataclass(frozen=True, kw_only=True, slots=True)
class PublishedPlan:
    """One table of one publication: its download function and what it depends on."""

    publication: str
    position: int
    published: PublishedTable
    function: str
    depends_on: tuple[TableName, ...]
    check_function: str | None = None
    """The function deciding ``upload_check``, if the table has one."""
    upload_mode: str = "rows"
    """The publication's ``upload:`` (``rows`` or ``atomic``)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CapturePlan:
    """Change capture on one table: by key (``key``; empty: its primary key), or, for a
    table that downloads only depend on, ``key`` None: only that it changed."""

    table: TableName
    key: tuple[str, ...] | None


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    rules: RuleSet
    triggers: tuple[TriggerPlan, ...]
    polls: tuple[PollPlan, ...]
    published: tuple[PublishedPlan, ...] = ()
    captures: tuple[CapturePlan, ...] = ()


def plan(rules: RuleSet) -> Plan:
    groups: dict[tuple[TableName, Event], list[Rule]] = {}
    for rule in rules.rules:
        for event in rule.events:
            groups.setdefault((rule.table, event), []).append(rule)
    triggers = tuple(
        TriggerPlan(
            table=table,
            event=event,
            rules=tuple(group),
            function=_object_name(f"on_{event}", table.schema, table.name),
            trigger=f"pushsync_{event}",
        )
        for (table, event), group in sorted(
            groups.items(), key=lambda kv: (kv[0][0].schema, kv[0][0].name, kv[0][1])
        )
    )
    polls = tuple(
        PollPlan(
            poll=poll,
            function=_object_name("poll", poll.name),
            columns=tuple(_columns_of(poll.query)),
        )
        for poll in rules.polls
    )
    published: list[PublishedPlan] = []
    keyed: dict[TableName, tuple[str, ...]] = {}
    dependencies: list[TableName] = []
    for publication in rules.publications:
        for position, table in enumerate(publication.tables, start=1):
            reads = [
                TableName(schema=schema, name=name)
                for schema, name in fragments.download_tables(table.download.tree)
            ]
            depends = tuple(t for t in reads if t != table.table)
            published.append(
                PublishedPlan(
                    publication=publication.name,
                    position=position,
                    published=table,
                    function=_object_name(
                        "pub", publication.name, table.table.schema, table.table.name
                    ),
                    depends_on=depends,
                    upload_mode=publication.upload,
                    check_function=None
                    if table.upload_check is None
                    else _object_name(
                        "pub",
                        publication.name,
                        table.table.schema,
                        table.table.name,
                        "upload_check",
                    ),
                )
            )
            if table.key or table.table not in keyed:
                keyed[table.table] = table.key
            dependencies += [t for t in depends if t not in dependencies]
    captures = [CapturePlan(table=t, key=k) for t, k in keyed.items()]
    captures += [CapturePlan(table=t, key=None) for t in dependencies if t not in keyed]
    return Plan(
        rules=rules,
        triggers=triggers,
        polls=polls,
        published=tuple(published),
        captures=tuple(sorted(captures, key=lambda c: (c.table.schema, c.table.name))),
    )
