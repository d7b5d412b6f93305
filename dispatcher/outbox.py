"""The outbox relay's store: claim due notifications, record what became of them.

:class:`OutboxStore` is the dispatcher's one data-access layer: every method
is one statement from the named blocks of ``sql/dispatcher.sql`` with its
parameters, run by an :class:`Executor`. The daemon's loops run it on their
async connection (:class:`ConnectionExecutor`: in the connection's current
transaction, or at once on an autocommit connection); the SYNC server and the
ack receivers on a small pool (:class:`PoolExecutor`, through
:class:`~pushsync.dispatcher.nodes.PoolStore`).

States and the claim contract are in ``docs/schema.md``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import psycopg
from psycopg.rows import AsyncRowFactory, RowMaker, tuple_row

from pushsync import queries

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

AsyncConn = psycopg.AsyncConnection[Any]
Params = Mapping[str, Any]
Row = TypeVar("Row")


def query(name: str) -> str:
    """The named block ``name`` of ``sql/dispatcher.sql``."""
    return queries.get(name, "dispatcher.sql")


@dataclass(frozen=True, kw_only=True)
class Claimed:
    """A notification claimed for sending, with what a sender needs to send it."""

    request_id: uuid.UUID
    rule: str
    device_id: str
    subject: str
    content: str
    priority: str
    gateway: str
    created_at: datetime
    expires_at: datetime
    attempts: int
    secret: bytes
    udp_address: str | None
    email_address: str | None
    mqtt_address: str | None = None
    """'on' when the device has an MQTT subscription on record (sql/0007_mqtt.sql)."""


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(Claimed) if f.default is not dataclasses.MISSING
}
_REQUIRED = frozenset(f.name for f in dataclasses.fields(Claimed)) - set(_DEFAULTS)


def _claimed_rows(cursor: psycopg.AsyncCursor[Any]) -> RowMaker[Claimed]:
    """psycopg's ``class_row(Claimed)``, without calling the frozen dataclass's
    ``__init__`` for each row (a keyword call that sets every field through
    ``object.__setattr__``): the fields are put in place at once, a few times
    cheaper, and the claim makes one per notification. ``Claimed`` has no
    ``__post_init__``, so the result is the same object. ValueError if a column
    is not a field or a field without a default has no column."""
    names = [column.name for column in cursor.description or ()]
    unknown = set(names) - _REQUIRED - set(_DEFAULTS)
    missing = _REQUIRED - set(names)
    if unknown or missing:
        raise ValueError(f"claimed rows: unknown columns {unknown}, missing columns {missing}")
    new = object.__new__

    def make(values: Sequence[Any]) -> Claimed:
        item: Claimed = new(Claimed)
        fields = item.__dict__
        fields.update(_DEFAULTS)
        fields.update(zip(names, values, strict=True))
        return item

    return make


assert not hasattr(Claimed, "__post_init__")  # noqa: S101  what _claimed_rows relies on
_CLAIMED: AsyncRowFactory[Claimed] = _claimed_rows


class Executor(Protocol):
    """Runs one statement: on an async connection, or on a connection from a pool."""

    async def execute(self, statement: str, params: Params) -> int:
        """Run ``statement``; the rows it changed."""

    async def fetch(
        self, statement: str, params: Params, row_factory: AsyncRowFactory[Row]
    ) -> list[Row]:
        """Run ``statement``; the rows it returned, made by ``row_factory``."""

    async def fetch_pair(
        self,
        first: tuple[str, Params],
        second: tuple[str, Params],
        row_factory: AsyncRowFactory[Row],
    ) -> tuple[list[tuple[Any, ...]], list[Row]]:
        """Run two statements in one round trip and one transaction (psycopg's pipeline
        mode): the first's rows as tuples, the second's made by ``row_factory``."""


class ConnectionExecutor:
    """:class:`Executor` on one connection, which no other task uses meanwhile."""

    def __init__(self, conn: AsyncConn) -> None:
        self.conn = conn

    async def execute(self, statement: str, params: Params) -> int:
        async with self.conn.cursor() as cur:
            await cur.execute(statement, params)
            return cur.rowcount

    async def fetch(
        self, statement: str, params: Params, row_factory: AsyncRowFactory[Row]
    ) -> list[Row]:
        async with self.conn.cursor(row_factory=row_factory) as cur:
            await cur.execute(statement, params)
            return await cur.fetchall()

    async def fetch_pair(
        self,
        first: tuple[str, Params],
        second: tuple[str, Params],
        row_factory: AsyncRowFactory[Row],
    ) -> tuple[list[tuple[Any, ...]], list[Row]]:
        conn = self.conn
        one = conn.cursor(row_factory=tuple_row)
        two = conn.cursor(row_factory=row_factory)
        async with conn.pipeline():
            async with conn.transaction():
                await one.execute(*first)
                await two.execute(*second)
            return await one.fetchall(), await two.fetchall()


class PoolExecutor:
    """:class:`Executor` on a pool of autocommit connections: each statement on the
    first free one, waiting up to ``timeout`` seconds for it."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConn], timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def execute(self, statement: str, params: Params) -> int:
        async with self.pool.connection(self.timeout) as conn:
            return await ConnectionExecutor(conn).execute(statement, params)

    async def fetch(
        self, statement: str, params: Params, row_factory: AsyncRowFactory[Row]
    ) -> list[Row]:
        async with self.pool.connection(self.timeout) as conn:
            return await ConnectionExecutor(conn).fetch(statement, params, row_factory)

    async def fetch_pair(
        self,
        first: tuple[str, Params],
        second: tuple[str, Params],
        row_factory: AsyncRowFactory[Row],
    ) -> tuple[list[tuple[Any, ...]], list[Row]]:
        async with self.pool.connection(self.timeout) as conn:
            return await ConnectionExecutor(conn).fetch_pair(first, second, row_factory)


