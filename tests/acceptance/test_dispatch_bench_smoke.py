"""The dispatch benchmarks still run, and every path delivers what it was given.

Only smoke runs: a few thousand rows, a few seconds of commits. The figures
are for people to read (bench/dispatch_throughput/README.md,
bench/dispatch_latency/README.md), not for assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_bench


@pytest.mark.slow
def test_dispatch_throughput_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    completed = run_bench(
        "dispatch_throughput", "--quick", "--batches", 100, "--pgqueuer", "100x1", "--json", results
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    for target in ("floor b=500", "dispatcher b=100", "pgqueuer b=100 c=1"):
        assert any(line.startswith(target) for line in lines), (target, completed.stdout)
    assert any(line.startswith("machine:") and "fsync" in line for line in lines), completed.stdout
    for label in ("dispatcher/floor ", "dispatcher/pgqueuer ", "dispatcher CPU µs/notif "):
        assert any(line.startswith(label) for line in lines), (label, completed.stdout)
    data = json.loads(results.read_text())
    assert data["settings"]["machine"]["fsync_ms"] > 0
    runs = {run["target"]: run for run in data["runs"]}
    assert set(runs) == {"floor b=500", "dispatcher b=100", "pgqueuer b=100 c=1"}
    rows = data["settings"]["rows"]
    assert runs["floor b=500"]["notes"]["claimed"] == rows
    dispatcher = runs["dispatcher b=100"]["notes"]
    assert dispatcher["distinct"] == rows, dispatcher  # every row reached the receiver
    assert dispatcher["tracebacks"] == 0, dispatcher
    assert dispatcher["exit_status"] == 0, dispatcher
    assert runs["pgqueuer b=100 c=1"]["notes"]["handled"] == rows
    verdicts = {"dispatcher_vs_floor", "dispatcher_vs_pgqueuer", "cpu_us_per_notification"}
    assert verdicts <= set(data["verdicts"])


@pytest.mark.slow
def test_dispatch_latency_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    completed = run_bench("dispatch_latency", "--seconds", 1, "--warmup", 0.2, "--json", results)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert any(line.startswith("machine:") and "fsync" in line for line in lines), completed.stdout
    assert "latency from commit returned (to the inserting client) to arrival:" in lines
    assert "latency from INSERT sent (autocommit: INSERT + commit) to arrival:" in lines
    for path in ("floor", "relay", "dispatcher", "pgqueuer"):
        assert sum(line.startswith(f"{path} ") for line in lines) == 2, (path, completed.stdout)
    for label in ("p50 dispatcher / floor (sent)", "p50 dispatcher / pgqueuer"):
        assert any(line.startswith(label) for line in lines), (label, completed.stdout)
    assert any(line.startswith("p99 dispatcher, ms") for line in lines), completed.stdout
    data = json.loads(results.read_text())
    assert set(data["results"]) == {"floor", "relay", "dispatcher", "pgqueuer"}
    for name, result in data["results"].items():
        assert result["received"] == result["measured"] > 0, (name, result)
    for name in ("relay", "dispatcher"):
        notes = data["results"][name]["notes"]
        assert notes["bad_datagrams"] == 0, (name, notes)
        assert notes["tracebacks"] == 0, (name, notes)
        assert notes["not_all_recorded"] == 0, (name, notes)
