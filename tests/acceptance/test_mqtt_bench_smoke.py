"""The MQTT fan-out benchmark still runs: a smoke run with a few devices.

The figures are for people to read (bench/mqtt_fanout/README.md); here only that
every device got its message over each gateway.
"""

from __future__ import annotations

import pytest

from tests.support.bench import figures, run_bench


@pytest.mark.slow
def test_mqtt_fanout_smoke_run() -> None:
    completed = run_bench("mqtt_fanout", "--devices", 50, "--clients", 2, "--json")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    found = figures(completed)
    assert (found["udp_received"], found["mqtt_received"]) == (50, 50)
    assert "fan-out over MQTT  50/50 in" in completed.stdout
