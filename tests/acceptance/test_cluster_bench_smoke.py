"""The cluster benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

import pytest

from tests.support.bench import figures, run_bench


@pytest.mark.slow
def test_cluster_benchmark_smoke_run(dsn: str) -> None:
    result = run_bench(
        "cluster", "--devices", 60, "--dispatchers", 2, "--processes", 2, "--dsn", dsn, "--json"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    found = figures(result)
    assert found["fanout_received"] == 60
    assert found["rehome_received"] == 60  # the killed dispatcher's devices too
    assert found["rehomed_devices"] == 30
    assert found["rehome_back"] == 30
    assert lines[0].startswith("machine: ")
    assert any(line.startswith("one dispatcher killed") for line in lines)


def test_cluster_benchmark_refuses_more_devices_than_a_process_may_hold() -> None:
    result = run_bench("cluster", "--devices", 10_000_000, "--processes", 1, timeout=60)
    assert result.returncode == 2
    assert "--devices 10000000" in result.stderr
    assert "Traceback" not in result.stderr
