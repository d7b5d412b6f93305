"""The synchronization benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_sync_benchmark_smoke_run() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.sync_incremental",
            "--rows",
            "500",
            "--rounds",
            "2",
            "--json",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    figures = json.loads(lines[-1])
    assert figures["rows"] == 500
    assert figures["incremental_ms"] > 0
    assert figures["push_to_synced_ms"] > 0
    assert any(line.startswith("push to synced") for line in lines)
