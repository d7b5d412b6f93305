"""What the listeners' ``socket`` actions report: each sends ``DEVICE REQUEST_ID`` to a
TCP server of the test, which notes it with the wall-clock time it arrived.

A process per message, at the rates of the reliability tests, would load the
machine instead of the system under test; a socket action costs a connection.
"""

from __future__ import annotations

import socketserver
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager


class Collector(socketserver.ThreadingTCPServer):
    """Notes every ``DEVICE REQUEST_ID`` sent to it, with the time it arrived."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024
    """Bursts of actions connect at once; the default backlog (5) would lose some of them."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Take)
        self.lock = threading.Lock()
        self.received: list[tuple[str, str, float]] = []

    @property
    def address(self) -> tuple[str, int]:
        """Where a listener's ``socket`` action sends."""
        return "127.0.0.1", int(self.server_address[1])

    def take(self, text: str) -> None:
        device, _, request_id = text.strip().partition(" ")
        with self.lock:
            self.received.append((device, request_id, time.time()))

    def ran(self, device: str) -> list[str]:
        """The request ids ``device`` ran its action for, in the order they arrived."""
        with self.lock:
            return [r for d, r, _ in self.received if d == device]

    def request_ids(self) -> list[str]:
        with self.lock:
            return [r for _, r, _ in self.received]

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def first(self, request_ids: set[uuid.UUID] | None = None, after: float = 0.0) -> float | None:
        """When the first action (of ``request_ids``, if given) after ``after`` ran."""
        wanted = None if request_ids is None else {str(i) for i in request_ids}
        with self.lock:
            times = [
                at for _, r, at in self.received if at > after and (wanted is None or r in wanted)
            ]
        return min(times, default=None)


class _Take(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, Collector)
        self.server.take(self.rfile.read(4096).decode("ascii", errors="replace"))


@contextmanager
def collecting() -> Iterator[Collector]:
    """A :class:`Collector` serving in a thread until the block ends."""
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
