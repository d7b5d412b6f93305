"""``pushsync demo --monitor``: the story, then the web console over it until Ctrl-C.

The real command as a subprocess. While it runs, the console it prints answers
on loopback: the page, the fleet (every demo device, and no device's secret),
and each pushed request with its attempt and confirmation. Ctrl-C stops it all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.support.cli import executable

DEVICES = {"truck-ann", "truck-bo", "truck-cy", "truck-di", "truck-ed"}
PUSHED = {"truck-bo": "sync", "truck-cy": "udp", "truck-di": "smtp"}
"""The devices the story pushes, and the gateway each is reached by."""
CONFIRMS = {"truck-bo", "truck-cy"}
"""Email has no way back: Di's message is sent, never confirmed."""

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSYNC_", "PG"))}


def _get(url: str) -> tuple[int, bytes]:
    with _DIRECT.open(url, timeout=10) as answer:
        return answer.status, answer.read()


def _json(url: str) -> Any:
    status, body = _get(url)
    assert status == 200, (url, body[:300])
    return json.loads(body)


def _started(process: subprocess.Popen[str]) -> str:
    """The demo's output up to its 'Try:' line (the story is over, everything runs)."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    for line in process.stdout:
        lines.append(line)
        if line.startswith("Try:"):
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError("the demo ended before it said what runs:\n" + "".join(lines))


@pytest.mark.slow
def test_demo_monitor_serves_the_console_over_the_story_without_secrets() -> None:
    process = subprocess.Popen(
        [*executable(), "demo", "--monitor"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    text = ""
    try:
        text = _started(process)
        assert "OK: every pushed driver has the detour" in text, text
        said = re.search(r"web console on (http://127\.0\.0\.1:\d+/)\n", text)
        assert said is not None, text
        url = said[1]
        assert f"console       {url}\n" in text, text
        dsn = re.search(r'psql "([^"]+)"', text)
        assert dsn is not None, text
        with psycopg.connect(dsn[1]) as conn:
            secrets: dict[str, bytes] = dict(
                conn.execute("SELECT device_id, secret FROM pushsync.devices")
            )
            requests: dict[str, str] = dict(
                conn.execute(
                    "SELECT device_id, request_id FROM pushsync.outbox "
                    "WHERE rule = 'route_disruption' UNION ALL "
                    "SELECT device_id, request_id FROM pushsync.outbox_history "
                    "WHERE rule = 'route_disruption'"
                )
            )
        assert set(secrets) == DEVICES
        assert set(requests) == set(PUSHED)

        status, page = _get(url)
        assert status == 200
        assert b"<title>" in page
        assert b"console.js" in page
        fleet = _json(url + "api/fleet")
        assert {d["device_id"] for d in fleet["devices"]} == DEVICES
        served = [_get(url + "api/fleet")[1], _get(url + "api/pulse")[1]]
        for device, request_id in requests.items():
            status, body = _get(f"{url}api/request/{request_id}")
            assert status == 200
            served.append(body)
            request = json.loads(body)["request"]
            assert request["device_id"] == device
            (attempt,) = request["attempt_log"]
            assert (attempt["gateway"], attempt["outcome"]) == (PUSHED[device], "sent")
            assert (request["confirmed_at"] is not None) == (device in CONFIRMS), request
        for device, secret in secrets.items():
            for body in served:
                assert secret.hex().encode() not in body, device
                assert secret.hex().upper().encode() not in body, device
                assert secret not in body, device
        assert not any(b'"secret"' in body for body in served)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "Traceback" not in err, err
    with pytest.raises(urllib.error.URLError):
        _get(url)  # the console stopped with the demo
    workdir = re.search(r"pushsync demo in (\S+)", text)
    assert workdir is not None
    assert not Path(workdir[1]).exists()
