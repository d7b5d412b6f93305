"""Wait for a condition instead of sleeping: poll it, with a bounded wait.

:func:`until` blocks the calling thread (tests that drive subprocesses);
:func:`until_async` yields to the event loop between polls (tests that run the
dispatcher or the listener in-process). Both fail the test with what they were
waiting for once ``timeout`` seconds have passed, and return the seconds it took.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

WAIT = 30.0
"""Default seconds a wait may take before the test fails; the conditions take far less."""


def until(
    check: Callable[[], object],
    what: str,
    timeout: float = WAIT,
    *,
    logs: Iterable[Path] = (),
    every: float = 0.02,
    explain: Callable[[], str] | None = None,
) -> float:
    """Poll ``check`` until true; the seconds it took.

    Fails after ``timeout`` with the tails of ``logs`` (and what ``explain`` says).
    """
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            tails = "".join(
                f"\n--- {path.name} ---\n{path.read_text(errors='replace')[-2500:]}"
                for path in logs
                if path.exists()
            )
            why = f": {explain()}" if explain is not None else ""
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}{why}{tails}")
        time.sleep(every)
    return time.monotonic() - started


async def until_async(
    check: Callable[[], object],
    what: str = "the condition",
    timeout: float = WAIT,  # noqa: ASYNC109  a deadline that fails the test naming `what`
    *,
    every: float = 0.01,
) -> float:
    """Poll ``check`` until true, sleeping on the event loop between polls; seconds it took."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(every)
    return time.monotonic() - started
