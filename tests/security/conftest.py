"""The security tier: attacks that must fail and leave nothing changed.

Each test plays one attacker of ``docs/security.md`` (a device owner with a
valid key, a rules author, a network attacker, the application role) through
real sockets, a real PostgreSQL and the real CLI, and asserts both that the
attack is refused and that rows, roles, settings and secrets are as before.
The fixtures ``db`` and ``dsn`` come from ``tests/conftest.py``.
"""

from collections.abc import Iterator

import psycopg
import pytest

from tests.integration import trucking
from tests.support.cli import pushsync
from tests.support.rules_attacks import Roles

__all__ = ["pushsync"]  # the real CLI as a subprocess: pushsync(*args, env={...})


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    """The trucking example with its rules applied, four devices with secrets, no messages.

    Modules that need more (other rules, shared secrets) define their own ``fleet``.
    """
    trucking.setup(db)
    return db


@pytest.fixture
def roles(db: psycopg.Connection) -> Iterator[Roles]:
    """Login roles of the test's own, dropped after it (roles are cluster-wide)."""
    yield from Roles.dropped_after(db)
