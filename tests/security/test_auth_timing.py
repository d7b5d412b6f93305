"""The SYNC port does not tell, by when it answers, which device ids exist.

The attacker measures, against a real ``pushsync dispatch``, how long the
server takes from an AUTH frame to its BYE for three kinds of failed
handshakes: an unknown device id, a disabled device, and a known enabled
device with a wrong secret (one that has just authenticated, so anything
remembered about it would be warm). Every failure is answered at the same
fixed deadline after its AUTH arrives, so the three distributions are the
deadline plus scheduling noise, and they are indistinguishable.

Robust on a loaded machine: the rounds interleave the three kinds (one of
each, concurrently, in a shuffled order), so load hits them alike; the
assertions are that no failure is answered before the deadline (exact: the
client's clock starts before the server's) and that the medians lie within
a small fraction of the deadline of each other.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Literal

import psycopg
import pytest

from bench.dispatcher_process import dispatcher_process
from pushsync.dispatcher.connections import FAILED_AUTH_DELAY
from pushsync.wire import protocol
from tests.support.dispatching import DEVICE, SECRET, WRONG, add_device

ROUNDS = 25
TOLERANCE = 0.1 * FAILED_AUTH_DELAY
"""How far apart two kinds' medians may be: 20 ms, against the deadline's 200 ms."""
LATEST = FAILED_AUTH_DELAY + 0.15
"""A median later than this would mean the answer waits for something else."""
Kind = Literal["unknown", "disabled", "wrong secret"]
KINDS: tuple[Kind, ...] = ("unknown", "disabled", "wrong secret")


async def handshake(port: int, device: str, secret: bytes) -> tuple[float, protocol.Frame]:
    """HELLO, CHALLENGE, AUTH: the seconds from sending AUTH to the server's answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    frames = protocol.FrameReader()
    try:
        nonce = protocol.new_nonce()
        writer.write(protocol.encode_hello(protocol.Hello(device=device, nonce=nonce)))
        challenge = protocol.decode_challenge(await next_frame(reader, frames))
        proof = protocol.client_proof(secret, challenge, nonce, device)
        started = time.perf_counter()
        writer.write(protocol.encode_auth(proof))
        answer = await next_frame(reader, frames)
        return time.perf_counter() - started, answer
    finally:
        writer.close()
        await writer.wait_closed()


async def next_frame(reader: asyncio.StreamReader, frames: protocol.FrameReader) -> protocol.Frame:
    while (frame := frames.take()) is None:
        data = await asyncio.wait_for(reader.read(4096), 10)
        assert data, "the server closed the connection without answering"
        frames.add(data)
    return frame


def attempt(kind: Kind, n: int) -> tuple[str, bytes]:
    if kind == "unknown":
        return f"ghost-{n}", SECRET
    if kind == "disabled":
        return "off", SECRET
    return DEVICE, WRONG


def devices(db: psycopg.Connection) -> list[tuple[object, ...]]:
    return db.execute(
        "SELECT device_id, secret, enabled FROM pushsync.devices ORDER BY 1"
    ).fetchall()


@pytest.mark.asyncio
async def test_unknown_disabled_and_wrong_secret_take_the_same_time(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    db.execute(
        "INSERT INTO pushsync.devices (device_id, secret, enabled) VALUES ('off', %s, false)",
        (SECRET,),
    )
    before = devices(db)
    rng = random.Random(11)
    times: dict[Kind, list[float]] = {kind: [] for kind in KINDS}
    with dispatcher_process(dsn) as dispatcher:
        port = dispatcher.sync_port
        # The known device authenticates: a success is answered at once.
        took, welcome = await handshake(port, DEVICE, SECRET)
        assert welcome.type == protocol.FrameType.WELCOME
        assert took < FAILED_AUTH_DELAY
        for n in range(ROUNDS):
            order = list(KINDS)
            rng.shuffle(order)
            answers = await asyncio.gather(*(handshake(port, *attempt(kind, n)) for kind in order))
            for kind, (took, frame) in zip(order, answers, strict=True):
                assert protocol.decode_bye(frame) == "authentication failed", kind
                times[kind].append(took)
        assert dispatcher.process.poll() is None
    assert devices(db) == before
    assert not db.execute("SELECT * FROM pushsync.sync_connections").fetchall()

    medians = {kind: statistics.median(values) for kind, values in times.items()}
    summary = {
        kind: f"min {min(v) * 1000:.1f} ms, median {medians[kind] * 1000:.1f} ms, "
        f"max {max(v) * 1000:.1f} ms"
        for kind, v in times.items()
    }
    for kind, values in times.items():
        assert min(values) >= FAILED_AUTH_DELAY, summary  # never before the deadline
        assert medians[kind] <= LATEST, summary
    assert max(medians.values()) - min(medians.values()) <= TOLERANCE, summary
