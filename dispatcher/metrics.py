"""The dispatcher's Prometheus metrics, and a small HTTP server for them and a health check.

:class:`Metrics` holds every figure the dispatcher exposes, in a
:class:`~prometheus_client.CollectorRegistry` of its own: several dispatchers
in one process (tests, an embedding application) never share or clash over
metrics, and nothing registered globally by other code leaks into a scrape.
Every metric is named ``pushsync_...``; ``docs/operations.md`` lists them with
their labels, meaning and suggested alerts.

:func:`serve_metrics` serves, on the event loop that calls it (no threads):

* ``GET /metrics``: the text exposition, in the format the scraper's
  ``Accept`` header asks for (prometheus_client's own content negotiation);
* ``GET /healthz``: ``200 ok`` while the health callback says healthy, else
  ``503`` with its reason.

The server speaks just enough HTTP/1.1 for scrapers and load balancers: one
request per connection (``Connection: close``), ``GET`` and ``HEAD`` only, a
request head of at most :data:`MAX_REQUEST_HEAD` bytes read within
:data:`REQUEST_TIMEOUT` seconds. Anything else is answered with the matching
4xx status, or the connection is closed; no request can make it stop serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder, generate_latest

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

    def sent(self, gateway: str) -> None:
        """One message handed to ``gateway``."""
        self._sends.labels(gateway=gateway).inc()

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


class _BadRequest(Exception):
    """The request cannot be served; answer with ``status`` (None: just close)."""

    def __init__(self, status: HTTPStatus | None, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class MetricsServer:
    """``/metrics`` and ``/healthz`` over HTTP; create with :func:`serve_metrics`."""

    def __init__(self, metrics: Metrics, health: Health) -> None:
        self.metrics = metrics
        self.health = health
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> None:
        """Bind and start serving; OSError if ``host:port`` cannot be bound."""
        self._server = await asyncio.start_server(self._client, host, port, limit=MAX_REQUEST_HEAD)

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) the server is bound to (its first socket, if several)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the metrics server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stop listening and drop the connections still open."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        await self._server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            await self._serve_one(reader, writer)
        except Exception:  # a bug here must not stop the server
            logger.exception("metrics server: error serving a request")
        finally:
            if task is not None:
                self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                method, target, headers = await _read_head(reader)
        except TimeoutError:
            await _send(writer, HTTPStatus.REQUEST_TIMEOUT, b"request timeout\n", head=False)
            return
        except _BadRequest as exc:
            logger.debug("metrics server: bad request: %s", exc)
            if exc.status is not None:
                body = f"{exc}\n".encode()
                await _send(writer, exc.status, body, head=False)
            return
        status, body, content_type = self._respond(method, target, headers)
        extra = {"Allow": "GET, HEAD"} if status == HTTPStatus.METHOD_NOT_ALLOWED else {}
        await _send(writer, status, body, content_type, head=method == "HEAD", extra=extra)

    def _respond(
        self, method: str, target: str, headers: Mapping[str, str]
    ) -> tuple[HTTPStatus, bytes, str]:
        path = urlsplit(target).path
        if path not in ("/metrics", "/healthz"):
            return HTTPStatus.NOT_FOUND, b"not found\n", _TEXT
        if method not in ("GET", "HEAD"):
            return HTTPStatus.METHOD_NOT_ALLOWED, b"method not allowed\n", _TEXT
        if path == "/metrics":
            body, content_type = self.metrics.exposition(headers.get("accept", ""))
            return HTTPStatus.OK, body, content_type
        try:
            healthy, reason = self.health()
        except Exception as exc:
            logger.exception("metrics server: the health check raised")
            healthy, reason = False, f"health check failed: {type(exc).__name__}"
        if healthy:
            return HTTPStatus.OK, b"ok\n", _TEXT
        text = reason.strip() or "unhealthy"
        return HTTPStatus.SERVICE_UNAVAILABLE, f"{text}\n".encode(), _TEXT


_TEXT = "text/plain; charset=utf-8"
_MAX_HEADERS = 100


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    """Request line and headers: (method, target, lower-cased header names -> values)."""
    size = 0
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            raise _BadRequest(None, "connection closed mid-request") from exc
        except asyncio.LimitOverrunError as exc:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too large") from exc
        size += len(line)
        if size > MAX_REQUEST_HEAD or len(lines) > _MAX_HEADERS:
            raise _BadRequest(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large")
        line = line.rstrip(b"\r\n")
        if not line:
            if lines:
                break
            continue  # blank lines before the request line are allowed (RFC 9112 2.2)
        lines.append(line)
    try:
        request_line, *header_lines = (line.decode("ascii") for line in lines)
    except UnicodeDecodeError as exc:
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "not ASCII") from exc
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[0].isupper():
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "HTTP/1.0 or HTTP/1.1 only")
    if not target.startswith(("/", "http://", "https://")):
        raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad request target")
    headers: dict[str, str] = {}
    for header in header_lines:
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise _BadRequest(HTTPStatus.BAD_REQUEST, "bad header line")
        headers[name.lower()] = value.strip()
    return method, target, headers


async def _send(
    writer: asyncio.StreamWriter,
    status: HTTPStatus,
    body: bytes,
    content_type: str = _TEXT,
    *,
    head: bool,
    extra: Mapping[str, str] | None = None,
) -> None:
    fields = {
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        "Connection": "close",
        **(extra or {}),
    }
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    lines += [f"{name}: {value}" for name, value in fields.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    if not head:
        writer.write(body)
    with contextlib.suppress(ConnectionError):
        await writer.drain()


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
