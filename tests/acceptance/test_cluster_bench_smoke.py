"""The cluster benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cluster_benchmark_smoke_run(dsn: str) -> None:
    command = [sys.executable, "-m", "bench.cluster", "--devices", "60", "--dispatchers", "2"]
    result = subprocess.run(
        [*command, "--processes", "2", "--dsn", dsn, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    figures = json.loads(lines[-1])
    assert figures["fanout_received"] == 60
    assert figures["rehome_received"] == 60  # the killed dispatcher's devices too
    assert figures["rehomed_devices"] == 30
    assert figures["rehome_back"] == 30
    assert lines[0].startswith("machine: ")
    assert any(line.startswith("one dispatcher killed") for line in lines)


def test_cluster_benchmark_refuses_more_devices_than_a_process_may_hold() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.cluster", "--devices", "10000000", "--processes", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--devices 10000000" in result.stderr
    assert "Traceback" not in result.stderr
