"""Property-based fuzzing of the running daemons over real sockets.

Hypothesis feeds thousands of random and mutated inputs: datagrams to a running
listener, SYNC streams from a fake server to the listener's sync channel, and
SYNC streams to the dispatcher's SYNC server. Properties: nothing crashes, no
action runs for anything that is not a validly signed message for the device,
and each daemon still does its job afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pushsync.dispatcher.connections import ConnectionServer, ConnectionSettings
from pushsync.dispatcher.outbox import Claimed
from pushsync.listener.config import load_config
from pushsync.listener.runtime import Listener
from pushsync.wire import protocol
from tests.support.event_loop import LoopThread
from tests.support.fuzz import examples
from tests.support.keys import write_key
from tests.support.waiting import until, until_async

SECRET = bytes(range(32))
WRONG = bytes(range(1, 33))
DEVICE = "truck-1"
EXAMPLES = examples(1500)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
T = TypeVar("T")


def message(**changes: Any) -> protocol.Message:
    now = time.time()
    fields: dict[str, Any] = {
        "request_id": uuid.uuid4(),
        "device": DEVICE,
        "subject": "sync",
        "content": "fuzz",
        "sender": "pushsync",
        "priority": "normal",
        "created": round(now, 3),
        "expires": round(now + 600, 3),
    }
    fields.update(changes)
    return protocol.Message(**fields)


def mutate(data: bytes, draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """Flip bits, cut, extend or splice ``data``."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "extend", "set"]))
        if kind == "flip" and out:
            at = draw(st.integers(0, len(out) - 1))
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut" and out:
            del out[draw(st.integers(0, len(out) - 1)) :]
        elif kind == "extend":
            out += draw(st.binary(min_size=1, max_size=64))
        elif out:
            at = draw(st.integers(0, len(out) - 1))
            out[at] = draw(st.integers(0, 255))
    return bytes(out)


