"""Running a handler's actions: ``run``, ``start``, ``socket``, ``sync`` and ``shutdown``.

:func:`perform` runs a handler's action (and its ``altaction``) through
:class:`Actions`; every runner returns an :class:`Outcome` instead of raising,
and programs get an argv list from :func:`pushsync.listener.handlers.argv_for`,
never a shell. How each action behaves is in ``docs/listener.md`` ("Actions").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from pushsync.listener.config import (
    Action,
    Handler,
    RunAction,
    ShutdownAction,
    SocketAction,
    StartAction,
    SyncAction,
)
from pushsync.listener.handlers import argv_for, socket_text
from pushsync.wire.protocol import Message

OUTPUT_CAP: Final = 64 * 1024
"""Most bytes of a program's output, or of a socket's reply, kept for the log."""

KILL_WAIT: Final = 2.0
"""Seconds to wait for a killed process group to be gone."""

_READ_SIZE: Final = 16 * 1024


@dataclass(frozen=True, slots=True)
class Outcome:
    """What came of one action: whether it succeeded, a short reason, and output for the log."""

    ok: bool
    detail: str
    output: str = ""


SyncFunction = Callable[[], Awaitable[Outcome]]
"""One synchronization: the built-in sync client, injected by the runtime."""


def seconds(duration: timedelta | None) -> float | None:
    return None if duration is None else duration.total_seconds()


def _shown(duration: float) -> str:
    """``5s``, ``0.25s``: how a timeout appears in an outcome."""
    return f"{duration:g}s"


def _timed_out(duration: float | None) -> Outcome:
    return Outcome(False, f"timed out after {_shown(duration or 0.0)}")


def _exit_detail(returncode: int) -> str:
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit {returncode}"


def _start_failure(program: str, exc: OSError) -> Outcome:
    if isinstance(exc, FileNotFoundError):
        return Outcome(False, f"program not found: {program}")
    if isinstance(exc, PermissionError):
        return Outcome(False, f"program not executable: {program}")
    return Outcome(False, f"cannot start {program}: {exc.strerror or exc}")


def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the process group that ``process`` leads (it was started in its own session)."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> bytes:
    """Everything ``stream`` gives until EOF, keeping the first ``cap`` bytes."""
    kept = bytearray()
    while chunk := await stream.read(_READ_SIZE):
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
    return bytes(kept)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- run


async def run_program(argv: list[str], timeout: float | None, *, cap: int = OUTPUT_CAP) -> Outcome:  # noqa: ASYNC109  the action's configured timeout
    """Run ``argv`` (no shell), wait for it within ``timeout``; exit 0 is success.

    stdout and stderr are captured together; the first ``cap`` bytes are kept
    for the log and the rest read and discarded, so the program never blocks
    on a full pipe. It runs in its own session; on timeout its process group
    is killed.
    """
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return _start_failure(argv[0], exc)
    assert process.stdout is not None  # noqa: S101  type narrowing; stdout=PIPE above
    try:
        async with asyncio.timeout(timeout):
            output = await _read_capped(process.stdout, cap)
            returncode = await process.wait()
    except TimeoutError:
        _kill_group(process)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(KILL_WAIT):
                await process.wait()
        return _timed_out(timeout)
    except BaseException:  # cancelled: the program must not outlive its action
        _kill_group(process)
        raise
    return Outcome(returncode == 0, _exit_detail(returncode), _text(output))


# --------------------------------------------------------------------------- socket


async def send_to_socket(
    host: str,
    port: int,
    text: str,
    *,
    reply: bool,
    timeout: float | None,  # noqa: ASYNC109  the action's configured timeout
    cap: int = OUTPUT_CAP,
) -> Outcome:
    """Send ``text`` (UTF-8) to ``host:port`` over TCP; with ``reply`` wait for an answer.

    The connection is half-closed after the text (the request is complete, for
    servers that read to the end); the answer is one line or everything up to
    the end of the stream, at most ``cap`` bytes. An empty answer is a failure.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(text.encode("utf-8"))
                if writer.can_write_eof():
                    writer.write_eof()
                await writer.drain()
                answer = await _read_reply(reader, cap) if reply else None
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError:
        return _timed_out(timeout)
    except ConnectionRefusedError:
        return Outcome(False, "connection refused")
    except OSError as exc:
        return Outcome(False, f"cannot connect to {host}:{port}: {exc.strerror or exc}")
    if answer is None:
        return Outcome(True, f"sent {len(text.encode('utf-8'))} bytes")
    if not answer:
        return Outcome(False, "no reply: the connection was closed")
    return Outcome(True, "reply received", _text(answer))


