"""The console's query benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_monitor_queries_benchmark_smoke_run(dsn: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.monitor_queries", "--history", "2000", "--devices", "40",
         "--rounds", "1", "--json", "--dsn", dsn],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    figures = json.loads(lines[-1])
    assert figures["history"] == 2000
    assert len(figures["queries"]) == 15
    assert all(f["median_ms"] > 0 for f in figures["queries"].values())
    assert figures["machine"]["cpus"] >= 1
    assert figures["rollups"]["agree"] is True  # the fill's history is in the roll-ups
    assert figures["rollups"]["flow_rows"] > 0
    assert any(line.startswith("fleet: first page") for line in lines)
    assert any(line.startswith("baseline: count(*)") for line in lines)
