"""The console's query benchmark runs end to end at a small size (figures are not asserted)."""

from __future__ import annotations

from tests.support.bench import figures, run_bench


def test_monitor_queries_benchmark_smoke_run(dsn: str) -> None:
    options = ["--history", 2000, "--devices", 40, "--rounds", 1]
    result = run_bench("monitor_queries", *options, "--json", "--dsn", dsn)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    found = figures(result)
    assert found["history"] == 2000
    assert len(found["queries"]) == 15
    assert all(f["median_ms"] > 0 for f in found["queries"].values())
    assert found["machine"]["cpus"] >= 1
    assert found["rollups"]["agree"] is True  # the fill's history is in the roll-ups
    assert found["rollups"]["flow_rows"] > 0
    assert any(line.startswith("fleet: first page") for line in lines)
    assert any(line.startswith("baseline: count(*)") for line in lines)
