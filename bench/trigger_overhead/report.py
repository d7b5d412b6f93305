"""Medians, ratios against the baseline, the targets and their verdicts, as text."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bench.trigger_overhead.database import VARIANTS, PgbenchResult

BASELINE = "none"


@dataclass(slots=True)
class Results:
    """Every measurement, per variant, in the order taken."""

    pgbench: dict[str, list[PgbenchResult]] = field(default_factory=dict)
    bulk: dict[str, list[float]] = field(default_factory=dict)
    bulk_cpu: dict[str, list[float]] = field(default_factory=dict)
    """The server process's CPU seconds per bulk INSERT, where it can be read."""

    def tps(self, variant: str) -> float:
        return statistics.median(r.tps for r in self.pgbench[variant])

    def seconds(self, variant: str) -> float:
        return statistics.median(self.bulk[variant])

    def has_cpu(self) -> bool:
        return bool(self.bulk_cpu) and all(self.bulk_cpu.get(n) for n in self.bulk)

    def cpu(self, variant: str) -> float:
        return statistics.median(self.bulk_cpu[variant])


@dataclass(frozen=True, slots=True)
class Target:
    label: str
    formula: str
    value: float
    op: Literal[">=", "<="]
    limit: float

    @property
    def passed(self) -> bool:
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def targets(res: Results) -> list[Target]:
    tps, sec = res.tps, res.seconds
    by_cpu = []
    if res.has_cpu():
        by_cpu.append(
            Target(
                "bulk, nobody vs its floor, server CPU",
                "cpu nobody / cpu floor",
                res.cpu("nobody") / res.cpu("floor"),
                "<=",
                1.05,
            )
        )
    return [
        Target(
            "single-row, rule's `when` false",
            "tps nomatch / tps none",
            tps("nomatch") / tps("none"),
            ">=",
            0.90,
        ),
        Target(
            "single-row, recipients find nobody",
            "tps nobody / tps none",
            tps("nobody") / tps("none"),
            ">=",
            0.90,
        ),
        Target(
            "bulk, rule's `when` false",
            "time nomatch / time none",
            sec("nomatch") / sec("none"),
            "<=",
            1.10,
        ),
        Target(
            "bulk, recipients find nobody",
            "time nobody / time none",
            sec("nobody") / sec("none"),
            "<=",
            1.10,
        ),
        Target(
            "bulk, nobody vs its hand-written floor",
            "time nobody / time floor",
            sec("nobody") / sec("floor"),
            "<=",
            1.05,
        ),
        *by_cpu,
        Target(
            "bulk, every row to 4 devices",
            "time match4 / time none",
            sec("match4") / sec("none"),
            "<=",
            3.0,
        ),
        Target(
            "bulk, generated vs row-level (no match)",
            "time rowlevel / time nomatch",
            sec("rowlevel") / sec("nomatch"),
            ">=",
            4.0,
        ),
        Target(
            "bulk, generated vs row-level (4 devices)",
            "time rowlevel / time match4",
            sec("rowlevel") / sec("match4"),
            ">=",
            4.0,
        ),
        Target(
            "bulk, 20 rules vs 1, total time",
            "time rules20 / time nomatch",
            sec("rules20") / sec("nomatch"),
            "<=",
            1.5,
        ),
        Target(
            "single-row, 20 rules vs 1, throughput",
            "tps nomatch / tps rules20",
            tps("nomatch") / tps("rules20"),
            "<=",
            1.5,
        ),
    ]


def _overhead_ratio(many: float, one: float, base: float) -> float:
    """(many - base) / (one - base); inf when ``one`` shows no overhead at all."""
    if one - base <= 0:
        return float("inf")
    return (many - base) / (one - base)


def per_row_overheads(res: Results) -> dict[str, float]:
    """Informational: the floor's own cost; 20 rules vs 1 counted above the baseline."""
    base_sec, base_txn = res.seconds("none"), 1 / res.tps("none")
    return {
        "bulk: floor / none, time (what any statement trigger doing nobody's join costs)": (
            res.seconds("floor") / base_sec
        ),
        "bulk: (rules20 - none) / (nomatch - none), time": _overhead_ratio(
            res.seconds("rules20"), res.seconds("nomatch"), base_sec
        ),
        "single-row: (rules20 - none) / (nomatch - none), time per transaction": (
            _overhead_ratio(1 / res.tps("rules20"), 1 / res.tps("nomatch"), base_txn)
        ),
    }


