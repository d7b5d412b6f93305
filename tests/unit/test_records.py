"""Connection records and secret lookups in batches (pushsync.dispatcher.records), no database."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

import pytest

from pushsync.dispatcher.records import Connect, Lookups, Pending, Recorder

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = T0 + timedelta(seconds=1)


# --------------------------------------------------------------------------- Pending (pure)


def test_a_disconnection_takes_out_the_waiting_record_of_that_connection() -> None:
    batch = Pending()
    batch.connected("d", "p1", T0)
    batch.disconnected("d", "p1")
    assert batch.connects == {}
    assert batch.disconnects == {"d": {"p1"}}  # harmless: it matches no other record


def test_a_connection_cancels_a_waiting_disconnection_of_the_same_peer_only() -> None:
    batch = Pending()
    batch.disconnected("d", "p1")
    batch.disconnected("d", "p2")
    batch.connected("d", "p1", T1)
    assert batch.connects == {"d": Connect("p1", T1)}
    assert batch.disconnects == {"d": {"p2"}}
    batch.connected("d", "p2", T1)
    assert batch.disconnects == {}


def test_the_newest_connection_and_endpoint_of_a_device_win() -> None:
    batch = Pending()
    batch.connected("d", "p1", T0)
    batch.connected("d", "p2", T1)
    batch.disconnected("d", "p1")  # the older connection: the newer record stays
    batch.tracked("d", "192.0.2.1:1")
    batch.tracked("d", "192.0.2.1:2")
    batch.tracked("e", "192.0.2.2:1")
    assert batch.connects == {"d": Connect("p2", T1)}
    assert batch.tracks == {"d": "192.0.2.1:2", "e": "192.0.2.2:1"}
    assert batch.disconnect_pairs() == [("d", "p1")]
    assert len(batch) == 4  # per device and kind


def test_connect_disconnect_connect_from_one_peer_ends_connected() -> None:
    batch = Pending()
    batch.connected("d", "p", T0)
    batch.disconnected("d", "p")
    batch.connected("d", "p", T1)
    assert batch.connects == {"d": Connect("p", T1)}
    assert batch.disconnects == {}


# --------------------------------------------------------------------------- Recorder


class Writes:
    """A ``write`` for the Recorder that keeps each batch and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[Pending] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.failures: list[BaseException] = []

    async def __call__(self, batch: Pending) -> None:
        self.entered.set()
        await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        self.batches.append(batch)


@pytest.mark.asyncio
async def test_records_arriving_during_a_write_go_together_in_the_next_batch() -> None:
    writes = Writes()
    writes.gate.clear()
    recorder = Recorder(writes)
    first = asyncio.create_task(recorder.connected("d0", "p0", T0))
    await asyncio.wait_for(writes.entered.wait(), 5)  # batch 1 is at the "database"
    later = [asyncio.create_task(recorder.connected(f"d{n}", f"p{n}", T0)) for n in range(1, 101)]
    gone = asyncio.create_task(recorder.disconnected("d0", "p0"))
    await asyncio.sleep(0.01)
    assert not first.done()  # a caller returns once its batch is written
    writes.gate.set()
    await asyncio.wait_for(asyncio.gather(first, gone, *later), 5)
    assert [sorted(b.connects) for b in writes.batches] == [
        ["d0"],
        sorted(f"d{n}" for n in range(1, 101)),
    ]
    assert writes.batches[1].disconnects == {"d0": {"p0"}}  # after its connection's batch
    assert recorder.batches == 2


@pytest.mark.asyncio
async def test_a_batch_the_database_refused_is_written_again_before_later_ones() -> None:
    writes = Writes()
    writes.failures = [ConnectionError("database away"), ConnectionError("still away")]
    recorder = Recorder(writes, retry_on=(ConnectionError,), retry_first=0.01)
    first = asyncio.create_task(recorder.connected("d", "p1", T0))
    await asyncio.wait_for(writes.entered.wait(), 5)
    second = asyncio.create_task(recorder.disconnected("d", "p1"))
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert [list(b.connects) for b in writes.batches] == [["d"], []]
    assert writes.batches[1].disconnects == {"d": {"p1"}}


