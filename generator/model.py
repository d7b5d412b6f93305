"""The validated rules file: frozen dataclasses, no I/O.

:mod:`pushsync.generator.validate` builds these from YAML; the passes in
:mod:`pushsync.generator.passes` check and plan them; templates render them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import sqlglot.expressions as exp

from pushsync.errors import Location
from pushsync.source import Node

Event = Literal["insert", "update", "delete"]
Gateway = Literal["auto", "sync", "mqtt", "udp", "smtp"]
Priority = Literal["low", "normal", "high"]
Scope = Literal["new", "old", "recipient"]

EVENTS: tuple[Event, ...] = ("insert", "update", "delete")
GATEWAYS: tuple[Gateway, ...] = ("auto", "sync", "mqtt", "udp", "smtp")
PRIORITIES: tuple[Priority, ...] = ("low", "normal", "high")


@dataclass(frozen=True, kw_only=True, slots=True)
class TableName:
    schema: str
    name: str

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Literal_:
    """Literal text of a message template."""

    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Placeholder:
    """``{scope.column}`` in a message template."""

    scope: Scope
    column: str
    location: Location


TemplatePart = Literal_ | Placeholder


@dataclass(frozen=True, kw_only=True, slots=True)
class Template:
    parts: tuple[TemplatePart, ...]
    location: Location

    @property
    def static_text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, Literal_))

    @property
    def placeholders(self) -> tuple[Placeholder, ...]:
        return tuple(p for p in self.parts if isinstance(p, Placeholder))


@dataclass(frozen=True, kw_only=True, slots=True)
class Fragment:
    """A parsed piece of SQL from the rules file, with where it was written."""

    tree: exp.Expr
    node: Node  # where the text came from, to locate positions inside it
    offset: int = 0  # characters the parser saw before the text on its first line

    @property
    def location(self) -> Location:
        return self.node.location

    def locate(self, line: int, column: int) -> Location:
        """The file location of ``line``:``column`` of the parsed text."""
        if line == 1:
            column -= self.offset
        return self.node.inner(line, max(column, 1))


@dataclass(frozen=True, kw_only=True, slots=True)
class Delivery:
    """How notifications of one rule or poll travel; ``defaults:`` fill the gaps."""

    gateway: Gateway = "auto"
    ttl: timedelta = timedelta(hours=1)
    resend_every: timedelta = timedelta(minutes=5)
    priority: Priority = "normal"
    coalesce: bool = True


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    name: str
    location: Location
    table: TableName
    table_location: Location
    events: tuple[Event, ...]
    columns: tuple[str, ...] = ()
    key: tuple[str, ...] = ()  # empty: the table's primary key, looked up when applied
    when: Fragment | None = None
    recipients: Fragment | None = None  # None means ``recipients: all``
    recipient_columns: tuple[str, ...] = ("device_id",)
    subject: Template
    content: Template
    delivery: Delivery = field(default_factory=Delivery)
    field_locations: dict[str, Location] = field(default_factory=dict, compare=False)

    def where(self, key: str) -> Location:
        return self.field_locations.get(key, self.location)

    @property
    def label(self) -> str:
        return f"rule {self.name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Poll:
    name: str
    location: Location
    every: timedelta
    query: Fragment
    delivery: Delivery = field(default_factory=Delivery)
    field_locations: dict[str, Location] = field(default_factory=dict, compare=False)

    def where(self, key: str) -> Location:
        return self.field_locations.get(key, self.location)

    @property
    def label(self) -> str:
        return f"poll {self.name}"


Conflict = Literal["server_wins", "client_wins", "newest"]
CONFLICTS: tuple[Conflict, ...] = ("server_wins", "client_wins", "newest")


@dataclass(frozen=True, kw_only=True, slots=True)
class PublishedTable:
    """One table of a publication: which rows a device holds, and what it may upload."""

    table: TableName
    location: Location
    download: Fragment  # a SELECT of the table's rows; ``:device_id`` is the device
    upload: tuple[Event, ...] = ()
    upload_check: Fragment | None = None
    """A condition over ``new`` and ``old`` every uploaded change must also meet."""
    conflict: Conflict = "server_wins"
    newest_column: str | None = None
    key: tuple[str, ...] = ()  # empty: the table's primary key, looked up when applied
    field_locations: dict[str, Location] = field(default_factory=dict, compare=False)

    def where(self, key: str) -> Location:
        return self.field_locations.get(key, self.location)


UploadMode = Literal["rows", "atomic"]
UPLOAD_MODES: tuple[UploadMode, ...] = ("rows", "atomic")


@dataclass(frozen=True, kw_only=True, slots=True)
class Publication:
    name: str
    location: Location
    tables: tuple[PublishedTable, ...]
    upload: UploadMode = "rows"
    """``rows``: each uploaded row applied or refused alone; ``atomic``: every batch of one
    upload applied in one transaction, or nothing of it."""

    @property
    def label(self) -> str:
        return f"publication {self.name}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Trusted:
    """An entry of ``trusted_functions:`` (``schema.name``) or ``trusted_owners:`` (a role)."""

    name: str
    location: Location


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleSet:
    """A whole rules file."""

    path: str
    sha256: str
    version: int
    rules: tuple[Rule, ...]
    polls: tuple[Poll, ...]
    publications: tuple[Publication, ...] = ()
    trusted_functions: tuple[Trusted, ...] = ()
    trusted_owners: tuple[Trusted, ...] = ()
