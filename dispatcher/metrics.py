"""The dispatcher's Prometheus metrics, served over HTTP with a health check.

:class:`Metrics` holds every figure the dispatcher exposes, in a
:class:`~prometheus_client.CollectorRegistry` of its own: several dispatchers
in one process (tests, an embedding application) never share or clash over
metrics, and nothing registered globally by other code leaks into a scrape.
Every metric is named ``pushsync_...``; ``docs/operations.md`` lists them with
their labels, meaning and suggested alerts.

:func:`serve_metrics` serves ``GET /metrics`` (the exposition, in the format
the scraper's ``Accept`` header asks for) and ``GET /healthz`` (``200 ok``, or
``503`` and the health callback's reason): a Starlette app run by uvicorn on
the event loop that calls it, no threads. A request head must fit in
:data:`MAX_REQUEST_HEAD` bytes and arrive within :data:`REQUEST_TIMEOUT`
seconds; anything malformed gets a 4xx or a closed connection.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable, Mapping
from typing import Any

import h11
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

from pushsync.dispatcher.http import HttpServer
from pushsync.dispatcher.sockets import listening
from pushsync.logs import Throttle

logger = logging.getLogger(__name__)

OUTBOX_STATES = ("pending", "sending", "sent", "confirmed", "expired", "failed")
"""The outbox states (``docs/schema.md``); each is always exposed, 0 when absent."""

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds, in seconds, of the commit-to-send histogram: 1 ms to 10 s."""

MAX_REQUEST_HEAD = 8192
"""Most bytes of request line and headers the HTTP server reads before giving up."""

REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send its whole request head."""

Health = Callable[[], tuple[bool, str]]
"""Returns (healthy, reason); the reason is the body of a 503."""


class Metrics:
    """The dispatcher's metrics, in a registry of their own (:attr:`registry`).

    Every method is cheap and never blocks: call them from the event loop as
    things happen. :meth:`render` gives the text exposition.
    """

    def __init__(self, *, process: bool = True) -> None:
        """``process``: also expose the ``process_*`` metrics (memory, CPU, open files)."""
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self._sends = Counter(
            "pushsync_sends",
            "Messages handed to a gateway, by gateway.",
            ["gateway"],
            registry=registry,
        )
        self._failures = Counter(
            "pushsync_send_failures",
            "Failed sends, by gateway and whether retrying can help (final=false) or not.",
            ["gateway", "final"],
            registry=registry,
        )
        self._latency = Histogram(
            "pushsync_commit_to_send_seconds",
            "Seconds from the commit that wrote an outbox row to its first send.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._connected = Gauge(
            "pushsync_connected_devices",
            "Devices connected to this dispatcher over SYNC.",
            registry=registry,
        )
        self._confirmations = Counter(
            "pushsync_confirmations",
            "Device confirmations recorded in the outbox.",
            registry=registry,
        )
        self._outbox = Gauge(
            "pushsync_outbox_rows",
            "Rows in pushsync.outbox by state, as last counted.",
            ["state"],
            registry=registry,
        )
        self._oldest = Gauge(
            "pushsync_outbox_oldest_unsent_seconds",
            "Age of the oldest pending or sending outbox row, as last counted; 0 if none.",
            registry=registry,
        )
        self._database_up = Gauge(
            "pushsync_database_up",
            "1 while the dispatcher's database connection works, else 0.",
            registry=registry,
        )
        for state in OUTBOX_STATES:
            self._outbox.labels(state=state).set(0)
        if process:
            ProcessCollector(registry=registry)

    def sent(self, gateway: str, n: int = 1) -> None:
        """``n`` messages handed to ``gateway``."""
        self._sends.labels(gateway=gateway).inc(n)

    def failed(self, gateway: str, final: bool) -> None:
        """One send through ``gateway`` failed; ``final``: retrying cannot help."""
        self._failures.labels(gateway=gateway, final="true" if final else "false").inc()

    def latency(self, seconds: float) -> None:
        """Observe commit-to-send time; negative values (clock skew) count as 0."""
        self._latency.observe(max(seconds, 0.0))

    def set_connected(self, n: int) -> None:
        """How many devices hold a SYNC connection to this dispatcher now."""
        self._connected.set(n)

    def confirmed(self, n: int = 1) -> None:
        """``n`` confirmations recorded."""
        self._confirmations.inc(n)

    def set_outbox_depth(self, by_state: Mapping[str, int]) -> None:
        """Outbox rows per state; known states missing from ``by_state`` are set to 0."""
        for state in OUTBOX_STATES:
            self._outbox.labels(state=state).set(by_state.get(state, 0))
        for state, n in by_state.items():
            if state not in OUTBOX_STATES:
                self._outbox.labels(state=state).set(n)

    def set_oldest_unsent(self, seconds: float | None) -> None:
        """Age of the oldest pending or sending row; None (no such row) is exposed as 0."""
        self._oldest.set(max(seconds or 0.0, 0.0))

    def set_database_up(self, up: bool) -> None:
        """Whether the database connection works."""
        self._database_up.set(1 if up else 0)

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        return generate_latest(self.registry)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format an ``Accept`` header asks for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


# --------------------------------------------------------------------------- HTTP


def _routes(metrics: Metrics, health: Health) -> Starlette:
    """The ASGI app: ``/metrics`` and ``/healthz``, ``GET`` and ``HEAD`` only."""

    async def scrape(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    async def healthz(request: Request) -> Response:
        try:
            healthy, reason = health()
        except Exception as exc:
            logger.exception("metrics server: the health check raised")
            healthy, reason = False, f"health check failed: {type(exc).__name__}"
        if healthy:
            return PlainTextResponse("ok\n")
        text = reason.strip() or "unhealthy"
        return PlainTextResponse(f"{text}\n", status_code=503)

    app = Starlette(
        routes=[
            Route("/metrics", scrape, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )
    app.router.redirect_slashes = False  # /metrics/ is unknown, not a redirect
    return app


class _ConnectionLog(logging.LoggerAdapter[logging.Logger]):
    """Where uvicorn's connections log: errors of the app as they come, the rest
    (malformed requests, mostly) throttled, so that a flood of them is no flood
    in the log."""

    level = logging.DEBUG  # uvicorn's TRACE lines, below DEBUG, stay off

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger)
        self.throttle = Throttle(logger)

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR or kwargs:
            self.logger.log(level, msg, *args, **kwargs)
        else:
            self.throttle.log(level, f"metrics server: {msg}", *args)


_CONNECTION_LOG = _ConnectionLog(logger)


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, with a deadline on every request head.

    uvicorn closes a keep-alive connection left idle, but waits forever for a
    head sent a byte at a time. Here each head (the first one from the
    connection, the next one from the end of the previous response) must be
    complete within :data:`REQUEST_TIMEOUT` seconds; a late one gets ``408``.
    """

    _deadline: asyncio.TimerHandle | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _CONNECTION_LOG  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._cancel_deadline()  # a whole head came: the app has the request

    def on_response_complete(self) -> None:
        self._expect_head()  # first: a pipelined head handled below cancels it
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _expect_head(self) -> None:
        self._cancel_deadline()
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT, self._head_too_late)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_too_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self.transport.write(_TIMED_OUT)  # part of a head came, not all of it
        self.transport.close()


