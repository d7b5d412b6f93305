"""The sender: N distinct signed datagrams, a window of unacknowledged ones, timed to the last ack.

Acks are matched by the request id they carry (bytes 4..20 of an ack envelope,
as of a message envelope) so the sender costs the same against the listener
and the baseline; the listener's acks are verified after the timed part.
A message unacked for ``resend_after`` seconds without any progress is sent
again (counted as ``resent``: a drop somewhere, or a slow action).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pushsync.wire import protocol

_ID = slice(4, 20)


def make_datagrams(
    n: int, *, device: str, secret: bytes, subject: str = "sync", content: str = "bench"
) -> list[bytes]:
    """``n`` signed message envelopes, each with a fresh request id, valid for an hour."""
    now = time.time()
    return [
        protocol.encode_message(
            protocol.Message(
                request_id=uuid.uuid4(),
                device=device,
                subject=subject,
                content=content,
                sender="bench",
                priority="normal",
                created=now,
                expires=now + 3600,
            ),
            secret,
        )
        for _ in range(n)
    ]


@dataclass(frozen=True, slots=True)
class SendResult:
    messages: int
    acked: int
    resent: int
    extra_acks: int
    """Acks for a message already acked (the listener acks a resent duplicate again)."""
    seconds: float
    acks: tuple[bytes, ...]

    @property
    def rate(self) -> float:
        return self.acked / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.messages - self.acked


class _Sender(asyncio.DatagramProtocol):
    def __init__(self, datagrams: list[bytes], window: int, done: asyncio.Future[None]) -> None:
        self.datagrams = datagrams
        self.index = {d[_ID]: i for i, d in enumerate(datagrams)}
        self.acked = bytearray(len(datagrams))
        self.window = window
        self.done = done
        self.next = 0
        self.outstanding = 0
        self.acked_count = 0
        self.extra = 0
        self.resent = 0
        self.acks: list[bytes] = []
        self.progress = time.monotonic()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def fill(self) -> None:
        assert self.transport is not None
        datagrams, sendto = self.datagrams, self.transport.sendto
        while self.outstanding < self.window and self.next < len(datagrams):
            sendto(datagrams[self.next])
            self.next += 1
            self.outstanding += 1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        i = self.index.get(data[_ID])
        if i is None or self.acked[i]:
            self.extra += 1
            return
        self.acked[i] = 1
        self.acks.append(data)
        self.acked_count += 1
        self.outstanding -= 1
        self.progress = time.monotonic()
        if self.acked_count == len(self.datagrams):
            if not self.done.done():
                self.done.set_result(None)
            return
        self.fill()

    def resend_unacked(self) -> None:
        assert self.transport is not None
        for i in range(self.next):
            if not self.acked[i]:
                self.transport.sendto(self.datagrams[i])
                self.resent += 1
        self.progress = time.monotonic()

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable and the like: the resend timer covers it


async def send_all(
    datagrams: list[bytes],
    port: int,
    *,
    window: int,
    resend_after: float = 1.0,
    deadline: float = 300.0,
) -> SendResult:
    """Send every datagram to 127.0.0.1:``port`` keeping ``window`` unacked; wait for all acks."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    transport, sender = await loop.create_datagram_endpoint(
        lambda: _Sender(datagrams, window, done), remote_addr=("127.0.0.1", port)
    )
    try:
        started = time.perf_counter()
        sender.fill()
        limit = time.monotonic() + deadline
        while not done.done() and time.monotonic() < limit:
            await asyncio.wait([done], timeout=resend_after / 4)
            if not done.done() and time.monotonic() - sender.progress > resend_after:
                sender.resend_unacked()
        elapsed = time.perf_counter() - started
    finally:
        transport.close()
    return SendResult(
        messages=len(datagrams),
        acked=sender.acked_count,
        resent=sender.resent,
        extra_acks=sender.extra,
        seconds=elapsed,
        acks=tuple(sender.acks),
    )


def bad_acks(acks: tuple[bytes, ...], secret: bytes) -> int:
    """How many of ``acks`` are not valid signed ack envelopes."""
    bad = 0
    for data in acks:
        try:
            protocol.decode_ack(data, secret)
        except protocol.ProtocolError:
            bad += 1
    return bad