async def _read_reply(reader: asyncio.StreamReader, cap: int) -> bytes:
    """One line (with its newline), or everything until EOF; at most ``cap`` bytes."""
    kept = bytearray()
    while len(kept) < cap:
        chunk = await reader.read(min(_READ_SIZE, cap - len(kept)))
        if not chunk:
            break
        newline = chunk.find(b"\n")
        if newline >= 0:
            kept += chunk[: newline + 1]
            break
        kept += chunk
    return bytes(kept)


# --------------------------------------------------------------------------- sync


class _Run:
    """One sync run and everyone waiting for it."""

    __slots__ = ("future", "timeout")

    def __init__(self, future: asyncio.Future[Outcome], timeout: float | None) -> None:
        self.future = future
        self.timeout = timeout

    def allow(self, timeout: float | None) -> None:
        """A request joining this run: the run may take as long as its most patient request."""
        if self.timeout is not None:
            self.timeout = None if timeout is None else max(self.timeout, timeout)


class SyncGate:
    """Coalesces sync requests: one run at a time, at most one more queued behind it.

    A request while nothing runs starts a run. A request while one runs
    queues a second run; requests arriving while that one waits join it.
    Every request gets the outcome of the run it is part of. A caller that is
    cancelled stops waiting, but the run it joined goes on for the others.
    """

    def __init__(self, sync: SyncFunction) -> None:
        self._sync = sync
        self._running: _Run | None = None
        self._queued: _Run | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.runs = 0
        """How many runs have started."""

    async def request(self, timeout: float | None = None) -> Outcome:  # noqa: ASYNC109  the action's configured timeout
        """Have a sync happen that starts after this call; its outcome."""
        run = self._queued
        if run is not None:
            run.allow(timeout)
        else:
            run = _Run(asyncio.get_running_loop().create_future(), timeout)
            if self._running is None:
                self._start(run)
            else:
                self._queued = run
        return await asyncio.shield(run.future)

    async def aclose(self) -> None:
        """Cancel the running sync and drop the queued one; their waiters are cancelled."""
        if self._queued is not None:
            self._queued.future.cancel()
            self._queued = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, run: _Run) -> None:
        self._running = run
        self.runs += 1
        task = asyncio.create_task(self._execute(run))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, run: _Run) -> None:
        try:
            try:
                async with asyncio.timeout(run.timeout):
                    outcome = await self._sync()
            except TimeoutError:
                outcome = _timed_out(run.timeout)
            except Exception as exc:
                outcome = Outcome(False, f"sync failed: {exc}")
            if not run.future.done():
                run.future.set_result(outcome)
        finally:
            if not run.future.done():
                run.future.cancel()
            self._running = None
        queued, self._queued = self._queued, None
        if queued is not None:
            self._start(queued)


# --------------------------------------------------------------------------- the runner


@dataclass(frozen=True, slots=True)
class Performed:
    """What :func:`perform` did for one handler."""

    handler: str
    outcome: Outcome
    alternative: Outcome | None
    """The ``altaction``'s outcome, when the action failed and there is one."""
    confirm: bool
    """Whether to confirm delivery of the message to the server."""

    @property
    def ok(self) -> bool:
        """Whether the action, or else its ``altaction``, succeeded."""
        return self.outcome.ok or (self.alternative is not None and self.alternative.ok)


