"""Turn the located YAML tree into the frozen model, collecting every problem.

Each check says where it failed (``file:line:col``) and for which rule; the
whole file is read before anything is reported, so one run shows all mistakes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar, cast

from pushsync import source
from pushsync.errors import Location, Problems
from pushsync.generator import allowed, fragments, template
from pushsync.generator.model import (
    CONFLICTS,
    EVENTS,
    GATEWAYS,
    PRIORITIES,
    UPLOAD_MODES,
    Conflict,
    Delivery,
    Event,
    Fragment,
    Gateway,
    Literal_,
    Poll,
    Priority,
    Publication,
    PublishedTable,
    Rule,
    RuleSet,
    TableName,
    Template,
    Trusted,
    UploadMode,
)

NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*\Z")
MAX_NAME = 63

TOP_KEYS = (
    "version",
    "defaults",
    "trusted_functions",
    "trusted_owners",
    "rules",
    "polls",
    "publications",
)
DELIVERY_KEYS = ("gateway", "ttl", "resend_every", "priority", "coalesce")
RULE_KEYS = (
    "name",
    "table",
    "on",
    "columns",
    "key",
    "when",
    "recipients",
    "subject",
    "content",
    *DELIVERY_KEYS,
)
POLL_KEYS = ("name", "every", "query", *DELIVERY_KEYS)
PUBLICATION_KEYS = ("name", "upload", "tables")
PUBLISHED_TABLE_KEYS = ("table", "download", "upload", "upload_check", "conflict", "key")

T = TypeVar("T")


class _Reader:
    """Validation state for one file: where problems go, and for which rule."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.context: str | None = None

    def fail(self, where: Location, message: str) -> None:
        self.problems.add(where, message, self.context)

    def mapping(self, node: source.Node, allowed: tuple[str, ...], what: str) -> bool:
        if not isinstance(node.value, dict):
            self.fail(node.location, f"{what} must be a mapping")
            return False
        for key, where in node.key_locations.items():
            if key not in allowed:
                self.fail(where, f"unknown key {key!r}{source.closest(key, allowed)}")
        return True

    def require(self, node: source.Node, key: str) -> source.Node | None:
        found: source.Node | None = node.value.get(key)
        if found is None or found.value is None:
            self.fail(node.location, f"missing required key {key!r}")
            return None
        return found

    def string(self, node: source.Node, key: str) -> str | None:
        if not isinstance(node.value, str):
            self.fail(node.location, f"{key} must be text")
            return None
        return node.value

    def choice(self, node: source.Node, key: str, choices: tuple[T, ...]) -> T | None:
        value = node.value
        if value not in choices:
            options = ", ".join(str(c) for c in choices)
            hint = source.closest(str(value), [str(c) for c in choices])
            self.fail(node.location, f"{key} must be one of {options}, not {value!r}{hint}")
            return None
        return cast(T, value)

    def duration(self, node: source.Node, key: str) -> timedelta | None:
        value = source.parse_duration(node.value)
        if value is None or value <= timedelta(0):
            self.fail(
                node.location,
                f"bad duration {node.value!r} for {key}: expected a number and a unit, "
                "e.g. 30s, 5m, 1h, 2d",
            )
            return None
        return value

    def name(self, node: source.Node) -> str | None:
        name = self.string(node, "name")
        if name is None:
            return None
        if not NAME.match(name) or len(name) > MAX_NAME:
            self.fail(
                node.location,
                f"bad name {name!r}: use lower-case letters, digits and _, starting with a "
                f"letter, at most {MAX_NAME} characters",
            )
            return None
        return name

    def identifiers(self, node: source.Node, key: str) -> tuple[str, ...] | None:
        items = node.value if isinstance(node.value, list) else [node]
        names: list[str] = []
        for item in items:
            if not isinstance(item.value, str) or not IDENTIFIER.match(item.value):
                self.fail(item.location, f"{key}: {item.value!r} is not a column name")
                return None
            names.append(item.value)
        if not names:
            self.fail(node.location, f"{key} must name at least one column")
            return None
        return tuple(names)

    def fragment(self, node: source.Node, key: str, parse: Callable[[str], Any]) -> Fragment | None:
        text = self.string(node, key)
        if text is None:
            return None
        try:
            tree = parse(text)
        except RecursionError:
            self.fail(node.location, f"{key}: SQL nested too deeply")
            return None
        except fragments.FragmentError as exc:
            self.fail(node.inner(exc.line, exc.column), f"{key}: {exc.message}")
            return None
        conditions = (fragments.parse_condition, fragments.parse_upload_check)
        offset = len(fragments.CONDITION_PREFIX) if parse in conditions else 0
        return Fragment(tree=tree, node=node, offset=offset)

    def template(self, node: source.Node, key: str) -> Template | None:
        if isinstance(node.value, int | float | bool) and node.raw is not None:
            text = node.raw  # `subject: yes` means the word, not a boolean
        else:
            found = self.string(node, key)
            if found is None:
                return None
            text = found
        try:
            return template.parse(text, lambda column: node.inner(1, column))
        except template.TemplateError as exc:
            self.fail(node.inner(1, exc.column), f"{key}: {exc.message}")
            return None


