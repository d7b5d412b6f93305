"""The fan-out benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fanout_benchmark_smoke_run(dsn: str) -> None:
    command = [sys.executable, "-m", "bench.sync_fanout", "--devices", "200", "--dsn", dsn]
    result = subprocess.run(
        [*command, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    figures = json.loads(lines[-1])
    assert figures["udp_received"] == 200
    assert figures["sync_received"] == 200
    assert figures["recorded_seconds"] >= figures["connect_seconds"] > 0
    assert figures["baseline_sample"] == 200
    assert any(line.startswith("fan-out over UDP") for line in lines)
    assert any(line.startswith("memory per SYNC connection") for line in lines)
    assert any(line.startswith("SYNC connections recorded") for line in lines)
    assert lines[0].startswith("machine: ")
    assert "fsync" in lines[0]