def _spread(values: Sequence[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}..{format(max(values), fmt)}"


def render(
    res: Results,
    *,
    rounds: int,
    rows: int,
    pgbench_command: str,
) -> str:
    lines: list[str] = []
    add = lines.append
    present = [v for v in VARIANTS if v.name in res.pgbench and v.name in res.bulk]
    base_tps, base_sec = res.tps(BASELINE), res.seconds(BASELINE)

    add("")
    add(f"single-row INSERT: {pgbench_command}")
    add(f"  median of {rounds} interleaved rounds; ratio = median tps / median tps(none)")
    add("  (higher is better); per round = tps / tps(none) of the same round, lowest..highest")
    add(
        f"  {'variant':<9} {'tps':>9} {'min..max':>13} {'lat ms':>7} {'fail':>5} "
        f"{'ratio':>7} {'per round':>13}"
    )
    base_runs = [r.tps for r in res.pgbench[BASELINE]]
    for v in present:
        runs = res.pgbench[v.name]
        tps = res.tps(v.name)
        latency = statistics.median(r.latency_ms for r in runs)
        failed = sum(r.failed for r in runs)
        paired = [r.tps / b for r, b in zip(runs, base_runs, strict=True)]
        add(
            f"  {v.name:<9} {tps:9.1f} {_spread([r.tps for r in runs], '.0f'):>13} "
            f"{latency:7.3f} {failed:5d} {tps / base_tps:7.3f} {_spread(paired, '.3f'):>13}"
        )

    add("")
    add(f"bulk INSERT ... SELECT generate_series(1, {rows}), one transaction, client-side time")
    add(f"  median of {rounds} interleaved rounds; ratio = median time / median time(none)")
    add("  (lower is better); +us/row = (time - time(none)) / rows; per round as above")
    cpu = res.has_cpu()
    if cpu:
        add("  cpu = the server process's CPU seconds for the statement (/proc/PID/schedstat):")
        add("  unlike wall time, it leaves out waiting for a CPU that other processes hold")
    add(
        f"  {'variant':<9} {'seconds':>9} {'min..max':>13} {'us/row':>7} {'+us/row':>8} "
        f"{'ratio':>7} {'per round':>13}" + (f" {'cpu s':>8} {'cpu ratio':>9}" if cpu else "")
    )
    base_times = res.bulk[BASELINE]
    for v in present:
        sec = res.seconds(v.name)
        extra = (sec - base_sec) / rows * 1e6
        paired = [t / b for t, b in zip(res.bulk[v.name], base_times, strict=True)]
        cpu_columns = (
            f" {res.cpu(v.name):8.4f} {res.cpu(v.name) / res.cpu(BASELINE):9.3f}" if cpu else ""
        )
        add(
            f"  {v.name:<9} {sec:9.4f} {_spread(res.bulk[v.name], '.3f'):>13} "
            f"{sec / rows * 1e6:7.2f} {extra:8.2f} {sec / base_sec:7.3f} "
            f"{_spread(paired, '.3f'):>13}{cpu_columns}"
        )

    add("")
    add("targets (computed on the ratios of the medians)")
    for t in targets(res):
        add(f"  {t.verdict}  {t.label:<42} {t.formula:<28} {t.value:6.3f} {t.op} {t.limit:g}")
    add("")
    add("informational: the floor against no trigger; 20 rules vs 1 above no trigger")
    for label, value in per_row_overheads(res).items():
        add(f"  {label}: {value:.2f}x")
    return "\n".join(lines)


def to_json(
    res: Results, *, meta: Mapping[str, Any], settings: Mapping[str, str]
) -> dict[str, Any]:
    names = [v.name for v in VARIANTS if v.name in res.pgbench and v.name in res.bulk]
    return {
        "meta": dict(meta),
        "settings": dict(settings),
        "pgbench": {
            n: {
                "runs": [asdict(r) for r in res.pgbench[n]],
                "median_tps": res.tps(n),
                "ratio_vs_none": res.tps(n) / res.tps(BASELINE),
            }
            for n in names
        },
        "bulk": {
            n: {
                "runs_seconds": res.bulk[n],
                "median_seconds": res.seconds(n),
                "ratio_vs_none": res.seconds(n) / res.seconds(BASELINE),
                **(
                    {
                        "runs_cpu_seconds": res.bulk_cpu[n],
                        "median_cpu_seconds": res.cpu(n),
                        "cpu_ratio_vs_none": res.cpu(n) / res.cpu(BASELINE),
                    }
                    if res.has_cpu()
                    else {}
                ),
            }
            for n in names
        },
        "targets": [
            {
                "label": t.label,
                "formula": t.formula,
                "value": t.value,
                "op": t.op,
                "limit": t.limit,
                "passed": t.passed,
            }
            for t in targets(res)
        ],
        "informational": per_row_overheads(res),
    }
