"""The dispatcher daemon: relay the outbox to devices, record what became of each row.

:func:`serve` assembles and runs it from a
:class:`~pushsync.dispatcher.settings.DispatcherSettings`; :func:`run_dispatcher`
is ``pushsync dispatch``. What it does and how to run it: docs/operations.md
("Running ``pushsync dispatch``", "Several dispatchers", "Outbox retention and
housekeeping").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from pushsync import db, queries
from pushsync.db import first_line
from pushsync.dispatcher.connections import ConnectionServer, SyncGateway
from pushsync.dispatcher.gateways import (
    Gateway,
    SendResult,
    UdpGateway,
    describe_smtp,
    smtp_from_url,
)
from pushsync.dispatcher.metrics import Metrics, MetricsServer, serve_metrics
from pushsync.dispatcher.mqtt import MqttGateway, start_mqtt
from pushsync.dispatcher.nodes import PoolStore
from pushsync.dispatcher.outbox import Claimed, ConnectionExecutor, OutboxStore
from pushsync.dispatcher.polls import Poll, due_polls, list_polls, next_due, run_poll
from pushsync.dispatcher.routing import gateway_order, next_gateway
from pushsync.dispatcher.settings import DispatcherSettings, split_listen
from pushsync.dispatcher.sync_endpoint import Synchronizer
from pushsync.logs import short
from pushsync.wire import protocol

logger = logging.getLogger(__name__)

CHANNEL = "pushsync"
DEVICES_CHANNEL = "pushsync_devices"
"""Device ids that lost access (disabled, new secret, removed): sql/0005_device_changes.sql."""
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
CONFIRM_BATCH = 1000
"""Acks recorded in one statement at most."""
STOP_TIMEOUT = 3.0
"""Seconds the loops get to finish after SIGTERM before they are cancelled."""
LEAVE_TIMEOUT = 2.0
"""Seconds for each step of leaving after that: the cancelled loops, this
dispatcher's record, the connection pool."""
EXIT_DEADLINE = 12.0
"""Seconds after SIGTERM at which the process exits even if a step above hangs
(e.g. an SMTP session in a thread): status 0, nothing lost (leases run out)."""

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
    """The outbox relay. ``await run(stop)`` until ``stop`` is set.

    Four loops (send, housekeeping, confirmations, polls) run on four autocommit
    connections: one claims and records sends (two statements at a time, in
    pipeline mode), one records confirmations and does the housekeeping, one
    only ``LISTEN``s, one runs the polls (each a transaction the others must not
    join). The SYNC server and UDP acks
    for rows sent before a restart use a small pool
    (:class:`~pushsync.dispatcher.nodes.PoolStore`), so a handshake never waits
    behind a claim. Statements are async (:class:`~pushsync.dispatcher.outbox.OutboxStore`),
    not in a thread, because a claim in a thread cannot be cancelled on stop.
    What each loop does, reconnecting and stopping: docs/operations.md.
    """

    def __init__(
        self, settings: DispatcherSettings, gateways: Mapping[str, Gateway] | None = None
    ) -> None:
        self.settings = settings
        self.dsn = settings.dsn
        self.gateways: dict[str, Gateway] = {}
        self._orders: dict[tuple[str, bool, bool, bool, bool], tuple[str, ...]] = {}
        """Gateways to try, by what decides them (:meth:`_order`)."""
        self._immediate: dict[str, Callable[[Claimed], SendResult | None]] = {}
        """The ``send_now`` of the gateways that have one (UDP), by name."""
        for name, gateway in (gateways or {}).items():
            self._use(name, gateway)
        self.owner = settings.owner or default_owner()
        self._poll_runs: dict[str, float] = {}
        """When each poll last ran here (or was found running elsewhere), ``time.monotonic()``."""
        self._wake = asyncio.Event()
        self._reload_polls = asyncio.Event()
        self._acks: deque[tuple[uuid.UUID, str]] = deque()
        self._ack_ready = asyncio.Event()
        self._held: set[uuid.UUID] = set()
        self.store = PoolStore(
            settings.dsn, self.owner, lease=settings.lease, alive_for=settings.alive_for
        )
        self.connections: ConnectionServer | None = None
        self.sync_address: str | None = None
        self.udp_address: str | None = None
        self.metrics = Metrics()
        self._database_error: str | None = "not connected yet"
        self._established = 0
        """Sessions that got as far as dispatching: a drop after one resets the backoff."""

    # ----------------------------------------------------------------- hooks for gateways

    def add_gateway(self, gateway: Gateway) -> None:
        """Use ``gateway`` under its name (e.g. a UdpGateway bound to this dispatcher's hooks)."""
        self._use(gateway.name, gateway)

    def _use(self, name: str, gateway: Gateway) -> None:
        self.gateways[name] = gateway
        self._orders.clear()
        send_now = getattr(gateway, "send_now", None)
        if send_now is None:
            self._immediate.pop(name, None)
        else:
            self._immediate[name] = send_now

    def health(self) -> tuple[bool, str]:
        """For ``/healthz``: healthy while the database connection works."""
        if self._database_error is None:
            return True, "ok"
        return False, f"database unavailable: {self._database_error}"

    def add_connections(self, server: ConnectionServer) -> None:
        """Hold device connections on ``server`` (started) and send through them first."""
        self.connections = server
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
        logger.debug("ack for %s from %s at %s", short(ack.request_id), ack.device, peer)
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
        async with contextlib.AsyncExitStack() as opened:
            listen, work, sending, polling = [
                await self._connect(opened) for _ in ("listen", "work", "send", "polls")
            ]
            store = self._store(work)
            sender = self._store(sending)
            await self._begin(listen, store)
            await self._loops(store, sender, listen, work, polling, stop)
            if self._held:
                released = await store.release(sorted(self._held))
                logger.info("released %d claimed rows not sent", released)
                self._held.clear()
            return True

    async def _connect(self, opened: contextlib.AsyncExitStack) -> AsyncConn:
        """A new autocommit connection, closed when ``opened`` closes."""
        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)
        opened.push_async_callback(_close, conn)
        return conn

    def _store(self, conn: AsyncConn) -> OutboxStore:
        return OutboxStore(
            ConnectionExecutor(conn),
            self.owner,
            lease=self.settings.lease,
            alive_for=self.settings.alive_for,
        )

    async def _begin(self, listen: AsyncConn, store: OutboxStore) -> None:
        """LISTEN, then take back what an earlier session left, and announce this dispatcher."""
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

    async def _loops(
        self,
        store: OutboxStore,
        sender: OutboxStore,
        listen: AsyncConn,
        work: AsyncConn,
        polling: AsyncConn,
        stop: asyncio.Event,
    ) -> None:
        """Run the loops until ``stop`` is set and they have returned; the first error of
        one (the others are cancelled then) is raised. The send loop has a connection
        of its own (``sender``'s): it runs two statements at a time in pipeline mode."""
        try:
            async with asyncio.TaskGroup() as loops:
                listening = loops.create_task(self._listen_loop(listen, stop), name="listen")
                loops.create_task(self._relay_stop(stop), name="stop relay")
                loops.create_task(self._send_loop(sender, stop), name="send")
                loops.create_task(self._housekeeping_loop(store, work, stop), name="housekeeping")
                loops.create_task(self._confirm_loop(store, stop), name="confirm")
                loops.create_task(self._poll_loop(polling, stop), name="polls")
                await stop.wait()
                # The other loops notice ``stop`` at their next step and return; the
                # listener only waits for notifications.
                listening.cancel()
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None

    # ----------------------------------------------------------------- loops

    async def _relay_stop(self, stop: asyncio.Event) -> None:
        """Wake the loops that wait on their own event when ``stop`` is set."""
        await stop.wait()
        self._wake.set()
        self._ack_ready.set()

    async def _listen_loop(self, conn: AsyncConn, stop: asyncio.Event) -> None:
        """Wake the send loop on each NOTIFY, revoke on each device change; cancelled on stop."""
        async for note in conn.notifies():
            if note.channel == DEVICES_CHANNEL:
                self.revoke(note.payload)
            else:
                self._wake.set()
        if not stop.is_set():
            raise psycopg.OperationalError("the database connection ended")

    def revoke(self, device: str) -> None:
        """``device`` was disabled, removed or given a new secret: close its connections
        and forget its secret; it must authenticate again (and is refused if disabled)."""
        self.store.forget_secret(device)
        closed = (
            0 if self.connections is None else self.connections.cut_off(device, "access revoked")
        )
        if closed:
            said = "its connection" if closed == 1 else f"{closed} connections"
            logger.info("device %s lost access: closed %s", device, said)

    async def _recheck_access(self) -> None:
        """After (re)connecting: notifications sent while this dispatcher was not
        listening are lost, so forget every cached secret and look at who is connected."""
        self.store.forget_secrets()
        if self.connections is None:
            return
        held = self.connections.credentials()
        if held:
            for device in await self.store.revoked(held):
                self.revoke(device)

    async def _send_loop(self, store: OutboxStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            # One event, no helper tasks: this wait is on every notification's path.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.poll_interval):
                    await self._wake.wait()
            if stop.is_set():
                return
            self._wake.clear()
            await self._drain(store, stop)

    async def _drain(self, store: OutboxStore, stop: asyncio.Event) -> None:
        """Claim and send until a claim comes back short of a full batch.

        While one full batch is being sent, the database records the batch
        before it and claims the next one (:meth:`OutboxStore.sent_then_claim`,
        one round trip), so neither waits for the other. A short batch is
        recorded at once.
        """
        batch = self.settings.batch
        items = self._claimed(await store.claim(batch))
        owed: list[tuple[Claimed, str]] = []
        """Sent, not recorded yet."""
        while items and not stop.is_set():
            ahead: asyncio.Task[tuple[set[uuid.UUID], list[Claimed]]] | None = None
            recording: list[tuple[Claimed, str]] = []
            if len(items) >= batch:
                recording, owed = owed, []
                ahead = asyncio.create_task(
                    store.sent_then_claim([(i.request_id, gw) for i, gw in recording], batch)
                )
                await asyncio.sleep(0)  # it writes its statements before the sending starts
            try:
                sends, rest = self._send_now(items)
                self._tally(sends)
                owed.extend(sends)
                items = []
                if rest:
                    # Slower gateways (SYNC, SMTP, a host name to look up): record what
                    # went out already, then wait for them as they finish.
                    if ahead is not None:
                        items = await self._collect(ahead, recording)
                        ahead = None
                    await self._record(store, owed)
                    owed = []
                    await self._send_slow(store, rest, stop)
                if ahead is not None:
                    items = await self._collect(ahead, recording)
                    ahead = None
            except BaseException:
                if ahead is not None:  # its rows stay leased here: released on reconnect
                    ahead.cancel()
                    await asyncio.gather(ahead, return_exceptions=True)
                raise
        await self._record(store, owed)

    def _claimed(self, items: list[Claimed]) -> list[Claimed]:
        """Note rows just claimed: held here (released if not sent), their secrets kept."""
        if items:
            logger.debug("claimed %d rows", len(items))
            self._held.update(item.request_id for item in items)
            secrets = {item.device_id: item.secret for item in items}
            for device, secret in secrets.items():
                self.store.remember_secret(device, secret)
        return items

    async def _collect(
        self,
        ahead: asyncio.Task[tuple[set[uuid.UUID], list[Claimed]]],
        recording: list[tuple[Claimed, str]],
    ) -> list[Claimed]:
        """The result of a :meth:`OutboxStore.sent_then_claim`: the sends it recorded are
        noted, the rows it claimed returned."""
        recorded, claimed = await ahead
        self._recorded(recording, recorded)
        return self._claimed(claimed)

    def _send_now(self, items: list[Claimed]) -> tuple[list[tuple[Claimed, str]], list[Claimed]]:
        """Send what can go at once (UDP to an IP address: nothing to wait for); the
        sends made, and the items left for :meth:`_send_slow`."""
        sends: list[tuple[Claimed, str]] = []
        rest: list[Claimed] = []
        immediate = self._immediate
        for item in items:
            order = self._order(item)
            first = immediate.get(order[0]) if order else None
            try:
                result = first(item) if first is not None else None
            except Exception:  # a gateway bug: _deliver tries again and records it
                result = None
            if result is not None and result.ok:
                sends.append((item, result.gateway))
            else:
                rest.append(item)
        return sends, rest

    def _order(self, item: Claimed) -> tuple[str, ...]:
        """The gateways to try for ``item`` that this dispatcher has, first choice first."""
        connected = self.connections is not None and self.connections.is_connected(item.device_id)
        key = (
            item.gateway,
            connected,
            bool(item.udp_address),
            bool(item.email_address),
            bool(item.mqtt_address),
        )
        order = self._orders.get(key)
        if order is None:
            order = self._orders[key] = tuple(
                name
                for name in gateway_order(
                    item.gateway,
                    connected=connected,
                    udp=item.udp_address,
                    email=item.email_address,
                    mqtt=item.mqtt_address,
                )
                if name in self.gateways
            )
        return order

    async def _send_slow(
        self, store: OutboxStore, items: list[Claimed], stop: asyncio.Event
    ) -> None:
        """Send ``items`` through gateways that wait (one task each), recording each
        group of sends as it finishes; returns early when ``stop`` is set.

        Finished tasks queue themselves: each wake-up takes every one finished so far,
        at a cost that does not grow with the tasks still waiting (``asyncio.wait``
        on all of them would, for each of hundreds of PUBACKs or SMTP replies)."""
        pending = {asyncio.create_task(self._deliver(item)): item for item in items}
        ended: asyncio.Queue[asyncio.Task[Outcome]] = asyncio.Queue()
        for task in pending:
            task.add_done_callback(ended.put_nowait)
        stopping = asyncio.create_task(stop.wait())
        try:
            while pending:
                getting = asyncio.ensure_future(ended.get())
                done, _ = await asyncio.wait(
                    [getting, stopping], return_when=asyncio.FIRST_COMPLETED
                )
                if getting not in done:
                    getting.cancel()
                    break
                tasks = [getting.result()]
                while not ended.empty():
                    tasks.append(ended.get_nowait())
                finished = [(pending.pop(t), t.result()) for t in tasks]
                sends = [(item, out.gateway) for item, out in finished if out.gateway]
                self._tally(sends)
                await self._record(store, sends)
                failures = [(item, out) for item, out in finished if out.gateway is None]
                if failures:
                    await self._record_failures(store, failures)
                if stopping in done:
                    break
        finally:
            stopping.cancel()
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, item: Claimed) -> Outcome:
        """Try the item's gateways in order until one sends it. No database access."""
        order = self._order(item)
        if not order:
            return Outcome(None, f"no gateway can reach device {item.device_id}", final=False)
        failures: dict[str, tuple[str, bool]] = {}
        while (name := next_gateway(order, set(failures))) is not None:
            try:
                result = await self.gateways[name].send(item)
            except Exception as exc:  # a gateway bug must not stop the others
                logger.exception("gateway %s raised sending %s", name, short(item.request_id))
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

    async def _record(self, store: OutboxStore, sends: list[tuple[Claimed, str]]) -> None:
        """Record ``sends`` (item, gateway) in one statement."""
        if sends:
            recorded = await store.sent_many([(item.request_id, gw) for item, gw in sends])
            self._recorded(sends, recorded)

    def _tally(self, sends: list[tuple[Claimed, str]]) -> None:
        """Metrics for ``sends`` as they are made (recorded in the database later)."""
        now = time.time()
        by_gateway: dict[str, int] = {}
        for item, gateway in sends:
            by_gateway[gateway] = by_gateway.get(gateway, 0) + 1
            if item.attempts == 1:
                self.metrics.latency(now - item.created_at.timestamp())
        for gateway, n in by_gateway.items():
            self.metrics.sent(gateway, n)

    def _recorded(self, sends: list[tuple[Claimed, str]], recorded: set[uuid.UUID]) -> None:
        """``sends`` are written: no longer held here; one log line for them all, and a
        warning for each whose lease was lost before it could be recorded."""
        if not sends:
            return
        by_gateway: dict[str, int] = {}
        for item, gateway in sends:
            by_gateway[gateway] = by_gateway.get(gateway, 0) + 1
            self._held.discard(item.request_id)
            if item.request_id not in recorded:
                logger.warning("lost the lease on %s before recording it", short(item.request_id))
        logger.info("sent %s", ", ".join(f"{n} via {gw}" for gw, n in sorted(by_gateway.items())))

    async def _record_failures(
        self, store: OutboxStore, failures: list[tuple[Claimed, Outcome]]
    ) -> None:
        """Record the failed sends of a group in one statement (a thousand rows no gateway
        can reach are one round trip, not a thousand), and log them in one line."""
        kept = await self._give_back_connected(store, failures)
        if not kept:
            return
        recorded = await store.failed_many(
            [(item.request_id, outcome.error, outcome.final) for item, outcome in kept]
        )
        for item, outcome in kept:
            for gateway in outcome.tried:
                self.metrics.failed(gateway, outcome.final)
            self._held.discard(item.request_id)
            if item.request_id not in recorded:
                logger.warning("lost the lease on %s before recording it", short(item.request_id))
        for final in (True, False):
            group = [(item, outcome) for item, outcome in kept if outcome.final == final]
            if group:
                _log_failures(group, "failed for good" if final else "not sent, will retry")
        # A device that subscribed here while its failure was on its way to the database:
        # its connection's record may have come first, and found the row still leased.
        # Its subscription is already in memory, and its record is written after it, so
        # one of the two sees the row as recorded.
        arrived = sorted(
            {item.device_id for item, outcome in kept if self._now_reachable(item, outcome)}
        )
        if arrived and await store.due_now(arrived):
            self._wake.set()

    def _now_reachable(self, item: Claimed, outcome: Outcome) -> bool:
        """The attempt could not use a SYNC connection, and the device has one here now."""
        return (
            not outcome.final
            and "sync" not in outcome.tried
            and self.connections is not None
            and self.connections.is_connected(item.device_id)
        )

    async def _give_back_connected(
        self, store: OutboxStore, failures: list[tuple[Claimed, Outcome]]
    ) -> list[tuple[Claimed, Outcome]]:
        """The failures whose device opened its SYNC connection while the attempt, which
        could not use it, was under way: the connection's own claim skipped their rows
        (leased here), so they go back, due now, in one statement, and are sent down the
        connection at once. The other failures are returned, to be recorded."""
        back = [item for item, outcome in failures if self._now_reachable(item, outcome)]
        if not back:
            return failures
        released = await store.release([item.request_id for item in back])
        for item in back:
            logger.info(
                "%s: %s connected meanwhile; sending again", short(item.request_id), item.device_id
            )
            self._held.discard(item.request_id)
        if released < len(back):
            logger.warning(
                "lost the lease on %d of %d rows before giving them back",
                len(back) - released,
                len(back),
            )
        self._wake.set()
        returned = {item.request_id for item in back}
        return [(item, outcome) for item, outcome in failures if item.request_id not in returned]

    async def _announce(self, store: OutboxStore) -> None:
        """Heartbeat, and (after a reconnect) record the SYNC connections held here again."""
        await store.heartbeat(self.sync_address, self.udp_address)
        if self.connections is None:
            return
        for device, held in list(self.connections.by_device.items()):
            await store.connected(device, held.peer)

    async def _count(self, conn: AsyncConn) -> None:
        """Refresh the gauges: outbox by state, oldest unsent, connected devices."""
        cur = await conn.execute(queries.get("status_states"))
        self.metrics.set_outbox_depth({state: n for state, n in await cur.fetchall()})
        cur = await conn.execute(queries.get("status_oldest_unsent"))
        row = await cur.fetchone()
        self.metrics.set_oldest_unsent(row[0] if row else None)
        self.metrics.set_connected(
            len(self.connections.by_device) if self.connections is not None else 0
        )

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
            if await store.prune(self.settings.changes_retention):
                logger.info("pruned the change log to the last %s", self.settings.changes_retention)
            archived = 0
            while not stop.is_set():
                moved = await store.archive(self.settings.archive_batch)
                archived += moved
                if moved < self.settings.archive_batch:
                    break
            if archived:
                logger.info("archived %d finished rows", archived)
            if await _wait(stop, self.settings.housekeeping_interval):
                return

    async def _confirm_loop(self, store: OutboxStore, stop: asyncio.Event) -> None:
        while not stop.is_set():
            while self._acks:
                await self._confirm(store, list(self._acks)[:CONFIRM_BATCH])
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

    async def _confirm(self, store: OutboxStore, acks: list[tuple[uuid.UUID, str]]) -> None:
        """Record the oldest queued ``acks`` in one statement, then drop them from the
        queue (only once recorded: a dropped connection keeps them)."""
        confirmed = await store.confirm_many(acks)
        for _ in acks:
            self._acks.popleft()
        unmatched = [(rid, device) for rid, device in acks if rid not in confirmed]
        if len(unmatched) < len(acks):
            self.metrics.confirmed(len(acks) - len(unmatched))
            logger.info("confirmed %d rows", len(acks) - len(unmatched))
        if logger.isEnabledFor(logging.DEBUG):
            for request_id, device in acks:
                if request_id in confirmed:
                    logger.debug("confirmed %s by %s", short(request_id), device)
        for request_id, device in unmatched:
            logger.warning("ack of %s by %s matches no sent row", short(request_id), device)

    async def _poll_loop(self, conn: AsyncConn, stop: asyncio.Event) -> None:
        polls = await self._load_polls(conn, None)
        reload_at = time.monotonic() + self.settings.polls_reload_interval
        while not stop.is_set():
            now = time.monotonic()
            if now >= reload_at or self._reload_polls.is_set():
                self._reload_polls.clear()
                polls = await self._load_polls(conn, polls)
                reload_at = now + self.settings.polls_reload_interval
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


