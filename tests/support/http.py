"""A plain HTTP/1.1 client on a real socket, for the web console's tests.

One request per connection (``Connection: close``), the head and body read raw,
so a test sees exactly what the server sent; :func:`first_events` reads the
beginning of a server-sent event stream and hangs up.
"""

from __future__ import annotations

import asyncio
import json
import ssl as ssl_
from dataclasses import dataclass
from typing import Any

WAIT = 10.0


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def _request(path: str, host: str, headers: dict[str, str] | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers


async def get(
    address: tuple[str, int],
    path: str,
    headers: dict[str, str] | None = None,
    *,
    host: str | None = None,
    tls: ssl_.SSLContext | None = None,
) -> Answer:
    """``GET path`` (inside TLS with ``tls``); the whole answer (the server closes after it)."""
    reader, writer = await asyncio.open_connection(*address, ssl=tls)
    try:
        writer.write(_request(path, host or f"{address[0]}:{address[1]}", headers))
        raw = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    if not raw:
        raise ConnectionError("the server closed the connection without an answer")
    head, _, body = raw.partition(b"\r\n\r\n")
    status, found = _head(head)
    if found.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return Answer(status, found, body)


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


class EventStream:
    """An open ``GET /events``: :meth:`next` is the data of the next ``pulse`` event."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self._buffer = b""

    @classmethod
    async def open(
        cls, address: tuple[str, int], headers: dict[str, str] | None = None
    ) -> EventStream:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(_request("/events", f"{address[0]}:{address[1]}", headers))
        stream = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
        stream.status, stream.headers = _head(head[:-4])
        return stream

    async def next(self, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109  a deadline for one event
        async with asyncio.timeout(timeout):
            while True:
                event, sep, rest = self._buffer.partition(b"\n\n")
                if sep:
                    self._buffer = rest
                    data = _pulse_data(event)
                    if data is not None:
                        return data
                    continue
                self._buffer += await self._chunk()

    async def _chunk(self) -> bytes:
        """The next chunk of the chunked body."""
        size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            raise ConnectionError("the event stream ended")
        return (await self.reader.readexactly(size + 2))[:-2]

    async def close(self) -> None:
        self.writer.close()


def _pulse_data(event: bytes) -> dict[str, Any] | None:
    fields = dict(line.split(b": ", 1) for line in event.strip().split(b"\n") if b": " in line)
    if fields.get(b"event") != b"pulse":
        return None
    result: dict[str, Any] = json.loads(fields[b"data"])
    return result
