"""The SYNC gateway on a real database and real TCP sockets: devices connect, get, ack, poll.

The dispatcher runs in-process with its SYNC server on 127.0.0.1:0; devices are
either the real listener (its ``sync``/``poll`` channel) or a bare
:func:`~pushsync.listener.connection.open_session`, or raw sockets sending
whatever a test wants.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import trustme

from pushsync.dispatcher.connections import ConnectionServer, ConnectionSettings, server_tls
from pushsync.dispatcher.daemon import Dispatcher, DispatcherSettings
from pushsync.dispatcher.gateways import SendResult, failed
from pushsync.dispatcher.outbox import Claimed
from pushsync.listener.connection import KeyRefused, Refused, open_session
from pushsync.testing import RecordingGateway
from pushsync.wire import protocol
from tests.support.dispatching import (
    DEVICE,
    SECRET,
    WAIT,
    WRONG,
    add_device,
    closed_by_server,
    connections_of,
    dispatching,
    enqueue,
    outbox_row,
    server_address,
    session,
    set_address,
    shut,
)
from tests.support.listening import listening, runs, write_config
from tests.support.waiting import until_async

# --------------------------------------------------------------------------- end to end


@pytest.mark.asyncio
async def test_insert_reaches_the_listener_over_sync_and_its_ack_confirms(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        config = write_config(tmp_path, server_address(dispatcher), udp=True)
        async with listening(config) as listener:
            from pushsync.listener.channels import SyncChannel

            channel = listener.channel(SyncChannel)
            await asyncio.wait_for(channel.connected.wait(), WAIT)
            await until_async(
                lambda: connections_of(dispatcher).is_connected(DEVICE), "the connection"
            )
            request_id = enqueue(db, content="$(rm -rf /); `id`")
            await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmation")
            _, gateway, confirmed_at = outbox_row(db, request_id)
            assert gateway == "sync"
            assert confirmed_at is not None
            assert runs(tmp_path) == [
                {"request_id": str(request_id), "content": "$(rm -rf /); `id`"}
            ]
            # The device reported its UDP endpoint: tracked, with the connection's host.
            udp_port = listener.udp_address[1]
            tracked = db.execute(
                "SELECT address, source FROM pushsync.effective_addresses "
                "WHERE device_id = %s AND medium = 'udp'",
                (DEVICE,),
            ).fetchone()
            assert tracked == (f"127.0.0.1:{udp_port}", "tracking")
            owner = db.execute(
                "SELECT owner FROM pushsync.sync_connections WHERE device_id = %s", (DEVICE,)
            ).fetchone()
            assert owner == (dispatcher.owner,)
        # The listener left: its connection record goes.
        await until_async(
            lambda: db.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone() == (0,),
            "the connection record to go",
        )


@pytest.mark.asyncio
async def test_rows_waiting_for_a_device_go_down_its_connection_when_it_connects(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    # Sent once (say over UDP, lost) and not due again for an hour.
    waiting = enqueue(db)
    db.execute(
        "UPDATE pushsync.outbox SET state = 'sent', attempts = 1, sent_at = now(), "
        "next_attempt_at = now() + interval '1 hour' WHERE request_id = %s",
        (waiting,),
    )
    async with dispatching(dsn) as dispatcher:
        conn = await session(dispatcher)
        try:
            frame = await conn.recv(timeout=WAIT)
            assert frame is not None
            assert frame.type == protocol.FrameType.MESSAGE
            msg = protocol.decode_message(frame.payload, SECRET, time.time())
            assert msg.request_id == waiting
            assert msg.device == DEVICE
            ack = protocol.Ack(request_id=waiting, device=DEVICE, confirmed=time.time())
            conn.send(protocol.encode_ack_frame(protocol.encode_ack(ack, SECRET)))
            await until_async(lambda: outbox_row(db, waiting)[0] == "confirmed", "confirmation")
        finally:
            await conn.close("done")


@pytest.mark.asyncio
async def test_light_weight_poll_gets_everything_unconfirmed_then_poll(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    first, second = enqueue(db, content="one"), enqueue(db, content="two")
    async with dispatching(dsn) as dispatcher:
        # The dispatcher tries first and finds no way to the device; while it tries, the
        # rows are leased to it and a poll would skip them (the next poll is an hour away).
        await until_async(
            lambda: {outbox_row(db, r)[0] for r in (first, second)} == {"sent"},
            "the dispatcher to find no gateway",
        )
        config = write_config(
            tmp_path, server_address(dispatcher), channel="poll", extra=", every: 1h"
        )
        async with listening(config) as listener:
            from pushsync.listener.channels import PollChannel

            channel = listener.channel(PollChannel)
            await until_async(lambda: channel.polls >= 1, "the first poll")
            await until_async(
                lambda: {outbox_row(db, r)[0] for r in (first, second)} == {"confirmed"},
                "both confirmed",
            )
            assert sorted(r["content"] for r in runs(tmp_path)) == ["one", "two"]
            assert outbox_row(db, first)[1] == "sync"
            # Nothing left: the next poll brings nothing and runs nothing again.
            assert await channel.poll() == 0
            assert len(runs(tmp_path)) == 2
        assert not connections_of(dispatcher).by_device


# --------------------------------------------------------------------------- authentication


@pytest.mark.asyncio
async def test_wrong_secret_and_unknown_device_are_refused_alike(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    db.execute(
        "INSERT INTO pushsync.devices (device_id, secret, enabled) VALUES ('off', %s, false)",
        (SECRET,),
    )
    async with dispatching(dsn) as dispatcher:
        reasons = []
        for device, secret in ((DEVICE, WRONG), ("nobody", SECRET), ("off", SECRET)):
            with pytest.raises(KeyRefused) as refused:
                await session(dispatcher, secret=secret, device=device)
            reasons.append(str(refused.value).split(" (")[0])
        assert reasons == [
            f"the server refused the key of device {device}" for device in (DEVICE, "nobody", "off")
        ]
        assert connections_of(dispatcher).stats.refused == 3
        assert not connections_of(dispatcher).by_device
        good = await session(dispatcher)  # the server is unaffected
        await good.close("bye")


@pytest.mark.asyncio
async def test_a_listener_whose_key_is_refused_says_so_once_per_backoff_cap(
    db: psycopg.Connection, dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pushsync.listener.channels")
    # No device is registered: the listener's key is refused at every attempt.
    async with dispatching(dsn) as dispatcher:
        config = write_config(tmp_path, server_address(dispatcher))
        async with listening(config):
            await until_async(
                lambda: connections_of(dispatcher).stats.refused >= 3, "three attempts"
            )
    said = [r for r in caplog.records if "refused the key" in r.getMessage()]
    assert (
        said[0]
        .getMessage()
        .startswith(
            f"sync: the server refused the key of device {DEVICE} (unknown, disabled or wrong "
            "secret): check device and secret_file against `pushsync device list`; retrying in "
        )
    )
    assert [r.levelno for r in said[:3]] == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    assert sum(r.levelno == logging.WARNING for r in said) == 1


@pytest.mark.asyncio
async def test_a_server_without_the_secret_is_not_trusted(db: psycopg.Connection, dsn: str) -> None:
    """The device checks the server's proof: a server with another secret is refused."""
    db.execute("INSERT INTO pushsync.devices (device_id, secret) VALUES (%s, %s)", (DEVICE, WRONG))
    async with dispatching(dsn) as dispatcher:
        # The server holds WRONG for this device, so it refuses us before WELCOME...
        with pytest.raises(Refused):
            await session(dispatcher)


