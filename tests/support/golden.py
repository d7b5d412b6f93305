"""The golden-file cases: rules files in ``tests/fixtures/golden`` next to their expected SQL."""

from __future__ import annotations

from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"
CASES = sorted(GOLDEN.glob("*.yaml"))
"""Every case's rules file; the expected SQL is the same name with ``.sql``."""
