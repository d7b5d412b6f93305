"""The dispatcher's bookkeeping in the database: who is alive, who holds which connection.

:class:`PoolStore` is the dispatcher's store
(:class:`~pushsync.dispatcher.outbox.OutboxStore`) on a small
``psycopg_pool.AsyncConnectionPool``, for the SYNC server and the ack
receivers, so that a handshake, a TRACK or a poll never waits behind the send
loop's claim, and a dropped database connection is replaced by the pool. It
also keeps the secrets that came with claimed rows, to verify UDP acks.

Every dispatcher heartbeats into ``pushsync.dispatchers``; the claim leaves
rows for a device whose SYNC connection another *live* dispatcher holds to
that dispatcher (``pushsync.sync_connections``). A dispatcher that dies stops
heartbeating: after ``alive_for`` the others claim its devices' rows again
(over UDP or email: the device reconnects to some dispatcher soon after).
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Final

from psycopg_pool import AsyncConnectionPool

from pushsync.dispatcher.outbox import AsyncConn, OutboxStore, PoolExecutor

logger = logging.getLogger(__name__)

SECRET_CACHE_SECONDS: Final = 60.0
"""How long a secret that came with a claimed row verifies that device's UDP acks."""


class PoolStore(OutboxStore):
    """Implements :class:`~pushsync.dispatcher.connections.ConnectionStore` on a connection pool."""

    def __init__(
        self,
        dsn: str,
        owner: str,
        *,
        lease: timedelta | None = None,
        alive_for: timedelta | None = None,
        max_size: int = 4,
        timeout: float = 5.0,
    ) -> None:
        self.pool: AsyncConnectionPool[AsyncConn] = AsyncConnectionPool(
            dsn,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True},
            open=False,
            name="pushsync-dispatcher",
            check=AsyncConnectionPool.check_connection,  # a connection the server dropped
            reconnect_timeout=0,  # keep trying: the database may be away for a while
        )
        executor = PoolExecutor(self.pool, timeout)
        # None: the store's own default (the daemon passes its settings' values).
        given = {"lease": lease, "alive_for": alive_for}
        super().__init__(executor, owner, **{k: v for k, v in given.items() if v is not None})
        self._secrets: dict[str, tuple[float, bytes | None]] = {}

    async def open(self) -> None:
        """Start the pool without waiting for the database (it may not be up yet)."""
        await self.pool.open(wait=False)

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109  passed to the pool's close(timeout)
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


__all__ = ["PoolStore"]
