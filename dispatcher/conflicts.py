"""What becomes of one uploaded change: pure decisions, no database.

:func:`admissible` refuses what no row on the server could make acceptable
(an operation the table does not take, an unknown column, a missing ``old``).
:func:`decide` applies the table's conflict policy to what the server found
under the change's key; when it needs a comparison only the database can make
(values typed as the table's columns), it answers with the :class:`Need` and is
asked again with the answer in :class:`Facts`, as ``pushsync.dispatcher.sync_apply``
does. The rules are in ``docs/sync.md`` ("What a device may upload", "Conflicts").
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from pushsync.dispatcher.sync_tables import ServerTable
from pushsync.wire.sync import Change


class Found(enum.Enum):
    """The server's row under the change's key."""

    NONE = "none"
    NOT_THEIRS = "not theirs"
    """A row the device's download does not return."""
    THEIRS = "theirs"


class Need(enum.Enum):
    """A fact :func:`decide` needs before it can answer."""

    SAME = "same"
    """Whether the device's ``old`` equals the server's row, in the columns it names."""
    NEWER = "newer"
    """Whether the uploaded row's ``newest`` column is greater than the server's."""


class Action(enum.Enum):
    """What to write."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    NOTHING = "nothing"
    """A delete of a row that is gone already: what the device wanted."""


@dataclass(frozen=True, slots=True)
class Facts:
    """What the server knows of the change's row, so far."""

    found: Found
    same: bool | None = None
    newer: bool | None = None

    def learnt(self, need: Need, answer: bool) -> Facts:
        if need is Need.SAME:
            return replace(self, same=answer)
        return replace(self, newer=answer)


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str


def admissible(table: ServerTable, change: Change, declared: frozenset[str]) -> str | None:
    """Why ``change`` cannot be applied to ``table`` whatever the server holds, or None.

    ``declared``: the server's columns the device's local table has; an update or
    delete must carry them all in ``old`` (the row as the device last had it),
    unless the table's policy is ``client_wins``.
    """
    op = change.op
    if op not in table.upload:
        return f"uploading {op}s to {table.name} is not allowed"
    for image in (change.key, change.old, change.new):
        unknown = sorted(set(image or ()) - table.column_names)
        if unknown:
            return (
                f"column {unknown[0]} of {table.name} does not exist on the server "
                "(its shape changed; the next download brings the new one)"
            )
    if set(table.key) - set(change.key):
        return f"the key of {table.name} is {', '.join(table.key)}"
    if op != "delete" and change.new is None:
        return f"{_a(op)} needs the new row"
    if op == "insert":
        assert change.new is not None  # noqa: S101  type narrowing; returned above when missing
        if any(k not in change.new or change.new[k] != change.key[k] for k in table.key):
            return f"the key of an insert must be the key of its new row in {table.name}"
        return None
    if table.conflict == "client_wins":
        return None
    if change.old is None:
        return (
            f"{_a(op)} of {table.name} must carry the row as the device last had it (old); "
            f"only a client_wins table takes one without"
        )
    missing = sorted((declared | set(table.key)) - set(change.old))
    if missing:
        return f"the old row of this {op} lacks column {missing[0]} of {table.name}"
    return None


def decide(table: ServerTable, change: Change, facts: Facts) -> Action | Refusal | Need:
    """The write an admissible ``change`` makes, under the table's conflict policy."""
    if facts.found is Found.NONE:
        if change.op == "insert":
            return Action.INSERT
        if change.op == "delete":
            return Action.NOTHING
        return Refusal(not_theirs(table))
    if facts.found is Found.NOT_THEIRS:
        return Refusal(not_theirs(table))
    if change.op == "insert" and table.conflict == "server_wins":
        return Refusal(f"a row with this key already exists in {table.name}")
    if change.old is not None:
        if facts.same is None:
            return Need.SAME
        if not facts.same:
            refused = _changed(table, change, facts)
            if refused is not None:
                return refused
    return Action.DELETE if change.op == "delete" else Action.UPDATE


def _changed(table: ServerTable, change: Change, facts: Facts) -> Refusal | Need | None:
    """The policy, when the server's row is not the one the device changed."""
    if table.conflict == "server_wins":
        return Refusal(f"the row changed in {table.name} since the device last had it; server wins")
    if table.conflict != "newest":
        return None
    if change.op != "update":
        return Refusal(f"the row changed in {table.name} since the device last had it")
    if facts.newer is None:
        return Need.NEWER
    if not facts.newer:
        return Refusal(f"the server's row of {table.name} is newer ({table.newest})")
    return None


def not_theirs(table: ServerTable) -> str:
    return f"the row is not (or no longer) one of this device's rows of {table.name}"


def _a(op: str) -> str:
    return f"an {op}" if op[0] in "aeiou" else f"a {op}"


__all__ = ["Action", "Facts", "Found", "Need", "Refusal", "admissible", "decide", "not_theirs"]
