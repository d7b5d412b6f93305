"""uvicorn on sockets of our own and the caller's event loop (``/metrics``, the console)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn


class HttpServer(uvicorn.Server):
    """uvicorn's server, leaving signals to whoever runs the loop, saying when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()

    async def start(self, sockets: list[socket.socket], *, name: str) -> asyncio.Task[None]:
        """Serve on ``sockets`` in a task named ``name``, returned once listening.

        Raises what stopped the server if it stopped before listening (the task
        is then over, or cancelled if the start itself was). The sockets stay
        the caller's to close.
        """
        serving = asyncio.create_task(self.serve(sockets), name=name)
        started = asyncio.create_task(self.listening.wait())
        try:
            await asyncio.wait((serving, started), return_when=asyncio.FIRST_COMPLETED)
            if not self.listening.is_set():
                serving.result()  # raises what stopped it
                raise RuntimeError(f"the HTTP server {name!r} stopped while starting")
        except BaseException:
            serving.cancel()
            raise
        finally:
            started.cancel()
        return serving


__all__ = ["HttpServer"]
