"""The dispatcher's metrics: names, labels, values, and registries kept apart."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pushsync.dispatcher.metrics import LATENCY_BUCKETS, OUTBOX_STATES, Metrics


def samples(metrics: Metrics) -> list[Sample]:
    text = metrics.render().decode("utf-8")
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(metrics: Metrics, name: str, **labels: str) -> float:
    """The one sample named ``name`` with exactly ``labels``; fails if absent."""
    found = [s.value for s in samples(metrics) if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def families(metrics: Metrics) -> dict[str, str]:
    text = metrics.render().decode("utf-8")
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_every_metric_is_exposed_with_its_type_before_anything_happens() -> None:
    found = families(Metrics())
    expected = {
        "pushsync_sends": "counter",
        "pushsync_send_failures": "counter",
        "pushsync_commit_to_send_seconds": "histogram",
        "pushsync_connected_devices": "gauge",
        "pushsync_confirmations": "counter",
        "pushsync_outbox_rows": "gauge",
        "pushsync_outbox_oldest_unsent_seconds": "gauge",
        "pushsync_database_up": "gauge",
    }
    # prometheus_client adds a ``_created`` gauge per counter and histogram series
    # (unless PROMETHEUS_DISABLE_CREATED_SERIES is set): not ours to test.
    ours = {k: v for k, v in found.items() if k.startswith("pushsync_")}
    assert {k: v for k, v in ours.items() if not k.endswith("_created")} == expected


def test_sends_and_failures_are_counted_per_gateway() -> None:
    metrics = Metrics()
    metrics.sent("udp")
    metrics.sent("udp")
    metrics.sent("smtp")
    metrics.failed("udp", final=False)
    metrics.failed("udp", final=True)
    metrics.failed("udp", final=True)
    assert value(metrics, "pushsync_sends_total", gateway="udp") == 2
    assert value(metrics, "pushsync_sends_total", gateway="smtp") == 1
    assert value(metrics, "pushsync_send_failures_total", gateway="udp", final="false") == 1
    assert value(metrics, "pushsync_send_failures_total", gateway="udp", final="true") == 2


def test_latency_histogram_has_buckets_from_1_ms_to_10_s() -> None:
    metrics = Metrics()
    for seconds in (0.0004, 0.003, 0.003, 0.2, 7.0, 60.0, -0.5):
        metrics.latency(seconds)
    bounds = [
        float(s.labels["le"])
        for s in samples(metrics)
        if s.name == "pushsync_commit_to_send_seconds_bucket"
    ]
    assert bounds == [*LATENCY_BUCKETS, math.inf]
    assert bounds[0] == 0.001
    assert bounds[-2] == 10.0

    def bucket(le: str) -> float:
        return value(metrics, "pushsync_commit_to_send_seconds_bucket", le=le)

    assert bucket("0.001") == 2  # 0.4 ms, and the negative one counted as 0
    assert bucket("0.005") == 4
    assert bucket("0.25") == 5
    assert bucket("10.0") == 6
    assert bucket("+Inf") == 7
    assert value(metrics, "pushsync_commit_to_send_seconds_count") == 7
    assert math.isclose(value(metrics, "pushsync_commit_to_send_seconds_sum"), 67.2064)


def test_gauges_take_the_last_value() -> None:
    metrics = Metrics()
    assert value(metrics, "pushsync_database_up") == 0
    metrics.set_database_up(True)
    metrics.set_connected(12)
    metrics.set_connected(7)
    metrics.set_oldest_unsent(42.5)
    assert value(metrics, "pushsync_database_up") == 1
    assert value(metrics, "pushsync_connected_devices") == 7
    assert value(metrics, "pushsync_outbox_oldest_unsent_seconds") == 42.5
    metrics.set_database_up(False)
    metrics.set_oldest_unsent(None)
    assert value(metrics, "pushsync_database_up") == 0
    assert value(metrics, "pushsync_outbox_oldest_unsent_seconds") == 0


def test_confirmations_count_up_by_one_or_by_n() -> None:
    metrics = Metrics()
    metrics.confirmed()
    metrics.confirmed(41)
    assert value(metrics, "pushsync_confirmations_total") == 42


def test_outbox_depth_reports_every_state_and_resets_missing_ones() -> None:
    metrics = Metrics()

    def depth() -> dict[str, float]:
        return {s: value(metrics, "pushsync_outbox_rows", state=s) for s in OUTBOX_STATES}

    assert depth() == dict.fromkeys(OUTBOX_STATES, 0)
    metrics.set_outbox_depth({"pending": 5, "sent": 3})
    metrics.set_outbox_depth({"pending": 2, "confirmed": 9})
    assert depth() == {**dict.fromkeys(OUTBOX_STATES, 0), "pending": 2, "confirmed": 9}


def test_each_metrics_object_has_its_own_registry() -> None:
    first, second = Metrics(), Metrics()  # would raise "Duplicated timeseries" if shared
    first.sent("udp")
    assert value(first, "pushsync_sends_total", gateway="udp") == 1
    assert not [s for s in samples(second) if s.name == "pushsync_sends_total"]


def test_process_metrics_can_be_left_out() -> None:
    assert not [n for n in families(Metrics(process=False)) if not n.startswith("pushsync_")]


def test_exposition_follows_the_accept_header() -> None:
    metrics = Metrics(process=False)
    text, plain = metrics.exposition("")
    assert plain.startswith("text/plain; version=0.0.4")
    assert text == metrics.render()
    openmetrics, kind = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text")
    assert openmetrics.endswith(b"# EOF\n")