class Actions:
    """Runs actions for one listener: its device id, its sync gate, its background programs."""

    def __init__(
        self,
        *,
        device: str,
        stop: asyncio.Event,
        sync: SyncFunction | None = None,
        output_cap: int = OUTPUT_CAP,
    ) -> None:
        self.device = device
        self.stop = stop
        self.sync_gate = SyncGate(sync) if sync is not None else None
        self.output_cap = output_cap
        self._background: set[asyncio.Task[None]] = set()

    async def run(
        self,
        action: Action,
        msg: Message,
        *,
        message_start: str | None = None,
        now: datetime | None = None,
    ) -> Outcome:
        """Run one action for ``msg``; ``now`` (local time) fills the time variables."""
        when = datetime.now() if now is None else now
        if isinstance(action, RunAction):
            argv = argv_for(action, msg, now=when, device=self.device, message_start=message_start)
            return await run_program(argv, seconds(action.timeout), cap=self.output_cap)
        if isinstance(action, StartAction):
            argv = argv_for(action, msg, now=when, device=self.device, message_start=message_start)
            return await self.start_program(argv, seconds(action.timeout))
        if isinstance(action, SocketAction):
            text = socket_text(
                action, msg, now=when, device=self.device, message_start=message_start
            )
            return await send_to_socket(
                action.host,
                action.port,
                text,
                reply=action.reply,
                timeout=seconds(action.timeout),
                cap=self.output_cap,
            )
        if isinstance(action, SyncAction):
            return await self.sync(seconds(action.timeout))
        if isinstance(action, ShutdownAction):
            return self.shutdown()
        raise TypeError(f"unknown action {action!r}")  # pragma: no cover

    async def sync(self, timeout: float | None) -> Outcome:  # noqa: ASYNC109  the action's configured timeout
        if self.sync_gate is None:
            return Outcome(False, "sync is not configured")
        return await self.sync_gate.request(timeout)

    def shutdown(self) -> Outcome:
        self.stop.set()
        return Outcome(True, "stopping the listener")

    async def start_program(self, argv: list[str], timeout: float | None) -> Outcome:  # noqa: ASYNC109  the action's configured timeout
        """Start ``argv`` in the background (no shell); success once it has started.

        Its output goes to ``/dev/null``. A task per program waits for it, so
        no zombie stays; with a ``timeout`` that task kills the process group
        when the timeout passes. Programs still running when the listener
        stops are left running.
        """
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as exc:
            return _start_failure(argv[0], exc)
        self._keep(_reap(process, timeout))
        return Outcome(True, f"started, pid {process.pid}")

    @property
    def background(self) -> int:
        """How many started programs are still being waited for."""
        return len(self._background)

    async def wait_background(self) -> None:
        """Wait until every started program has ended (tests; an orderly stop)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self) -> None:
        """Stop waiting for started programs (they keep running) and cancel a running sync."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.sync_gate is not None:
            await self.sync_gate.aclose()

    def _keep(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _reap(process: asyncio.subprocess.Process, timeout: float | None) -> None:  # noqa: ASYNC109  the action's configured timeout
    """Wait for a started program so it leaves no zombie; past ``timeout``, kill its group."""
    try:
        async with asyncio.timeout(timeout):
            await process.wait()
    except TimeoutError:
        _kill_group(process)
        await process.wait()


async def perform(
    handler: Handler,
    msg: Message,
    actions: Actions,
    *,
    now: datetime | None = None,
) -> Performed:
    """Run ``handler``'s action for ``msg``, and its ``altaction`` if the action failed.

    An unexpected exception in a runner is an outcome too, so one handler
    cannot stop the listener. ``confirm`` (per the handler's ``confirm``) is
    set whenever the action ran, whatever its outcome: the message was
    *accepted*, and a redelivery would not make the action succeed (the dedupe
    store would drop it). Only an action cut short by cancellation (the
    listener stopping) gives no result, so no confirmation.
    """
    when = datetime.now() if now is None else now
    outcome = await _guarded(actions, handler.action, msg, handler.message_start, when)
    alternative = None
    if not outcome.ok and handler.altaction is not None:
        alternative = await _guarded(actions, handler.altaction, msg, handler.message_start, when)
    return Performed(
        handler=handler.name, outcome=outcome, alternative=alternative, confirm=handler.confirm
    )


async def _guarded(
    actions: Actions, action: Action, msg: Message, message_start: str | None, now: datetime
) -> Outcome:
    try:
        return await actions.run(action, msg, message_start=message_start, now=now)
    except Exception as exc:
        return Outcome(False, f"internal error: {type(exc).__name__}: {exc}")