@pytest.mark.asyncio
async def test_a_batch_that_cannot_be_written_is_logged_once_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = Writes()
    writes.failures = [ValueError("bad batch")]
    recorder = Recorder(writes, retry_on=(ConnectionError,))
    writes.gate.clear()
    tasks = [asyncio.create_task(recorder.tracked(f"d{n}", "192.0.2.1:1")) for n in range(5)]
    await asyncio.sleep(0)
    writes.gate.set()
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(asyncio.gather(*tasks), 5)
    lines = [r.getMessage() for r in caplog.records if "cannot record" in r.getMessage()]
    assert lines == ["sync: cannot record 5 connections: bad batch"]
    await recorder.connected("d", "p", T0)  # the next batch is written
    assert [list(b.connects) for b in writes.batches] == [["d"]]


@pytest.mark.asyncio
async def test_close_writes_what_waits_then_records_nothing() -> None:
    writes = Writes()
    writes.gate.clear()
    recorder = Recorder(writes)
    waiting = [asyncio.create_task(recorder.tracked(f"d{n}", "192.0.2.1:1")) for n in range(3)]
    await asyncio.sleep(0)
    closing = asyncio.create_task(recorder.close())
    await asyncio.sleep(0.01)
    assert not closing.done()
    writes.gate.set()
    await asyncio.wait_for(asyncio.gather(closing, *waiting), 5)
    assert sum(len(b.tracks) for b in writes.batches) == 3
    await asyncio.wait_for(recorder.connected("late", "p", T0), 1)  # ignored at once
    assert all("late" not in b.connects for b in writes.batches)


@pytest.mark.asyncio
async def test_close_gives_up_after_its_timeout_when_the_database_never_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writes = Writes()
    writes.gate.clear()  # the write never returns
    recorder = Recorder(writes)
    caller = asyncio.create_task(recorder.connected("d", "p", T0))
    await asyncio.wait_for(writes.entered.wait(), 5)
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(recorder.close(0.05), 5)
    await asyncio.wait_for(caller, 1)  # released, not left hanging
    assert "stopped with connection records not written" in caplog.text


@pytest.mark.asyncio
async def test_flush_waits_for_the_batch_being_written() -> None:
    writes = Writes()
    writes.gate.clear()
    recorder = Recorder(writes)
    caller = asyncio.create_task(recorder.connected("d", "p", T0))
    await asyncio.wait_for(writes.entered.wait(), 5)
    flushing = asyncio.create_task(recorder.flush())
    await asyncio.sleep(0.01)
    assert not flushing.done()
    writes.gate.set()
    await asyncio.wait_for(asyncio.gather(flushing, caller), 5)
    assert len(writes.batches) == 1


# --------------------------------------------------------------------------- Lookups


@pytest.mark.asyncio
async def test_lookups_during_a_read_share_the_next_read_and_get_their_own_answer() -> None:
    reads: list[list[str]] = []
    gate = asyncio.Event()

    async def read(devices: list[str]) -> dict[str, bytes]:
        reads.append(devices)
        await gate.wait()
        return {d: d.encode() for d in devices if d.startswith("known")}

    lookups = Lookups(read)
    first = asyncio.create_task(lookups.secret("known-0"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(lookups.secret(d)) for d in ("known-1", "unknown", "known-1")]
    await asyncio.sleep(0)
    gate.set()
    answers = await asyncio.wait_for(asyncio.gather(first, *others), 5)
    assert answers == [b"known-0", b"known-1", None, b"known-1"]
    assert reads == [["known-0"], ["known-1", "unknown"]]
    await lookups.close()


@pytest.mark.asyncio
async def test_a_failed_read_fails_each_lookup_of_its_batch_and_the_next_works() -> None:
    failing = True

    async def read(devices: list[str]) -> dict[str, bytes]:
        if failing:
            raise ConnectionError("database away")
        return {d: b"s" for d in devices}

    lookups = Lookups(read)
    results = await asyncio.gather(lookups.secret("a"), lookups.secret("b"), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionError, ConnectionError]
    failing = False
    assert await asyncio.wait_for(lookups.secret("a"), 5) == b"s"
    await lookups.close()
