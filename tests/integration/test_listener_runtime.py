"""The listener runtime over real sockets and files, with the dispatcher's UDP gateway as sender.

No database: a ``Claimed`` is built directly and sent by ``UdpGateway``; the
listener's action is a real program that appends one JSON line per run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from pushsync.dispatcher.gateways import UdpGateway, sent, to_message
from pushsync.dispatcher.outbox import Claimed
from pushsync.listener.config import UdpChannel as UdpConfig
from pushsync.listener.config import load_config
from pushsync.listener.runtime import Listener, run_listener
from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from tests.support.keys import write_key
from tests.support.processes import free_udp_port
from tests.support.waiting import until_async

SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
DEVICE = "truck-1"
NASTY = "$(rm -rf /); `id`"
WAIT = 5.0

SCRIPT = """\
import json, pathlib, sys
out = pathlib.Path(__file__).with_name("runs.jsonl")
with out.open("a", encoding="utf-8") as f:
    record = {"tag": sys.argv[1], "request_id": sys.argv[2], "args": sys.argv[3:]}
    f.write(json.dumps(record) + "\\n")
"""


def write_config(directory: Path, tag: str = "first", *, broken: bool = False) -> Path:
    script = directory / "record.py"
    script.write_text(SCRIPT, encoding="utf-8")
    write_key(directory / "truck-1.key", SECRET)
    argv = [sys.executable, str(script), tag, "$request_id", "$content"]
    text = f"""\
device: {DEVICE}
secret_file: truck-1.key
state_dir: state
channels:
  udp: {{bind: "127.0.0.1:9"}}
  maildir: {{path: Maildir}}
handlers:
  - name: record-{tag}
    subject: sync
    action: {{run: {json.dumps(argv)}, timeout: 10s}}
