"""Running handler actions: run, start, socket, sync (coalesced), shutdown, altaction."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from pushsync.listener.actions import (
    Actions,
    Outcome,
    Performed,
    SyncFunction,
    SyncGate,
    perform,
)
from pushsync.listener.config import Handler, loads_config
from pushsync.wire.protocol import Message

DANGEROUS = "$(rm -rf /); `id` 'quoted' \"double\" $subject ${content}"
NOW = datetime(2024, 3, 7, 8, 5, 9)
PY = sys.executable


def message(content: str = "disruption 42", subject: str = "sync") -> Message:
    return Message(
        request_id=uuid.UUID("12345678-1234-5678-1234-567812345678"),
        device="truck-17",
        subject=subject,
        content=content,
        sender="pushsync",
        priority="normal",
        created=1_700_000_000.0,
        expires=1_700_003_600.0,
    )


def handler(action: Any, **more: Any) -> Handler:
    """One handler built through the real config reader; ``action`` as YAML data."""
    config = {
        "device": "truck-17",
        "secret_file": "k",
        "channels": {"udp": {"bind": "127.0.0.1:5001"}},
        "handlers": [{"name": "h", "action": action, **more}],
    }
    (found,) = loads_config(json.dumps(config), "listener.yaml").handlers  # JSON is YAML
    return found


def python(code: str, *args: str, **more: Any) -> dict[str, Any]:
    """A ``run`` action running ``code`` with this interpreter."""
    return {"run": [PY, "-c", code, *args], **more}


@pytest_asyncio.fixture
async def actions() -> AsyncIterator[Actions]:
    runner = Actions(device="truck-17", stop=asyncio.Event())
    yield runner
    await runner.aclose()


async def do(actions: Actions, found: Handler, msg: Message | None = None) -> Performed:
    return await perform(found, msg or message(), actions, now=NOW)


# --------------------------------------------------------------------------- run


@pytest.mark.asyncio
async def test_run_success_captures_output(actions: Actions) -> None:
    done = await do(actions, handler(python("print('hello'); import sys; sys.stderr.write('e')")))
    assert done.outcome == Outcome(True, "exit 0", "hello\ne")
    assert done.ok
    assert done.alternative is None
    assert done.confirm


@pytest.mark.asyncio
async def test_run_non_zero_exit_is_a_failure(actions: Actions) -> None:
    done = await do(actions, handler(python("raise SystemExit(3)")))
    assert done.outcome == Outcome(False, "exit 3")
    assert not done.ok
    assert done.confirm  # the message was accepted: the action ran


@pytest.mark.asyncio
async def test_run_output_is_capped(tmp_path: Path) -> None:
    runner = Actions(device="truck-17", stop=asyncio.Event(), output_cap=10)
    done = await do(runner, handler(python("print('x' * 100000)")))
    assert done.outcome == Outcome(True, "exit 0", "x" * 10)


@pytest.mark.asyncio
async def test_run_timeout_kills_the_process_group(actions: Actions, tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
        "open(sys.argv[1], 'w').write(str(child.pid))\n"
        "time.sleep(30)\n"
    )
    started = time.monotonic()
    done = await do(actions, handler(python(code, str(pid_file), timeout="500ms")))
    assert time.monotonic() - started < 1.5
    assert done.outcome == Outcome(False, "timed out after 0.5s")
    assert not _alive(int(pid_file.read_text()))


def _alive(pid: int, within: float = 1.0) -> bool:
    """Whether ``pid`` still runs (a zombie does not count) after up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return False
        if state == "Z":
            return False
        time.sleep(0.02)
    return True


