"""The console's HTTP application (Starlette): pages, JSON, live updates, and its guard.

Routes: ``/`` (the page), ``/static/*`` (its script and style), ``/api/pulse``,
``/api/fleet``, ``/api/flow``, ``/api/latency``, ``/api/timeline``,
``/api/request/{id}`` (JSON), and ``/events`` (server-sent events: the pulse,
each time it changes). Every route is ``GET`` and behind :class:`Guard`;
every response carries a content security policy that lets the page run only
its own script and style and talk only to its own origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any, Final
from urllib.parse import parse_qs

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pushsync.db import first_line
from pushsync.monitor import data, params
from pushsync.monitor.access import Policy, Verdict

logger = logging.getLogger(__name__)

PULSE_EVERY: Final = 0.5
"""Seconds between two looks at the pulse while someone watches the live updates."""
KEEPALIVE: Final = 15.0
"""Seconds of silence after which the event stream sends a comment."""
MAX_WATCHERS: Final = 64
"""Event streams open at once; more are answered 503."""
QUERY_WAIT: Final = 5.0
"""Seconds a request waits for a database connection."""

HEADERS: Final = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
"""Sent with every response, errors and refusals included."""

Handler = Callable[[Request], Awaitable[Response]]


class Guard:
    """ASGI middleware: every request passes :class:`~.access.Policy` or is refused."""

    def __init__(
        self, app: ASGIApp, policy: Policy, *, secure: bool, pulse: Pulse | None = None
    ) -> None:
        self.app = app
        self.policy = policy
        self.secure = secure
        self.pulse = pulse
        """The live updates' poller behind ``app``, closed with the server."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        verdict = self.policy.decide(
            method=scope["method"],
            path=scope["path"],
            host=headers.get("host", ""),
            authorization=headers.get("authorization"),
            cookie=headers.get("cookie"),
            query_token=query["token"][0] if "token" in query else None,
        )
        if verdict is Verdict.ALLOW:
            await self.app(scope, receive, _with_headers(send))
        elif verdict is Verdict.LOGIN:
            cookie = self.policy.cookie_header(secure=self.secure)
            await _plain(send, 303, "logged in\n", {"location": "/", "set-cookie": cookie})
        elif verdict is Verdict.WRONG_HOST:
            await _plain(send, 421, "this console answers on a loopback host name only\n", {})
        else:
            challenge = {"www-authenticate": 'Bearer realm="pushsync monitor"'}
            await _plain(send, 401, "a valid token is required\n", challenge)


def _with_headers(send: Send) -> Send:
    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            extra = [
                (k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in present
            ]
            message = {**message, "headers": [*message.get("headers", []), *extra]}
        await send(message)

    return sending


async def _plain(send: Send, status: int, body: str, headers: dict[str, str]) -> None:
    raw = body.encode()
    all_headers = {
        **HEADERS,
        **headers,
        "content-type": "text/plain; charset=utf-8",
        "content-length": str(len(raw)),
    }
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(k.encode(), v.encode()) for k, v in all_headers.items()],
        }
    )
    await send({"type": "http.response.body", "body": raw})


# --------------------------------------------------------------------------- the pulse