async def _wait(stop: asyncio.Event, delay: float) -> bool:
    """Sleep up to ``delay`` seconds; True if ``stop`` was set meanwhile."""
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except TimeoutError:
        return False
    return True


async def _wait_any(stop: asyncio.Event, event: asyncio.Event, delay: float | None) -> bool:
    """Until ``event`` or ``stop`` is set, or ``delay`` seconds; True if ``stop`` is set."""
    if stop.is_set():
        return True
    if event.is_set():
        return False
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(event.wait())]
    try:
        await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
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


# --------------------------------------------------------------------------- assembly


@dataclass(frozen=True, slots=True, kw_only=True)
class Running:
    """What :func:`serve` started. The dispatcher runs until :meth:`stop` or the block ends."""

    dispatcher: Dispatcher
    connections: ConnectionServer | None
    """The SYNC gateway's server; None when the settings have no ``sync_listen``."""
    udp: UdpGateway | None
    """The UDP gateway, where acks arrive; None when the settings have no ``udp_listen``."""
    metrics: MetricsServer | None
    """``/metrics`` and ``/healthz``; None when the settings have no ``metrics_listen``."""
    mqtt: MqttGateway | None = None
    """The MQTT gateway; None when the settings have no ``mqtt``."""
    stopping: asyncio.Event
    """Set to stop the dispatcher (:meth:`stop`); it then drains as on SIGTERM."""
    finished: asyncio.Task[None]
    """The dispatcher's run: done once it has stopped."""

    @property
    def store(self) -> PoolStore:
        return self.dispatcher.store

    @property
    def sync_address(self) -> tuple[str, int] | None:
        """Where the SYNC server listens (the port the system picked for port 0)."""
        return None if self.connections is None else self.connections.address

    @property
    def udp_address(self) -> tuple[str, int] | None:
        return None if self.udp is None else self.udp.local_address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return None if self.metrics is None else self.metrics.address

    def stop(self) -> None:
        """Ask the dispatcher to stop: it claims nothing more and drains (bounded)."""
        self.stopping.set()

    async def stopped(self) -> None:
        """Until the dispatcher has stopped (after :meth:`stop`, or if it failed)."""
        await asyncio.wait([self.finished])