@pytest.mark.asyncio
async def test_run_program_not_found(actions: Actions, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-program")
    done = await do(actions, handler({"run": [missing, "x"]}))
    assert done.outcome == Outcome(False, f"program not found: {missing}")


@pytest.mark.asyncio
async def test_values_reach_the_program_as_literal_argv_elements(actions: Actions) -> None:
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    argv = ["$content", "x${content}y", "$$content", "[$subject]", "$request_id $device"]
    done = await do(actions, handler({"run": [PY, "-c", code, *argv]}), message(DANGEROUS))
    assert done.outcome.ok, done.outcome
    assert json.loads(done.outcome.output) == [
        DANGEROUS,
        f"x{DANGEROUS}y",
        "$content",
        "[sync]",
        "12345678-1234-5678-1234-567812345678 truck-17",
    ]


# --------------------------------------------------------------------------- start


@pytest.mark.asyncio
async def test_start_does_not_wait_and_leaves_no_zombie(actions: Actions) -> None:
    started = time.monotonic()
    done = await do(actions, handler({"start": [PY, "-c", "import time; time.sleep(0.5)"]}))
    assert time.monotonic() - started < 0.4
    assert done.outcome.ok, done.outcome
    found = re.fullmatch(r"started, pid (\d+)", done.outcome.detail)
    assert found is not None
    pid = int(found[1])
    assert actions.background == 1
    assert _alive(pid, within=0.05)

    await asyncio.wait_for(actions.wait_background(), 5)
    assert actions.background == 0
    assert not Path(f"/proc/{pid}").exists()  # noqa: ASYNC240  reaped: not even a zombie is left
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222  WNOHANG returns at once


@pytest.mark.asyncio
async def test_start_with_a_timeout_kills_it_then(actions: Actions) -> None:
    done = await do(
        actions,
        handler({"start": [PY, "-c", "import time; time.sleep(30)"], "timeout": "200ms"}),
    )
    assert done.outcome.ok
    started = time.monotonic()
    await asyncio.wait_for(actions.wait_background(), 5)
    assert time.monotonic() - started < 1.5


@pytest.mark.asyncio
async def test_start_program_not_found(actions: Actions, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    done = await do(actions, handler({"start": [missing]}))
    assert done.outcome == Outcome(False, f"program not found: {missing}")
    assert actions.background == 0


# --------------------------------------------------------------------------- socket

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


async def _server(serve: Serve) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, int(port)


@pytest.mark.asyncio
async def test_socket_sends_the_text(actions: Actions) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.set_result(await reader.read())  # until the sender's EOF
        writer.close()

    server, port = await _server(serve)
    async with server:
        send = {"host": "127.0.0.1", "port": port, "send": "sync $request_id: $content"}
        done = await do(actions, handler({"socket": send}), message("ü $(x)"))
        data = await asyncio.wait_for(received, 2)
    assert done.outcome.ok, done.outcome
    expected = "sync 12345678-1234-5678-1234-567812345678: ü $(x)".encode()
    assert data == expected
    assert done.outcome.detail == f"sent {len(expected)} bytes"


@pytest.mark.asyncio
async def test_socket_waits_for_a_reply(actions: Actions) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(b"got " + line.strip() + b"\nand more\n")
        await writer.drain()
        writer.close()

    server, port = await _server(serve)
    async with server:
        send = {"host": "127.0.0.1", "port": port, "send": "$content\n", "reply": True}
        done = await do(actions, handler({"socket": send}))
    assert done.outcome == Outcome(True, "reply received", "got disruption 42\n")


@pytest.mark.asyncio
async def test_socket_reply_timeout(actions: Actions) -> None:
    release = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.close()

    server, port = await _server(serve)
    async with server:
        send = {"host": "127.0.0.1", "port": port, "send": "x", "reply": True}
        started = time.monotonic()
        done = await do(actions, handler({"socket": send, "timeout": "200ms"}))
        release.set()
    assert done.outcome == Outcome(False, "timed out after 0.2s")
    assert time.monotonic() - started < 1.0


@pytest.mark.asyncio
async def test_socket_closed_without_a_reply_fails(actions: Actions) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server, port = await _server(serve)
    async with server:
        send = {"host": "127.0.0.1", "port": port, "send": "x", "reply": True}
        done = await do(actions, handler({"socket": send}))
    assert done.outcome == Outcome(False, "no reply: the connection was closed")


@pytest.mark.asyncio
async def test_socket_connection_refused(actions: Actions) -> None:
    with socket.socket() as probe:  # a port nobody listens on: bound, then released
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = await do(actions, handler({"socket": {"host": "127.0.0.1", "port": port, "send": "x"}}))
    assert done.outcome == Outcome(False, "connection refused")


# --------------------------------------------------------------------------- altaction


@pytest.mark.asyncio
async def test_altaction_runs_only_when_the_action_fails(actions: Actions, tmp_path: Path) -> None:
    marker = tmp_path / "alt"
    alt = python("import sys; open(sys.argv[1], 'a').write('ran')", str(marker))

    done = await do(actions, handler(python("pass"), altaction=alt))
    assert done.outcome.ok
    assert done.alternative is None
    assert not marker.exists()

    done = await do(actions, handler(python("raise SystemExit(1)"), altaction=alt))
    assert done.outcome == Outcome(False, "exit 1")
    assert done.alternative == Outcome(True, "exit 0")
    assert done.ok
    assert marker.read_text() == "ran"


@pytest.mark.asyncio
async def test_both_failing_is_not_ok(actions: Actions) -> None:
    done = await do(actions, handler(python("raise SystemExit(2)"), altaction=python("exit(5)")))
    assert (done.outcome.detail, done.alternative) == ("exit 2", Outcome(False, "exit 5"))
    assert not done.ok


@pytest.mark.asyncio
async def test_confirm_follows_the_handler(actions: Actions) -> None:
    assert (await do(actions, handler(python("pass"), confirm=False))).confirm is False
    assert (await do(actions, handler(python("exit(1)")))).confirm is True


# --------------------------------------------------------------------------- sync


@pytest.mark.asyncio
async def test_sync_not_configured_fails_and_runs_the_altaction(actions: Actions) -> None:
    done = await do(actions, handler("sync", altaction=python("pass")))
    assert done.outcome == Outcome(False, "sync is not configured")
    assert done.alternative == Outcome(True, "exit 0")


@pytest.mark.asyncio
async def test_sync_runs_the_injected_client() -> None:
    calls = 0

    async def sync() -> Outcome:
        nonlocal calls
        calls += 1
        return Outcome(True, "synchronized 3 tables")

    runner = Actions(device="truck-17", stop=asyncio.Event(), sync=sync)
    done = await do(runner, handler("sync"))
    assert done.outcome == Outcome(True, "synchronized 3 tables")
    assert calls == 1
    await runner.aclose()


@pytest.mark.asyncio
async def test_sync_timeout_and_errors_are_outcomes() -> None:
    async def hangs() -> Outcome:
        await asyncio.sleep(30)
        raise AssertionError("not reached")  # pragma: no cover

    async def breaks() -> Outcome:
        raise RuntimeError("server went away")

    runner = Actions(device="truck-17", stop=asyncio.Event(), sync=hangs)
    done = await do(runner, handler({"sync": True, "timeout": "100ms"}))
    assert done.outcome == Outcome(False, "timed out after 0.1s")
    await runner.aclose()

    runner = Actions(device="truck-17", stop=asyncio.Event(), sync=breaks)
    done = await do(runner, handler("sync"))
    assert done.outcome == Outcome(False, "sync failed: server went away")
    await runner.aclose()


def _counting_sync() -> tuple[SyncFunction, asyncio.Event, asyncio.Event, list[int]]:
    """A fake sync that waits for ``release``; ``running`` is set while it runs."""
    release, running = asyncio.Event(), asyncio.Event()
    runs: list[int] = []

    async def sync() -> Outcome:
        runs.append(len(runs) + 1)
        number = len(runs)
        running.set()
        await release.wait()
        return Outcome(True, f"run {number}")

    return sync, release, running, runs


async def _at_the_gate(gate: SyncGate, count: int) -> list[asyncio.Task[Outcome]]:
    """``count`` requests of the gate, each in a task; returns once all of them wait there.

    Each task sets its event just before it calls ``gate.request()``, which does not
    yield until it waits for its run: once the event is seen set, the request is in.
    """
    entered = [asyncio.Event() for _ in range(count)]

    async def request(event: asyncio.Event) -> Outcome:
        event.set()
        return await gate.request()

    tasks = [asyncio.create_task(request(event)) for event in entered]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in entered)), 5)
    return tasks


