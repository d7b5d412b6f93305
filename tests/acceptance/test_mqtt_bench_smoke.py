"""The MQTT fan-out benchmark still runs: a smoke run with a few devices.

The figures are for people to read (bench/mqtt_fanout/README.md); here only that
every device got its message over each gateway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mqtt_fanout_smoke_run() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.mqtt_fanout", "--devices", "50", "--clients", "2", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    figures = json.loads(completed.stdout.splitlines()[-1])
    assert (figures["udp_received"], figures["mqtt_received"]) == (50, 50)
    assert "fan-out over MQTT  50/50 in" in completed.stdout
