"""The security tier: attacks that must fail and leave nothing changed.

Each test plays one attacker of ``docs/security.md`` (a device owner with a
valid key, a rules author, a network attacker, the application role) through
real sockets, a real PostgreSQL and the real CLI, and asserts both that the
attack is refused and that rows, roles, settings and secrets are as before.
The fixtures ``db`` and ``dsn`` come from ``tests/conftest.py``.
"""

from tests.support.cli import pushsync

__all__ = ["pushsync"]  # the real CLI as a subprocess: pushsync(*args, env={...})