@pytest.mark.asyncio
async def test_sync_gate_coalesces_requests_while_one_runs() -> None:
    sync, release, running, runs = _counting_sync()
    gate = SyncGate(sync)
    first = asyncio.create_task(gate.request())
    await asyncio.wait_for(running.wait(), 5)
    later = await _at_the_gate(gate, 5)
    assert runs == [1]  # the five wait, sharing one queued run
    assert gate.runs == 1
    assert not any(task.done() for task in later)

    release.set()
    outcomes = await asyncio.gather(first, *later)
    assert runs == [1, 2]
    assert gate.runs == 2
    assert outcomes == [Outcome(True, "run 1")] + [Outcome(True, "run 2")] * 5

    assert await gate.request() == Outcome(True, "run 3")  # idle again: a fresh run
    await gate.aclose()


@pytest.mark.asyncio
async def test_sync_gate_caller_cancel_does_not_cancel_the_shared_run() -> None:
    sync, release, running, runs = _counting_sync()
    gate = SyncGate(sync)
    first = asyncio.create_task(gate.request())
    await asyncio.wait_for(running.wait(), 5)
    impatient, patient = await _at_the_gate(gate, 2)  # both share the queued run
    impatient.cancel()
    release.set()
    assert await first == Outcome(True, "run 1")
    assert await patient == Outcome(True, "run 2")
    assert impatient.cancelled()
    assert runs == [1, 2]
    await gate.aclose()


@pytest.mark.asyncio
async def test_sync_gate_close_cancels_waiters() -> None:
    sync, _release, running, _runs = _counting_sync()
    gate = SyncGate(sync)
    current = asyncio.create_task(gate.request())
    await asyncio.wait_for(running.wait(), 5)
    [queued] = await _at_the_gate(gate, 1)
    await gate.aclose()
    results = await asyncio.gather(current, queued, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)


# --------------------------------------------------------------------------- shutdown


@pytest.mark.asyncio
async def test_shutdown_sets_the_stop_event() -> None:
    stop = asyncio.Event()
    runner = Actions(device="truck-17", stop=stop)
    done = await do(runner, handler("shutdown", confirm=False))
    assert done.outcome == Outcome(True, "stopping the listener")
    assert stop.is_set()
    assert not done.confirm
    await runner.aclose()