def _delivery(reader: _Reader, node: source.Node, base: Delivery) -> Delivery:
    """``base`` with the delivery keys that ``node`` sets."""
    values: dict[str, Any] = {}
    fields: dict[str, source.Node] = node.value
    if (gateway := fields.get("gateway")) is not None:
        values["gateway"] = reader.choice(gateway, "gateway", GATEWAYS)
    if (priority := fields.get("priority")) is not None:
        values["priority"] = reader.choice(priority, "priority", PRIORITIES)
    for key in ("ttl", "resend_every"):
        if (found := fields.get(key)) is not None:
            values[key] = reader.duration(found, key)
    if (coalesce := fields.get("coalesce")) is not None:
        if isinstance(coalesce.value, bool):
            values["coalesce"] = coalesce.value
        else:
            reader.fail(coalesce.location, "coalesce must be true or false")
    return Delivery(
        gateway=cast(Gateway, values.get("gateway") or base.gateway),
        priority=cast(Priority, values.get("priority") or base.priority),
        ttl=values.get("ttl") or base.ttl,
        resend_every=values.get("resend_every") or base.resend_every,
        coalesce=values.get("coalesce", base.coalesce),
    )


def _table(reader: _Reader, node: source.Node) -> TableName | None:
    text = reader.string(node, "table")
    if text is None:
        return None
    schema, dot, name = text.partition(".")
    if not dot:
        reader.fail(node.location, f"table {text!r} must name its schema, e.g. public.{text}")
        return None
    if not IDENTIFIER.match(schema) or not IDENTIFIER.match(name):
        reader.fail(node.location, f"table {text!r} is not a lower-case schema.table name")
        return None
    return TableName(schema=schema, name=name)


def _events(reader: _Reader, node: source.Node, key: str = "on") -> tuple[Event, ...] | None:
    items = node.value if isinstance(node.value, list) else [node]
    events: list[Event] = []
    for item in items:
        event = reader.choice(item, key, EVENTS)
        if event is None:
            return None
        if event in events:
            reader.fail(item.location, f"event {event} is listed twice")
            return None
        events.append(event)
    if not events and key == "on":
        reader.fail(node.location, "on must list at least one of insert, update, delete")
        return None
    return tuple(events)


def _rule(reader: _Reader, node: source.Node, defaults: Delivery) -> Rule | None:
    if not isinstance(node.value, dict):
        reader.fail(node.location, "a rule must be a mapping")
        return None
    fields: dict[str, source.Node] = node.value
    before = len(reader.problems)
    name_node = reader.require(node, "name")
    name = reader.name(name_node) if name_node else None
    reader.context = f"rule {name}" if name else reader.context
    reader.mapping(node, RULE_KEYS, "a rule")
    table_node = reader.require(node, "table")
    table = _table(reader, table_node) if table_node else None
    on_node = reader.require(node, "on")
    events = _events(reader, on_node) if on_node else None
    recipients_node = reader.require(node, "recipients")
    recipients: Fragment | None = None
    if recipients_node is not None and recipients_node.value != "all":
        recipients = reader.fragment(recipients_node, "recipients", fragments.parse_query)
    columns: tuple[str, ...] | None = ()
    if (columns_node := fields.get("columns")) is not None:
        columns = reader.identifiers(columns_node, "columns")
    key: tuple[str, ...] | None = ()
    if (key_node := fields.get("key")) is not None:
        key = reader.identifiers(key_node, "key")
    when = None
    if (when_node := fields.get("when")) is not None:
        when = reader.fragment(when_node, "when", fragments.parse_condition)
    subject_node = fields.get("subject")
    subject = reader.template(subject_node, "subject") if subject_node else None
    content_node = fields.get("content")
    content = reader.template(content_node, "content") if content_node else None
    delivery = _delivery(reader, node, defaults)
    if len(reader.problems) > before:
        return None  # reported; the file will not compile
    assert name is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert table is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert table_node is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert events is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert columns is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert key is not None  # noqa: S101  type narrowing; a missing field was reported above
    return Rule(
        name=name,
        location=node.location,
        table=table,
        table_location=table_node.location,
        events=events,
        columns=columns,
        key=key,
        when=when,
        recipients=recipients,
        # Without a subject, the rule's name is one: handlers can filter on it.
        subject=subject or Template(parts=(Literal_(text=name),), location=node.location),
        content=content or Template(parts=(), location=node.location),
        delivery=delivery,
        field_locations=node.key_locations,
    )


