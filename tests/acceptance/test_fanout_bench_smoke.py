"""The fan-out benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import pytest

from tests.support.bench import figures, run_bench


@pytest.mark.slow
def test_fanout_benchmark_smoke_run(dsn: str) -> None:
    result = run_bench("sync_fanout", "--devices", 200, "--dsn", dsn, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    found = figures(result)
    assert found["udp_received"] == 200
    assert found["sync_received"] == 200
    assert found["recorded_seconds"] >= found["connect_seconds"] > 0
    assert found["baseline_sample"] == 200
    assert any(line.startswith("fan-out over UDP") for line in lines)
    assert any(line.startswith("memory per SYNC connection") for line in lines)
    assert any(line.startswith("SYNC connections recorded") for line in lines)
    assert lines[0].startswith("machine: ")
    assert "fsync" in lines[0]
