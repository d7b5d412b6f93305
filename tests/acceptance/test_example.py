"""The README's example runs and tells the truth."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_trucking_example_runs_against_a_database(dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.trucking", "--dsn", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "  -> truck-1: [sync]disruption 100 on north" in lines
    assert "  -> truck-2: [sync]disruption 100 on south" in lines
    assert lines[-1] == "ok: the right trucks, and only they, are waiting to be notified"
