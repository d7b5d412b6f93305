"""The installed ``pushsync`` console script, run as a subprocess.

:func:`executable` finds it next to this interpreter (the venv) or on PATH;
:func:`run_cli` (and :func:`run_cli_async`) runs it to completion without this
process's pushsync or libpq settings; :func:`start` and :func:`stop` run it in the background; the
``pushsync`` fixture runs it in the test's ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]


def executable() -> list[str]:
    """The command that starts ``pushsync``."""
    script = Path(sys.executable).with_name("pushsync")
    if script.exists():
        return [str(script)]
    found = shutil.which("pushsync")
    assert found, "the pushsync console script is not installed"
    return [found]


def clean_env() -> dict[str, str]:
    """This process's environment without pushsync's or libpq's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("PUSHSYNC_", "PG"))}


async def run_cli_async(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`run_cli` for a test whose event loop must keep running meanwhile (a
    dispatcher or listener in this process)."""
    process = await asyncio.create_subprocess_exec(
        *executable(),
        *args,
        cwd=cwd,
        env=clean_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return subprocess.CompletedProcess(list(args), process.returncode, out.decode(), err.decode())


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``pushsync ARGS`` to completion."""
    return subprocess.run(
        [*executable(), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def start(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """``pushsync ARGS`` in the background, its output to pipes (for short runs only)."""
    return subprocess.Popen(
        [*executable(), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM; the process must exit with 0 and no traceback. Its stderr."""
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


@pytest.fixture
def pushsync(tmp_path: Path) -> Run:
    """``pushsync(*args, env={...})`` runs the CLI in ``tmp_path`` and returns the result."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
        environment.update(env or {})
        return subprocess.run(
            [*executable(), *args],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run