"""
    if broken:
        text += "    subjet: typo\n"
    path = directory / "listener.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def runs(directory: Path) -> list[dict[str, Any]]:
    out = directory / "runs.jsonl"
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def claimed(address: tuple[str, int], **changes: Any) -> Claimed:
    now = datetime.now(UTC)
    item = Claimed(
        request_id=uuid.uuid4(),
        rule="route_disruption",
        device_id=DEVICE,
        subject="sync",
        content=NASTY,
        priority="normal",
        gateway="udp",
        created_at=now,
        expires_at=now + timedelta(hours=1),
        attempts=1,
        secret=SECRET,
        udp_address=f"{address[0]}:{address[1]}",
        email_address=None,
    )
    return replace(item, **changes)


@asynccontextmanager
async def listening(config_path: Path, **options: Any) -> AsyncIterator[Listener]:
    """A listener on ``config_path``, its UDP channel on a free port of 127.0.0.1."""
    config = load_config(config_path)
    udp = UdpConfig(bind=Address(host="127.0.0.1", port=0))
    config = replace(config, channels=replace(config.channels, udp=udp))
    listener = Listener(config, maildir_poll=0.05, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    started = asyncio.create_task(listener.started.wait())
    await asyncio.wait({task, started}, timeout=WAIT, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        task.result()  # raise what went wrong
    assert listener.started.is_set()
    try:
        yield listener
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


@dataclass
class Server:
    gateway: UdpGateway
    acks: asyncio.Queue[uuid.UUID]

    async def ack(self) -> uuid.UUID:
        return await asyncio.wait_for(self.acks.get(), WAIT)


@asynccontextmanager
async def server() -> AsyncIterator[Server]:
    acks: asyncio.Queue[uuid.UUID] = asyncio.Queue()
    gateway = await UdpGateway.bind(
        local_addr=("127.0.0.1", 0),
        secret_for=lambda device: SECRET if device == DEVICE else None,
        on_ack=lambda ack, peer: acks.put_nowait(ack.request_id),
    )
    try:
        yield Server(gateway, acks)
    finally:
        gateway.close()


def send_raw(address: tuple[str, int], *datagrams: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for data in datagrams:
            sock.sendto(data, address)


def drop_mail(maildir: Path, item: Claimed, name: str) -> None:
    mail = EmailMessage()
    for key, value in protocol.email_headers(to_message(item), item.secret).items():
        mail[key] = value
    mail["From"] = "pushsync@example.org"
    mail["To"] = "truck-1@example.org"
    mail.set_content(item.content)
    temporary = maildir / "tmp" / name
    temporary.write_bytes(mail.as_bytes())
    os.replace(temporary, maildir / "new" / name)


# --------------------------------------------------------------------------- tests


@pytest.mark.asyncio
async def test_end_to_end_and_duplicates_over_udp_and_maildir(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    async with server() as srv, listening(config_path) as listener:
        item = claimed(listener.udp_address)
        result = await srv.gateway.send(item)
        assert result.ok, result

        assert await srv.ack() == item.request_id
        await until_async(lambda: len(runs(tmp_path)) == 1)
        (run,) = runs(tmp_path)
        assert run == {"tag": "first", "request_id": str(item.request_id), "args": [NASTY]}

        # The same message again: acked again, not run again.
        assert (await srv.gateway.send(item)).ok
        assert await srv.ack() == item.request_id
        assert listener.counters.duplicates == 1

        # And once more by email, into the maildir.
        maildir = tmp_path / "Maildir"
        drop_mail(maildir, item, "1.mail")
        await until_async(lambda: (maildir / "cur" / "1.mail:2,S").exists())
        assert not (maildir / "new" / "1.mail").exists()
        assert listener.counters.duplicates == 2
        assert len(runs(tmp_path)) == 1
        assert listener.counters.handled == 1
        assert listener.counters.acks_sent == 2
        assert sum(listener.counters.rejected.values()) == 0


@pytest.mark.asyncio
async def test_new_message_by_maildir_runs_and_a_forged_mail_is_trashed(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    async with listening(config_path) as listener:
        maildir = tmp_path / "Maildir"
        forged = claimed(("127.0.0.1", 9), secret=OTHER)
        drop_mail(maildir, forged, "forged.mail")
        good = claimed(("127.0.0.1", 9))
        drop_mail(maildir, good, "good.mail")
        (maildir / "new" / "junk.mail").write_bytes(b"\x00\xffnot a mail at all")
        await until_async(lambda: (maildir / "cur" / "good.mail:2,S").exists())
        await until_async(lambda: (maildir / "cur" / "junk.mail:2,T").exists())
        assert (maildir / "cur" / "forged.mail:2,T").exists()
        assert [r["request_id"] for r in runs(tmp_path)] == [str(good.request_id)]
        assert listener.counters.rejected["BadSignature"] == 2
        assert listener.counters.received == 3


@pytest.mark.asyncio
async def test_a_mail_that_cannot_be_taken_now_stays_for_the_next_look(tmp_path: Path) -> None:
    """The dedupe store failing is not the mail's fault: it is kept, not trashed."""
    from pushsync.listener.dedupe import DedupeError

    config_path = write_config(tmp_path)
    async with listening(config_path) as listener:
        remember = listener._remembered.remember
        failing = True

        async def flaky(request_id: uuid.UUID, expires: float) -> bool:
            if failing:
                raise DedupeError("disk full")
            return await remember(request_id, expires)

        listener._remembered.remember = flaky  # type: ignore[method-assign,assignment]
        maildir = tmp_path / "Maildir"
        good = claimed(("127.0.0.1", 9))
        drop_mail(maildir, good, "good.mail")
        await until_async(lambda: listener.counters.rejected["dedupe store failed"] >= 2)
        assert (maildir / "new" / "good.mail").exists()
        assert runs(tmp_path) == []
        failing = False
        await until_async(lambda: (maildir / "cur" / "good.mail:2,S").exists())
        assert [r["request_id"] for r in runs(tmp_path)] == [str(good.request_id)]


