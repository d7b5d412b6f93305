"""Named SQL blocks from the runtime query files in ``sql/``.

Each file (``queries.sql`` for the commands, ``dispatcher.sql`` for the outbox
relay) holds one statement per block, each introduced by a line ``-- name --``;
:func:`get` returns a block by name.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@functools.cache
def _blocks(file: str) -> dict[str, str]:
    text = resources.files("pushsync.sql").joinpath(file).read_text("utf-8")
    parts = _HEADER.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def get(name: str, file: str = "queries.sql") -> str:
    """The block ``name`` of ``sql/<file>``."""
    return _blocks(file)[name]
