"""What the SYNC server writes and reads per device, in batches.

Every device that authenticates needs its secret looked up; every device that
subscribes, leaves, or reports a UDP endpoint needs a record written. One
statement each means a round trip each, on a pool of a few connections: ten
thousand devices connecting at once queue twenty thousand statements, and
each handshake waits behind the others'. Here requests gather while the
previous batch is at the database, and each batch is one statement (lookups)
or one transaction (records), whatever its size — group commit.

:class:`Pending` is a batch of records, and decides (without I/O) what a later
record of a device does to an earlier one still waiting; :class:`Recorder`
and :class:`Lookups` are the shells that write and read batches through the
functions they are given (``pushsync.dispatcher.nodes`` gives them SQL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from pushsync.db import first_line
from pushsync.logs import Throttle

logger = logging.getLogger(__name__)

RETRY_FIRST: Final = 0.2
"""Seconds before a batch that failed for want of the database is written again."""
RETRY_MAX: Final = 5.0


@dataclass(frozen=True, slots=True)
class Connect:
    """A device subscribed on connection ``peer`` at ``since`` (this dispatcher's clock)."""

    peer: str
    since: datetime


@dataclass(slots=True)
class Pending:
    """Records not written yet, as one batch writes them: connections first, then
    UDP endpoints, then disconnections.

    A device's later record decides what becomes of an earlier one in the same
    batch: a newer connection replaces an older one; a disconnection of the
    connection whose record is still waiting takes that record out (the
    connection is gone: writing it would take the device back from a
    dispatcher it has moved to since); a connection cancels a waiting
    disconnection of the same peer. Disconnections of other peers stay, and
    are harmless after the connection's record, which they do not match.
    """

    connects: dict[str, Connect] = field(default_factory=dict)
    disconnects: dict[str, set[str]] = field(default_factory=dict)
    """Device → the peers whose records to delete (only if still this dispatcher's)."""
    tracks: dict[str, str] = field(default_factory=dict)
    """Device → the newest UDP endpoint it reported."""

    def __len__(self) -> int:
        return len(self.connects) + len(self.disconnects) + len(self.tracks)

    def connected(self, device: str, peer: str, since: datetime) -> None:
        peers = self.disconnects.get(device)
        if peers is not None:
            peers.discard(peer)
            if not peers:
                del self.disconnects[device]
        self.connects[device] = Connect(peer, since)

    def disconnected(self, device: str, peer: str) -> None:
        waiting = self.connects.get(device)
        if waiting is not None and waiting.peer == peer:
            del self.connects[device]
        self.disconnects.setdefault(device, set()).add(peer)

    def tracked(self, device: str, address: str) -> None:
        self.tracks[device] = address

    def disconnect_pairs(self) -> list[tuple[str, str]]:
        """(device, peer) for each disconnection, sorted."""
        return sorted(
            (device, peer) for device, peers in self.disconnects.items() for peer in peers
        )


Write = Callable[[Pending], Awaitable[None]]
Read = Callable[[list[str]], Awaitable[dict[str, bytes]]]


class Recorder:
    """Writes :class:`Pending` batches with ``write``, one at a time, in order.

    A record joins the open batch and its caller waits until that batch is
    written. A batch that fails with one of ``retry_on`` (the database is
    away, a deadlock) is written again after a backoff, before any later
    batch; any other failure is logged once for the batch and the batch
    dropped. After :meth:`close`, records are ignored: the dispatcher is
    leaving and removes its connection records itself.
    """

    def __init__(
        self,
        write: Write,
        *,
        retry_on: tuple[type[BaseException], ...] = (),
        retry_first: float = RETRY_FIRST,
    ) -> None:
        self._write = write
        self._retry_on = retry_on
        self._retry_first = retry_first
        self._open = Pending()
        self._open_done: asyncio.Future[None] | None = None
        self._writing: asyncio.Future[None] | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.throttle = Throttle(logger)
        self.batches = 0
        """Batches written (a retried batch counts once)."""

    async def connected(self, device: str, peer: str, since: datetime) -> None:
        await self._join(lambda batch: batch.connected(device, peer, since))

    async def disconnected(self, device: str, peer: str) -> None:
        await self._join(lambda batch: batch.disconnected(device, peer))

    async def tracked(self, device: str, address: str) -> None:
        await self._join(lambda batch: batch.tracked(device, address))

    async def flush(self) -> None:
        """Until everything recorded so far is written (or dropped)."""
        waiting = self._open_done if self._open else self._writing
        if waiting is not None:
            await asyncio.shield(waiting)

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109  bounds the last writes
        """Write what is waiting (for at most ``timeout`` seconds), then ignore records."""
        self._closed = True
        self._ready.set()
        task = self._task
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.shield(task)
        if task.done():
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        lost = len(self._open)
        self._open = Pending()
        for waiting in (self._writing, self._open_done):
            if waiting is not None and not waiting.done():
                waiting.set_result(None)
        logger.warning(
            "sync: stopped with connection records not written (%d waiting, and a batch "
            "being written): the database did not answer",
            lost,
        )

    async def _join(self, add: Callable[[Pending], None]) -> None:
        if self._closed:
            return
        add(self._open)
        if self._open_done is None:
            self._open_done = asyncio.get_running_loop().create_future()
        done = self._open_done
        self._ready.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pushsync sync records")
        await asyncio.shield(done)

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            if not self._open:
                if self._closed:
                    return
                continue
            batch, done = self._open, self._open_done
            self._open, self._open_done = Pending(), None
            self._writing = done
            try:
                await self._write_batch(batch)
            finally:
                self._writing = None
                if done is not None and not done.done():
                    done.set_result(None)
            self._ready.set()  # records that arrived meanwhile

    async def _write_batch(self, batch: Pending) -> None:
        delay = self._retry_first
        while True:
            try:
                await self._write(batch)
            except self._retry_on as exc:
                self.throttle.warning(
                    "sync: cannot record %d connections yet (retrying): %s",
                    len(batch),
                    first_line(exc),
                    key="records retry",
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
            except Exception as exc:
                logger.warning(
                    "sync: cannot record %d connections: %s", len(batch), first_line(exc)
                )
                return
            else:
                self.batches += 1
                return


class Lookups:
    """Secrets read in batches with ``read`` (device ids → the secrets found).

    Each caller waits for the batch it joined; a device the read did not
    return gets None. A failed read fails every caller of that batch.
    """

    def __init__(self, read: Read) -> None:
        self._read = read
        self._waiting: dict[str, list[asyncio.Future[bytes | None]]] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    async def secret(self, device: str) -> bytes | None:
        answer: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(device, []).append(answer)
        self._ready.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pushsync secret lookups")
        return await answer

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        waiting, self._waiting = self._waiting, {}
        for answer in _flatten(waiting.values()):
            if not answer.done():
                answer.set_exception(ConnectionError("the dispatcher is stopping"))

    async def _run(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            waiting, self._waiting = self._waiting, {}
            if not waiting:
                continue
            try:
                found = await self._read(sorted(waiting))
            except Exception as exc:
                for answer in _flatten(waiting.values()):
                    if not answer.done():
                        answer.set_exception(exc)
                continue
            except BaseException:
                for answer in _flatten(waiting.values()):
                    answer.cancel()
                raise
            self.batches += 1
            for device, answers in waiting.items():
                secret = found.get(device)
                for answer in answers:
                    if not answer.done():
                        answer.set_result(secret)


def _flatten(
    groups: Iterable[list[asyncio.Future[bytes | None]]],
) -> list[asyncio.Future[bytes | None]]:
    return [item for group in groups for item in group]


__all__ = ["Connect", "Lookups", "Pending", "Recorder"]