_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 16\r\nconnection: close\r\n\r\nrequest timeout\n"
)


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP; create with :func:`serve_metrics`."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self._server: HttpServer | None = None
        self._serving: asyncio.Task[None] | None = None
        self._sockets: list[socket.socket] = []

    async def start(self, host: str, port: int) -> None:
        """Bind and start serving; OSError if ``host:port`` cannot be bound."""
        config = uvicorn.Config(
            _routes(self.metrics, self.health),
            http=_Protocol,
            ws="none",
            lifespan="off",
            log_config=None,  # the dispatcher's logging configuration applies
            access_log=False,
            server_header=False,
            timeout_keep_alive=math.ceil(REQUEST_TIMEOUT),  # the head deadline comes first
            timeout_graceful_shutdown=1,
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
        )
        server = HttpServer(config)
        sockets = await listening(host, port)
        try:
            serving = await server.start(sockets, name="metrics-http")
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._server, self._serving, self._sockets = server, serving, sockets

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server is bound to (its first socket, if several)."""
        if self._server is None:
            raise RuntimeError("the metrics server is not listening")
        host, port = self._sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stop listening, finish the responses under way, drop idle connections."""
        server, self._server = self._server, None
        if server is None or self._serving is None:
            return
        server.should_exit = True
        await self._serving


async def serve_metrics(metrics: Metrics, host: str, port: int, health: Health) -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` (port 0: the system picks one).

    Returns once listening; ``server.address`` is where, ``await server.close()``
    stops it. OSError if the address cannot be bound.
    """
    server = MetricsServer(metrics, health)
    await server.start(host, port)
    logger.debug("metrics server listening on %s port %d", *server.address)
    return server


__all__ = [
    "LATENCY_BUCKETS",
    "OUTBOX_STATES",
    "Health",
    "Metrics",
    "MetricsServer",
    "serve_metrics",
]
