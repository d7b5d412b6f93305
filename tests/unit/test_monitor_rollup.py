"""The console's long windows: bounded flow buckets, percentiles estimated from buckets."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime, timedelta

import pytest

from pushsync.monitor import data, params

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("name", "step", "seconds"),
    [("5m", "second", 1), ("15m", "second", 1), ("1h", "minute", 60), ("6h", "minute", 60),
     ("24h", "minute", 300), ("7d", "minute", 1800)],
)  # fmt: skip
def test_a_flow_window_has_at_most_flow_bars_buckets(name: str, step: str, seconds: int) -> None:
    window = params.window({"window": name}, NOW)
    assert (window.step, window.bucket_seconds) == (step, seconds)
    bars = params.WINDOWS[name] / timedelta(seconds=seconds)
    assert bars <= (params.FLOW_BARS if step == "minute" else 900)


def bucket(ms: float) -> int:
    """pushsync.latency_bucket (sql/0011_flow_minutes.sql), in Python."""
    return 0 if ms < 1 else min(1 + math.floor(4 * math.log2(ms)), 127)


def test_every_value_is_within_ten_percent_of_its_buckets_middle() -> None:
    for ms in (1.0, 1.5, 3.0, 17.0, 199.9, 200.0, 5_000.0, 123_456.0):
        low, high = data.bucket_bounds(bucket(ms))
        assert low <= ms < high
        assert data.bucket_middle(bucket(ms)) == pytest.approx(ms, rel=0.1)


def test_estimated_percentiles_are_within_ten_percent_of_the_exact_ones() -> None:
    rng = random.Random(3)
    values = sorted(math.exp(rng.uniform(0, 9)) for _ in range(5_000))
    counts: dict[int, int] = {}
    for ms in values:
        counts[bucket(ms)] = counts.get(bucket(ms), 0) + 1
    bounds = list(params.LATENCY_BOUNDS_MS)
    got = data.estimate(counts, bounds)
    assert got["n"] == len(values)
    for p, name in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        exact = values[math.ceil(p * len(values)) - 1]
        assert got[name] == pytest.approx(exact, rel=0.1), name
    assert values[-1] <= got["max"] <= values[-1] * 1.2
    assert sum(got["histogram"]) == len(values)
    assert got["histogram"][bounds.index(1_000.0)] == pytest.approx(
        sum(1_000 <= v < 2_000 for v in values), rel=0.1
    )


def test_a_timeline_longer_than_15_minutes_shows_fewer_bars() -> None:
    until = str(int(NOW.timestamp() * 1000))
    short = params.timeline({"since": str(int(until) - 15 * 60_000), "until": until}, NOW)
    long = params.timeline({"since": str(int(until) - 15 * 60_000 - 1), "until": until}, NOW)
    assert (short.limit, long.limit) == (params.TIMELINE_LIMIT, params.LONG_TIMELINE_LIMIT)