class Pulse:
    """One look at the database every :data:`PULSE_EVERY` seconds while anyone watches,
    shared by every event stream; each watcher gets the latest value when it changes."""

    def __init__(
        self, pool: AsyncConnectionPool[data.AsyncConn], every: float = PULSE_EVERY
    ) -> None:
        self.pool = pool
        self.every = every
        self.latest: dict[str, Any] | None = None
        self._watchers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    @contextlib.asynccontextmanager
    async def watch(self) -> AsyncIterator[asyncio.Queue[dict[str, Any] | None]]:
        """A queue of pulses while open; None in it when the console closes."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=1)
        if self._closed:
            queue.put_nowait(None)
        elif self.latest is not None:
            queue.put_nowait(self.latest)
        self._watchers.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="pushsync monitor pulse")
        try:
            yield queue
        finally:
            self._watchers.discard(queue)

    async def close(self) -> None:
        """Stop looking, and end every event stream."""
        self._closed = True
        for queue in self._watchers:
            _replace(queue, None)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while self._watchers:
            try:
                async with self.pool.connection(QUERY_WAIT) as db:
                    figures = await data.pulse(db)
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                logger.warning("monitor: cannot read the pulse: %s", first_line(exc))
                figures = {"error": "the database does not answer"}
            changed = {k: v for k, v in figures.items() if k != "now"}
            if self.latest is None or changed != {
                k: v for k, v in self.latest.items() if k != "now"
            }:
                self.latest = figures
                for queue in list(self._watchers):
                    _replace(queue, figures)
            await asyncio.sleep(self.every)


def _replace(queue: asyncio.Queue[dict[str, Any] | None], value: dict[str, Any] | None) -> None:
    """Put ``value`` in place of what ``queue`` holds: only the newest matters."""
    with contextlib.suppress(asyncio.QueueEmpty):
        queue.get_nowait()
    queue.put_nowait(value)


# --------------------------------------------------------------------------- the routes


def build_app(
    pool: AsyncConnectionPool[data.AsyncConn],
    policy: Policy,
    *,
    secure: bool = False,
    pulse_every: float = PULSE_EVERY,
) -> Guard:
    """The console as an ASGI application; ``pool`` must be open while it serves."""
    pulse = Pulse(pool, pulse_every)
    static = resources.files("pushsync.monitor").joinpath("static")
    page = static.joinpath("index.html").read_bytes()

    async def index(request: Request) -> Response:
        return Response(page, media_type="text/html; charset=utf-8")

    def api(read: Callable[[data.AsyncConn, Request], Awaitable[Any]]) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                async with pool.connection(QUERY_WAIT) as db:
                    body = await read(db, request)
            except params.BadRequest as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                logger.warning("monitor: %s failed: %s", request.url.path, first_line(exc))
                return JSONResponse({"error": "the database does not answer"}, status_code=503)
            if body is None:
                return JSONResponse({"error": "not found"}, status_code=404)
            return JSONResponse(body)

        return handler

    def now() -> datetime:
        return datetime.now(UTC)

    async def read_pulse(db: data.AsyncConn, request: Request) -> Any:
        return await data.pulse(db)

    async def read_fleet(db: data.AsyncConn, request: Request) -> Any:
        return await data.fleet(db, params.fleet(request.query_params, now()))

    async def read_flow(db: data.AsyncConn, request: Request) -> Any:
        return await data.flow(db, params.window(request.query_params, now()))

    async def read_latency(db: data.AsyncConn, request: Request) -> Any:
        return await data.latency(db, params.window(request.query_params, now(), "1h"))

    async def read_timeline(db: data.AsyncConn, request: Request) -> Any:
        return await data.timeline(db, params.timeline(request.query_params, now()))

    async def read_request(db: data.AsyncConn, request: Request) -> Any:
        return await data.request(db, params.request_id(request.path_params["request_id"]))

    async def events(request: Request) -> Response:
        if pulse.watchers >= MAX_WATCHERS:
            return JSONResponse({"error": "too many live views open"}, status_code=503)

        async def stream() -> AsyncIterator[str]:
            async with pulse.watch() as queue:
                yield "retry: 2000\n\n"
                while True:
                    try:
                        figures = await asyncio.wait_for(queue.get(), KEEPALIVE)
                    except TimeoutError:
                        yield ": still here\n\n"
                        continue
                    if figures is None:
                        return  # the console is closing
                    yield f"event: pulse\ndata: {json.dumps(figures)}\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
        )

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/api/pulse", api(read_pulse), methods=["GET"]),
        Route("/api/fleet", api(read_fleet), methods=["GET"]),
        Route("/api/flow", api(read_flow), methods=["GET"]),
        Route("/api/latency", api(read_latency), methods=["GET"]),
        Route("/api/timeline", api(read_timeline), methods=["GET"]),
        Route("/api/request/{request_id}", api(read_request), methods=["GET"]),
        Route("/events", events, methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("pushsync.monitor", "static")])),
    ]

    app = Starlette(routes=routes)
    app.router.redirect_slashes = False
    return Guard(app, policy, secure=secure, pulse=pulse)


__all__ = ["HEADERS", "MAX_WATCHERS", "Guard", "Pulse", "build_app"]