@pytest.mark.asyncio
async def test_forged_acks_on_an_authenticated_connection_confirm_nothing(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    add_device(db, "truck-2", WRONG)
    other = enqueue(db, "truck-2")
    async with dispatching(dsn) as dispatcher:
        conn = await session(dispatcher)
        try:
            # An ack for truck-2's message signed with truck-2's secret, sent by truck-1.
            ack = protocol.Ack(request_id=other, device="truck-2", confirmed=time.time())
            conn.send(protocol.encode_ack_frame(protocol.encode_ack(ack, WRONG)))
            # And one with truck-1's name but a bad signature.
            mine = protocol.Ack(request_id=other, device=DEVICE, confirmed=time.time())
            forged = bytearray(protocol.encode_ack(mine, SECRET))
            forged[-1] ^= 1
            conn.send(protocol.encode_ack_frame(bytes(forged)))
            conn.send(protocol.encode_ping(1))
            pong = await conn.recv(timeout=WAIT)
            while pong is not None and pong.type != protocol.FrameType.PONG:
                pong = await conn.recv(timeout=WAIT)
            assert pong is not None
            assert protocol.decode_heartbeat(pong) == 1
            assert connections_of(dispatcher).stats.bad_acks == 2
            assert connections_of(dispatcher).is_connected(DEVICE)  # a bad ack does not drop it
        finally:
            await conn.close("done")
        assert outbox_row(db, other)[2] is None


# --------------------------------------------------------------------------- hostile input


GARBAGE: list[tuple[str, bytes]] = [
    ("random bytes", os.urandom(64)),
    ("zero length", b"\x00\x00\x00\x00\x01"),
    ("oversized length", (2**31).to_bytes(4, "big") + b"\x01"),
    ("unknown type", b"\x00\x00\x00\x01\x7f"),
    ("traffic before hello", protocol.encode_ping()),
    ("message from a device", protocol.encode_frame(protocol.FrameType.MESSAGE, b"x")),
    ("bad hello", protocol.encode_frame(protocol.FrameType.HELLO, b"\x01short")),
    ("unsupported version", protocol.encode_frame(protocol.FrameType.HELLO, b"\x09" + bytes(40))),
    ("too much before auth", b"\x00\x00\x10\x00\x01" + bytes(2000)),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "data"), GARBAGE, ids=[w for w, _ in GARBAGE])
