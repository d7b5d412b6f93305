"""The two ways a synchronization says no: to the whole session, or to one uploaded row."""

from __future__ import annotations


class SyncRefused(Exception):
    """The device sent something the synchronization cannot go on with; the text says what."""


class Rejected(Exception):
    """One uploaded row is refused (its savepoint is rolled back); the text says why."""


__all__ = ["Rejected", "SyncRefused"]
