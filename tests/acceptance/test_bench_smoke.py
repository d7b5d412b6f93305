"""The trigger-overhead benchmark still runs, and its variants still do what they claim.

Only a smoke run: one short round. The numbers themselves are for people to
read (bench/trigger_overhead/README.md), not for assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bench import run_bench


@pytest.mark.slow
def test_benchmark_smoke_run(tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    completed = run_bench(
        "trigger_overhead", "--rounds", 1, "--seconds", 1, "--rows", 2000, "--json", results
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    # The sanity checks compare what each variant wrote with what it should.
    sanity = [line for line in lines if line.rstrip().endswith((" ok", " WRONG"))]
    assert sanity, sanity
    assert all(line.rstrip().endswith(" ok") for line in sanity), sanity
    data = json.loads(results.read_text())
    variants = {"none", "nomatch", "nobody", "floor", "match4", "rowlevel", "rules20"}
    assert set(data["bulk"]) == variants
    assert data["bulk"]["none"]["ratio_vs_none"] == 1.0
    # The generated trigger is judged against the hand-written one doing the same join.
    formulas = {t["formula"] for t in data["targets"]}
    assert "time nobody / time floor" in formulas
    # The machine facts that explain the figures are measured, printed and saved.
    facts = data["meta"]["machine"]
    assert facts["cpus"] >= 1
    assert facts["fsync_ms"] > 0
    assert facts["commit_ms"] > 0
    assert any(line.startswith("machine: ") for line in lines), lines[:10]
    assert any("fsync latency" in line for line in lines), lines[:10]