async def test_garbage_closes_that_connection_and_the_server_keeps_serving(
    db: psycopg.Connection, dsn: str, what: str, data: bytes
) -> None:
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        host, port = connections_of(dispatcher).address
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        rest = await closed_by_server(reader)
        await shut(writer)
        # Whatever came back is frames (a BYE at most), never an echo of the input.
        frames = protocol.FrameReader().feed(rest) if rest else []
        assert all(f.type == protocol.FrameType.BYE for f in frames), (what, frames)
        good = await session(dispatcher)
        assert connections_of(dispatcher).is_connected(DEVICE)
        await good.close("bye")


@pytest.mark.asyncio
async def test_silent_peers_are_dropped(db: psycopg.Connection, dsn: str) -> None:
    add_device(db)
    settings = ConnectionSettings(handshake_timeout=0.3, heartbeat=0.2)
    async with dispatching(dsn, sync=settings) as dispatcher:
        host, port = connections_of(dispatcher).address
        # Connects and never says HELLO.
        reader, writer = await asyncio.open_connection(host, port)
        started = time.monotonic()
        assert protocol.FrameReader().feed(await closed_by_server(reader))[0].type == (
            protocol.FrameType.BYE
        )
        assert time.monotonic() - started < 3
        await shut(writer)
        # Authenticates, then answers nothing: pinged, then dropped after 3 heartbeats.
        conn = await session(dispatcher)
        seen = []
        while (frame := await conn.recv(timeout=WAIT)) is not None:
            seen.append(frame.type)
        assert protocol.FrameType.PING in seen
        assert seen[-1] == protocol.FrameType.BYE
        await conn.close()
        await until_async(
            lambda: not connections_of(dispatcher).by_device, "the silent device to go"
        )


@pytest.mark.asyncio
async def test_a_second_connection_replaces_the_first(db: psycopg.Connection, dsn: str) -> None:
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        first = await session(dispatcher)
        second = await session(dispatcher)
        frame = await first.recv(timeout=WAIT)
        assert frame is not None
        assert protocol.decode_bye(frame) == "replaced by a new connection"
        request_id = enqueue(db)
        frame = await second.recv(timeout=WAIT)
        assert frame is not None
        assert frame.type == protocol.FrameType.MESSAGE
        assert protocol.decode_message(frame.payload, SECRET, time.time()).request_id == request_id
        count = db.execute("SELECT count(*) FROM pushsync.sync_connections").fetchone()
        assert count == (1,)
        await first.close()
        await second.close("bye")


# --------------------------------------------------------------------------- TLS


