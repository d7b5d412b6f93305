"""``pushsync demo`` as a newcomer runs it: no arguments, an embedded PostgreSQL, exit 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import executable


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSYNC_", "PG"))}


@pytest.mark.slow
def test_demo_plays_the_story_and_checks_it() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [*executable(), "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for line in (
        "Bo pushed over SYNC",
        "Cy pushed over UDP",
        "Di pushed over SMTP",
        "Bo synchronized: route south now says 'avoid location 100 (bridge closed)'",
        "Cy synchronized: route east now says",
        "Di synchronized: route west now says",
        "OK: every pushed driver has the detour",
    ):
        assert line in out, out
    assert "Ed pushed" not in out
    assert "Ed synchronized:" not in out
    assert "Traceback" not in result.stderr
    assert elapsed < 60, elapsed
    workdir = re.search(r"pushsync demo in (\S+)", out)
    assert workdir is not None
    assert not Path(workdir[1]).exists()  # cleaned up


@pytest.mark.slow
def test_demo_keep_runs_until_interrupted_then_cleans_up() -> None:
    process = subprocess.Popen(
        [*executable(), "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 90
    try:
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Try:"):
                break
            assert time.monotonic() < deadline
        text = "".join(lines)
        assert "Everything keeps running" in text
        dsn = re.search(r'psql "([^"]+)"', text)
        assert dsn is not None
        time.sleep(0.5)
        assert process.poll() is None  # still running
        import psycopg

        with psycopg.connect(dsn[1]) as conn:  # the database is there to poke at
            row = conn.execute("SELECT count(*) FROM public.disruption_reports").fetchone()
            assert row == (1,)
    finally:
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    workdir = re.search(r"pushsync demo in (\S+)", "".join(lines))
    assert workdir is not None
    assert not Path(workdir[1]).exists()
