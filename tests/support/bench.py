"""Running a benchmark as its readers do: ``python -m bench.NAME ARGS`` from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m bench.NAME ARGS`` to completion, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def figures(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The figures a ``--json`` run prints as its last line."""
    found: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return found


__all__ = ["ROOT", "figures", "run_bench"]