@pytest.mark.asyncio
async def test_tls_end_to_end_and_an_untrusted_certificate_is_refused(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    settings = ConnectionSettings(
        tls=server_tls(str(tmp_path / "server.pem"), str(tmp_path / "server.pem"))
    )
    async with dispatching(dsn, sync=settings) as dispatcher:
        server = server_address(dispatcher)
        # A device that trusts another CA does not connect.
        other = trustme.CA()
        other.cert_pem.write_to_path(str(tmp_path / "other.pem"))
        with pytest.raises(ssl.SSLCertVerificationError):
            await open_session(
                server, device=DEVICE, secret=SECRET, tls=True, ca_file=tmp_path / "other.pem"
            )
        # Plain TCP to a TLS port gets nowhere either.
        with pytest.raises((Refused, protocol.ProtocolError, ConnectionError, TimeoutError)):
            await open_session(server, device=DEVICE, secret=SECRET, timeout=2)
        config = write_config(
            tmp_path, server, extra=f', tls: true, ca_file: "{tmp_path / "ca.pem"}"'
        )
        async with listening(config):
            request_id = enqueue(db)
            await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmation")
        assert [r["request_id"] for r in runs(tmp_path)] == [str(request_id)]


# --------------------------------------------------------------------------- several dispatchers


@pytest.mark.asyncio
async def test_rows_for_a_connected_device_go_through_the_dispatcher_holding_it(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    add_device(db, "truck-2", WRONG)
    async with dispatching(dsn, owner="node-a") as a, dispatching(dsn, owner="node-b") as b:
        conn = await session(b)
        try:
            await until_async(
                lambda: (
                    db.execute("SELECT owner FROM pushsync.sync_connections").fetchone()
                    == ("node-b",)
                ),
                "node-b's record",
            )
            ids = [enqueue(db, content=str(n)) for n in range(20)]
            got: list[protocol.Message] = []
            while len(got) < len(ids):
                frame = await conn.recv(timeout=WAIT)
                assert frame is not None
                if frame.type == protocol.FrameType.MESSAGE:
                    got.append(protocol.decode_message(frame.payload, SECRET, time.time()))
            assert sorted(m.request_id for m in got) == sorted(ids)
            await until_async(
                lambda: (
                    db.execute(
                        "SELECT array_agg(DISTINCT gateway_used) FROM pushsync.outbox "
                        "WHERE device_id = %s",
                        (DEVICE,),
                    ).fetchone()
                    == (["sync"],)
                ),
                "every send recorded as sync",
            )
            assert connections_of(a).stats.pushed == 0
            assert connections_of(b).stats.pushed == 20
        finally:
            await conn.close("bye")
    rows = db.execute("SELECT count(*) FROM pushsync.dispatchers").fetchone()
    assert rows == (0,)  # both stopped cleanly and removed themselves


@pytest.mark.asyncio
async def test_a_dead_nodes_devices_are_claimed_by_the_others(
    db: psycopg.Connection, dsn: str
) -> None:
    """A connection record of a dispatcher that stopped heartbeating holds nothing back."""
    add_device(db)
    db.execute(
        "INSERT INTO pushsync.dispatchers (owner, host, pid, alive_until) "
        "VALUES ('dead', 'h', 1, now() - interval '1 second')"
    )
    db.execute(
        "INSERT INTO pushsync.sync_connections (device_id, owner, peer) "
        "VALUES (%s, 'dead', '10.0.0.1:1')",
        (DEVICE,),
    )
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "VALUES (%s, 'udp', 'manual', '127.0.0.1:9')",
        (DEVICE,),
    )
    request_id = enqueue(db)
    udp = RecordingGateway("udp")
    async with dispatching(dsn, gateways={"udp": udp}):
        await until_async(lambda: outbox_row(db, request_id)[0] == "sent", "a send")
    assert outbox_row(db, request_id)[1] == "udp"
    assert [item.request_id for item in udp.items] == [request_id]


# ---------------------------------------------------------------- UDP acks after a restart


@pytest.mark.asyncio
async def test_udp_ack_for_a_message_sent_before_a_restart_is_verified_from_the_database(
    db: psycopg.Connection, dsn: str
) -> None:
    from pushsync.dispatcher.gateways import UdpGateway

    add_device(db)
    request_id = enqueue(db)
    db.execute(
        "UPDATE pushsync.outbox SET state = 'sent', attempts = 1, sent_at = now(), "
        "gateway_used = 'udp', next_attempt_at = now() + interval '1 hour' "
        "WHERE request_id = %s",
        (request_id,),
    )
    async with dispatching(dsn) as dispatcher:
        udp = await UdpGateway.bind(
            ("127.0.0.1", 0),
            secret_for=dispatcher.secret_for,
            fetch_secret=dispatcher.fetch_secret,
            on_ack=dispatcher.on_ack,
        )
        try:
            ack = protocol.encode_ack(
                protocol.Ack(request_id=request_id, device=DEVICE, confirmed=time.time()), SECRET
            )
            loop = asyncio.get_running_loop()
            sender, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=udp.local_address
            )
            forged = replace(
                protocol.Ack(request_id=request_id, device=DEVICE, confirmed=time.time())
            )
            sender.sendto(protocol.encode_ack(forged, WRONG))
            sender.sendto(ack)
            await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmation")
            assert udp.stats.accepted == 1
            assert udp.stats.dropped == 1
            sender.close()
        finally:
            udp.close()