@contextlib.asynccontextmanager
async def serve(
    settings: DispatcherSettings, *, gateways: Mapping[str, Gateway] | None = None
) -> AsyncIterator[Running]:
    """The one place a dispatcher is assembled: start everything ``settings`` ask for
    (UDP and SMTP gateways, SYNC server and synchronizer, metrics), run the dispatcher,
    and yield it running.

    ``gateways`` are used besides those (e.g. a test double under ``udp`` when
    the settings have no ``udp_listen``); the settings' own win a clash of names.
    OSError if an address cannot be bound. Leaving stops the dispatcher as
    SIGTERM does (it drains for at most :data:`STOP_TIMEOUT`, then each step of
    leaving gets :data:`LEAVE_TIMEOUT`), then closes what was started, last
    started first.
    """
    dispatcher = Dispatcher(settings, {**(gateways or {}), **_configured_gateways(settings)})
    async with contextlib.AsyncExitStack() as started:
        udp = await _start_udp(dispatcher, started)
        mqtt = await start_mqtt(dispatcher, started)
        connections = await _start_connections(dispatcher, started)
        metrics = await _start_metrics(dispatcher, started)
        stopping = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            finished = tasks.create_task(dispatcher.run(stopping), name="dispatcher")
            try:
                yield Running(
                    dispatcher=dispatcher,
                    connections=connections,
                    udp=udp,
                    mqtt=mqtt,
                    metrics=metrics,
                    stopping=stopping,
                    finished=finished,
                )
            finally:
                stopping.set()
                await asyncio.wait([finished])  # bounded by Dispatcher.run itself


