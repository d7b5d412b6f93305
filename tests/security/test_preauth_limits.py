"""Idle unauthenticated connections cannot lock devices out of the SYNC port.

The attacker opens 1,100 TCP connections to a real ``pushsync dispatch`` and
never says a word, from the device's own address (think of a shared NAT) and
from 40 others, more than the dispatcher's default caps (256 unauthenticated
connections, 32 from one address) and more than its file descriptors allow
(systemd's default ``LimitNOFILE=1024``, and a tighter 200). Then the real
listener connects: it authenticates and gets its push within seconds, the
dispatcher keeps running, and its log stays a few lines long — not a
traceback per refused accept.

Bad datagrams, which anyone can send to the dispatcher's ack port and to a
listener's UDP channel, cost a log line per kind and interval, not one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import re
import resource
import select
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.dispatcher_process import dispatcher_process
from pushsync.dispatcher.connections import MAX_PREAUTH, MAX_PREAUTH_PER_HOST
from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from tests.support.dispatching import DEVICE, SECRET, add_device, enqueue, outbox_row
from tests.support.listening import listening, runs, write_config
from tests.support.waiting import until_async

IDLE = 1100
"""Connections the attacker opens, as in the incident."""
FROM_DEVICE_ADDRESS = 300
"""Of those, from 127.0.0.1, where the device connects from."""
OTHER_ADDRESSES = 40
DEVICE_WITHIN = 5.0
"""Seconds for the device to connect, authenticate and confirm a push, once the flood is
in (half the handshake timeout, after which idle peers would be closed anyway)."""
MOST_LOG_LINES = 40


@contextlib.contextmanager
def more_open_files(wanted: int) -> Iterator[None]:
    """This test process needs a descriptor per attacking connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = min(max(soft, wanted), hard if hard != resource.RLIM_INFINITY else wanted)
    if raised < wanted:
        pytest.skip(f"needs {wanted} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def sources() -> list[str]:
    others = [f"127.0.1.{n}" for n in range(1, OTHER_ADDRESSES + 1)]
    rest = IDLE - FROM_DEVICE_ADDRESS
    return ["127.0.0.1"] * FROM_DEVICE_ADDRESS + [others[n % len(others)] for n in range(rest)]


def open_idle(port: int) -> list[socket.socket]:
    """Start every connection at once (non-blocking: a full accept queue must not stall)."""
    opened: list[socket.socket] = []
    for host in sources():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((host, 0))
        code = sock.connect_ex(("127.0.0.1", port))
        assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code)
        opened.append(sock)
    return opened


