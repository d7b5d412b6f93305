"""Device key files for tests, as ``pushsync device add --secret-file`` writes them."""

from __future__ import annotations

from pathlib import Path

from pushsync.wire.protocol import format_secret


def write_key(path: Path, secret: bytes) -> Path:
    """Write ``secret`` to ``path`` readable by its owner only (the listener refuses more)."""
    path.write_text(format_secret(secret), encoding="ascii")
    path.chmod(0o600)
    return path
