"""``pushsync monitor`` in Chromium, against a running dispatcher and listeners.

Pushes made during a test reach the open Flow and Timeline views within 2 s
without a reload; a listener that stops shows as disconnected; the request
view shows each attempt (gateway, kind of address, outcome or error) and the
confirmation, also for a push resent when its device came back; markup in a
rule name or a message's content shows as text; a console with a token
answers 401 to a browser without it.
With ``PUSHSYNC_SCREENSHOT=PATH`` the first test also saves a screenshot of
the timeline there (the README's ``docs/monitor.png``).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from playwright.async_api import Browser, Page, expect
from psycopg.types.json import Jsonb

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.listener.runtime import Listener
from pushsync.monitor.server import Console
from tests.integration import trucking
from tests.support.dispatching import SECRET, dispatching, enqueue, outbox_row
from tests.support.listening import listening
from tests.support.monitor import console
from tests.support.publications import device_config
from tests.support.waiting import until_async

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIVE = 2_000
"""Milliseconds a change may take to show in an open view."""
TOKEN = "browser-token-0123456789"


@dataclass
class Fleet:
    dispatcher: Dispatcher
    listeners: dict[str, Listener]
    console: Console
    stops: dict[str, AsyncExitStack]
    """Per device: leaving it stops that device's listener."""


@asynccontextmanager
async def running_fleet(
    db: psycopg.Connection, dsn: str, tmp_path: Path, *, token: str | None = None
) -> AsyncIterator[Fleet]:
    """The trucking fleet: a dispatcher, truck-2 and truck-3 listening over SYNC (a push
    makes them synchronize), and the console with its live updates at their normal pace."""
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    async with AsyncExitStack() as stack:
        dispatcher = await stack.enter_async_context(dispatching(dsn))
        listeners, stops = {}, {}
        for device in ("truck-2", "truck-3"):
            config = device_config(tmp_path, dispatcher, device)
            stops[device] = await stack.enter_async_context(AsyncExitStack())
            listeners[device] = await stops[device].enter_async_context(listening(config.path))
        await until_async(lambda: connected(db) == 2, "both listeners connected", 10)
        served = await stack.enter_async_context(console(dsn, token=token, pulse_every=0.5))
        yield Fleet(dispatcher, listeners, served, stops)