def _configured_gateways(settings: DispatcherSettings) -> dict[str, Gateway]:
    """The gateways the settings name that need no socket of their own yet: SMTP."""
    if settings.smtp is None:
        return {}
    smtp = smtp_from_url(settings.smtp, password=settings.smtp_password)
    logger.info("SMTP gateway: %s", describe_smtp(smtp))
    return {"smtp": smtp}


async def _start_udp(
    dispatcher: Dispatcher, started: contextlib.AsyncExitStack
) -> UdpGateway | None:
    if dispatcher.settings.udp_listen is None:
        return None
    udp = await UdpGateway.bind(
        split_listen(dispatcher.settings.udp_listen),
        secret_for=dispatcher.secret_for,
        fetch_secret=dispatcher.fetch_secret,
        on_ack=dispatcher.on_ack,
    )
    started.callback(udp.close)
    dispatcher.add_gateway(udp)
    dispatcher.udp_address = _join(*udp.local_address)
    logger.info("UDP gateway on %s (acks arrive here)", dispatcher.udp_address)
    return udp


async def _start_connections(
    dispatcher: Dispatcher, started: contextlib.AsyncExitStack
) -> ConnectionServer | None:
    settings = dispatcher.settings
    if settings.sync_listen is None:
        return None
    server = ConnectionServer(
        dispatcher.store,
        dispatcher.on_ack,
        settings=settings.sync,
        on_connect=lambda _device: dispatcher.wake(),
    )
    synchronizer = Synchronizer(dispatcher.store.pool, limits=settings.sync_limits)
    server.synchronizer = synchronizer
    await server.start(*split_listen(settings.sync_listen))
    started.push_async_callback(server.close)
    started.push_async_callback(synchronizer.close)
    dispatcher.add_connections(server)
    tls = " (TLS)" if settings.sync.tls else ""
    logger.info("SYNC gateway on %s%s", _join(*server.address), tls)
    return server


