"""Named SQL blocks from ``sql/queries.sql``.

The file holds one statement per block, each introduced by a line
``-- name --``; :func:`get` returns a block by name.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

_HEADER = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


@functools.cache
def _blocks() -> dict[str, str]:
    text = resources.files("pushsync").joinpath("sql/queries.sql").read_text("utf-8")
    parts = _HEADER.split(text)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def get(name: str) -> str:
    return _blocks()[name]