# --------------------------------------------------------------------------- the listener's side


@pytest.mark.asyncio
async def test_the_listener_reconnects_when_the_dispatcher_comes_back(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    async with dispatching(dsn) as first:
        server = server_address(first)
        config = write_config(tmp_path, server)
        async with listening(config) as listener:
            from pushsync.listener.channels import SyncChannel

            channel = listener.channel(SyncChannel)
            await asyncio.wait_for(channel.connected.wait(), WAIT)
            await first_gone(first)
            await until_async(lambda: not channel.connected.is_set(), "the listener to notice")
            second = Dispatcher(
                DispatcherSettings(dsn=dsn, poll_interval=0.2, housekeeping_interval=0.5)
            )
            sync = ConnectionServer(
                second.store, second.on_ack, on_connect=lambda _d: second.wake()
            )
            await sync.start(server.host, server.port)
            second.add_connections(sync)
            stop = asyncio.Event()
            task = asyncio.create_task(second.run(stop))
            try:
                await asyncio.wait_for(channel.connected.wait(), WAIT)
                assert channel.connections == 2
                request_id = enqueue(db)
                await until_async(
                    lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmation"
                )
            finally:
                stop.set()
                await asyncio.wait_for(task, WAIT)
                await sync.close()


async def first_gone(dispatcher: Dispatcher) -> None:
    """Close a running dispatcher's SYNC server (its devices lose their connection)."""
    await connections_of(dispatcher).close()


@pytest.mark.asyncio
async def test_one_message_over_sync_and_udp_runs_once(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        config = write_config(tmp_path, server_address(dispatcher), udp=True)
        async with listening(config) as listener:
            from pushsync.listener.channels import SyncChannel

            await asyncio.wait_for(listener.channel(SyncChannel).connected.wait(), WAIT)
            await until_async(
                lambda: connections_of(dispatcher).is_connected(DEVICE), "the connection"
            )
            request_id = enqueue(db, content="once")
            await until_async(lambda: outbox_row(db, request_id)[0] == "confirmed", "confirmation")
            # The same signed message arrives again, over UDP this time.
            msg = protocol.Message(
                request_id=request_id,
                device=DEVICE,
                subject="sync",
                content="once",
                sender="pushsync",
                priority="normal",
                created=time.time(),
                expires=time.time() + 600,
            )
            loop = asyncio.get_running_loop()
            sender, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, remote_addr=listener.udp_address
            )
            sender.sendto(protocol.encode_message(msg, SECRET))
            await until_async(lambda: listener.counters.duplicates == 1, "the duplicate")
            sender.close()
            assert [r["content"] for r in runs(tmp_path)] == ["once"]


class HeldGateway:
    """A UDP gateway whose send waits until the test lets it go, then fails."""

    name = "udp"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.finish = asyncio.Event()

    async def send(self, item: Claimed) -> SendResult:
        self.started.set()
        await self.finish.wait()
        return failed(self.name, "no answer", final=False)


@pytest.mark.asyncio
async def test_a_device_connecting_during_an_attempt_gets_the_row_at_once(
    db: psycopg.Connection, dsn: str
) -> None:
    """Its connection's own claim skips the row leased to that attempt; once the attempt
    fails, the row goes down the new connection now, not at the next resend (an hour)."""
    add_device(db)
    set_address(db, DEVICE, "udp", "192.0.2.1:5001")
    held = HeldGateway()
    request_id = enqueue(db)
    async with dispatching(dsn, gateways={"udp": held}) as dispatcher:
        await asyncio.wait_for(held.started.wait(), WAIT)  # the attempt over UDP is under way
        conn = await session(dispatcher)
        try:
            held.finish.set()
            frame = await conn.recv(timeout=WAIT)
            assert frame is not None
            assert frame.type == protocol.FrameType.MESSAGE
            message = protocol.decode_message(frame.payload, SECRET, time.time())
            assert message.request_id == request_id
        finally:
            await conn.close()