def _poll(reader: _Reader, node: source.Node, defaults: Delivery) -> Poll | None:
    if not isinstance(node.value, dict):
        reader.fail(node.location, "a poll must be a mapping")
        return None
    before = len(reader.problems)
    name_node = reader.require(node, "name")
    name = reader.name(name_node) if name_node else None
    reader.context = f"poll {name}" if name else reader.context
    reader.mapping(node, POLL_KEYS, "a poll")
    every_node = reader.require(node, "every")
    every = reader.duration(every_node, "every") if every_node else None
    query_node = reader.require(node, "query")
    query = reader.fragment(query_node, "query", fragments.parse_query) if query_node else None
    delivery = _delivery(reader, node, defaults)
    if len(reader.problems) > before:
        return None  # reported; the file will not compile
    assert name is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert every is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert query is not None  # noqa: S101  type narrowing; a missing field was reported above
    return Poll(
        name=name,
        location=node.location,
        every=every,
        query=query,
        delivery=delivery,
        field_locations=node.key_locations,
    )


def _publication(reader: _Reader, node: source.Node) -> Publication | None:
    if not isinstance(node.value, dict):
        reader.fail(node.location, "a publication must be a mapping")
        return None
    before = len(reader.problems)
    name_node = reader.require(node, "name")
    name = reader.name(name_node) if name_node else None
    reader.context = f"publication {name}" if name else reader.context
    reader.mapping(node, PUBLICATION_KEYS, "a publication")
    upload: UploadMode | None = "rows"
    if (upload_node := node.value.get("upload")) is not None:
        if isinstance(upload_node.value, list | dict):
            reader.fail(
                upload_node.location,
                "upload of a publication must be rows or atomic; "
                "the operations a device may upload are each table's upload: [insert, …]",
            )
            upload = None
        else:
            upload = reader.choice(upload_node, "upload", UPLOAD_MODES)
    tables: list[PublishedTable] = []
    tables_node = reader.require(node, "tables")
    if tables_node is not None:
        if not isinstance(tables_node.value, list) or not tables_node.value:
            reader.fail(tables_node.location, "tables must be a list of at least one table")
        else:
            for item in tables_node.value:
                if (published := _published_table(reader, item)) is not None:
                    tables.append(published)
    if len(reader.problems) > before:
        return None
    assert name is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert upload is not None  # noqa: S101  type narrowing; a bad value was reported above
    return Publication(name=name, location=node.location, tables=tuple(tables), upload=upload)


def _published_table(reader: _Reader, node: source.Node) -> PublishedTable | None:
    if not reader.mapping(node, PUBLISHED_TABLE_KEYS, "a publication table"):
        return None
    before = len(reader.problems)
    fields: dict[str, source.Node] = node.value
    table_node = reader.require(node, "table")
    table = _table(reader, table_node) if table_node else None
    download_node = reader.require(node, "download")
    download = (
        reader.fragment(download_node, "download", fragments.parse_download)
        if download_node
        else None
    )
    upload: tuple[Event, ...] = ()
    if (upload_node := fields.get("upload")) is not None and upload_node.value is not None:
        upload = _events(reader, upload_node, "upload") or ()
    upload_check: Fragment | None = None
    if (check_node := fields.get("upload_check")) is not None:
        upload_check = reader.fragment(check_node, "upload_check", fragments.parse_upload_check)
    conflict: Conflict | None = "server_wins"
    newest: str | None = None
    if (conflict_node := fields.get("conflict")) is not None:
        conflict, newest = _conflict(reader, conflict_node)
    key: tuple[str, ...] | None = ()
    if (key_node := fields.get("key")) is not None:
        key = reader.identifiers(key_node, "key")
    if len(reader.problems) > before:
        return None
    assert table is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert download is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert conflict is not None  # noqa: S101  type narrowing; a missing field was reported above
    assert key is not None  # noqa: S101  type narrowing; a missing field was reported above
    return PublishedTable(
        table=table,
        location=node.location,
        download=download,
        upload=upload,
        upload_check=upload_check,
        conflict=conflict,
        newest_column=newest,
        key=key,
        field_locations=node.key_locations,
    )