def connected(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone()
    return int(row[0]) if row else 0


async def open_view(browser: Browser, url: str) -> Page:
    page = await browser.new_page(viewport={"width": 1280, "height": 720})
    await page.goto(url)
    await expect(page.locator("#live")).not_to_have_class("live off")
    return page


async def test_a_push_shows_live_in_flow_and_timeline_and_its_request_is_confirmed(
    browser: Browser, db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with running_fleet(db, dsn, tmp_path) as fleet:
        flow = await open_view(browser, fleet.console.url + "#flow")
        timeline = await open_view(browser, fleet.console.url + "#timeline")
        await expect(flow.locator("[data-kind=written] .total")).to_have_text("0")

        request_id = enqueue(db, "truck-2", content="detour via the harbour")
        pushed = time.monotonic()
        await expect(flow.locator("[data-kind=written] .total")).to_have_text("1", timeout=LIVE)
        bar = timeline.locator(f'a[data-request="{request_id}"]')
        await expect(bar).to_have_count(1, timeout=max(1, LIVE - ms_since(pushed)))
        assert ms_since(pushed) <= LIVE
        await expect(timeline.locator('[data-lane="truck-2"]')).to_have_count(1)

        # The push makes truck-2 synchronize: the confirmation, then its synchronization.
        await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmation")
        await expect(flow.locator("[data-kind=confirmed] .total")).to_have_text("1", timeout=LIVE)
        await expect(timeline.locator("rect.sync")).not_to_have_count(0, timeout=10_000)

        await bar.click()
        await expect(timeline.locator("#view-request")).to_be_visible()
        request = timeline.locator("[data-testid=request]")
        await expect(request.locator("[data-field='state']")).to_have_text("confirmed")
        await expect(request.locator("[data-testid=confirmation]")).to_contain_text("confirmed")
        await expect(request.locator("[data-field='content']")).to_have_text(
            "detour via the harbour"
        )
        attempt = request.locator("[data-testid=attempts] tbody tr")
        await expect(attempt).to_have_count(1)
        await expect(attempt).to_have_attribute("data-outcome", "sent")
        await expect(attempt.locator("td").nth(3)).to_have_text("sync")
        await expect(attempt.locator("td").nth(4)).to_have_text("the device's SYNC connection")
        await expect(request.locator("[data-testid=attempts-note]")).to_have_text("1 attempt(s)")
        await expect(request.locator("[data-testid=request-syncs] tbody tr")).not_to_have_count(0)

        if screenshot := os.environ.get("PUSHSYNC_SCREENSHOT"):
            await picture(db, timeline, fleet.console.url, Path(screenshot))
        for page in (flow, timeline):
            await page.close()


async def picture(db: psycopg.Connection, page: Page, url: str, path: Path) -> None:
    """A timeline with a few pushes and synchronizations on it, for the README."""
    for _ in range(3):
        for device in ("truck-2", "truck-3"):
            await confirmed(db, enqueue(db, device, content="route update"))
        await asyncio.sleep(0.8)
    await page.goto(url + "#timeline")
    for _ in range(5):  # 5 min -> 9 s
        await page.locator("#tl-zoom-in").click()
    await expect(page.locator("rect.sync")).not_to_have_count(0)
    await asyncio.sleep(1)
    path.parent.mkdir(parents=True, exist_ok=True)
    await page.set_viewport_size({"width": 1280, "height": 240})
    await page.screenshot(path=str(path))


async def test_a_listener_that_stops_shows_as_disconnected_and_a_push_meanwhile_is_resent(
    browser: Browser, db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    async with running_fleet(db, dsn, tmp_path) as fleet:
        page = await open_view(browser, fleet.console.url + "#fleet")
        row = page.locator('tr[data-device="truck-3"] [data-testid=connection]')
        other = page.locator('tr[data-device="truck-2"] [data-testid=connection]')
        await expect(row).to_have_class("connected")
        await expect(row).to_contain_text(f"sync via {fleet.dispatcher.owner} from 127.0.0.1:")
        await expect(
            page.locator('tr[data-device="truck-4"] [data-testid=connection]')
        ).to_have_text("disconnected")
        await fleet.stops["truck-3"].aclose()
        await expect(row).to_have_class("disconnected", timeout=5_000)
        await expect(row).to_have_text("disconnected")
        await expect(other).to_have_class("connected")
        await expect(page.locator("#pulse-connected")).to_have_text("1")

        # A push while truck-3 is away cannot go out; it does when truck-3 is back.
        request_id = enqueue(db, "truck-3", content="resent when back")
        await until_async(lambda: len(attempt_log(db, request_id)) == 1, "the failed attempt")
        async with listening(tmp_path / "truck-3" / "listener.yaml"):
            await confirmed(db, request_id)
        await page.goto(fleet.console.url + f"#request/{request_id}")
        request = page.locator("[data-testid=request]")
        attempts = request.locator("[data-testid=attempts] tbody tr")
        await expect(attempts).to_have_count(2)
        await expect(attempts.nth(0)).to_have_attribute("data-outcome", "retry")
        await expect(attempts.nth(0)).to_contain_text("no gateway can reach device truck-3")
        await expect(attempts.nth(1)).to_have_attribute("data-outcome", "sent")
        await expect(attempts.nth(1)).to_contain_text("the device's SYNC connection")
        await expect(request.locator("[data-testid=attempts-note]")).to_have_text("2 attempt(s)")
        await expect(request.locator("[data-testid=confirmation]")).to_contain_text("confirmed")
        await page.close()


async def test_markup_in_a_rule_name_or_content_shows_as_text(
    browser: Browser, db: psycopg.Connection, dsn: str
) -> None:
    trucking.setup(db)
    rule = '<img src=x onerror="window.pwned=1">'
    content = "<script>window.pwned=2</script><b>bold</b>"
    error = 'smtp: 550 <svg onload="window.pwned=3"><u>no</u></svg>'  # a server's answer
    attempt = Jsonb([{"at": "2026-01-01T00:00:00+00:00", "outcome": "retry", "error": error}])
    row = db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, expires_at,"
        " resend_every, attempts, attempt_log) VALUES (%s, 'truck-1', '<i>sync</i>', %s, false,"
        " now() + interval '1 hour', '1 hour', 1, %s) RETURNING request_id",
        (rule, content, attempt),
    ).fetchone()
    assert row is not None
    async with console(dsn) as served:
        page = await open_view(browser, served.url + "#flow")
        await expect(page.locator("#flow-table tbody td").first).to_have_text(rule)
        await page.goto(served.url + f"#request/{row[0]}")
        body = page.locator("[data-testid=request]")
        await expect(body.locator("[data-field='content']")).to_have_text(content)
        await expect(body.locator("[data-field='rule']")).to_have_text(rule)
        await expect(body.locator("[data-field='subject']")).to_have_text("<i>sync</i>")
        await expect(body.locator("[data-testid=attempts] tbody td").last).to_have_text(
            "not sent, retried at the next resend: " + error
        )
        await page.goto(served.url + "#timeline")
        await expect(page.locator(f'a[data-request="{row[0]}"] title')).to_contain_text(content)
        for markup in (
            "img",
            "script:not([src])",
            'b:text-is("bold")',
            'i:text-is("sync")',
            "svg[onload]",
            'u:text-is("no")',
        ):
            assert await page.locator(markup).count() == 0, markup
        assert await page.evaluate("window.pwned") is None
        await page.close()


async def test_a_browser_without_the_token_gets_401_and_the_token_logs_it_in(
    browser: Browser, dsn: str
) -> None:
    async with console(dsn, token=TOKEN) as served:
        context = await browser.new_context()
        page = await context.new_page()
        bare = await page.goto(served.url)
        wrong = await page.goto(served.url + "?token=not-the-token-at-all")
        script = await page.goto(served.url + "static/console.js")
        assert bare is not None
        assert wrong is not None
        assert script is not None
        assert (bare.status, wrong.status, script.status) == (401, 401, 401)
        text = await page.evaluate("document.body.innerText")
        assert text.strip() == "a valid token is required"
        logged_in = await page.goto(served.url + f"?token={TOKEN}")
        assert logged_in is not None
        assert logged_in.status == 200
        assert page.url == served.url  # the token left the address bar
        await expect(page.locator("#live")).not_to_have_class("live off")  # the stream, by cookie
        await expect(page.locator("#pulse-devices")).to_have_text("0")
        await context.close()


async def confirmed(db: psycopg.Connection, request_id: uuid.UUID) -> None:
    await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "the confirmation")


def attempt_log(db: psycopg.Connection, request_id: uuid.UUID) -> list[dict[str, object]]:
    """The request's recorded attempts, in the outbox or, once finished, its history."""
    row = db.execute(
        "SELECT attempt_log FROM pushsync.outbox WHERE request_id = %s "
        "UNION ALL SELECT attempt_log FROM pushsync.outbox_history WHERE request_id = %s",
        (request_id, request_id),
    ).fetchone()
    return list(row[0]) if row else []


def ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
