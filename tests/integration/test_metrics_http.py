"""The metrics HTTP server on a real socket on 127.0.0.1: scrapes, health, bad requests.

What scrapers and load balancers rely on is asserted here; the attacks (garbage,
oversized heads, slow and idle clients) must each leave the server serving.

No database: these tests need only the loopback interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from pushsync.dispatcher import metrics as m

WAIT = 5.0


@dataclass
class Health:
    """A health callback the test can flip."""

    healthy: bool = True
    reason: str = "ok"
    calls: list[None] = field(default_factory=list)

    def __call__(self) -> tuple[bool, str]:
        self.calls.append(None)
        return self.healthy, self.reason


@dataclass
class Served:
    metrics: m.Metrics
    health: Health
    server: m.MetricsServer

    @property
    def address(self) -> tuple[str, int]:
        return self.server.address


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    metrics = m.Metrics()
    health = Health()
    server = await m.serve_metrics(metrics, "127.0.0.1", 0, health)
    try:
        yield Served(metrics, health, server)
    finally:
        await server.close()


@dataclass(frozen=True)
class Response:
    status: int  # 0: the server closed the connection without answering
    headers: dict[str, str]
    body: bytes


async def exchange(address: tuple[str, int], data: bytes) -> Response:
    """Send raw bytes, read until the server closes, parse what came back.

    The requests ask for ``Connection: close``; without it the server keeps the
    connection open for the next request (see the keep-alive test).
    """
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
        await writer.wait_closed()
    if not raw:
        return Response(0, {}, b"")
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("ascii").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    if "content-length" in headers:  # else the body ends with the connection
        assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    return Response(int(status), headers, body)


async def get(address: tuple[str, int], path: str, method: str = "GET") -> Response:
    host, port = address
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: t\r\n"
        "Connection: close\r\n\r\n"
    )
    return await exchange(address, request.encode("ascii"))


def urlopen(url: str, accept: str | None = None) -> tuple[int, str, bytes]:
    """A request with the standard library's HTTP client (run in a thread)."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})  # noqa: S310  http:// of the test's own server
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:  # noqa: S310  http:// of the test's own server
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


# --------------------------------------------------------------------------- /metrics


@pytest.mark.asyncio
async def test_scrape_over_http_parses_and_shows_current_values(served: Served) -> None:
    served.metrics.sent("udp")
    served.metrics.sent("udp")
    served.metrics.failed("smtp", final=True)
    served.metrics.latency(0.004)
    served.metrics.set_outbox_depth({"pending": 3})
    served.metrics.set_database_up(True)
    host, port = served.address
    status, content_type, body = await asyncio.to_thread(urlopen, f"http://{host}:{port}/metrics")
    assert status == 200
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode("utf-8"))
        for s in family.samples
    }
    assert found[("pushsync_sends_total", (("gateway", "udp"),))] == 2
    assert found[("pushsync_send_failures_total", (("final", "true"), ("gateway", "smtp")))] == 1
    assert found[("pushsync_commit_to_send_seconds_bucket", (("le", "0.005"),))] == 1
    assert found[("pushsync_outbox_rows", (("state", "pending"),))] == 3
    assert found[("pushsync_database_up", ())] == 1
    assert any(name.startswith("process_") for name, _ in found)

    served.metrics.sent("udp")
    again = await get(served.address, "/metrics?x=1")
    assert again.status == 200
    assert b'pushsync_sends_total{gateway="udp"} 3.0' in again.body