class OutboxStore:
    """The statements of ``sql/dispatcher.sql`` as dispatcher ``owner``, on ``executor``.

    Rows are claimed under a lease of ``lease``; this dispatcher's heartbeat
    and SYNC connection records say it is alive for ``alive_for``.
    """

    def __init__(
        self,
        executor: Executor,
        owner: str,
        *,
        lease: timedelta = timedelta(seconds=30),
        alive_for: timedelta = timedelta(seconds=15),
    ) -> None:
        self.executor = executor
        self.owner = owner
        self.lease = lease
        self.alive_for = alive_for

    # ----------------------------------------------------------------- outbox

    async def claim(self, limit: int) -> list[Claimed]:
        """Up to ``limit`` due rows, now ``sending`` under this store's lease."""
        params = {"owner": self.owner, "limit": limit, "lease": self.lease}
        return await self.executor.fetch(query("claim"), params, _CLAIMED)

    async def claim_device(self, device: str, limit: int) -> list[Claimed]:
        """What ``device`` has not confirmed, due or not (it polled), now ``sending``."""
        params = {"owner": self.owner, "device_id": device, "limit": limit, "lease": self.lease}
        return await self.executor.fetch(query("claim_device"), params, _CLAIMED)

    async def sent(self, request_id: uuid.UUID, gateway: str) -> bool:
        """Record a send through ``gateway``; False if this owner no longer holds the row."""
        params = {"owner": self.owner, "request_id": request_id, "gateway": gateway}
        return await self.executor.execute(query("sent"), params) == 1

    async def sent_many(self, sends: list[tuple[uuid.UUID, str]]) -> set[uuid.UUID]:
        """Record several sends in one statement; the request ids recorded (this owner
        still held them, or they were confirmed already)."""
        rows = await self.executor.fetch(query("sent_many"), self._sends(sends), tuple_row)
        return {row[0] for row in rows}

    async def sent_then_claim(
        self, sends: list[tuple[uuid.UUID, str]], limit: int
    ) -> tuple[set[uuid.UUID], list[Claimed]]:
        """:meth:`sent_many`, then :meth:`claim`, in one round trip and one transaction;
        the request ids recorded and the rows claimed."""
        if not sends:
            return set(), await self.claim(limit)
        record = (query("sent_many"), self._sends(sends))
        claim = (query("claim"), {"owner": self.owner, "limit": limit, "lease": self.lease})
        rows, claimed = await self.executor.fetch_pair(record, claim, _CLAIMED)
        return {row[0] for row in rows}, claimed

    def _sends(self, sends: list[tuple[uuid.UUID, str]]) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "request_ids": [request_id for request_id, _ in sends],
            "gateways": [gateway for _, gateway in sends],
        }

    async def failed(self, request_id: uuid.UUID, error: str, *, final: bool) -> bool:
        """Record a failed send: ``final`` → ``failed``, else retried at the next resend."""
        return request_id in await self.failed_many([(request_id, error, final)])

    async def failed_many(self, failures: Sequence[tuple[uuid.UUID, str, bool]]) -> set[uuid.UUID]:
        """:meth:`failed` for several (request id, error, final) in one statement; the
        request ids recorded (those this owner still held)."""
        params = {
            "owner": self.owner,
            "request_ids": [request_id for request_id, _, _ in failures],
            "errors": [error for _, error, _ in failures],
            "finals": [final for _, _, final in failures],
        }
        rows = await self.executor.fetch(query("failed_many"), params, tuple_row)
        return {row[0] for row in rows}

    async def due_now(self, devices: Sequence[str]) -> int:
        """Make the rows of ``devices`` that wait for a resend due now; how many."""
        return await self.executor.execute(query("due_now"), {"device_ids": list(devices)})

    async def mine(self) -> set[uuid.UUID]:
        """The rows leased to this owner (after a reconnect: also claims whose result was lost)."""
        rows = await self.executor.fetch(query("mine"), {"owner": self.owner}, tuple_row)
        return {row[0] for row in rows}

    async def release(self, request_ids: Iterable[uuid.UUID]) -> int:
        """Give back rows this owner holds, unsent; how many were given back."""
        params = {"owner": self.owner, "request_ids": list(request_ids)}
        return await self.executor.execute(query("release"), params)

    async def confirm(self, request_id: uuid.UUID, device_id: str) -> bool:
        """``device_id`` has the message; False if it is not that device's or not sent."""
        params = {"request_id": request_id, "device_id": device_id}
        rows = await self.executor.fetch(query("confirm"), params, tuple_row)
        return bool(rows and rows[0][0])

    async def confirm_many(self, acks: Sequence[tuple[uuid.UUID, str]]) -> set[uuid.UUID]:
        """:meth:`confirm` for several (request id, device) acks in one statement; the
        request ids confirmed, now or before."""
        params = {
            "request_ids": [request_id for request_id, _ in acks],
            "device_ids": [device for _, device in acks],
        }
        rows = await self.executor.fetch(query("confirm_many"), params, tuple_row)
        return {row[0] for row in rows}

    async def expire(self) -> int:
        """Mark rows past their ``expires_at`` as ``expired``; how many."""
        return await self.executor.execute(query("expire"), {})

    async def archive(self, batch: int) -> int:
        """Move up to ``batch`` finished rows to ``outbox_history``; how many."""
        return await self.executor.execute(query("archive"), {"batch": batch})

    async def prune(self, keep: timedelta) -> bool:
        """Forget changes and upload batches older than ``keep``; True if any were."""
        return await self.executor.execute(query("prune_changes"), {"keep": keep}) > 0

    # ----------------------------------------------------------------- devices

    async def secret(self, device: str) -> bytes | None:
        """The secret of an enabled device, None if there is no such enabled device.

        Always from the database: SYNC authentication asks here, so that a device
        disabled a moment ago is refused, and a device seen recently answers no
        faster than an unknown one.
        """
        rows = await self.executor.fetch(query("device_secret"), {"device_id": device}, tuple_row)
        return bytes(rows[0][0]) if rows else None

    async def revoked(self, held: Sequence[tuple[str, bytes | None]]) -> list[str]:
        """Of the (device, secret it authenticated with) pairs ``held``, the devices
        disabled, removed, or given another secret since (None: not authenticated yet)."""
        params = {"device_ids": [d for d, _ in held], "secrets": [s for _, s in held]}
        rows = await self.executor.fetch(query("devices_revoked"), params, tuple_row)
        return [str(row[0]) for row in rows]

    async def track(self, device: str, address: str) -> None:
        """Record ``address`` as the device's tracked UDP endpoint."""
        await self.executor.execute(query("track"), {"device_id": device, "address": address})

    # ----------------------------------------------------------------- this dispatcher

    async def heartbeat(self, sync_address: str | None, udp_address: str | None) -> None:
        """This dispatcher is alive for ``alive_for`` from now, reachable at these addresses."""
        params = {**self._node(), "sync_address": sync_address, "udp_address": udp_address}
        await self.executor.execute(query("heartbeat"), params)

    async def connected(self, device: str, peer: str) -> None:
        """Record that this dispatcher now holds ``device``'s connection from ``peer``."""
        params = {**self._node(), "device_id": device, "peer": peer}
        await self.executor.execute(query("sync_connected"), params)

    async def disconnected(self, device: str, peer: str) -> None:
        """Forget this dispatcher's record of ``device``'s connection from ``peer``."""
        params = {"device_id": device, "owner": self.owner, "peer": peer}
        await self.executor.execute(query("sync_disconnected"), params)

    async def gone(self) -> None:
        """This dispatcher stops: remove its row and its connection records."""
        await self.executor.execute(query("dispatcher_gone"), {"owner": self.owner})

    def _node(self) -> dict[str, Any]:
        """Who this dispatcher is, as ``heartbeat`` and ``sync_connected`` record it."""
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "alive_for": self.alive_for,
        }


__all__ = [
    "Claimed",
    "ConnectionExecutor",
    "Executor",
    "OutboxStore",
    "PoolExecutor",
    "query",
]
