"""A network attacker on the path of a SYNC connection cannot act inside the session.

The attacker is a man in the middle: a TCP proxy on 127.0.0.1 between a real
device (the listener's sync channel, or ``pushsync sync``) and the real
dispatcher's SYNC server, that sees every frame and may forward, drop, hold,
reorder, replay or add frames. It knows no device secret. Whatever it does
after the handshake, the side that receives the tampered stream closes the
connection, and the database is as the honest frames alone left it: no
confirmation, tracked address, uploaded row or notification from the attacker.

The proxy splits the stream into frames with its own few lines (a length, a
type, and a 16-byte tag after each frame once the handshake is over), as an
attacker's tool would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest

from pushsync.dispatcher.daemon import Dispatcher
from pushsync.listener.channels import SyncChannel
from pushsync.wire import protocol
from pushsync.wire.addresses import Address
from pushsync.wire.protocol import FrameType
from tests.integration import trucking
from tests.support.cli import run_cli_async
from tests.support.dispatching import (
    DEVICE,
    SECRET,
    add_device,
    connections_of,
    dispatching,
    enqueue,
    server_address,
)
from tests.support.listening import listening, runs, write_config
from tests.support.waiting import until_async

TAG = 16
"""Bytes of tag after each frame once the handshake is over."""
Direction = Literal["up", "down"]
"""``up``: device to server; ``down``: server to device."""


# --------------------------------------------------------------------------- the attacker


class Splitter:
    """Cuts one direction of the stream into frames: (type, the frame's bytes with its tag)."""

    def __init__(self, relay: Relay, last_untagged: FrameType) -> None:
        self.relay = relay
        self.last_untagged = last_untagged
        self.tagged = False
        self.buffer = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        frames: list[tuple[int, bytes]] = []
        while len(self.buffer) >= 5:
            size = 4 + int.from_bytes(self.buffer[:4], "big") + (TAG if self.tagged else 0)
            if len(self.buffer) < size:
                break
            raw, self.buffer = self.buffer[:size], self.buffer[size:]
            kind = raw[4]
            if kind == FrameType.HELLO:
                self.relay.version = raw[5]
            if kind == self.last_untagged and self.relay.version >= 2:
                self.tagged = True
            frames.append((kind, raw))
        return frames


class Relay:
    """One proxied connection: what went each way, and who hung up first."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.version = 0
        self.seen: dict[Direction, list[tuple[int, bytes]]] = {"up": [], "down": []}
        self.to_server: asyncio.StreamWriter | None = None
        self.to_device: asyncio.StreamWriter | None = None
        self.closed_by: Literal["device", "server"] | None = None
        self.closed = asyncio.Event()
        self.held: list[bytes] = []
        """Frames an attack keeps back for later."""

    def frames(self, direction: Direction, kind: int) -> list[bytes]:
        return [raw for seen, raw in self.seen[direction] if seen == kind]

    def inject(self, direction: Direction, data: bytes) -> None:
        writer = self.to_server if direction == "up" else self.to_device
        assert writer is not None
        writer.write(data)


Tamper = Callable[[Relay, Direction, int, bytes], list[bytes]]
"""Given one frame passing through, the bytes to forward instead."""


def forward(relay: Relay, direction: Direction, kind: int, raw: bytes) -> list[bytes]:
    return [raw]


class Mitm:
    """A TCP proxy to ``upstream`` that takes ``connections`` devices and refuses the rest."""

    def __init__(
        self, upstream: Address, tamper: Tamper = forward, *, connections: int = 1
    ) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.connections = connections
        self.relays: list[Relay] = []
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Address:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return Address(host="127.0.0.1", port=int(self._server.sockets[0].getsockname()[1]))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, from_device: asyncio.StreamReader, to_device: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(asyncio.CancelledError):  # the proxy closing
            await self._relay(from_device, to_device)

    async def _relay(self, from_device: asyncio.StreamReader, to_device: Any) -> None:
        if len(self.relays) >= self.connections:
            self.refused += 1
            await _shut(to_device)
            return
        relay = Relay(len(self.relays))
        self.relays.append(relay)
        from_server, to_server = await asyncio.open_connection(
            self.upstream.host, self.upstream.port
        )
        relay.to_device, relay.to_server = to_device, to_server
        pumps = [
            asyncio.ensure_future(self._pump(relay, "up", from_device, to_server)),
            asyncio.ensure_future(self._pump(relay, "down", from_server, to_device)),
        ]
        try:
            await asyncio.gather(*pumps)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await _shut(to_server)
            await _shut(to_device)
            relay.closed.set()

    async def _pump(
        self,
        relay: Relay,
        direction: Direction,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        splitter = Splitter(relay, FrameType.AUTH if direction == "up" else FrameType.WELCOME)
        try:
            while data := await reader.read(65536):
                for kind, raw in splitter.feed(data):
                    relay.seen[direction].append((kind, raw))
                    for chunk in self.tamper(relay, direction, kind, raw):
                        writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        if relay.closed_by is None:
            relay.closed_by = "device" if direction == "up" else "server"
        # One side hung up: so does the proxy, both ways.
        for other in (relay.to_server, relay.to_device):
            if other is not None:
                other.close()


async def _shut(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def forged(relay: Relay, frame: bytes) -> bytes:
    """A frame with the best tag an attacker without the key has: a guess (none where the
    connection's version has no tags)."""
    return frame + os.urandom(TAG) if relay.version >= 2 else frame


# --------------------------------------------------------------------------- what may change


def state(db: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the attacks aim at: confirmations, tracked addresses, connection
    records, uploaded batches, reports (the upload target) and the outbox."""
    return {
        "confirmed": db.execute(
            "SELECT request_id, confirmed_at FROM pushsync.outbox WHERE confirmed_at IS NOT NULL "
            "UNION ALL SELECT request_id, confirmed_at FROM pushsync.outbox_history "
            "WHERE confirmed_at IS NOT NULL ORDER BY 1"
        ).fetchall(),
        "outbox": db.execute(
            "SELECT request_id, rule, device_id, content FROM pushsync.outbox "
            "UNION ALL SELECT request_id, rule, device_id, content FROM pushsync.outbox_history "
            "ORDER BY 1"
        ).fetchall(),
        "addresses": db.execute(
            "SELECT device_id, medium, source, address FROM pushsync.device_addresses ORDER BY 1"
        ).fetchall(),
        "connections": db.execute(
            "SELECT device_id FROM pushsync.sync_connections ORDER BY 1"
        ).fetchall(),
        "uploads": db.execute("SELECT device_id, batch FROM pushsync.sync_uploads").fetchall(),
        "reports": (
            db.execute("SELECT * FROM public.disruption_reports ORDER BY 1").fetchall()
            if db.execute("SELECT to_regclass('public.disruption_reports')").fetchone() != (None,)
            else []
        ),
    }


def tracked(db: psycopg.Connection) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT address FROM pushsync.device_addresses WHERE source = 'tracking'"
    ).fetchall()


@asynccontextmanager
async def through(
    dispatcher: Dispatcher, tamper: Tamper, connections: int = 1
) -> AsyncIterator[tuple[Mitm, Address]]:
    mitm = Mitm(server_address(dispatcher), tamper, connections=connections)
    address = await mitm.start()
    try:
        yield mitm, address
    finally:
        await mitm.close()


HANG_UP = 5.0
"""Seconds a side has to close the connection after a tampered frame (it takes milliseconds)."""


async def hung_up(relay: Relay) -> str | None:
    """Who closed the connection (``device`` or ``server``), None if it is still open."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(relay.closed.wait(), HANG_UP)
    return relay.closed_by


# --------------------------------------------------------------------------- (a) forged frames


def forged_track(relay: Relay) -> bytes:
    return forged(relay, protocol.encode_track("203.0.113.66:5001"))


def forged_ack(relay: Relay, request_id: uuid.UUID) -> bytes:
    ack = protocol.Ack(request_id=request_id, device=DEVICE, confirmed=time.time())
    envelope = bytearray(protocol.encode_ack(ack, SECRET))
    envelope[-32:] = os.urandom(32)  # the attacker cannot sign either
    return forged(relay, protocol.encode_ack_frame(bytes(envelope)))


@pytest.mark.asyncio
@pytest.mark.parametrize("frame", ["TRACK", "ACK", "SUBSCRIBE and TRACK"])
async def test_a_forged_frame_closes_the_connection_and_changes_nothing(
    db: psycopg.Connection, dsn: str, tmp_path: Path, frame: str
) -> None:
    add_device(db)
    waiting = enqueue(db)  # a message the attacker would like confirmed (or pushed to it)

    def inject(relay: Relay, direction: Direction, kind: int, raw: bytes) -> list[bytes]:
        if direction == "down" and kind == FrameType.WELCOME:
            # Ahead of anything the device sends in the session.
            if frame == "ACK":
                relay.inject("up", forged_ack(relay, waiting))
            elif frame == "TRACK":
                relay.inject("up", forged_track(relay))
            else:
                relay.inject("up", forged(relay, protocol.encode_subscribe()) + forged_track(relay))
        return [raw]

    async with dispatching(dsn) as dispatcher:
        before = state(db)
        async with through(dispatcher, inject) as (mitm, address):
            config = write_config(tmp_path, address, udp=True)
            async with listening(config):
                relay = await wait_for_relay(mitm)
                closer = await hung_up(relay)
                await settle(dispatcher)
                assert state(db) == before
                assert closer == "server"
                assert connections_of(dispatcher).stats.bad_frames == 1
                assert connections_of(dispatcher).stats.authenticated == 1
                assert not connections_of(dispatcher).by_device
        assert runs(tmp_path) == []


@pytest.mark.asyncio
async def test_a_forged_upload_inside_pushsync_sync_is_refused(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """Injected after the device's SYNC_BEGIN: an open disruption report by its driver —
    exactly what the device itself may upload, and what would notify other drivers."""
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s WHERE device_id = 'truck-2'", (SECRET,))
    report = str(uuid.uuid4())
    upload = protocol.encode_json_frame(
        FrameType.UPLOAD,
        {
            "batch": "forged:1-1",
            "more": False,
            "rows": [
                {
                    "seq": 1,
                    "table": "public.disruption_reports",
                    "op": "insert",
                    "key": {"report_id": report},
                    "old": None,
                    "new": {
                        "report_id": report,
                        "location_id": 100,
                        "reported_by": 2,
                        "status": "open",
                        "note": "forged",
                    },
                }
            ],
        },
    )

    def inject(relay: Relay, direction: Direction, kind: int, raw: bytes) -> list[bytes]:
        if direction == "up" and kind == FrameType.SYNC_BEGIN:
            return [raw, forged(relay, upload)]
        return [raw]

    key = tmp_path / "truck-2.key"
    key.write_text(protocol.format_secret(SECRET), encoding="ascii")
    key.chmod(0o600)
    async with dispatching(dsn) as dispatcher:
        before = state(db)
        async with through(dispatcher, inject) as (mitm, address):
            config = tmp_path / "truck-2.yaml"
            config.write_text(
                "device: truck-2\nsecret_file: truck-2.key\nstate_dir: state\n"
                f'publication: driver\nchannels:\n  sync: {{server: "{address}"}}\n'
                "handlers:\n  - name: h\n    subject: sync\n    action: sync\n",
                encoding="utf-8",
            )
            code, _, err = await cli("sync", str(config), cwd=tmp_path)
            closer = await hung_up(mitm.relays[0])
            await settle(dispatcher)
            assert state(db) == before  # no report, no notification, no batch
            assert closer == "server"
            assert connections_of(dispatcher).stats.bad_frames == 1
            assert code == 1, err
            assert err.startswith("sync failed: the server closed the connection"), err


# --------------------------------------------------------------------------- (b) replayed frames


@pytest.mark.asyncio
async def test_a_frame_replayed_to_the_server_in_the_same_connection(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The device's own ACK, sent again: the server closes the connection."""
    add_device(db)
    first = enqueue(db, content="one")

    def replay(relay: Relay, direction: Direction, kind: int, raw: bytes) -> list[bytes]:
        if direction == "up" and kind == FrameType.ACK:
            return [raw, raw]
        return [raw]

    async with dispatching(dsn) as dispatcher, through(dispatcher, replay) as (mitm, address):
        config = write_config(tmp_path, address)
        async with listening(config):
            relay = await wait_for_relay(mitm)
            closer = await hung_up(relay)
            await settle(dispatcher)
            assert [r for (r, _) in state(db)["confirmed"]] == [first]
            assert closer == "server"
            assert connections_of(dispatcher).stats.bad_frames == 1
            assert connections_of(dispatcher).stats.acks == 1  # the device's own, once


@pytest.mark.asyncio
async def test_a_frame_from_an_earlier_connection_replayed_to_the_server(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """The device moved to another UDP port; the attacker replays its old TRACK (recorded
    on the device's previous connection) to send its pushes back to the old one."""
    add_device(db)
    old_track: list[bytes] = []

    def replay(relay: Relay, direction: Direction, kind: int, raw: bytes) -> list[bytes]:
        if direction == "up" and kind == FrameType.TRACK:
            if relay.number == 0:
                old_track.append(raw)
            else:
                return [raw, *old_track]
        return [raw]

    async with (
        dispatching(dsn) as dispatcher,
        through(dispatcher, replay, connections=2) as (mitm, address),
    ):
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        async with listening(write_config(tmp_path / "a", address, udp=True)) as device:
            old = f"127.0.0.1:{device.udp_address[1]}"
            await until_async(lambda: tracked(db) == [(old,)], "the first address")
        assert await hung_up(mitm.relays[0]) == "device"  # it stopped
        async with listening(write_config(tmp_path / "b", address, udp=True)) as device:
            new = f"127.0.0.1:{device.udp_address[1]}"
            relay = await wait_for_relay(mitm, 1)
            closer = await hung_up(relay)
            await settle(dispatcher)
            assert tracked(db) == [(new,)]
            assert closer == "server"
            assert connections_of(dispatcher).stats.bad_frames == 1


@pytest.mark.asyncio
async def test_a_frame_replayed_to_the_device(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    """A MESSAGE the server pushed, sent to the listener again: it closes the connection."""
    add_device(db)
    enqueue(db, content="one")

    def replay(relay: Relay, direction: Direction, kind: int, raw: bytes) -> list[bytes]:
        if direction == "down" and kind == FrameType.MESSAGE:
            return [raw, raw]
        return [raw]

    async with (
        dispatching(dsn) as dispatcher,
        through(dispatcher, replay) as (mitm, address),
        listening(write_config(tmp_path, address)) as listener,
    ):
        relay = await wait_for_relay(mitm)
        assert await hung_up(relay) == "device"
        assert listener.channel(SyncChannel).connections == 1
        assert connections_of(dispatcher).stats.bad_frames == 0
        assert listener.counters.duplicates == 0  # never read as a message


# --------------------------------------------------------------------------- (c) reordered, dropped


def swap_first_two(direction: Direction, kind: int) -> Tamper:
    """Hold the first ``kind`` frame going ``direction``; send it after the second."""

    def tamper(relay: Relay, going: Direction, seen: int, raw: bytes) -> list[bytes]:
        if going != direction or seen != kind:
            return [raw]
        count = len(relay.frames(direction, kind))
        if count == 1:
            relay.held.append(raw)
            return []
        if count == 2:
            return [raw, *relay.held]
        return [raw]

    return tamper


def drop_first(direction: Direction, kind: int) -> Tamper:
    def tamper(relay: Relay, going: Direction, seen: int, raw: bytes) -> list[bytes]:
        if going == direction and seen == kind and len(relay.frames(direction, kind)) == 1:
            return []
        return [raw]

    return tamper


def swap_subscribe_and_track(
    relay: Relay, direction: Direction, kind: int, raw: bytes
) -> list[bytes]:
    """The listener sends SUBSCRIBE then TRACK: the server gets TRACK then SUBSCRIBE."""
    if direction == "up" and kind == FrameType.SUBSCRIBE:
        relay.held.append(raw)
        return []
    if direction == "up" and kind == FrameType.TRACK:
        return [raw, *relay.held]
    return [raw]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "tamper",
    [swap_subscribe_and_track, drop_first("up", FrameType.SUBSCRIBE)],
    ids=["reordered", "dropped"],
)
async def test_frames_reordered_or_dropped_on_the_way_to_the_server(
    db: psycopg.Connection, dsn: str, tmp_path: Path, tamper: Tamper
) -> None:
    """The listener's SUBSCRIBE and TRACK, swapped, or SUBSCRIBE dropped: the server
    closes the connection at the first frame out of its place and records neither."""
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        before = state(db)
        async with (
            through(dispatcher, tamper) as (mitm, address),
            listening(write_config(tmp_path, address, udp=True)),
        ):
            relay = await wait_for_relay(mitm)
            closer = await hung_up(relay)
            await settle(dispatcher)
            assert state(db) == before  # neither subscribed nor tracked
            assert closer == "server"
            assert connections_of(dispatcher).stats.bad_frames == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "tamper",
    [swap_first_two("down", FrameType.MESSAGE), drop_first("down", FrameType.MESSAGE)],
    ids=["reordered", "dropped"],
)
async def test_frames_reordered_or_dropped_on_the_way_to_the_device(
    db: psycopg.Connection, dsn: str, tmp_path: Path, tamper: Tamper
) -> None:
    """Two messages waiting; the attacker swaps them, or drops the first: the listener
    runs neither and confirms neither, and closes the connection."""
    add_device(db)
    enqueue(db, content="one")
    enqueue(db, content="two")
    async with dispatching(dsn) as dispatcher:
        before = state(db)
        async with (
            through(dispatcher, tamper) as (mitm, address),
            listening(write_config(tmp_path, address)) as listener,
        ):
            relay = await wait_for_relay(mitm)
            closer = await hung_up(relay)
            await settle(dispatcher)
            assert state(db)["confirmed"] == before["confirmed"] == []
            assert listener.counters.handled == 0
            assert closer == "device"
            assert len(relay.frames("down", FrameType.MESSAGE)) == 2
        assert runs(tmp_path) == []


# --------------------------------------------------------------------------- no way around


@pytest.mark.asyncio
async def test_a_listener_of_the_untagged_version_is_refused_with_the_reason(
    db: psycopg.Connection, dsn: str
) -> None:
    """Version 1 had no tags: the server does not speak it, and says so before anything."""
    add_device(db)
    hello = protocol.encode_hello(protocol.Hello(device=DEVICE, nonce=protocol.new_nonce()))
    old_hello = hello[:5] + bytes([1]) + hello[6:]
    async with dispatching(dsn) as dispatcher:
        reader, writer = await asyncio.open_connection(*connections_of(dispatcher).address)
        writer.write(old_hello)
        answer = await asyncio.wait_for(reader.read(), 10)
        await _shut(writer)
        [bye] = protocol.FrameReader().feed(answer)
        assert protocol.decode_bye(bye) == (
            "unsupported version: this server speaks SYNC version 2; upgrade pushsync on the device"
        )
        assert connections_of(dispatcher).stats.authenticated == 0


# --------------------------------------------------------------------------- helpers


async def wait_for_relay(mitm: Mitm, number: int = 0) -> Relay:
    await until_async(lambda: len(mitm.relays) > number, f"connection {number} through the proxy")
    return mitm.relays[number]


async def settle(dispatcher: Dispatcher) -> None:
    """Wait until the server has done what it started for the frames it accepted
    (recording a TRACK or a connection, confirming an ack)."""
    server = connections_of(dispatcher)
    await until_async(
        lambda: not server._tasks and not dispatcher._acks, "the SYNC server's pending work"
    )


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    done = await run_cli_async(*args, cwd=cwd)
    return done.returncode, done.stdout, done.stderr