@pytest.mark.asyncio
async def test_scraper_asking_for_openmetrics_gets_it(served: Served) -> None:
    host, port = served.address
    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"
    status, content_type, body = await asyncio.to_thread(
        urlopen, f"http://{host}:{port}/metrics", accept
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")


@pytest.mark.asyncio
async def test_head_gives_headers_without_a_body(served: Served) -> None:
    reader, writer = await asyncio.open_connection(*served.address)
    writer.write(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b""
    length = [line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    assert int(length[0].split(b":")[1]) > 0  # the length a GET would have


# --------------------------------------------------------------------------- /healthz


@pytest.mark.asyncio
async def test_healthz_is_200_when_healthy_and_503_with_the_reason_when_not(
    served: Served,
) -> None:
    host, port = served.address
    assert await asyncio.to_thread(urlopen, f"http://{host}:{port}/healthz") == (
        200,
        "text/plain; charset=utf-8",
        b"ok\n",
    )
    served.health.healthy = False
    served.health.reason = "database unreachable since 12:00:03"
    status, _, body = await asyncio.to_thread(urlopen, f"http://{host}:{port}/healthz")
    assert (status, body) == (503, b"database unreachable since 12:00:03\n")
    served.health.healthy = True
    assert (await get(served.address, "/healthz")).status == 200
    assert len(served.health.calls) == 3  # asked on every request, never cached


@pytest.mark.asyncio
async def test_healthz_is_503_when_the_health_check_raises() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("bug")

    server = await m.serve_metrics(m.Metrics(), "127.0.0.1", 0, broken)
    try:
        response = await get(server.address, "/healthz")
        assert (response.status, response.body) == (503, b"health check failed: RuntimeError\n")
        assert (await get(server.address, "/metrics")).status == 200
    finally:
        await server.close()


# --------------------------------------------------------------------------- other requests


@pytest.mark.asyncio
async def test_unknown_path_is_404_and_other_methods_405(served: Served) -> None:
    assert (await get(served.address, "/")).status == 404
    assert (await get(served.address, "/metrics/extra")).status == 404
    assert (await get(served.address, "/metrics/")).status == 404
    assert (await get(served.address, "/nothing", method="POST")).status == 404
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        response = await get(served.address, "/metrics", method=method)
        assert response.status == 405, method
        assert sorted(response.headers["allow"].split(", ")) == ["GET", "HEAD"]
    assert (await get(served.address, "/healthz", method="POST")).status == 405
    assert served.health.calls == []  # a refused method never runs the check


REFUSED = [
    pytest.param(bytes(range(256)) * 4 + b"\r\n\r\n", id="binary"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64, id="tls-hello"),
    pytest.param(b"GET /metrics\r\n\r\n", id="http-0.9"),
    pytest.param(b"GET /metrics HTTP/1.1\r\n\r\n", id="no-host"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", id="bad-header"),
    pytest.param(b"GET /m\xffx HTTP/1.1\r\nHost: x\r\n\r\n", id="not-ascii-target"),
    pytest.param(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n\r\n", id="huge-line"),
    pytest.param(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n", id="many-headers"),
    pytest.param(b"GET /metrics HTT", id="cut-short"),
    pytest.param(b"", id="empty"),
]

ODD = [
    pytest.param(b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 405, id="lower-case-method"),
    pytest.param(b"GET metrics HTTP/1.1\r\nHost: x\r\n\r\n", 404, id="bad-target"),
    pytest.param(b"GET /%ff%00 HTTP/1.1\r\nHost: x\r\n\r\n", 404, id="escaped-bytes"),
    pytest.param(b"GET /metrics HTTP/2.0\r\nHost: x\r\n\r\n", 200, id="other-version"),
    pytest.param(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX: \xff\xfe\r\n\r\n", 200, id="obs-text"),
]
"""Odd but parseable: answered as HTTP/1.1 (obs-text is allowed in header values)."""


async def answer_to(address: tuple[str, int], data: bytes) -> int:
    """The status the server answers raw ``data`` with; 0 if it just closes."""
    reader, writer = await asyncio.open_connection(*address)
    writer.write(data)
    await writer.drain()
    writer.write_eof()  # the client has nothing more to say
    try:
        raw = await asyncio.wait_for(reader.read(), WAIT)
    except ConnectionResetError:  # the server closed with unread bytes in its buffer
        raw = b""
    writer.close()
    await writer.wait_closed()
    return int(raw.split(b" ", 2)[1]) if raw else 0


async def still_serving(address: tuple[str, int]) -> None:
    assert (await get(address, "/metrics")).status == 200
    assert (await get(address, "/healthz")).status == 200


@pytest.mark.asyncio
@pytest.mark.parametrize("data", REFUSED)
async def test_garbage_is_refused_and_the_next_request_is_served(
    served: Served, data: bytes
) -> None:
    answered = await answer_to(served.address, data)
    assert answered == 0 or 400 <= answered < 500
    await still_serving(served.address)
    assert served.health.calls == [None]  # only the check above ran it


@pytest.mark.asyncio
async def test_a_flood_of_bad_requests_is_at_most_one_line_in_the_log(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for _ in range(20):
        assert await answer_to(served.address, b"\x00garbage\r\n\r\n") == 400
    await still_serving(served.address)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 1


@pytest.mark.asyncio
@pytest.mark.parametrize(("data", "status"), ODD)
async def test_odd_requests_are_answered_and_the_next_request_is_served(
    served: Served, data: bytes, status: int
) -> None:
    assert await answer_to(served.address, data) == status
    await still_serving(served.address)


@pytest.mark.asyncio
async def test_a_connection_serves_one_request_after_another(served: Served) -> None:
    reader, writer = await asyncio.open_connection(*served.address)
    try:
        for path in ("/metrics", "/healthz", "/nothing", "/metrics"):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode("ascii"))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await asyncio.wait_for(reader.readexactly(length), WAIT)
            assert head.split(b" ", 2)[1] == (b"404" if path == "/nothing" else b"200")
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.mark.asyncio
async def test_slow_client_times_out_and_does_not_hold_up_others(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(m, "REQUEST_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection(*served.address)
    writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the end of the head
    await writer.drain()
    assert (await get(served.address, "/healthz")).status == 200  # served meanwhile
    raw = await asyncio.wait_for(reader.read(), WAIT)
    assert raw.startswith(b"HTTP/1.1 408 ")
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio
async def test_a_head_sent_a_byte_at_a_time_still_times_out(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(m, "REQUEST_TIMEOUT", 0.5)
    reader, writer = await asyncio.open_connection(*served.address)
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def dribble() -> None:
        for byte in b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    dribbling = asyncio.create_task(dribble())
    try:
        raw = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        dribbling.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert raw.startswith(b"HTTP/1.1 408 ")
    assert loop.time() - started < 2.0
    await still_serving(served.address)


@pytest.mark.asyncio
async def test_idle_connections_are_closed(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(m, "REQUEST_TIMEOUT", 0.3)
    reader, writer = await asyncio.open_connection(*served.address)  # says nothing
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    await writer.wait_closed()
    reader, writer = await asyncio.open_connection(*served.address)  # one request, then nothing
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), WAIT)
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert raw.endswith(b"\r\n\r\nok\n")
    writer.close()
    await writer.wait_closed()


@pytest.mark.asyncio
async def test_many_concurrent_scrapes(served: Served) -> None:
    responses = await asyncio.gather(*(get(served.address, "/metrics") for _ in range(50)))
    assert {r.status for r in responses} == {200}


# --------------------------------------------------------------------------- lifecycle


@pytest.mark.asyncio
async def test_port_zero_binds_an_ephemeral_port_and_close_stops_serving() -> None:
    server = await m.serve_metrics(m.Metrics(), "127.0.0.1", 0, lambda: (True, ""))
    host, port = server.address
    assert host == "127.0.0.1"
    assert port > 0
    idle_reader, idle_writer = await asyncio.open_connection(host, port)  # left open
    await asyncio.wait_for(server.close(), WAIT)  # does not wait for the idle client
    assert await asyncio.wait_for(idle_reader.read(), WAIT) == b""
    idle_writer.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, port)
    with pytest.raises(RuntimeError):
        _ = server.address


@pytest.mark.asyncio
async def test_two_servers_with_their_own_metrics() -> None:
    first, second = m.Metrics(), m.Metrics()
    first.sent("udp")
    a = await m.serve_metrics(first, "127.0.0.1", 0, lambda: (True, ""))
    b = await m.serve_metrics(second, "127.0.0.1", 0, lambda: (False, "draining"))
    try:
        assert a.address != b.address
        assert b'pushsync_sends_total{gateway="udp"} 1.0' in (await get(a.address, "/metrics")).body
        assert b"pushsync_sends_total{" not in (await get(b.address, "/metrics")).body
        assert (await get(b.address, "/healthz")).body == b"draining\n"
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_address_in_use_is_an_oserror(served: Served) -> None:
    host, port = served.address
    with pytest.raises(OSError, match=r"(?i)address already in use"):
        await m.serve_metrics(m.Metrics(), host, port, lambda: (True, ""))
    await still_serving(served.address)


@pytest.mark.asyncio
async def test_signal_handlers_are_left_to_the_dispatcher() -> None:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    server = await m.serve_metrics(m.Metrics(), "127.0.0.1", 0, lambda: (True, ""))
    try:
        assert (await get(server.address, "/healthz")).status == 200
        assert {signum: signal.getsignal(signum) for signum in before} == before
    finally:
        await server.close()
    assert {signum: signal.getsignal(signum) for signum in before} == before