def closed_by_server(socks: list[socket.socket], timeout: float) -> int:
    """How many of ``socks`` the server closed (readable: EOF, BYE or a reset) once
    ``IDLE - MAX_PREAUTH`` are, or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    gone: set[int] = set()
    while len(gone) < IDLE - MAX_PREAUTH and (left := deadline - time.monotonic()) > 0:
        for fd, _ in poller.poll(min(left, 0.1) * 1000):
            gone.add(fd)
            poller.unregister(fd)
    return len(gone)


@pytest.mark.asyncio
@pytest.mark.parametrize("nofile", [1024, 200])
async def test_idle_connections_do_not_lock_out_a_device(
    db: psycopg.Connection, dsn: str, tmp_path: Path, nofile: int
) -> None:
    add_device(db)
    with (
        more_open_files(IDLE + 200),
        dispatcher_process(dsn, nofile=nofile) as dispatcher,
    ):
        logged_before = len(dispatcher.lines)
        idle = open_idle(dispatcher.sync_port)
        try:
            # The server keeps the newest; the oldest beyond the caps are closed.
            evicted = await asyncio.to_thread(closed_by_server, idle, 5.0)
            assert evicted >= IDLE - MAX_PREAUTH

            started = time.monotonic()
            request_id = enqueue(db)
            server = Address(host="127.0.0.1", port=dispatcher.sync_port)
            async with listening(write_config(tmp_path, server)):
                await until_async(
                    lambda: outbox_row(db, request_id)[0] == "confirmed",
                    "the device to get its push",
                    timeout=DEVICE_WITHIN,
                )
            assert time.monotonic() - started < DEVICE_WITHIN
            assert [r["request_id"] for r in runs(tmp_path)] == [str(request_id)]

            assert dispatcher.process.poll() is None, "the dispatcher exited"
            log = dispatcher.lines[logged_before:]
            assert len(log) <= MOST_LOG_LINES, "\n".join(log[:60])
            assert not any("Traceback" in line for line in log), "\n".join(log[:60])
            connected = db.execute("SELECT device_id FROM pushsync.sync_connections").fetchall()
            assert connected in ([], [(DEVICE,)])
        finally:
            for sock in idle:
                sock.close()


FLOOD = 2000
"""Bad datagrams sent to each UDP port."""


@pytest.mark.asyncio
async def test_a_flood_of_bad_datagrams_is_a_few_log_lines(
    db: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone can send datagrams to the dispatcher's ack port and to a listener's UDP
    channel: each is dropped and counted, and the log says so once per kind and interval
    (then how many more), not once per datagram."""
    add_device(db)
    row = enqueue(db)
    db.execute(
        "UPDATE pushsync.outbox SET state = 'sent', attempts = 1, sent_at = now(), "
        "gateway_used = 'udp', next_attempt_at = now() + interval '1 hour' "
        "WHERE request_id = %s",
        (row,),
    )
    rng = random.Random(7)
    garbage = [rng.randbytes(rng.randint(1, 300)) for _ in range(FLOOD)]
    with (
        dispatcher_process(dsn) as dispatcher,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender,
    ):
        port = next(
            int(found[1])
            for line in dispatcher.lines
            if (found := re.search(r"UDP gateway on 127\.0\.0\.1:(\d+)", line))
        )
        logged_before = len(dispatcher.lines)
        for data in garbage:
            sender.sendto(data, ("127.0.0.1", port))
            await asyncio.sleep(0)
        ack = protocol.Ack(request_id=row, device=DEVICE, confirmed=time.time())
        sender.sendto(protocol.encode_ack(ack, SECRET), ("127.0.0.1", port))  # taken last
        await until_async(
            lambda: outbox_row(db, row)[0] == "confirmed", "the valid ack", timeout=20
        )
        dropped = [line for line in dispatcher.lines[logged_before:] if "dropped UDP" in line]
        assert 1 <= len(dropped) <= 5, dropped

        caplog.set_level(logging.INFO)
        async with listening(
            write_config(tmp_path, Address(host="127.0.0.1", port=9), udp=True)
        ) as listener:
            for data in garbage:
                sender.sendto(data, listener.udp_address)
                await asyncio.sleep(0)
            message = protocol.Message(
                request_id=uuid.uuid4(),
                device=DEVICE,
                subject="sync",
                content="after the flood",
                sender="pushsync",
                priority="normal",
                created=time.time(),
                expires=time.time() + 600,
            )
            sender.sendto(protocol.encode_message(message, SECRET), listener.udp_address)
            await until_async(lambda: len(runs(tmp_path)) == 1, "the valid message", timeout=20)
            assert listener.counters.received == FLOOD + 1
        rejected = [r for r in caplog.records if "dropped message via udp" in r.getMessage()]
        assert 1 <= len(rejected) <= 5, [r.getMessage() for r in rejected]
        assert all(r.levelno == logging.WARNING for r in rejected)


def test_the_caps_are_the_documented_defaults() -> None:
    assert (MAX_PREAUTH, MAX_PREAUTH_PER_HOST) == (256, 32)


def test_the_caps_are_options_of_the_command(dsn: str) -> None:
    """``--sync-max-handshakes-per-address 2``: a third idle connection from one address
    closes the oldest; the two newer ones wait for their handshake."""
    with dispatcher_process(dsn, "--sync-max-handshakes-per-address", "2") as running:
        connect = ("127.0.0.1", running.sync_port)
        first, second, third = (socket.create_connection(connect, 5) for _ in range(3))
        try:
            first.settimeout(5)
            said = b""
            while chunk := first.recv(4096):  # until the server closes it
                said += chunk
            # A BYE with the reason, unless it was closed before it was fully set up.
            assert said == b"" or b"too many connections" in said
            for still in (second, third):
                still.setblocking(False)
                with pytest.raises(BlockingIOError):
                    still.recv(4096)  # nothing said to them: they are waiting their turn
        finally:
            for sock in (first, second, third):
                sock.close()
