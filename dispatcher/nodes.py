"""The dispatcher's bookkeeping in the database: who is alive, who holds which connection.

:class:`PoolStore` runs the statements the SYNC server and the ack receivers
need (``sql/dispatcher.sql``) on a small ``psycopg_pool.AsyncConnectionPool``,
so that a handshake, a TRACK or a poll never waits behind the send loop's
claim, and a dropped database connection is replaced by the pool.

Every dispatcher heartbeats into ``pushsync.dispatchers``; the claim leaves
rows for a device whose SYNC connection another *live* dispatcher holds to
that dispatcher (``pushsync.sync_connections``). A dispatcher that dies stops
heartbeating: after ``alive_for`` the others claim its devices' rows again
(over UDP or email: the device reconnects to some dispatcher soon after).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from datetime import timedelta
from typing import Any, Final

import psycopg
from psycopg.rows import class_row
from psycopg_pool import AsyncConnectionPool

from pushsync.dispatcher.outbox import Claimed, query

logger = logging.getLogger(__name__)

SECRET_CACHE_SECONDS: Final = 60.0
"""How long a secret that came with a claimed row verifies that device's UDP acks."""


class PoolStore:
    """Implements :class:`~pushsync.dispatcher.sync_server.SyncStore` on a connection pool."""

    def __init__(
        self,
        dsn: str,
        owner: str,
        *,
        lease: timedelta = timedelta(seconds=30),
        alive_for: timedelta = timedelta(seconds=15),
        max_size: int = 4,
        timeout: float = 5.0,
    ) -> None:
        self.owner = owner
        self.lease = lease
        self.alive_for = alive_for
        self.timeout = timeout
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True},
            open=False,
            name="pushsync-dispatcher",
            check=AsyncConnectionPool.check_connection,  # a connection the server dropped
            reconnect_timeout=0,  # keep trying: the database may be away for a while
        )
        self._secrets: dict[str, tuple[float, bytes | None]] = {}

    async def open(self) -> None:
        """Start the pool without waiting for the database (it may not be up yet)."""
        await self.pool.open(wait=False)

    async def close(self, timeout: float = 5.0) -> None:
        await self.pool.close(timeout)

    # ----------------------------------------------------------------- secrets

    def cached_secret(self, device: str) -> bytes | None:
        """The secret the last claim brought for ``device``, if recent: verifies UDP acks
        without a query. Forgotten when the device loses access (:meth:`forget_secret`)."""
        found = self._secrets.get(device)
        if found is None or found[0] < time.monotonic():
            return None
        return found[1]

    def forget_secrets(self) -> None:
        self._secrets.clear()

    def forget_secret(self, device: str) -> None:
        self._secrets.pop(device, None)

    def remember_secret(self, device: str, secret: bytes) -> None:
        if len(self._secrets) > 100_000:
            self._secrets.clear()
        self._secrets[device] = (time.monotonic() + SECRET_CACHE_SECONDS, secret)

    async def secret(self, device: str) -> bytes | None:
        """The secret of an enabled device, always from the database.

        Authentication asks here: no cache, so that a device disabled a moment
        ago is refused, and a device seen recently answers no faster than an
        unknown one.
        """
        row = await self._one(query("device_secret"), {"device_id": device})
        return bytes(row[0]) if row else None

    async def revoked(self, devices: list[str]) -> list[str]:
        """Those of ``devices`` that are disabled or gone."""
        async with self.pool.connection(self.timeout) as conn:
            cur = await conn.execute(query("devices_revoked"), {"device_ids": devices})
            return [str(row[0]) for row in await cur.fetchall()]

    # ----------------------------------------------------------------- connections

    async def connected(self, device: str, peer: str) -> None:
        await self._run(query("sync_connected"), self.connected_params(device, peer))

    def node_params(self) -> dict[str, Any]:
        """Who this dispatcher is, as ``heartbeat`` and ``sync_connected`` record it."""
        return {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "alive_for": self.alive_for,
        }

    def connected_params(self, device: str, peer: str) -> dict[str, Any]:
        """The parameters of ``sync_connected`` (the daemon runs it too, after a reconnect)."""
        return {**self.node_params(), "device_id": device, "peer": peer}

    async def disconnected(self, device: str, peer: str) -> None:
        await self._run(
            query("sync_disconnected"), {"device_id": device, "owner": self.owner, "peer": peer}
        )

    async def track(self, device: str, address: str) -> None:
        await self._run(query("track"), {"device_id": device, "address": address})

    async def gone(self) -> None:
        """This dispatcher stops: remove its row and its connection records."""
        await self._run(query("dispatcher_gone"), {"owner": self.owner})

    # ----------------------------------------------------------------- outbox

    async def claim_device(self, device: str, limit: int) -> list[Claimed]:
        params = {"owner": self.owner, "device_id": device, "limit": limit, "lease": self.lease}
        async with self.pool.connection(self.timeout) as conn:
            async with conn.cursor(row_factory=class_row(Claimed)) as cur:
                await cur.execute(query("claim_device"), params)
                return await cur.fetchall()

    async def sent(self, request_id: uuid.UUID, gateway: str) -> bool:
        params = {"owner": self.owner, "request_id": request_id, "gateway": gateway}
        return await self._run(query("sent"), params) == 1

    async def failed(self, request_id: uuid.UUID, error: str, *, final: bool) -> bool:
        params = {"owner": self.owner, "request_id": request_id, "error": error, "final": final}
        return await self._run(query("failed"), params) == 1

    # ----------------------------------------------------------------- helpers

    async def _run(self, sql: str, params: dict[str, Any]) -> int:
        async with self.pool.connection(self.timeout) as conn:
            cur = await conn.execute(sql, params)
            return cur.rowcount

    async def _one(self, sql: str, params: dict[str, Any]) -> tuple[Any, ...] | None:
        async with self.pool.connection(self.timeout) as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchone()


__all__ = ["PoolStore"]