async def _start_metrics(
    dispatcher: Dispatcher, started: contextlib.AsyncExitStack
) -> MetricsServer | None:
    if dispatcher.settings.metrics_listen is None:
        return None
    host, port = split_listen(dispatcher.settings.metrics_listen)
    served = await serve_metrics(dispatcher.metrics, host, port, dispatcher.health)
    started.push_async_callback(served.close)
    logger.info("metrics on http://%s/metrics", _join(*served.address))
    return served


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- the command


def run_dispatcher(
    settings: DispatcherSettings, *, gateways: Mapping[str, Gateway] | None = None
) -> int:
    """``pushsync dispatch``: run until SIGTERM or SIGINT, then drain; exit status 0.

    SIGHUP re-reads the polls (:meth:`Dispatcher.reload`). OSError if an address
    cannot be bound.
    """

    async def main() -> int:
        async with serve(settings, gateways=gateways) as running:
            with _signals_handled(running):
                await running.stopped()
        return 0

    return asyncio.run(main())


@contextlib.contextmanager
def _signals_handled(running: Running) -> Iterator[None]:
    """SIGTERM and SIGINT stop ``running`` (and start the exit watchdog); SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stops = (signal.SIGTERM, signal.SIGINT)
    for signum in stops:
        loop.add_signal_handler(signum, _stopper(running.stopping, signum))
    loop.add_signal_handler(signal.SIGHUP, running.dispatcher.reload)
    try:
        yield
    finally:
        for signum in (*stops, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def _stopper(stop: asyncio.Event, signum: signal.Signals) -> Any:
    def handler() -> None:
        if stop.is_set():
            # A second stop request: whoever sent it prefers leaving to waiting. Rows
            # claimed and not recorded go back to the others when their lease expires.
            logger.warning(
                "%s again: leaving now, without waiting for sends under way", signum.name
            )
            _leave(1)
        logger.info(
            "%s: stopping: sends under way (an SMTP session, say) get %.0fs to finish, "
            "leaving takes %.0fs at most; %s again leaves at once",
            signum.name,
            STOP_TIMEOUT,
            EXIT_DEADLINE,
            "Ctrl-C" if signum == signal.SIGINT else signum.name,
        )
        _exit_at_the_latest(EXIT_DEADLINE)
        stop.set()

    return handler


def _leave(status: int) -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(status)


def _exit_at_the_latest(seconds: float) -> None:
    """Exit with status 0 after ``seconds`` even if stopping hangs (a thread, a socket).

    Everything before this is bounded too; this is the guarantee a service
    manager relies on, so it does not send SIGKILL with leases held.
    """

    def force() -> None:
        logger.error("still stopping %.0fs after the stop request: exiting now", seconds)
        _leave(0)

    timer = threading.Timer(seconds, force)
    timer.daemon = True
    timer.start()


FAILURES_SHOWN = 3
"""Failed sends named in the one warning for a group; the others are logged at DEBUG."""


def _log_failures(group: list[tuple[Claimed, Outcome]], what: str) -> None:
    """One warning for a group of failed sends: each, if few; else the first few and a count."""
    if len(group) == 1:
        item, outcome = group[0]
        logger.warning("%s to %s %s: %s", item.request_id, item.device_id, what, outcome.error)
        return
    shown = "; ".join(
        f"{short(item.request_id)} to {item.device_id}: {outcome.error}"
        for item, outcome in group[:FAILURES_SHOWN]
    )
    more = len(group) - FAILURES_SHOWN
    rest = f"; and {more} more" if more > 0 else ""
    logger.warning("%d notifications %s: %s%s", len(group), what, shown, rest)
    for item, outcome in group[FAILURES_SHOWN:]:
        logger.debug("%s to %s %s: %s", item.request_id, item.device_id, what, outcome.error)


__all__ = [
    "Dispatcher",
    "DispatcherSettings",
    "Running",
    "run_dispatcher",
    "serve",
    "split_listen",
]
