"""The listener runtime: ``pushsync listen CONFIG.yaml``.

:class:`Listener` opens the configured channels, takes each verified message
they hand it (:meth:`Listener.handle`: dedupe, run the matching handlers, ack),
and stops or reloads on signals. What it does for the user, step by step, is in
``docs/listener.md`` ("Running"); the channels are in
:mod:`pushsync.listener.channels` and :mod:`pushsync.listener.imap`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal, Protocol, TypeVar

from pushsync.errors import PushsyncError, RulesError
from pushsync.listener.actions import Actions, Outcome, Performed, perform
from pushsync.listener.channels import (
    DEFAULT_MAILDIR_POLL,
    MaildirChannel,
    PollChannel,
    SyncChannel,
    UdpChannel,
)
from pushsync.listener.config import (
    Handler,
    ListenerConfig,
    SyncAction,
    load_config,
    load_for_command,
    read_secret_file,
)
from pushsync.listener.connection import KeyRefused
from pushsync.listener.dedupe import DedupeError, DedupeStore, GroupCommit
from pushsync.listener.handlers import match
from pushsync.listener.imap import ImapChannel
from pushsync.listener.localdb import LocalDatabaseError
from pushsync.listener.state import SYNC_LOCK, FolderLock, StateInUse, hold_for_listener
from pushsync.listener.sync import NO_SYNC_ROUTE, KeptDatabase, SyncFailed, sync_once
from pushsync.logs import Throttle, plain, short
from pushsync.wire import protocol
from pushsync.wire.limits import MAX_DATAGRAM

logger = logging.getLogger(__name__)

EXPIRE_EVERY: Final = 60.0
"""Seconds between two sweeps of expired request ids from the dedupe store."""

DRAIN_TIMEOUT: Final = 10.0
"""Seconds a stopping listener waits for messages being handled."""

NOT_FOR_THIS_DEVICE: Final = "not for this device"
DEDUPE_FAILED: Final = "dedupe store failed"

Status = Literal["handled", "unmatched", "duplicate", "rejected", "deferred"]
"""``deferred``: valid, but it could not be taken now (the dedupe store failed); a
channel that holds its messages (maildir, IMAP) keeps it for its next look."""
C = TypeVar("C")
Reply = Callable[[bytes], None]


class Channel(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class Counters:
    """What the listener has seen since it started."""

    received: int = 0
    """Envelopes that arrived on any channel, valid or not."""
    handled: int = 0
    """Messages taken for the first time (with or without a matching handler)."""
    unmatched: int = 0
    """Of those, messages no handler matched."""
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    """By reason: the ``ProtocolError`` class name, ``not for this device``, …"""
    actions_failed: int = 0
    """Handlers whose action failed and whose ``altaction`` (if any) failed too."""
    acks_sent: int = 0


class Listener:
    """One device's listener: its config, secret, dedupe store, action runner and counters.

    Its channels hand it verified messages (:meth:`handle`) and rejected
    envelopes (:meth:`verify`: counted by reason, logged with channel and peer);
    nothing a peer sends raises out of it.
    """

    def __init__(
        self,
        config: ListenerConfig,
        *,
        secret: bytes | None = None,
        log_messages: bool = False,
        maildir_poll: float = DEFAULT_MAILDIR_POLL,
        expire_every: float = EXPIRE_EVERY,
        drain_timeout: float = DRAIN_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``secret`` defaults to the config's key file; raises ``PushsyncError`` if unusable."""
        self.config = config
        self.secret = read_secret_file(config) if secret is None else secret
        self.log_messages = log_messages
        self.maildir_poll = maildir_poll
        self.expire_every = expire_every
        self.drain_timeout = drain_timeout
        self.clock = clock
        self.counters = Counters()
        self._rejections = Throttle(logger)
        """Anyone can send datagrams and mail: one line per channel, reason and interval."""
        self._failures = Throttle(logger)
        """A failing action is logged once per handler and interval, not once per message."""
        self.shutdown_requested = asyncio.Event()
        self.actions = Actions(
            device=config.device, stop=self.shutdown_requested, sync=self._synchronize
        )
        self.dedupe = DedupeStore.in_state_dir(config.state_dir)
        self.local = KeptDatabase()
        """The local database, kept open while the listener runs (see :meth:`_open_local`)."""
        self._remembered = GroupCommit(self.dedupe)
        self._reported = (time.monotonic(), self._activity())
        """When the last activity line was logged, and the counts it reached."""
        self.channels: list[Channel] = []
        self.started = asyncio.Event()
        self._tasks: set[asyncio.Task[Status]] = set()
        self._running: set[uuid.UUID] = set()
        """Request ids whose actions are running (their duplicates are not acked yet)."""

    # ------------------------------------------------------------------ messages

    def verify(
        self, decode: Callable[[], protocol.Message], *, channel: str, peer: str
    ) -> protocol.Message | None:
        """Count an arrived envelope and run ``decode``; ``None`` (counted, logged) if invalid."""
        self.counters.received += 1
        try:
            return decode()
        except protocol.ProtocolError as exc:
            self._reject(type(exc).__name__, str(exc), channel=channel, peer=peer)
        except Exception as exc:  # a bug in decoding must not stop the listener
            logger.exception("%s: cannot decode an envelope from %s", channel, peer)
            self._reject("internal error", type(exc).__name__, channel=channel, peer=peer)
        return None

    def verify_envelope(self, data: bytes, *, channel: str, peer: str) -> protocol.Message | None:
        """:meth:`verify` a signed envelope as UDP, SYNC and MQTT carry it."""
        return self.verify(
            lambda: protocol.decode_message(data, self.secret, self.clock(), limit=MAX_DATAGRAM),
            channel=channel,
            peer=peer,
        )

    def spawn(
        self, msg: protocol.Message, *, reply: Reply | None, channel: str, peer: str
    ) -> asyncio.Task[Status]:
        """Handle ``msg`` in a task of its own (for channels that cannot wait)."""
        task = asyncio.create_task(self.handle(msg, reply, channel=channel, peer=peer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def handle(
        self,
        msg: protocol.Message,
        reply: Reply | None,
        *,
        channel: str = "direct",
        peer: str = "-",
    ) -> Status:
        """Take one verified message: dedupe, run the matching handlers, ack. Never raises.

        1. A message for another device is rejected ("not for this device"):
           logged and counted, not acked.
        2. The request id goes into the dedupe store *before* anything runs. A
           duplicate is counted and not run again, but acked again when the
           handlers would confirm it (the earlier copy's ack may have been lost).
        3. The matching handlers are performed in order, one after the other.
        4. One log line: request id, subject, channel, handlers and outcomes;
           content and output only with ``log_messages``, the secret never.
        5. Ack through ``reply`` when a performed handler asks for confirmation.
           An unmatched message is not confirmed (as in MobiLink): the
           dispatcher keeps it until it expires. ``reply=None`` (Maildir, IMAP):
           no way back, no ack.
        """
        try:
            return await self._handle(msg, reply, channel=channel, peer=peer)
        except Exception as exc:  # a bug here must not stop the listener
            logger.exception("message %s via %s from %s failed", msg.request_id, channel, peer)
            self._reject("internal error", type(exc).__name__, channel=channel, peer=peer)
            return "rejected"

    async def _handle(
        self, msg: protocol.Message, reply: Reply | None, *, channel: str, peer: str
    ) -> Status:
        where = f"{channel} from {peer}"
        if msg.device != self.config.device:
            self._reject(
                NOT_FOR_THIS_DEVICE,
                f"request {msg.request_id} names device {msg.device!r}",
                channel=channel,
                peer=peer,
            )
            return "rejected"
        try:
            first = await self._remembered.remember(msg.request_id, msg.expires)
        except DedupeError as exc:
            # Neither run nor ack: the server resends, and the store may work by then.
            self._reject(DEDUPE_FAILED, str(exc), channel=channel, peer=peer)
            return "deferred"
        handlers = match(self.config.handlers, msg)
        if not first:
            self.counters.duplicates += 1
            # The first copy's actions may still be running: its own ack comes after them.
            running = msg.request_id in self._running
            acked = not running and any(h.confirm for h in handlers) and self._ack(msg, reply)
            logger.info(
                "message %s subject %r via %s: duplicate, not run again%s",
                short(msg.request_id),
                msg.subject,
                where,
                "; acked again"
                if acked
                else ("; the first copy is still running" if running else ""),
            )
            return "duplicate"
        self.counters.handled += 1
        self._running.add(msg.request_id)
        try:
            return await self._run_handlers(msg, handlers, reply, where)
        finally:
            self._running.discard(msg.request_id)

    async def _run_handlers(
        self, msg: protocol.Message, handlers: list[Handler], reply: Reply | None, where: str
    ) -> Status:
        if not handlers:
            self.counters.unmatched += 1
            logger.info(
                "message %s subject %r via %s: no handler matched; not confirmed%s",
                short(msg.request_id),
                msg.subject,
                where,
                self._content(msg),
            )
            return "unmatched"
        done: list[Performed] = []
        failed: list[str] = []
        for handler in handlers:
            performed = await perform(handler, msg, self.actions)
            if not performed.ok:
                self.counters.actions_failed += 1
                failed.append(performed.handler)
            done.append(performed)
        acked = any(p.confirm for p in done) and self._ack(msg, reply)
        if failed or self.log_messages or logger.isEnabledFor(logging.DEBUG):
            args = (
                short(msg.request_id),
                msg.subject,
                where,
                "; ".join(self._outcome(p) for p in done),
                "acked" if acked else ("not confirmed" if reply is not None else "no ack channel"),
                self._content(msg),
            )
            line = "message %s subject %r via %s: %s; %s%s"
            if self.log_messages:  # every message in full, as asked
                logger.log(logging.WARNING if failed else logging.INFO, line, *args)
            elif failed:  # one line per failing handler and interval; the rest at DEBUG
                self._failures.warning(line, *args, key=tuple(failed))
            else:
                logger.debug(line, *args)
        return "handled"

    def _ack(self, msg: protocol.Message, reply: Reply | None) -> bool:
        if reply is None:
            return False
        try:
            confirmed = round(self.clock() * 1000) / 1000
            ack = protocol.Ack(
                request_id=msg.request_id, device=self.config.device, confirmed=confirmed
            )
            reply(protocol.encode_ack(ack, self.secret))
        except Exception as exc:
            logger.warning("cannot ack %s: %s", short(msg.request_id), plain(exc))
            return False
        self.counters.acks_sent += 1
        return True

    def _outcome(self, performed: Performed) -> str:
        outcome = performed.outcome
        text = f"handler {performed.handler}: {_result(outcome.ok)} ({outcome.detail})"
        if self.log_messages and outcome.output:
            text += f" output {outcome.output!r}"
        if performed.alternative is not None:
            alt = performed.alternative
            text += f", altaction {_result(alt.ok)} ({alt.detail})"
            if self.log_messages and alt.output:
                text += f" output {alt.output!r}"
        return text

    def _content(self, msg: protocol.Message) -> str:
        if not self.log_messages:
            return ""
        return f"; sender {msg.sender!r} priority {msg.priority} content {msg.content!r}"

    def _reject(self, reason: str, detail: str, *, channel: str, peer: str) -> None:
        self.counters.rejected[reason] += 1
        self._rejections.warning(
            "dropped message via %s from %s: %s: %s",
            channel,
            peer,
            reason,
            detail,
            key=(channel, reason),
        )

    async def _synchronize(self) -> Outcome:
        """The ``sync`` action: over the open SYNC connection if there is one, else a new one.

        Without a ``sync`` or ``poll`` channel it fails at once, touching neither the
        state folder's lock nor the local database.
        """
        channel = next((c for c in self.channels if isinstance(c, SyncChannel)), None)
        if channel is None and self.config.sync_server is None:
            return Outcome(ok=False, detail=f"sync failed: {NO_SYNC_ROUTE}")
        try:
            if channel is not None and channel.connected.is_set():
                async with channel.borrow() as lent:
                    result = await sync_once(self.config, self.secret, lent, kept=self.local)
            else:
                result = await sync_once(self.config, self.secret, kept=self.local)
        except (SyncFailed, LocalDatabaseError, StateInUse, KeyRefused, OSError) as exc:
            return Outcome(ok=False, detail=f"sync failed: {exc}")
        logger.info("%s", result.describe())
        return Outcome(ok=True, detail=result.describe())

    # ------------------------------------------------------------------ config

    def reload(self, path: str | Path | None = None) -> bool:
        """Re-read the config (SIGHUP); ``True`` if its handlers are now in use.

        A config with errors is logged, every error located, and the old one
        kept. Only the handlers are replaced: changes to ``device``,
        ``secret_file``, ``state_dir``, ``publication`` or ``channels`` need a
        restart, and the log says so.
        """
        source = self.config.path if path is None else Path(path)
        try:
            new = load_config(source)
        except RulesError as exc:
            for problem in exc:
                logger.error("reload: %s", problem)
            logger.error("reload: %s has errors; keeping the running config", source)
            return False
        except PushsyncError as exc:
            logger.error("reload: %s; keeping the running config", exc)
            return False
        old = self.config
        restart = [
            key
            for key in ("device", "secret_file", "state_dir", "publication", "channels")
            if getattr(new, key) != getattr(old, key)
        ]
        self.config = replace(old, handlers=new.handlers)
        names = ", ".join(h.name for h in new.handlers)
        logger.info("reload: %s: now using handlers %s", source, names)
        if restart:
            logger.warning(
                "reload: changes to %s take effect only after a restart", ", ".join(restart)
            )
        return True

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Open the channels and take messages until ``stop`` is set; then close everything.

        Expired request ids are forgotten every :attr:`expire_every` seconds.
        ``stop`` is set by SIGTERM, SIGINT or a ``shutdown`` action. Messages in
        flight then get :data:`DRAIN_TIMEOUT` seconds, and are then cancelled:
        not acked, so the server resends them, but the dedupe store already
        holds their id, so they do not run again.

        Raises ``PushsyncError`` or ``OSError`` if no channel can be opened.
        """
        relay = asyncio.create_task(self._relay_shutdown(stop))
        try:
            self._open_local()
            await self._start_channels()
            self.started.set()
            logger.info(
                "listening as %s on %s",
                self.config.device,
                ", ".join(self._describe(c) for c in self.channels),
            )
            while not stop.is_set():
                await self._forget_expired()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.expire_every)
                self._log_activity()
            logger.info("stopping")
        finally:
            relay.cancel()
            await self._shutdown()

    def _open_local(self) -> None:
        """Open the local database before the first message when a handler synchronizes,
        so the first ``sync`` costs what the next ones do. Skipped while a ``pushsync
        sync`` holds ``sync.lock``; a failure is logged, and the first ``sync`` tries again
        (and fails with the reason, as before)."""
        config = self.config
        actions = [a for h in config.handlers for a in (h.action, h.altaction)]
        if config.sync_server is None or not any(isinstance(a, SyncAction) for a in actions):
            return
        lock = FolderLock(config.state_dir, SYNC_LOCK)
        try:
            if not lock.try_acquire():
                return
            with lock:
                self.local.open(config)
        except (LocalDatabaseError, OSError) as exc:
            logger.warning("local database: %s; the sync action will try again", exc)

    async def _relay_shutdown(self, stop: asyncio.Event) -> None:
        await self.shutdown_requested.wait()
        stop.set()

    async def _start_channels(self) -> None:
        configured = self.config.channels
        udp: UdpChannel | None = None
        if configured.udp is not None:
            udp = UdpChannel(self, configured.udp.bind)
            await udp.start()
            self.channels.append(udp)
        if configured.maildir is not None:
            maildir = MaildirChannel(self, configured.maildir.path, poll=self.maildir_poll)
            await maildir.start()
            self.channels.append(maildir)
        if configured.imap is not None:
            imap = ImapChannel(self, configured.imap)
            await imap.start()
            self.channels.append(imap)
        if configured.sync is not None:
            bound = udp
            sync = SyncChannel(
                self,
                configured.sync,
                udp_port=lambda: bound.address[1] if bound is not None else None,
            )
            await sync.start()
            self.channels.append(sync)
        if configured.poll is not None:
            poll = PollChannel(self, configured.poll)
            await poll.start()
            self.channels.append(poll)
        if configured.mqtt is not None:
            from pushsync.listener.mqtt import MqttChannel  # paho-mqtt: only when configured

            mqtt = MqttChannel(self, configured.mqtt)
            await mqtt.start()
            self.channels.append(mqtt)
        if not self.channels:
            raise PushsyncError("no channel is configured")

    def _describe(self, channel: Channel) -> str:
        if isinstance(channel, UdpChannel):
            host, port = channel.address
            return f"udp {host}:{port}"
        if isinstance(channel, MaildirChannel):
            return f"maildir {channel.path}"
        if isinstance(channel, SyncChannel):
            return f"sync {channel.config.server}{' (TLS)' if channel.config.tls else ''}"
        if isinstance(channel, PollChannel):
            return f"poll {channel.config.server} every {channel.config.every}"
        if isinstance(channel, ImapChannel):
            imap = channel.config
            return (
                f"imap {channel.server} folder {imap.folder!r} as {imap.user!r} every {imap.every}"
            )
        return channel.name

    def channel(self, kind: type[C]) -> C:
        """The running channel of type ``kind`` (after :attr:`started`)."""
        for channel in self.channels:
            if isinstance(channel, kind):
                return channel
        raise RuntimeError(f"no {kind.__name__} is running")

    @property
    def udp_address(self) -> tuple[str, int]:
        """The bound address of the UDP channel (after :attr:`started`)."""
        for channel in self.channels:
            if isinstance(channel, UdpChannel):
                return channel.address
        raise RuntimeError("no UDP channel is running")

    async def _forget_expired(self) -> None:
        try:
            dropped = await asyncio.to_thread(self.dedupe.forget_expired, self.clock())
        except DedupeError as exc:
            logger.error("cannot forget expired request ids: %s", exc)
            return
        if dropped:
            logger.debug("forgot %d expired request ids", dropped)

    async def _shutdown(self) -> None:
        channels, self.channels = self.channels, []
        for channel in channels:
            try:
                async with asyncio.timeout(self.drain_timeout):
                    await channel.close()
            except TimeoutError:
                logger.warning("%s channel did not stop in %gs", channel.name, self.drain_timeout)
            except Exception:
                logger.exception("cannot close the %s channel", channel.name)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("cancelled %d messages still being handled", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        await self.actions.aclose()
        self.local.close()
        self.dedupe.close()
        if self.started.is_set():  # a listener that never started has nothing to count
            self._log_totals()

    def _activity(self) -> tuple[int, ...]:
        counts = self.counters
        return (
            counts.received,
            counts.handled,
            counts.unmatched,
            counts.duplicates,
            counts.rejected.total(),
            counts.actions_failed,
            counts.acks_sent,
            self.dedupe.commits,
        )

    def _log_activity(self) -> None:
        """One line per interval in which envelopes arrived: the counts since the last one."""
        since, before = self._reported
        now, counts = time.monotonic(), self._activity()
        self._reported = (now, counts)
        delta = [a - b for a, b in zip(counts, before, strict=True)]
        if delta[0] == 0:
            return
        logger.info(
            "in the last %.0fs: received %d, handled %d (unmatched %d), duplicates %d, "
            "rejected %d, actions failed %d, acks sent %d, dedupe commits %d",
            now - since,
            *delta,
        )

    def _log_totals(self) -> None:
        """One line at stop: what arrived and what became of it, and the dedupe store's syncs."""
        counts = self.counters
        logger.info(
            "stopped: received %d, handled %d (unmatched %d), duplicates %d, rejected %d, "
            "acks sent %d, dedupe commits %d",
            counts.received,
            counts.handled,
            counts.unmatched,
            counts.duplicates,
            counts.rejected.total(),
            counts.acks_sent,
            self.dedupe.commits,
        )


def _result(ok: bool) -> str:
    return "ok" if ok else "failed"


# --------------------------------------------------------------------------- entry point


def run_listener(config_path: str, *, log_messages: bool = False) -> int:
    """``pushsync listen CONFIG``: run until SIGTERM or SIGINT; the exit status.

    0 after an orderly stop; 2 when the config or the key file cannot be used
    (every problem printed to stderr, located); 1 when the listener cannot
    start (no channel could be opened, the state directory is unusable).
    """
    loaded = load_for_command(config_path)
    if isinstance(loaded, int):
        return loaded
    config, secret = loaded
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr
        )
    try:
        return asyncio.run(_main(config, secret, log_messages=log_messages))
    except KeyboardInterrupt:
        return 0


async def _main(config: ListenerConfig, secret: bytes, *, log_messages: bool) -> int:
    try:
        folder = hold_for_listener(config.state_dir, config.path)
    except StateInUse as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot use state_dir {config.state_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with folder:
        return await _run(config, secret, log_messages=log_messages)


async def _run(config: ListenerConfig, secret: bytes, *, log_messages: bool) -> int:
    try:
        listener = Listener(config, secret=secret, log_messages=log_messages)
    except DedupeError as exc:
        print(exc, file=sys.stderr)
        return 1
    except PushsyncError as exc:  # the key file
        print(exc, file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for signum, callback in (
        (signal.SIGTERM, stop.set),
        (signal.SIGINT, stop.set),
        (getattr(signal, "SIGHUP", None), listener.reload),
    ):
        if signum is None:
            continue
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, callback)
            installed.append(signum)
    try:
        await listener.run(stop)
    except PushsyncError as exc:
        print(f"cannot start the listener: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot start the listener: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
    return 0
