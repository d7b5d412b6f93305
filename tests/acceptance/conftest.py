"""Run the real ``pushsync`` console script as a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

Run = Callable[..., subprocess.CompletedProcess[str]]


def _executable() -> list[str]:
    script = Path(sys.executable).with_name("pushsync")
    if script.exists():
        return [str(script)]
    found = shutil.which("pushsync")
    assert found, "the pushsync console script is not installed"
    return [found]


@pytest.fixture
def pushsync(tmp_path: Path) -> Run:
    """``pushsync(*args, env={...})`` runs the CLI in ``tmp_path`` and returns the result."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("PUSHSYNC_")}
        environment.update(env or {})
        return subprocess.run(
            [*_executable(), *args],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run
