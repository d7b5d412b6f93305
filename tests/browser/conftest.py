"""The web console in a real browser: Playwright driving the system's Chromium.

Browser builds cannot be downloaded here, so Playwright is pointed at the
Chromium the system has (``scripts/ensure-chromium`` installs Debian's
``chromium``; ``PUSHSYNC_CHROMIUM`` names another executable). One browser per
module, shared by its tests on the module's event loop; each test has its own
context (cookies) and pages.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from playwright.async_api import Browser, async_playwright


def chromium() -> str:
    """The Chromium executable: ``$PUSHSYNC_CHROMIUM``, else chromium on PATH."""
    named = os.environ.get("PUSHSYNC_CHROMIUM")
    found = named or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no chromium: run scripts/ensure-chromium (or set PUSHSYNC_CHROMIUM)")
    return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=chromium())
        try:
            yield launched
        finally:
            await launched.close()
