"""How many examples the property tests of the wire protocol try.

At scale 1 the sizes fit CI; ``PUSHSYNC_FUZZ_SCALE=10`` runs ten times as many
(for a deeper search before a release, or after a change to the protocol).
"""

from __future__ import annotations

import os

SCALE = float(os.environ.get("PUSHSYNC_FUZZ_SCALE", "1"))


def examples(at_scale_one: int) -> int:
    """``at_scale_one`` times the scale, at least 10."""
    return max(10, round(at_scale_one * SCALE))
