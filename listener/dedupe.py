"""The dedupe store: which messages this device has already taken, across restarts.

Delivery is at least once, so the runtime runs a message's actions only when
:meth:`DedupeStore.remember` says its request id is new. The store is one SQLite
file in the listener's ``state_dir``, durable before the action runs; see
:class:`DedupeStore` and ``docs/listener.md`` ("Running").
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

from pushsync.errors import PushsyncError

FILE_NAME: Final = "dedupe.sqlite3"
"""The store's file name inside ``state_dir``."""

DEFAULT_GRACE: Final = 300.0
"""Seconds an id is kept after its message expired: room for clocks that disagree."""

BUSY_TIMEOUT: Final = 10.0
"""Seconds to wait for another process holding the file's write lock."""

MAX_BATCH: Final = 1024
"""Most ids :class:`GroupCommit` puts into one commit."""

GATHER_TURNS: Final = 2
"""Turns of the event loop between two looks for ids that joined the next commit."""

_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS seen ("
    " request_id TEXT PRIMARY KEY,"
    " expires REAL NOT NULL"
    ") WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS seen_expires ON seen (expires)",
)


class DedupeError(PushsyncError):
    """The dedupe store could not be opened or used."""


RequestId = uuid.UUID | str


def _key(request_id: RequestId) -> str:
    """The canonical text of a request id: a UUID in lower case, hyphenated."""
    if isinstance(request_id, uuid.UUID):
        return str(request_id)
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        return request_id


class DedupeStore:
    """Request ids already taken, in the SQLite file ``path``.

    WAL mode with ``synchronous=FULL``: an id :meth:`remember` reported as new
    is on disk before the action runs, so not even a power cut makes it run
    twice. Each write transaction syncs the file once, whatever it holds:
    :meth:`remember_many` takes many ids in one, and :class:`GroupCommit` makes
    that the rule for a busy listener (:attr:`commits` counts them).
    :meth:`forget_expired` keeps the file small. One connection,
    usable from any thread, serialised by a lock (the runtime calls it from an
    executor thread). Every SQLite failure, including a file that is not a
    database, is raised as :class:`DedupeError`.

    Use :meth:`in_state_dir` to open the listener's store. A context manager:
    ``with DedupeStore(path) as store: ...`` closes it.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.commits = 0
        """Transactions of :meth:`remember_many` committed (each one sync to disk)."""
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        try:
            connection = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,  # autocommit: every statement is its own transaction
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise DedupeError(f"cannot open the dedupe store {self.path}: {exc}") from None
        try:
            mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()
            connection.execute("PRAGMA synchronous=FULL")
            for statement in _SCHEMA:
                connection.execute(statement)
        except sqlite3.Error as exc:
            connection.close()
            raise DedupeError(
                f"cannot use the dedupe store {self.path}: {exc} "
                "(move the file away and the listener starts a new one)"
            ) from None
        if mode is None or str(mode[0]).lower() != "wal":
            connection.close()
            raise DedupeError(f"cannot use the dedupe store {self.path}: WAL mode refused")
        self._connection = connection

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> DedupeStore:
        """The store in the listener's ``state_dir``, created (with the directory) if missing."""
        directory = Path(state_dir)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DedupeError(f"cannot create the state directory {directory}: {exc}") from None
        return cls(directory / FILE_NAME)

    # ------------------------------------------------------------------ queries

    def seen(self, request_id: RequestId) -> bool:
        """Whether ``request_id`` was remembered (and not forgotten since)."""
        rows = self._query("SELECT 1 FROM seen WHERE request_id = ?", (_key(request_id),))
        return bool(rows)

    def remember(self, request_id: RequestId, expires: float) -> bool:
        """Record ``request_id``; ``True`` only the first time, atomically.

        Whatever the threads or processes racing on one file, exactly one
        caller gets ``True`` for an id.
        """
        return self.remember_many([(request_id, expires)])[0]

    def remember_many(self, entries: Sequence[tuple[RequestId, float]]) -> list[bool]:
        """:meth:`remember` for several ids in one transaction: one sync to disk for all.

        An id given twice is new only the first time.
        """
        with self._lock:
            connection = self._open()
            firsts: list[bool] = []
            try:
                connection.execute("BEGIN IMMEDIATE")
                try:
                    for request_id, expires in entries:
                        connection.execute(
                            "INSERT OR IGNORE INTO seen (request_id, expires) VALUES (?, ?)",
                            (_key(request_id), float(expires)),
                        )
                        (changes,) = connection.execute("SELECT changes()").fetchone()
                        firsts.append(changes == 1)
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
                self.commits += 1
            except sqlite3.Error as exc:
                raise DedupeError(f"dedupe store {self.path}: {exc}") from None
        return firsts

    def forget_expired(self, now: float, grace: float = DEFAULT_GRACE) -> int:
        """Drop the ids whose expiry plus ``grace`` seconds is before ``now``; how many."""
        with self._lock:
            connection = self._open()
            try:
                cursor = connection.execute(
                    "DELETE FROM seen WHERE expires < ?", (float(now) - float(grace),)
                )
            except sqlite3.Error as exc:
                raise DedupeError(f"dedupe store {self.path}: {exc}") from None
            return cursor.rowcount

    def __len__(self) -> int:
        ((count,),) = self._query("SELECT count(*) FROM seen", ())
        if not isinstance(count, int):
            raise DedupeError(f"dedupe store {self.path}: count(*) gave {count!r}")
        return count

    # ------------------------------------------------------------------ lifetime

    @property
    def closed(self) -> bool:
        return self._connection is None

    def close(self) -> None:
        """Close the file; closing twice is fine. The store cannot be used afterwards."""
        with self._lock:
            connection, self._connection = self._connection, None
            if connection is not None:
                connection.close()

    def __enter__(self) -> DedupeStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            raise DedupeError(f"dedupe store {self.path} is closed")
        return self._connection

    def _query(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[object, ...]]:
        """All rows of one statement, fetched under the lock."""
        with self._lock:
            connection = self._open()
            try:
                return connection.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise DedupeError(f"dedupe store {self.path}: {exc}") from None


