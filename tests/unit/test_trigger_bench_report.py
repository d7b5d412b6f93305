"""The trigger benchmark's verdicts: the generated `nobody` trigger is judged against its floor."""

from __future__ import annotations

from bench.trigger_overhead import report
from bench.trigger_overhead.database import VARIANTS, PgbenchResult


def _results(bulk: dict[str, float], cpu: dict[str, float] | None = None) -> report.Results:
    res = report.Results()
    for v in VARIANTS:
        res.pgbench[v.name] = [PgbenchResult(tps=1000.0, transactions=1000, failed=0, latency_ms=1)]
        res.bulk[v.name] = [bulk.get(v.name, 1.0)]
        if cpu is not None:
            res.bulk_cpu[v.name] = [cpu.get(v.name, 0.5)]
    return res


def _target(res: report.Results, formula: str) -> report.Target:
    return next(t for t in report.targets(res) if t.formula == formula)


def test_nobody_is_judged_against_the_hand_written_floor_not_only_against_no_trigger() -> None:
    res = _results({"none": 1.0, "floor": 1.2, "nobody": 1.25})
    floor = _target(res, "time nobody / time floor")
    assert round(floor.value, 4) == round(1.25 / 1.2, 4)
    assert floor.passed  # 1.042 <= 1.05
    assert not _target(res, "time nobody / time none").passed  # 1.25 > 1.10

    slower = _results({"none": 1.0, "floor": 1.2, "nobody": 1.27})
    assert not _target(slower, "time nobody / time floor").passed  # 1.058


def test_the_cpu_verdict_appears_only_when_the_server_cpu_was_read() -> None:
    without = _results({"none": 1.0, "floor": 1.2, "nobody": 1.2})
    assert not without.has_cpu()
    assert "cpu nobody / cpu floor" not in {t.formula for t in report.targets(without)}

    measured = _results({}, cpu={"floor": 0.40, "nobody": 0.44})
    cpu = _target(measured, "cpu nobody / cpu floor")
    assert round(cpu.value, 4) == 1.1
    assert not cpu.passed
    text = report.render(measured, rounds=1, rows=10, pgbench_command="pgbench")
    assert "cpu ratio" in text
    assert "FAIL  bulk, nobody vs its floor, server CPU" in text
