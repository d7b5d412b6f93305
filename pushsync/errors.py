"""The exceptions pushsync raises. Every one derives from :class:`PushsyncError`.

Errors a user can fix (a bad rules file, a bad option) carry where the problem
is, so the CLI prints one located line per problem and exits with status 2
instead of showing a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


class PushsyncError(Exception):
    """Something went wrong in pushsync."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(PushsyncError):
    """The command was given something it cannot use."""


class DatabaseError(PushsyncError):
    """The database refused or could not be reached."""


class DsnError(UsageError):
    """The connection string is not one libpq can use."""


class SchemaError(UsageError):
    """The pushsync schema is missing or older than this pushsync: run `pushsync migrate`."""


@dataclass(frozen=True, slots=True)
class Location:
    """A place in a source file; line and column count from 1."""

    path: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}"

    def shifted(self, lines: int = 0, column: int | None = None) -> Location:
        """The location ``lines`` further down, at ``column`` if given."""
        return Location(self.path, self.line + lines, self.column if column is None else column)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a rules file."""

    location: Location
    message: str
    context: str | None = None  # e.g. "rule route_disruption"

    def __str__(self) -> str:
        where = f"{self.location}: "
        if self.context is not None:
            where += f"{self.context}: "
        return where + self.message


class RulesError(PushsyncError):
    """The rules file is not valid."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


class Problems:
    """Collects problems so that one run reports all of them."""

    def __init__(self) -> None:
        self._items: list[Problem] = []

    def add(self, location: Location, message: str, context: str | None = None) -> None:
        self._items.append(Problem(location, message, context))

    def __bool__(self) -> bool:
        return bool(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self._items)

    def raise_if_any(self) -> None:
        if self._items:
            ordered = sorted(
                self._items, key=lambda p: (p.location.path, p.location.line, p.location.column)
            )
            raise RulesError(ordered)
