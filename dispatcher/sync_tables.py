"""A published table as the server has it now: the registry's entry and the catalog's shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from psycopg import sql

from pushsync.wire.sync import TableShape

Policy = Literal["server_wins", "client_wins", "newest"]
"""What decides when the server's row changed since the device had it (docs/sync.md)."""


@dataclass(frozen=True, slots=True)
class ServerTable:
    """A published table: its columns and key, what devices may upload, its functions."""

    name: str
    """Schema-qualified: ``public.routes``."""
    columns: tuple[tuple[str, str], ...]
    """Name and ``format_type()`` of each column, in the table's order."""
    key: tuple[str, ...]
    upload: tuple[str, ...]
    """The operations devices may upload."""
    conflict: Policy
    newest: str | None
    """The column a ``newest`` policy compares."""
    function: str
    """The publication's download function for the table, in schema ``pushsync``."""
    depends_on: tuple[str, ...]
    """The tables the download reads."""
    check_function: str | None = None
    """The table's ``upload_check`` function, in schema ``pushsync``."""

    @property
    def column_names(self) -> frozenset[str]:
        return frozenset(name for name, _ in self.columns)

    def shape(self) -> TableShape:
        return TableShape(columns=self.columns, key=self.key)

    def ident(self) -> sql.Composed:
        schema, _, name = self.name.partition(".")
        return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


__all__ = ["Policy", "ServerTable"]
