"""The dispatcher daemon: relay the outbox to devices, record what became of each row.

One :class:`Dispatcher` runs three loops over one autocommit
``psycopg.AsyncConnection`` (the *work* connection), a second one that only
``LISTEN``s on channel ``pushsync``, and a third for the polls:

* the send loop claims due rows (``FOR UPDATE SKIP LOCKED``, with a lease),
  sends each through the gateways :func:`~pushsync.dispatcher.routing.gateway_order`
  picks (a live SYNC connection first), first choice first, falling back to the
  next on failure, and records the batch's sends in one statement, failures one
  by one. It wakes on every NOTIFY and at least every
  ``poll_interval`` seconds, so a lost NOTIFY, a reconnect or rows written
  while the dispatcher was down never strand a row; it claims again at once
  while batches come back full;
* housekeeping every ``housekeeping_interval``: the heartbeat in
  ``pushsync.dispatchers``, the gauges, ``expire``, pruning the change log,
  then ``archive`` (repeated while batches are full);
* confirmations: verified acks (UDP, SYNC) are queued and recorded with
  ``confirm``; an ack that cannot be recorded (database down) stays queued;
* polls (:mod:`~pushsync.dispatcher.polls`): the rules file's polls, each run
  when due, under an advisory lock so two dispatchers never run one poll at
  once. The list is re-read every ``polls_reload_interval`` seconds, so a new
  migration is picked up. A poll that fails is logged with its name and tried
  again after its ``every``; the others go on. Rows a poll writes wake the
  send loop. Polls run on their own connection because each is a transaction
  (lock, then call) that the other loops' statements must not join, and so a
  slow poll does not hold up sending. Last runs are kept in memory: see the
  limitation in :mod:`~pushsync.dispatcher.polls`.

The SYNC server (:mod:`~pushsync.dispatcher.sync_server`), the synchronization
endpoint and UDP acks for rows sent before a restart reach the database through
a small connection pool (:class:`~pushsync.dispatcher.nodes.PoolStore`), so a
handshake never waits behind a claim.

The statements are the named blocks of ``sql/dispatcher.sql``, run by one
store, :class:`~pushsync.dispatcher.outbox.OutboxStore`: the loops' on the work
connection, the SYNC server's on the pool. It is async rather than a sync store
in ``asyncio.to_thread`` because a thread cannot be cancelled: a claim running
in a thread when the daemon stops or the connection drops would leave rows
leased to a dispatcher that no longer knows it holds them.

When the database connection drops, the daemon reconnects with capped
exponential backoff (0.2 s doubling to 5 s), logging one line per attempt
(never the password); a session that worked starts the backoff over. Rows
leased to it are released on the next connection (also those whose claim
committed but whose result was lost); if that never comes their lease runs out
and another dispatcher takes them. On stop it claims nothing more, cancels sends still in
flight, releases the rows it holds unsent and closes its connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg

from pushsync import db, queries
from pushsync.db import first_line
from pushsync.dispatcher.gateways import Gateway, UdpGateway, split_address
from pushsync.dispatcher.metrics import Metrics, MetricsServer, serve_metrics
from pushsync.dispatcher.nodes import PoolStore
from pushsync.dispatcher.outbox import Claimed, ConnectionExecutor, OutboxStore
from pushsync.dispatcher.polls import Poll, due_polls, list_polls, next_due, run_poll
from pushsync.dispatcher.routing import gateway_order, next_gateway
from pushsync.dispatcher.sync_endpoint import Synchronizer
from pushsync.dispatcher.sync_server import DEFAULT_PORT as DEFAULT_SYNC_PORT
from pushsync.dispatcher.sync_server import (
    HEARTBEAT,
    MAX_PREAUTH,
    MAX_PREAUTH_PER_HOST,
    SyncGateway,
    SyncServer,
    SyncSettings,
)
from pushsync.wire import protocol

logger = logging.getLogger(__name__)

CHANNEL = "pushsync"
DEVICES_CHANNEL = "pushsync_devices"
"""Device ids that lost access (disabled, new secret, removed): sql/0005_device_changes.sql."""
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
STOP_TIMEOUT = 3.0
"""Seconds the loops get to finish after SIGTERM before they are cancelled."""
LEAVE_TIMEOUT = 2.0
"""Seconds for each step of leaving after that: the cancelled loops, this
dispatcher's record, the connection pool."""
EXIT_DEADLINE = 12.0
"""Seconds after SIGTERM at which the process exits even if a step above hangs
(e.g. an SMTP session in a thread): status 0, nothing lost (leases run out)."""
DEFAULT_SYNC_LISTEN = f"0.0.0.0:{DEFAULT_SYNC_PORT}"
"""Where devices open their SYNC connections unless ``--sync-listen`` says otherwise."""
DEFAULT_UDP_LISTEN = "0.0.0.0:0"
"""Where acks arrive unless ``--udp-listen`` says otherwise: every interface, a
port the system picks (logged at start). Devices ack to the address a message
came from, so any port works; fix one when a firewall must allow it."""

