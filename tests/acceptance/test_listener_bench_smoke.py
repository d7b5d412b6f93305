"""The listener-throughput benchmark still runs and still reports what explains its figures.

A smoke run of one variant with a few hundred messages: the figures are for people
to read (bench/listener_throughput/README.md); what is asserted is that every
message was acked, and that the dedupe commits and the machine facts were measured.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_bench

MESSAGES = 400


@pytest.mark.slow
def test_listener_benchmark_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    options = ["--variants", "sync", "--rounds", 1, "--messages", MESSAGES]
    completed = run_bench(
        "listener_throughput", *options, "--state-dir", tmp_path / "state", "--json", results,
        timeout=120,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert lines[0].startswith("machine: "), lines[:3]
    assert "fsync" in lines[0]
    data = json.loads(results.read_text())
    facts = data["machine"]
    assert facts["cpus"] >= 1
    assert facts["fsync_ms"] > 0
    rows = {row["target"]: row for row in data["summary"]}
    assert set(rows) == {"baseline", "listener/sync"}
    listener = rows["listener/sync"]
    assert listener["lost"] == 0
    assert listener["bad_acks"] == 0
    # Read from the listener's own line at stop: at least one commit, never more than
    # one per message.
    assert 0 < listener["commits_per_message"] <= 1
    assert listener["cpu_us"] > 0
    assert rows["baseline"]["commits_per_message"] is None
    assert set(data["verdicts"]) == {"throughput", "ratio", "commits", "idle_rss"}
    assert any(line.startswith("dedupe commits (fsyncs) per message") for line in lines)