def _conflict(reader: _Reader, node: source.Node) -> tuple[Conflict | None, str | None]:
    """``server_wins``, ``client_wins``, or ``{newest: column}``."""
    if isinstance(node.value, dict):
        if set(node.value) != {"newest"}:
            reader.fail(node.location, "conflict as a mapping must be {newest: column}")
            return None, None
        column = reader.identifiers(node.value["newest"], "conflict.newest")
        if column is None:
            return None, None
        if len(column) != 1:
            reader.fail(node.value["newest"].location, "conflict.newest names one column")
            return None, None
        return "newest", column[0]
    if node.value == "newest":
        reader.fail(node.location, "conflict: newest needs a column: {newest: updated_at}")
        return None, None
    choices = tuple(c for c in CONFLICTS if c != "newest")
    found = reader.choice(node, "conflict", choices)
    return found, None


def _items(reader: _Reader, root: dict[str, source.Node], key: str) -> list[source.Node]:
    node = root.get(key)
    if node is None or node.value is None:
        return []
    if not isinstance(node.value, list):
        reader.fail(node.location, f"{key} must be a list")
        return []
    return list(node.value)


def build(text: str, path: str, problems: Problems) -> RuleSet | None:
    """Validate the rules file ``text``; problems go to ``problems``."""
    root = source.load(text, path)
    reader = _Reader(problems)
    if not reader.mapping(root, TOP_KEYS, "the rules file"):
        return None
    fields: dict[str, source.Node] = root.value
    version_node = reader.require(root, "version")
    if version_node is not None and version_node.value != 1:
        reader.fail(version_node.location, f"unsupported version {version_node.value!r}: use 1")
    defaults = Delivery()
    if (defaults_node := fields.get("defaults")) is not None and reader.mapping(
        defaults_node, DELIVERY_KEYS, "defaults"
    ):
        defaults = _delivery(reader, defaults_node, defaults)
    rules: list[Rule] = []
    polls: list[Poll] = []
    for index, item in enumerate(_items(reader, fields, "rules"), start=1):
        reader.context = f"rule #{index}"
        if (rule := _rule(reader, item, defaults)) is not None:
            rules.append(rule)
    for index, item in enumerate(_items(reader, fields, "polls"), start=1):
        reader.context = f"poll #{index}"
        if (poll := _poll(reader, item, defaults)) is not None:
            polls.append(poll)
    publications: list[Publication] = []
    for index, item in enumerate(_items(reader, fields, "publications"), start=1):
        reader.context = f"publication #{index}"
        if (publication := _publication(reader, item)) is not None:
            publications.append(publication)
    reader.context = None
    return RuleSet(
        path=path,
        sha256=hashlib.sha256(text.encode()).hexdigest(),
        version=1,
        rules=tuple(rules),
        polls=tuple(polls),
        publications=tuple(publications),
        trusted_functions=_trusted(reader, fields, "trusted_functions", _function_name),
        trusted_owners=_trusted(reader, fields, "trusted_owners", _role_name),
    )


def _trusted(
    reader: _Reader,
    root: dict[str, source.Node],
    key: str,
    check: Callable[[str], str | None],
) -> tuple[Trusted, ...]:
    """The names listed under ``key``, each checked by ``check`` (a reason, or None)."""
    found: dict[str, Trusted] = {}
    for item in _items(reader, root, key):
        name = item.value
        if not isinstance(name, str):
            reader.fail(item.location, f"{key}: {name!r} is not a name")
            continue
        if (reason := check(name)) is not None:
            reader.fail(item.location, f"{key}: {name}: {reason}")
        elif name in found:
            reader.fail(item.location, f"{key}: {name} is listed twice")
        else:
            found[name] = Trusted(name=name, location=item.location)
    return tuple(found.values())


def _function_name(name: str) -> str | None:
    schema, dot, function = name.partition(".")
    if not dot or not IDENTIFIER.match(schema) or not IDENTIFIER.match(function):
        return "name the function as schema.function, in lower case"
    if allowed.closed(schema):
        return (
            f"functions in {schema} cannot be trusted; of the built-ins, only those of "
            "the allow-list may be called"
        )
    return None


def _role_name(name: str) -> str | None:
    if not name or len(name.encode()) > MAX_NAME:
        return f"a role name has 1 to {MAX_NAME} bytes"
    if name.lower() == "public":
        return "PUBLIC is every role: trust a role that owns what rules use"
    return None
