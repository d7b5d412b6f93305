"""Run the real ``pushsync`` console script as a subprocess."""

from tests.support.cli import pushsync

__all__ = ["pushsync"]  # the real CLI as a subprocess: pushsync(*args, env={...})
