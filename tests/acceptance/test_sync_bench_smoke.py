"""The synchronization benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import pytest

from tests.support.bench import figures, run_bench


@pytest.mark.slow
def test_sync_benchmark_smoke_run() -> None:
    result = run_bench("sync_incremental", "--rows", 500, "--rounds", 2, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    found = figures(result)
    assert found["rows"] == 500
    assert found["incremental_ms"] > 0
    assert found["push_to_synced_ms"] > 0
    assert any(line.startswith("push to synced") for line in lines)