@pytest.mark.asyncio
async def test_bad_datagrams_are_dropped_and_counted_and_the_listener_keeps_working(
    tmp_path: Path,
) -> None:
    config_path = write_config(tmp_path)
    async with server() as srv, listening(config_path) as listener:
        address = listener.udp_address
        now = datetime.now(UTC)
        forged = claimed(address, secret=OTHER)
        expired = claimed(
            address, created_at=now - timedelta(hours=2), expires_at=now - timedelta(hours=1)
        )
        assert (await srv.gateway.send(forged)).ok
        assert (await srv.gateway.send(expired)).ok
        valid = protocol.encode_message(to_message(claimed(address)), SECRET)
        send_raw(address, b"\x00" * 1201, valid[:-5], b"garbage", b"")
        await until_async(lambda: listener.counters.received == 6)
        assert dict(listener.counters.rejected) == {
            "BadSignature": 1,
            "Expired": 1,
            "Oversized": 1,
            "Malformed": 3,
        }
        assert runs(tmp_path) == []
        assert srv.acks.empty()

        item = claimed(address)
        assert (await srv.gateway.send(item)).ok
        assert await srv.ack() == item.request_id
        await until_async(lambda: len(runs(tmp_path)) == 1)
        assert srv.acks.empty()


@pytest.mark.asyncio
async def test_a_message_for_another_device_is_rejected(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    async with server() as srv, listening(config_path) as listener:
        other = claimed(listener.udp_address, device_id="truck-2")
        assert (await srv.gateway.send(other)).ok
        await until_async(lambda: listener.counters.rejected["not for this device"] == 1)
        mine = claimed(listener.udp_address)
        assert (await srv.gateway.send(mine)).ok
        assert await srv.ack() == mine.request_id  # the first ack: none for truck-2's message
        assert [r["request_id"] for r in runs(tmp_path)] == [str(mine.request_id)]


@pytest.mark.asyncio
async def test_dedupe_survives_a_restart(tmp_path: Path) -> None:
    config_path = write_config(tmp_path)
    async with server() as srv:
        async with listening(config_path) as listener:
            item = claimed(listener.udp_address)
            assert (await srv.gateway.send(item)).ok
            assert await srv.ack() == item.request_id
            await until_async(lambda: len(runs(tmp_path)) == 1)
        assert listener.dedupe.closed

        async with listening(config_path) as again:
            resent = replace(item, udp_address="{}:{}".format(*again.udp_address), attempts=2)
            assert (await srv.gateway.send(resent)).ok
            assert await srv.ack() == item.request_id
            assert again.counters.duplicates == 1
            assert again.counters.handled == 0
        assert len(runs(tmp_path)) == 1


IN_FLIGHT = 64


CHEAP_FAILING = f"""\
device: {DEVICE}
secret_file: truck-1.key
state_dir: state
channels:
  udp: {{bind: "127.0.0.1:9"}}
handlers:
  - name: cheap
    subject: sync
    action: sync
"""
"""A listener whose action fails at once (no local database to synchronize)."""


def cheap_failing(directory: Path, text: str = CHEAP_FAILING) -> Path:
    """The listener config ``text`` (:data:`CHEAP_FAILING`) in ``directory``, its key
    beside it; its path."""
    write_key(directory / "truck-1.key", SECRET)
    path = directory / "listener.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.asyncio
async def test_messages_are_logged_at_debug_failures_once_per_interval_counts_at_info(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A busy listener does not write a line per message at INFO: the messages go to
    DEBUG, a failing handler gets one WARNING per interval, and each interval in which
    envelopes arrived gets one INFO line of counts."""
    config_path = cheap_failing(tmp_path)
    caplog.set_level("DEBUG", logger="pushsync.listener.runtime")
    async with server() as srv, listening(config_path, expire_every=0.2) as listener:
        items = [claimed(listener.udp_address) for _ in range(3)]
        for item in items:
            assert (await srv.gateway.send(item)).ok
            assert await srv.ack() == item.request_id
        send_raw(listener.udp_address, b"not an envelope")
        await until_async(lambda: reported(caplog)[0] == 4, "the counts of all 4 envelopes")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    per_message = [(level, text) for level, text in lines if text.startswith("message ")]
    assert [level for level, _ in per_message] == ["WARNING", "DEBUG", "DEBUG"], lines
    assert all("handler cheap: failed (sync failed: " in text for _, text in per_message)
    # received, handled, unmatched, duplicates, rejected, actions failed, acks, commits
    assert reported(caplog) == [4, 3, 0, 0, 1, 3, 3, 3], lines


@pytest.mark.asyncio
async def test_message_log_logs_every_message_in_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--message-log``: every message gets its line at the default level, content and all."""
    config_path = cheap_failing(tmp_path)
    caplog.set_level("INFO", logger="pushsync.listener.runtime")
    async with server() as srv, listening(config_path, log_messages=True) as listener:
        items = [claimed(listener.udp_address) for _ in range(2)]
        for item in items:
            assert (await srv.gateway.send(item)).ok
            assert await srv.ack() == item.request_id
    per_message = [r for r in caplog.records if r.getMessage().startswith("message ")]
    assert [r.levelname for r in per_message] == ["WARNING", "WARNING"]
    assert all(f"content {NASTY!r}" in r.getMessage() for r in per_message)


@pytest.mark.asyncio
async def test_a_copy_that_arrives_while_the_first_runs_is_not_acked_before_it(
    tmp_path: Path,
) -> None:
    """The server resends a message whose action is slow: the copy is a duplicate, and its
    ack would claim an action that has not finished. Only the first copy's ack, after the
    action, goes out; a copy arriving after that is acked again."""
    answer: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()
    sink = await asyncio.start_server(lambda _r, w: answer.put_nowait(w), "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    socket_action = (
        f'action: {{socket: {{host: 127.0.0.1, port: {port}, send: "$request_id", reply: true}}}}'
    )
    config_path = cheap_failing(tmp_path, CHEAP_FAILING.replace("action: sync", socket_action))
    async with sink, server() as srv, listening(config_path) as listener:
        item = claimed(listener.udp_address)
        assert (await srv.gateway.send(item)).ok
        action = await asyncio.wait_for(answer.get(), WAIT)  # the action waits for its answer
        assert (await srv.gateway.send(replace(item, attempts=2))).ok
        await until_async(lambda: listener.counters.duplicates == 1, "the copy taken")
        await asyncio.sleep(0.05)
        assert srv.acks.empty()
        assert listener.counters.acks_sent == 0
        action.write(b"done\n")
        await action.drain()
        assert await srv.ack() == item.request_id
        assert (await srv.gateway.send(replace(item, attempts=3))).ok
        assert await srv.ack() == item.request_id
        assert listener.counters.acks_sent == 2
        assert listener.counters.handled == 1
        action.close()


ACTIVITY = re.compile(
    r"in the last \d+s: received (\d+), handled (\d+) \(unmatched (\d+)\), duplicates (\d+), "
    r"rejected (\d+), actions failed (\d+), acks sent (\d+), dedupe commits (\d+)$"
)


def reported(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The counts of the INFO activity lines so far, added up."""
    total = [0] * 8
    for record in caplog.records:
        found = ACTIVITY.fullmatch(record.getMessage())
        if found and record.levelname == "INFO":
            total = [a + int(b) for a, b in zip(total, found.groups(), strict=True)]
    return total


@pytest.mark.asyncio
async def test_messages_in_flight_share_one_dedupe_commit_and_are_acked_only_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """64 datagrams arrive while another connection holds the dedupe file's write lock (a
    slow disk, drawn out): all 64 are read and verified, none is acked; once the lock goes,
    one commit (one sync to disk) records all 64, then each is acked once."""
    config_path = cheap_failing(tmp_path)
    caplog.set_level("INFO", logger="pushsync.listener.runtime")
    async with server() as srv, listening(config_path) as listener:
        blocker = sqlite3.connect(listener.dedupe.path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            items = [claimed(listener.udp_address) for _ in range(IN_FLIGHT)]
            for item in items:  # all in the socket's buffer before the listener reads one
                assert srv.gateway.send_now(item) == sent("udp")
            await until_async(lambda: listener.counters.received == IN_FLIGHT, "all read")
            for _ in range(20):
                await asyncio.sleep(0)
            assert listener.counters.acks_sent == 0
            assert srv.acks.empty()
            assert listener.dedupe.commits == 0
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        acked = {await srv.ack() for _ in items}
        assert acked == {item.request_id for item in items}
        assert listener.dedupe.commits == 1
        assert listener.counters.handled == IN_FLIGHT
        assert listener.counters.actions_failed == IN_FLIGHT  # sync with no channel to use
    assert not (tmp_path / "state" / "local.db").exists()  # which it fails without opening
    assert (
        f"stopped: received {IN_FLIGHT}, handled {IN_FLIGHT} (unmatched 0), duplicates 0, "
        f"rejected 0, acks sent {IN_FLIGHT}, dedupe commits 1"
    ) in caplog.text


@pytest.mark.asyncio
async def test_reload_replaces_handlers_and_keeps_them_when_the_new_config_is_broken(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_path = write_config(tmp_path)
    async with server() as srv, listening(config_path) as listener:

        async def deliver() -> str:
            item = claimed(listener.udp_address)
            assert (await srv.gateway.send(item)).ok
            assert await srv.ack() == item.request_id
            await until_async(
                lambda: any(r["request_id"] == str(item.request_id) for r in runs(tmp_path))
            )
            (run,) = (r for r in runs(tmp_path) if r["request_id"] == str(item.request_id))
            return str(run["tag"])

        assert await deliver() == "first"

        write_config(tmp_path, "second")
        assert listener.reload() is True
        assert [h.name for h in listener.config.handlers] == ["record-second"]
        assert await deliver() == "second"

        write_config(tmp_path, "third", broken=True)
        caplog.clear()
        assert listener.reload(config_path) is False
        assert "unknown key 'subjet'" in caplog.text
        assert f"{config_path}:" in caplog.text
        assert [h.name for h in listener.config.handlers] == ["record-second"]
        assert await deliver() == "second"


def test_run_listener_prints_located_errors_and_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, broken=True)
    assert run_listener(str(config_path)) == 2
    err = capsys.readouterr().err
    assert f"{config_path}:11:5: handler record-first: unknown key 'subjet'" in err


def with_port(config_path: Path, port: int) -> None:
    text = config_path.read_text(encoding="utf-8")
    config_path.write_text(text.replace("127.0.0.1:9", f"127.0.0.1:{port}"), encoding="utf-8")


@pytest.mark.asyncio
async def test_run_listener_process_reloads_on_sighup_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    config_path = write_config(tmp_path)
    port = free_udp_port()
    with_port(config_path, port)
    code = "import sys; from pushsync.listener.runtime import run_listener; "
    code += "sys.exit(run_listener(sys.argv[1]))"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        str(config_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    stream = process.stderr
    assert stream is not None
    log: list[str] = []

    async def collect() -> None:
        async for line in stream:
            log.append(line.decode(errors="replace"))

    collector = asyncio.create_task(collect())
    try:
        await until_async(lambda: any("listening as truck-1" in line for line in log))
        async with server() as srv:

            async def deliver() -> str:
                item = claimed(("127.0.0.1", port))
                assert (await srv.gateway.send(item)).ok
                assert await srv.ack() == item.request_id
                found = [r for r in runs(tmp_path) if r["request_id"] == str(item.request_id)]
                assert len(found) == 1
                return str(found[0]["tag"])

            assert await deliver() == "first"
            write_config(tmp_path, "second")
            with_port(config_path, port)
            process.send_signal(signal.SIGHUP)
            await until_async(lambda: any("handlers record-second" in line for line in log))
            assert await deliver() == "second"
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(process.wait(), WAIT)
        await asyncio.wait_for(collector, WAIT)
    assert returncode == 0, "".join(log)
    assert any("stopping" in line for line in log)