AsyncConn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one claimed row: sent through ``gateway``, or failed with ``error``."""

    gateway: str | None
    error: str = ""
    final: bool = False
    tried: tuple[str, ...] = ()
    """The gateways that failed before (without ``gateway``)."""


def default_owner() -> str:
    """A lease owner unique to this process: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Dispatcher:
    """The outbox relay: see the module docstring. ``await run(stop)`` until ``stop`` is set."""

    def __init__(
        self,
        dsn: str,
        gateways: Mapping[str, Gateway],
        *,
        owner: str | None = None,
        batch: int = 500,
        lease: timedelta = timedelta(seconds=30),
        poll_interval: float = 1.0,
        housekeeping_interval: float = 5.0,
        archive_batch: int = 1000,
        polls_reload_interval: float = 30.0,
        changes_retention: timedelta = timedelta(days=7),
    ) -> None:
        self.dsn = dsn
        self.gateways: dict[str, Gateway] = dict(gateways)
        self.owner = owner or default_owner()
        self.batch = batch
        self.lease = lease
        self.poll_interval = poll_interval
        self.housekeeping_interval = housekeeping_interval
        self.archive_batch = archive_batch
        self.polls_reload_interval = polls_reload_interval
        self._poll_runs: dict[str, float] = {}
        """When each poll last ran here (or was found running elsewhere), ``time.monotonic()``."""
        self._wake = asyncio.Event()
        self._reload_polls = asyncio.Event()
        self._acks: deque[tuple[uuid.UUID, str]] = deque()
        self._ack_ready = asyncio.Event()
        self._held: set[uuid.UUID] = set()
        self.alive_for = timedelta(seconds=max(15.0, 3 * housekeeping_interval))
        self.changes_retention = changes_retention
        self.store = PoolStore(dsn, self.owner, lease=lease, alive_for=self.alive_for)
        self.sync: SyncServer | None = None
        self.sync_address: str | None = None
        self.udp_address: str | None = None
        self.metrics = Metrics()
        self._database_error: str | None = "not connected yet"
        self._established = 0
        """Sessions that got as far as dispatching: a drop after one resets the backoff."""

    # ----------------------------------------------------------------- hooks for gateways

    def add_gateway(self, gateway: Gateway) -> None:
        """Use ``gateway`` under its name (e.g. a UdpGateway bound to this dispatcher's hooks)."""
        self.gateways[gateway.name] = gateway

    def health(self) -> tuple[bool, str]:
        """For ``/healthz``: healthy while the database connection works."""
        if self._database_error is None:
            return True, "ok"
        return False, f"database unavailable: {self._database_error}"

    async def serve_metrics(self, host: str, port: int) -> MetricsServer:
        """Serve this dispatcher's ``/metrics`` and ``/healthz`` on ``host:port``."""
        return await serve_metrics(self.metrics, host, port, self.health)

    def add_sync(self, server: SyncServer) -> None:
        """Hold device connections on ``server`` (started) and send through them first."""
        self.sync = server
        self.sync_address = _join(*server.address)
        self.add_gateway(SyncGateway(server))

    def secret_for(self, device: str) -> bytes | None:
        """A device's secret if known here without asking the database (acks)."""
        return self.store.cached_secret(device)

    async def fetch_secret(self, device: str) -> bytes | None:
        """A device's secret from the database (an ack for a row sent before a restart),
        kept for the device's next acks until it loses access."""
        secret = await self.store.secret(device)
        if secret is not None:
            self.store.remember_secret(device, secret)
        return secret

    def on_ack(self, ack: protocol.Ack, peer: str) -> None:
        """A verified ack: queue its confirmation (recorded by the confirm loop)."""
        logger.debug("ack for %s from %s at %s", ack.request_id, ack.device, peer)
        self._acks.append((ack.request_id, ack.device))
        self._ack_ready.set()

    def wake(self) -> None:
        """Claim now instead of at the next poll."""
        self._wake.set()

    def reload(self) -> None:
        """SIGHUP: read the polls again now, and forget the secrets cached for UDP acks.

        Not needed for disabling a device: that reaches every dispatcher at once
        (:meth:`revoke`)."""
        logger.info("SIGHUP: reloading the polls and forgetting cached device secrets")
        self._reload_polls.set()
        self.store.forget_secrets()

    # ----------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set; reconnect with backoff when the database drops."""
        where = db.describe(self.dsn)
        logger.info("dispatcher %s starting (%s)", self.owner, where)
        await self.store.open()
        try:
            await self._run_until_stopped(stop, where)
        finally:
            if self._database_error is None:
                try:
                    async with asyncio.timeout(LEAVE_TIMEOUT):
                        await self.store.gone()
                except Exception as exc:
                    reason = first_line(exc) or "no answer"
                    logger.warning("could not remove this dispatcher's record: %s", reason)
            await self.store.close(LEAVE_TIMEOUT)
        logger.info("dispatcher %s stopped", self.owner)

    async def _run_until_stopped(self, stop: asyncio.Event, where: str) -> None:
        """:meth:`_run`, given :data:`STOP_TIMEOUT` to drain once ``stop`` is set, then cancelled.

        Draining needs the database (rows held are released, acks recorded); a
        database that does not answer must not keep the process from exiting.
        """
        running = asyncio.create_task(self._run(stop, where), name="dispatcher")
        stopping = asyncio.create_task(stop.wait(), name="stop")
        try:
            await asyncio.wait([running, stopping], return_when=asyncio.FIRST_COMPLETED)
            if not running.done():
                await asyncio.wait([running], timeout=STOP_TIMEOUT)
            if not running.done():
                logger.warning(
                    "still draining %.0fs after the stop request (is the database answering?); "
                    "stopping now: rows held here go back when their lease runs out",
                    STOP_TIMEOUT,
                )
                running.cancel()
                # A query being cancelled waits for the server's answer; not forever.
                await asyncio.wait([running], timeout=LEAVE_TIMEOUT)
                self._database_error = self._database_error or "stopped while busy"
            if running.done() and not running.cancelled():
                running.result()
        finally:
            stopping.cancel()
            if not running.done():  # cancelled from outside, or given up on above
                running.cancel()

    async def _run(self, stop: asyncio.Event, where: str) -> None:
        delay = BACKOFF_FIRST
        attempt = 0
        while not stop.is_set():
            attempt += 1
            established = self._established
            try:
                connected = await self._session(stop)
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                connected = False
                if self._established != established:  # it worked for a while: start over
                    delay, attempt = BACKOFF_FIRST, 1
                reason = first_line(exc)
                self._database_error = reason
                self.metrics.set_database_up(False)
                logger.warning(
                    "database connection to %s failed (attempt %d): %s; retrying in %.1fs",
                    where,
                    attempt,
                    reason,
                    delay,
                )
                if await _wait(stop, delay):
                    break
                delay = min(delay * 2, BACKOFF_MAX)
            if connected:
                delay, attempt = BACKOFF_FIRST, 0

    async def _session(self, stop: asyncio.Event) -> bool:
        """One connection's worth of dispatching; True when it ended because of ``stop``."""
        listen = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        try:
            work = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        except BaseException:
            await listen.close()
            raise
        try:
            polling = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        except BaseException:
            await work.close()
            await listen.close()
            raise
        store = OutboxStore(
            ConnectionExecutor(work), self.owner, lease=self.lease, alive_for=self.alive_for
        )
        tasks: list[asyncio.Task[None]] = []
        try:
            await listen.execute(f"LISTEN {DEVICES_CHANNEL}")
            await listen.execute(f"LISTEN {CHANNEL}")
            await self._recheck_access()  # after LISTEN: no revocation falls in between
            # Rows claimed before a connection dropped (including claims whose result
            # was lost with the connection) go back, to be claimed again at once.
            mine = sorted(await store.mine() | self._held)
            if mine:
                released = await store.release(mine)
                logger.info("released %d rows held before reconnecting", released)
            self._held.clear()
            await self._announce(store)
            self._established += 1
            self._database_error = None
            self.metrics.set_database_up(True)
            logger.info("connected to %s; listening on channel %r", db.describe(self.dsn), CHANNEL)
            self._wake.set()
            tasks = [
                asyncio.create_task(self._listen_loop(listen), name="listen"),
                asyncio.create_task(self._relay_stop(stop), name="stop relay"),
                asyncio.create_task(self._send_loop(store, stop), name="send"),
                asyncio.create_task(
                    self._housekeeping_loop(store, work, stop), name="housekeeping"
                ),
                asyncio.create_task(self._confirm_loop(store, stop), name="confirm"),
                asyncio.create_task(self._poll_loop(polling, stop), name="polls"),
            ]
            stopping = asyncio.create_task(stop.wait(), name="stop")
            try:
                done, _ = await asyncio.wait(
                    [*tasks, stopping], return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                stopping.cancel()
            for task in done:
                if task is not stopping and (exc := task.exception()) is not None:
                    raise exc
            if not stop.is_set():  # a loop returned by itself: the connection ended
                raise psycopg.OperationalError("the database connection ended")
            # Stopping: the loops notice ``stop`` at their next step and return;
            # the listener and the stop relay only wait, so they are cancelled.
            tasks[0].cancel()
            tasks[1].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            errors = [r for r in results if isinstance(r, Exception)]
            if errors:
                raise errors[0]
            if self._held:
                released = await store.release(sorted(self._held))
                logger.info("released %d claimed rows not sent", released)
                self._held.clear()
            return True
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close(polling)
            await _close(work)
            await _close(listen)

    # ----------------------------------------------------------------- loops

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        """Wake the loops that wait on their own event when ``stop`` is set; then wait."""
        await stop.wait()
        self._wake.set()
        self._ack_ready.set()
        await asyncio.Event().wait()  # cancelled with the listener

    async def _listen_loop(self, conn: AsyncConn) -> None:
        async for note in conn.notifies():
            if note.channel == DEVICES_CHANNEL:
                self.revoke(note.payload)
            else:
                self._wake.set()

    def revoke(self, device: str) -> None:
        """``device`` was disabled, removed or given a new secret: close its connections
        and forget its secret; it must authenticate again (and is refused if disabled)."""
        self.store.forget_secret(device)
        closed = 0 if self.sync is None else self.sync.cut_off(device, "access revoked")
        if closed:
            logger.info("device %s lost access: closed %d connection(s)", device, closed)

    async def _recheck_access(self) -> None:
        """After (re)connecting: notifications sent while this dispatcher was not
        listening are lost, so forget every cached secret and look at who is connected."""
        self.store.forget_secrets()
        if self.sync is None:
            return
        held = self.sync.credentials()
        if held:
            for device in await self.store.revoked(held):
                self.revoke(device)

    async def _send_loop(self, store: OutboxStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # One event, no helper tasks: this wait is on every notification's path.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await self._wake.wait()
            if stop.is_set():
                return
            self._wake.clear()
            while not stop.is_set() and await self._send_batch(store, stop) >= self.batch:
                pass

    async def _send_batch(self, store: OutboxStore, stop: asyncio.Event) -> int:
        """Claim one batch and send it; how many rows were claimed."""
        items = await store.claim(self.batch)
        if not items:
            return 0
        logger.debug("claimed %d rows", len(items))
        self._held.update(item.request_id for item in items)
        for item in items:
            self.store.remember_secret(item.device_id, item.secret)
        pending = {asyncio.create_task(self._deliver(item)): item for item in items}
        stopping = asyncio.create_task(stop.wait())
        sent: dict[str, int] = {}
        try:
            while pending:
                done, _ = await asyncio.wait(
                    [*pending, stopping], return_when=asyncio.FIRST_COMPLETED
                )
                finished = [(pending.pop(t), t.result()) for t in list(pending) if t in done]
                await self._record(store, finished, sent)
                if stopping in done:
                    break
        finally:
            stopping.cancel()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if sent:
            logger.info("sent %s", ", ".join(f"{n} via {gw}" for gw, n in sorted(sent.items())))
        return len(items)

    async def _deliver(self, item: Claimed) -> Outcome:
        """Try the item's gateways in order until one sends it. No database access."""
        connected = self.sync is not None and self.sync.is_connected(item.device_id)
        order = [
            name
            for name in gateway_order(
                item.gateway, connected=connected, udp=item.udp_address, email=item.email_address
            )
            if name in self.gateways
        ]
        if not order:
            return Outcome(None, f"no gateway can reach device {item.device_id}", final=False)
        failures: dict[str, tuple[str, bool]] = {}
        while (name := next_gateway(order, set(failures))) is not None:
            try:
                result = await self.gateways[name].send(item)
            except Exception as exc:  # a gateway bug must not stop the others
                logger.exception("gateway %s raised sending %s", name, item.request_id)
                failures[name] = (f"{type(exc).__name__}: {exc}", False)
                continue
            if result.ok:
                return Outcome(name)
            failures[name] = (result.error or "failed", result.final)
            logger.info(
                "send of %s to %s via %s failed: %s",
                item.request_id,
                item.device_id,
                name,
                result.error,
            )
        error = "; ".join(f"{name}: {text}" for name, (text, _) in failures.items())
        final = all(final for _, final in failures.values())
        return Outcome(None, error, final=final, tried=tuple(failures))

    async def _record(
        self, store: OutboxStore, finished: list[tuple[Claimed, Outcome]], sent: dict[str, int]
    ) -> None:
        """Record what became of ``finished``: the sends in one statement, failures one by one."""
        sends = [(item, outcome.gateway) for item, outcome in finished if outcome.gateway]
        if sends:
            now = time.time()
            recorded = await store.sent_many([(item.request_id, gw) for item, gw in sends])
            for item, gateway in sends:
                sent[gateway] = sent.get(gateway, 0) + 1
                self.metrics.sent(gateway)
                if item.attempts == 1:
                    self.metrics.latency(now - item.created_at.timestamp())
                self._held.discard(item.request_id)
                if item.request_id not in recorded:
                    logger.warning("lost the lease on %s before recording it", item.request_id)
        for item, outcome in finished:
            if outcome.gateway is None:
                await self._record_failure(store, item, outcome)

    async def _record_failure(self, store: OutboxStore, item: Claimed, outcome: Outcome) -> None:
        if await self._connected_meanwhile(store, item, outcome):
            return
        ok = await store.failed(item.request_id, outcome.error, final=outcome.final)
        for gateway in outcome.tried:
            self.metrics.failed(gateway, outcome.final)
        logger.warning(
            "%s to %s %s: %s",
            item.request_id,
            item.device_id,
            "failed for good" if outcome.final else "not sent, will retry",
            outcome.error,
        )
        self._held.discard(item.request_id)
        if not ok:
            logger.warning("lost the lease on %s before recording it", item.request_id)

    async def _connected_meanwhile(
        self, store: OutboxStore, item: Claimed, outcome: Outcome
    ) -> bool:
        """The device opened its SYNC connection while this attempt, which could not use
        it, was under way: the connection's own claim skipped the row (leased here), so
        it goes back, due now, and is sent down the connection at once. True if so."""
        if outcome.final or "sync" in outcome.tried or self.sync is None:
            return False
        if not self.sync.is_connected(item.device_id):
            return False
        if not await store.release([item.request_id]):
            return False
        logger.info("%s: %s connected meanwhile; sending again", item.request_id, item.device_id)
        self._held.discard(item.request_id)
        self._wake.set()
        return True

    async def _announce(self, store: OutboxStore) -> None:
        """Heartbeat, and (after a reconnect) record the SYNC connections held here again."""
        await store.heartbeat(self.sync_address, self.udp_address)
        if self.sync is None:
            return
        for device, held in list(self.sync.connections.items()):
            await store.connected(device, held.peer)

    async def _count(self, conn: AsyncConn) -> None:
        """Refresh the gauges: outbox by state, oldest unsent, connected devices."""
        cur = await conn.execute(queries.get("status_states"))
        self.metrics.set_outbox_depth({state: n for state, n in await cur.fetchall()})
        cur = await conn.execute(queries.get("status_oldest_unsent"))
        row = await cur.fetchone()
        self.metrics.set_oldest_unsent(row[0] if row else None)
        self.metrics.set_connected(len(self.sync.connections) if self.sync is not None else 0)

    async def _housekeeping_loop(
        self, store: OutboxStore, conn: AsyncConn, stop: asyncio.Event
    ) -> None:
        """``store`` runs on ``conn``; the gauges' queries (``_count``) go there directly."""
        while not stop.is_set():
            await store.heartbeat(self.sync_address, self.udp_address)
            await self._count(conn)
            expired = await store.expire()
            if expired:
                logger.info("expired %d rows", expired)
            if await store.prune(self.changes_retention):
                logger.info("pruned the change log to the last %s", self.changes_retention)
            archived = 0
            while not stop.is_set():
                moved = await store.archive(self.archive_batch)
                archived += moved
                if moved < self.archive_batch:
                    break
            if archived:
                logger.info("archived %d finished rows", archived)
            if await _wait(stop, self.housekeeping_interval):
                return

    async def _confirm_loop(self, store: OutboxStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            while self._acks:
                request_id, device = self._acks[0]
                if await store.confirm(request_id, device):
                    self.metrics.confirmed()
                    logger.info("confirmed %s by %s", request_id, device)
                else:
                    logger.warning("ack of %s by %s matches no sent row", request_id, device)
                self._acks.popleft()  # only once recorded: a dropped connection keeps it
            self._ack_ready.clear()
            if self._acks:
                continue
            # The stop relay wakes this loop by setting ``_ack_ready``; if that
            # happened while acks were being recorded, the clear above undid it.
            if stop.is_set():
                return
            await self._ack_ready.wait()
            if stop.is_set():
                return

    async def _poll_loop(self, conn: AsyncConn, stop: asyncio.Event) -> None:
        polls = await self._load_polls(conn, None)
        reload_at = time.monotonic() + self.polls_reload_interval
        while not stop.is_set():
            now = time.monotonic()
            if now >= reload_at or self._reload_polls.is_set():
                self._reload_polls.clear()
                polls = await self._load_polls(conn, polls)
                reload_at = now + self.polls_reload_interval
            for poll in due_polls(polls, self._poll_runs, now):
                if stop.is_set():
                    return
                await self._run_poll(conn, poll)
            now = time.monotonic()
            wait = next_due(polls, self._poll_runs, now)
            delay = reload_at - now if wait is None else min(wait, reload_at - now)
            if await _wait_any(stop, self._reload_polls, max(delay, 0.01)):
                return

    async def _load_polls(self, conn: AsyncConn, known: list[Poll] | None) -> list[Poll]:
        """The registered polls; ``known`` if they cannot be read (the connection is fine)."""
        try:
            polls = await list_polls(conn)
        except Exception:
            if conn.broken or conn.closed:
                raise
            logger.exception("could not read the list of polls")
            return known or []
        if known is None or polls != known:
            listed = ", ".join(f"{p.name} (every {p.every})" for p in polls)
            logger.info("polls: %s", listed or "none")
        names = {p.name for p in polls}
        for name in [n for n in self._poll_runs if n not in names]:
            del self._poll_runs[name]
        return polls

    async def _run_poll(self, conn: AsyncConn, poll: Poll) -> None:
        """Run one poll; its failure is logged, not raised, unless the connection broke."""
        self._poll_runs[poll.name] = time.monotonic()
        try:
            written = await run_poll(conn, poll)
        except Exception as exc:
            if conn.broken or conn.closed:
                raise
            logger.error("poll %s failed: %s", poll.name, first_line(exc))
            return
        if written is None:
            logger.debug("poll %s is running in another dispatcher; skipped", poll.name)
        elif written:
            logger.info("poll %s queued %d rows", poll.name, written)
            self._wake.set()
        else:
            logger.debug("poll %s queued nothing", poll.name)


# --------------------------------------------------------------------------- helpers


async def _wait(stop: asyncio.Event, timeout: float) -> bool:
    """Sleep up to ``timeout`` seconds; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def _wait_any(stop: asyncio.Event, event: asyncio.Event, timeout: float | None) -> bool:
    """Until ``event`` or ``stop`` is set, or ``timeout``; True if ``stop`` is set."""
    if stop.is_set():
        return True
    if event.is_set():
        return False
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(event.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return stop.is_set()


async def _close(conn: AsyncConn) -> None:
    try:
        await conn.close()
    except Exception:  # closing a broken connection: nothing more to do
        logger.debug("error closing a database connection", exc_info=True)


# --------------------------------------------------------------------------- entry point


def run_dispatcher(
    dsn: str,
    *,
    udp_listen: str | None = None,
    sync_listen: str | None = None,
    sync_tls: ssl.SSLContext | None = None,
    heartbeat: float = HEARTBEAT,
    max_handshakes: tuple[int, int] = (MAX_PREAUTH, MAX_PREAUTH_PER_HOST),
    gateways: Mapping[str, Gateway] | None = None,
    owner: str | None = None,
    batch: int = 500,
    lease: timedelta = timedelta(seconds=30),
    poll_interval: float = 1.0,
    housekeeping_interval: float = 5.0,
    archive_batch: int = 1000,
    polls_reload_interval: float = 30.0,
    metrics_listen: str | None = None,
) -> int:
    """``pushsync dispatch``: run until SIGTERM or SIGINT, then drain; exit status 0.

    A :class:`UdpGateway` is bound to ``udp_listen`` (``HOST:PORT``; default
    :data:`DEFAULT_UDP_LISTEN`) and receives the devices' acks there. The SYNC
    server listens on ``sync_listen`` (default :data:`DEFAULT_SYNC_LISTEN`;
    ``off`` for none), inside TLS when ``sync_tls`` is given, holding at most
    ``max_handshakes`` unauthenticated connections (overall, per address). ``gateways`` adds
    others by name (e.g. ``{"smtp": SmtpGateway(...)}``).
    ValueError if an address is not ``HOST:PORT``; OSError if it cannot be bound.
    """
    address = split_listen(udp_listen or DEFAULT_UDP_LISTEN)
    sync_text = sync_listen or DEFAULT_SYNC_LISTEN
    sync_address = None if sync_text == "off" else split_listen(sync_text)
    metrics_address = split_listen(metrics_listen) if metrics_listen else None

    async def main() -> int:
        dispatcher = Dispatcher(
            dsn,
            gateways or {},
            owner=owner,
            batch=batch,
            lease=lease,
            poll_interval=poll_interval,
            housekeeping_interval=housekeeping_interval,
            archive_batch=archive_batch,
            polls_reload_interval=polls_reload_interval,
        )
        udp = await UdpGateway.bind(
            address,
            secret_for=dispatcher.secret_for,
            fetch_secret=dispatcher.fetch_secret,
            on_ack=dispatcher.on_ack,
        )
        dispatcher.add_gateway(udp)
        host, port = udp.local_address
        dispatcher.udp_address = _join(host, port)
        logger.info("UDP gateway on %s (acks arrive here)", dispatcher.udp_address)
        sync: SyncServer | None = None
        closers: list[Any] = []
        try:
            if sync_address is not None:
                sync = SyncServer(
                    dispatcher.store,
                    dispatcher.on_ack,
                    settings=SyncSettings(
                        heartbeat=heartbeat,
                        tls=sync_tls,
                        max_preauth=max_handshakes[0],
                        max_preauth_per_host=max_handshakes[1],
                    ),
                    on_connect=lambda _device: dispatcher.wake(),
                )
                sync.synchronizer = Synchronizer(dispatcher.store.pool)
                await sync.start(*sync_address)
                dispatcher.add_sync(sync)
                closers.append(sync.close)
                closers.append(sync.synchronizer.close)
                logger.info(
                    "SYNC gateway on %s%s", _join(*sync.address), " (TLS)" if sync_tls else ""
                )
            if metrics_address is not None:
                served = await dispatcher.serve_metrics(*metrics_address)
                closers.append(served.close)
                logger.info("metrics on http://%s/metrics", _join(*served.address))
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            signals = (signal.SIGTERM, signal.SIGINT)
            for signum in signals:
                loop.add_signal_handler(signum, _stopper(stop, signum))
            loop.add_signal_handler(signal.SIGHUP, dispatcher.reload)
            try:
                await dispatcher.run(stop)
            finally:
                for signum in (*signals, signal.SIGHUP):
                    loop.remove_signal_handler(signum)
        finally:
            for close in reversed(closers):
                await close()
            udp.close()
        return 0

    return asyncio.run(main())


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (port 0 allowed: the system picks one) as (host, port)."""
    return split_address(text, lowest_port=0)


def _stopper(stop: asyncio.Event, signum: signal.Signals) -> Any:
    def handler() -> None:
        logger.info("%s: stopping", signum.name)
        if not stop.is_set():
            _exit_at_the_latest(EXIT_DEADLINE)
        stop.set()

    return handler


def _exit_at_the_latest(seconds: float) -> None:
    """Exit with status 0 after ``seconds`` even if stopping hangs (a thread, a socket).

    Everything before this is bounded too; this is the guarantee a service
    manager relies on, so it does not send SIGKILL with leases held.
    """

    def force() -> None:
        logger.error("still stopping %.0fs after the stop request: exiting now", seconds)
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        os._exit(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


__all__ = [
    "DEFAULT_SYNC_LISTEN",
    "DEFAULT_UDP_LISTEN",
    "Dispatcher",
    "run_dispatcher",
]