@st.composite
def hostile_envelopes(draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """Anything but a validly signed, unexpired message for DEVICE."""
    kind = draw(st.sampled_from(["random", "mutated", "wrong secret", "expired", "other device"]))
    if kind == "random":
        return bytes(draw(st.binary(max_size=1400)))
    if kind == "wrong secret":
        return protocol.encode_message(message(), WRONG)
    if kind == "expired":
        return protocol.encode_message(message(created=1.0, expires=2.0), SECRET)
    if kind == "other device":
        return protocol.encode_message(message(device="truck-2"), SECRET)
    good = protocol.encode_message(message(), SECRET)
    bad = mutate(good, draw)
    if bad == good:
        bad = good[:-1]
    return bad


def write_config(directory: Path, channels: str) -> Path:
    write_key(directory / "device.key", SECRET)
    script = directory / "record.py"
    script.write_text(
        "import pathlib, sys\n"
        "with (pathlib.Path(__file__).parent / 'runs.txt').open('a') as f:\n"
        "    f.write(sys.argv[1] + '\\n')\n",
        encoding="utf-8",
    )
    argv = json.dumps([sys.executable, str(script), "$request_id"])
    path = directory / "listener.yaml"
    path.write_text(
        f"device: {DEVICE}\nsecret_file: device.key\nstate_dir: state\nchannels:\n{channels}"
        f"handlers:\n  - name: record\n    action: {{run: {argv}, timeout: 10s}}\n",
        encoding="utf-8",
    )
    return path


def runs(directory: Path) -> list[str]:
    out = directory / "runs.txt"
    return out.read_text().split() if out.exists() else []


@contextmanager
def running_listener(loop: LoopThread, config: Path) -> Iterator[Listener]:
    async def start() -> tuple[Listener, asyncio.Event, asyncio.Task[None]]:
        listener = Listener(load_config(config))
        stop = asyncio.Event()
        task = asyncio.create_task(listener.run(stop))
        await asyncio.wait_for(listener.started.wait(), 10)
        return listener, stop, task

    listener, stop, task = loop.run(start())
    try:
        yield listener
    finally:

        async def finish() -> None:
            stop.set()
            await asyncio.wait_for(task, 15)

        loop.run(finish())


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    try:
        yield thread
    finally:
        thread.close()


# --------------------------------------------------------------------------- UDP to the listener


@pytest.mark.slow
def test_hostile_datagrams_never_run_an_action(loop: LoopThread, tmp_path: Path) -> None:
    config = write_config(tmp_path, '  udp: {bind: "127.0.0.1:0"}\n')
    sent = 0
    with running_listener(loop, config) as listener:
        address = listener.udp_address
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:

            @FUZZ
            @given(hostile_envelopes())
            def send(data: bytes) -> None:
                nonlocal sent
                sender.sendto(data, address)
                sent += 1
                if sent % 200 == 0:  # keep the socket's buffer from overflowing
                    until(lambda: listener.counters.received >= sent - 50, "the listener")

            send()
            until(lambda: listener.counters.received >= sent, "every datagram")
            assert runs(tmp_path) == []
            assert listener.counters.handled == 0
            assert listener.counters.acks_sent == 0
            good = message()
            sender.sendto(protocol.encode_message(good, SECRET), address)
            until(lambda: runs(tmp_path) == [str(good.request_id)], "the valid message")
    assert sent >= EXAMPLES // 2


# --------------------------------------------------------------------------- SYNC to the listener


class FakeServer:
    """A SYNC server that authenticates the device, then writes whatever it is given.

    It holds the device's secret, so it tags the frames it is given as the
    real server would (a hostile server, not a stranger on the path): what
    :meth:`send` queues goes out tagged, what :meth:`send_raw` queues as it is.
    Only the newest connection takes what is queued.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, bool]] = asyncio.Queue()
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def send(self, data: bytes) -> None:
        """Queue whole frames for the current connection, to be tagged (in the loop's thread)."""
        self.queue.put_nowait((data, True))

    def send_raw(self, data: bytes) -> None:
        """Queue bytes to write as they are (call in the loop's thread)."""
        self.queue.put_nowait((data, False))

    def drop(self) -> None:
        """Close the current connection (call in the loop's thread)."""
        if self.writer is not None:
            self.writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = protocol.FrameReader()
        try:
            got: list[protocol.Frame] = []
            while len(got) < 1:
                got += frames.feed(await reader.read(4096))
            hello = protocol.decode_hello(got.pop(0))
            challenge = protocol.new_nonce()
            writer.write(protocol.encode_challenge(challenge))
            while len(got) < 1:
                got += frames.feed(await reader.read(4096))
            protocol.decode_auth(got.pop(0))
            proof = protocol.server_proof(SECRET, hello.nonce, challenge, hello.device)
            writer.write(protocol.encode_welcome(proof))
            keys = protocol.session_keys(SECRET, hello.nonce, challenge, hello.device)
            sealer = protocol.FrameSealer(keys.down)
            self.drop()
            self.queue = asyncio.Queue()  # what was meant for the last connection is dropped
            self.writer = writer
            queue = self.queue
            while True:
                getting = asyncio.ensure_future(queue.get())
                reading = asyncio.ensure_future(reader.read(4096))
                done, _ = await asyncio.wait(
                    [getting, reading], return_when=asyncio.FIRST_COMPLETED
                )
                for waiter in (getting, reading):
                    waiter.cancel()
                if reading in done and not reading.result():
                    break  # the listener closed the connection
                if getting in done:
                    data, tag = getting.result()
                    writer.write(sealer.seal(data) if tag else data)
                    await writer.drain()
        except (ConnectionError, protocol.ProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@st.composite
def hostile_streams(draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[bytes, bool]:
    """What a server might send after WELCOME that must not run an action: bytes, and
    whether they are whole frames to tag (a hostile server holding the key) or go as
    they are (garbage, or an injection by someone without the key)."""
    kind = draw(st.sampled_from(["random", "frames", "mutated frame", "untagged", "tampered"]))
    if kind == "random":
        return bytes(draw(st.binary(min_size=1, max_size=300))), False
    good = protocol.encode_message_frame(protocol.encode_message(message(), SECRET))
    if kind == "frames":
        frame_type = draw(st.sampled_from(list(protocol.FrameType)))
        if frame_type == protocol.FrameType.MESSAGE:
            payload = draw(hostile_envelopes())
        else:
            payload = draw(st.binary(max_size=40))
        return protocol.encode_frame(frame_type, payload), True
    if kind == "untagged":  # a valid message injected without a tag, or a made-up one
        return good + draw(st.binary(max_size=protocol.TAG_SIZE)), False
    if kind == "tampered":  # tagged under another session's key
        keys = protocol.session_keys(SECRET, protocol.new_nonce(), protocol.new_nonce(), DEVICE)
        return protocol.FrameSealer(keys.down).seal(good), False
    bad = mutate(good, draw)
    # Bytes after an intact frame leave a valid message: not what this tests.
    bad = good[:-1] if bad.startswith(good) else bad
    try:
        protocol.FrameSealer(bytes(32)).seal(bad)
    except ValueError:
        return bad, False  # not whole frames: as they are
    return bad, True


@pytest.mark.slow
def test_hostile_sync_streams_never_run_an_action(loop: LoopThread, tmp_path: Path) -> None:
    fake = FakeServer()
    port = loop.run(fake.start())
    config = write_config(tmp_path, f'  sync: {{server: "127.0.0.1:{port}"}}\n')
    with running_listener(loop, config) as listener:
        from pushsync.listener.channels import SyncChannel

        channel = listener.channel(SyncChannel)
        channel.backoff.first = channel.backoff.most = 0.001  # reconnect at once
        until(channel.connected.is_set, "the first connection")

        @settings(FUZZ, max_examples=EXAMPLES // 3)
        @given(hostile_streams())
        def send(stream: tuple[bytes, bool]) -> None:
            data, tag = stream
            before = channel.connections
            loop.loop.call_soon_threadsafe(fake.send if tag else fake.send_raw, data)
            # A bad stream drops the connection: wait for the next one.
            time.sleep(0.002)
            if not channel.connected.is_set() or channel.connections != before:
                until(channel.connected.is_set, "a reconnection")

        send()
        assert runs(tmp_path) == []
        # A valid message on a fresh connection (the last one may hold half a frame).
        good = message()
        frame = protocol.encode_message_frame(protocol.encode_message(good, SECRET))
        before = channel.connections
        loop.loop.call_soon_threadsafe(fake.drop)
        until(lambda: channel.connections > before and channel.connected.is_set(), "a fresh one")
        loop.loop.call_soon_threadsafe(fake.send, frame)
        until(lambda: runs(tmp_path) == [str(good.request_id)], "the valid message")
    loop.run(_close_server(fake))


async def _close_server(fake: FakeServer) -> None:
    fake.drop()
    if fake.server is not None:
        fake.server.close()
        await fake.server.wait_closed()


# --------------------------------------------------------------------------- SYNC to the dispatcher


class MemoryStore:
    """The SYNC server's store without a database: one device, records kept in lists."""

    def __init__(self) -> None:
        self.connected_devices: list[str] = []
        self.tracked: list[tuple[str, str]] = []

    async def secret(self, device: str) -> bytes | None:
        return SECRET if device == DEVICE else None

    async def connected(self, device: str, peer: str) -> None:
        self.connected_devices.append(device)

    async def disconnected(self, device: str, peer: str) -> None:
        return None

    async def track(self, device: str, address: str) -> None:
        self.tracked.append((device, address))

    async def claim_device(self, device: str, limit: int) -> list[Claimed]:
        return []

    async def sent(self, request_id: uuid.UUID, gateway: str) -> bool:
        return True

    async def failed(self, request_id: uuid.UUID, error: str, *, final: bool) -> bool:
        return True


@st.composite
def client_streams(draw: Callable[[st.SearchStrategy[Any]], Any]) -> bytes:
    """What a hostile client might send first: garbage, frames, a mutated handshake."""
    kind = draw(st.sampled_from(["random", "frames", "mutated hello", "forged auth"]))
    if kind == "random":
        return bytes(draw(st.binary(min_size=1, max_size=600)))
    if kind == "frames":
        parts = [
            protocol.encode_frame(
                draw(st.sampled_from(list(protocol.FrameType))), draw(st.binary(max_size=80))
            )
            for _ in range(draw(st.integers(1, 4)))
        ]
        return b"".join(parts)
    hello = protocol.encode_hello(protocol.Hello(device=DEVICE, nonce=protocol.new_nonce()))
    if kind == "mutated hello":
        return mutate(hello, draw)
    return hello + protocol.encode_auth(draw(st.binary(min_size=32, max_size=32)))


@pytest.mark.slow
def test_hostile_clients_never_authenticate_and_the_server_keeps_serving(
    loop: LoopThread,
) -> None:
    store = MemoryStore()
    acks: list[protocol.Ack] = []
    server = ConnectionServer(
        store,
        lambda ack, _peer: acks.append(ack),
        settings=ConnectionSettings(handshake_timeout=2.0),
    )
    loop.run(server.start("127.0.0.1", 0))
    host, port = server.address

    async def attack(data: bytes) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(65536), 0.05)
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    @settings(FUZZ, max_examples=EXAMPLES // 2)
    @given(client_streams())
    def send(data: bytes) -> None:
        loop.run(attack(data))

    try:
        send()
        until(lambda: not server._all, "every hostile connection to close", 10)
        assert store.connected_devices == []
        assert acks == []
        assert server.stats.authenticated == 0

        async def honest() -> bool:
            from pushsync.listener.connection import open_session
            from pushsync.wire.addresses import Address

            session = await open_session(
                Address(host=host, port=port), device=DEVICE, secret=SECRET
            )
            session.send(protocol.encode_subscribe())
            await until_async(
                lambda: store.connected_devices, "the honest device's subscription", 2
            )
            await session.close("bye")
            return True

        assert loop.run(honest())
        assert store.connected_devices == [DEVICE]
    finally:
        loop.run(server.close())
