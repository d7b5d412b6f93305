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

The SYNC server's secret lookups and its connection records (connected,
disconnected, tracked UDP endpoint) go through batches
(:mod:`pushsync.dispatcher.records`, ``sql/connections.sql``): whatever
arrives while one batch is at the database goes in the next, in one
statement, so ten thousand devices connecting at once cost a few dozen round
trips, not twenty thousand.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Final

import psycopg
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

from pushsync import queries
from pushsync.dispatcher.outbox import AsyncConn, OutboxStore, PoolExecutor, query
from pushsync.dispatcher.records import Lookups, Pending, Recorder

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
        self.timeout = timeout
        self._secrets: dict[str, tuple[float, bytes | None]] = {}
        self.lookups = Lookups(self._read_secrets)
        self.records = Recorder(
            self._write_records,
            retry_on=(psycopg.OperationalError,),  # the database away, a deadlock, the pool
        )

    async def open(self) -> None:
        """Start the pool without waiting for the database (it may not be up yet)."""
        await self.pool.open(wait=False)

    async def close(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109  passed to the pool's close(timeout)
        """Write the connection records waiting (for at most ``timeout``), then close."""
        await self.records.close(timeout)
        await self.lookups.close()
        await self.pool.close(timeout)

    # ----------------------------------------------------------------- SYNC connections

    async def secret(self, device: str) -> bytes | None:
        """As :meth:`OutboxStore.secret` (always from the database), in a batch with the
        lookups of the other handshakes under way."""
        return await self.lookups.secret(device)

    async def connected(self, device: str, peer: str) -> None:
        """Record, in the next batch, that this dispatcher holds ``device``'s connection
        from ``peer`` as of now; returns once written."""
        await self.records.connected(device, peer, datetime.now(UTC))

    async def disconnected(self, device: str, peer: str) -> None:
        await self.records.disconnected(device, peer)

    async def track(self, device: str, address: str) -> None:
        await self.records.tracked(device, address)

    async def gone(self) -> None:
        """Write the records waiting, stop recording, then remove this dispatcher's row
        and its connection records."""
        await self.records.close()
        await super().gone()

    async def _read_secrets(self, devices: list[str]) -> dict[str, bytes]:
        async with self.pool.connection(self.timeout) as conn:
            cur = conn.cursor(row_factory=tuple_row)
            await cur.execute(_query("secrets"), {"device_ids": devices})
            return {str(device): bytes(secret) for device, secret in await cur.fetchall()}

    async def _write_records(self, batch: Pending) -> None:
        """One transaction and one round trip (pipeline mode): connections, then UDP
        endpoints, then disconnections. On a dispatcher whose loop serves thousands of
        connections each round trip waits its turn, so a batch makes just one. Each
        statement is planned for its batch (unprepared): a generic plan guesses ten
        devices and may join thousands by scanning one side per row of the other."""
        async with (
            self.pool.connection(self.timeout) as conn,
            conn.pipeline(),
            conn.transaction(),
        ):
            if batch.connects:
                devices = sorted(batch.connects)
                params = {
                    **self._node(),
                    "device_ids": devices,
                    "peers": [batch.connects[d].peer for d in devices],
                    "since": [batch.connects[d].since for d in devices],
                }
                await conn.execute(_query("connected"), params, prepare=False)
                await conn.execute(query("due_now"), {"device_ids": devices}, prepare=False)
            if batch.tracks:
                devices = sorted(batch.tracks)
                addresses = [batch.tracks[d] for d in devices]
                await conn.execute(
                    _query("tracked"),
                    {"device_ids": devices, "addresses": addresses},
                    prepare=False,
                )
            if batch.disconnects:
                pairs = batch.disconnect_pairs()
                params = {
                    "owner": self.owner,
                    "device_ids": [d for d, _ in pairs],
                    "peers": [p for _, p in pairs],
                }
                await conn.execute(_query("disconnected"), params, prepare=False)

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


def _query(name: str) -> str:
    """The named block ``name`` of ``sql/connections.sql``."""
    return queries.get(name, "connections.sql")


__all__ = ["PoolStore"]