class GroupCommit:
    """Remembers ids for an asyncio program: one durable commit for many messages.

    The commit runs in a worker thread while the event loop goes on taking
    messages, and the next commit takes every id that arrived meanwhile.
    Before a commit starts, the writer lets the loop run on for as long as each
    turn brings more ids, so that messages already read off a socket but not
    yet at this point join it too: a listener with 64 messages in flight syncs
    its file once or twice per 64 messages, not once per message. At most
    ``max_batch`` ids go into one commit, so a flood cannot hold a commit back.

    Each caller learns whether its id is new only after the commit that holds
    it: an action runs, and an ack goes out, only for an id already on disk.
    """

    def __init__(self, store: DedupeStore, *, max_batch: int = MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, not {max_batch}")
        self.store = store
        self.max_batch = max_batch
        self._waiting: list[tuple[RequestId, float, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def remember(self, request_id: RequestId, expires: float) -> bool:
        """Whether ``request_id`` is new, once it is durably recorded (see the class)."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiting.append((request_id, expires, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())
        return await done

    async def _write(self) -> None:
        while self._waiting:
            await self._gather()
            batch = self._waiting[: self.max_batch]
            del self._waiting[: len(batch)]
            entries = [(request_id, expires) for request_id, expires, _ in batch]
            try:
                firsts = await asyncio.to_thread(self.store.remember_many, entries)
            except Exception as exc:
                for _, _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            except asyncio.CancelledError:  # the loop is closing: nobody waits in vain
                for _, _, done in batch:
                    done.cancel()
                raise
            for (_, _, done), first in zip(batch, firsts, strict=True):
                if not done.done():
                    done.set_result(first)

    async def _gather(self) -> None:
        """Let the event loop run while it keeps bringing ids, up to ``max_batch``.

        A datagram read in one turn of the loop reaches :meth:`remember` in the
        task it starts, which runs in the next turn: so the writer looks every
        second turn, and stops at the first look that finds nothing new.
        """
        count = -1
        while count != len(self._waiting) and len(self._waiting) < self.max_batch:
            count = len(self._waiting)
            for _ in range(GATHER_TURNS):
                await asyncio.sleep(0)
