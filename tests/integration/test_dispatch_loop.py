"""The dispatcher daemon on a real database: NOTIFY to datagram, acks, fallback, leases."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, cast

import psycopg
import pytest
from psycopg.rows import dict_row

from pushsync.dispatcher.daemon import Dispatcher, DispatcherSettings
from pushsync.dispatcher.gateways import Gateway, SendResult, UdpGateway
from pushsync.dispatcher.outbox import Claimed, OutboxStore
from pushsync.testing import RecordingGateway
from pushsync.wire import protocol
from tests.integration import trucking
from tests.support.dispatching import dispatcher_listens, running, set_address, states
from tests.support.waiting import until_async

if TYPE_CHECKING:
    from pushsync.dispatcher.connections import ConnectionServer

SECRET = b"0123456789abcdef"  # what trucking.add_devices gives every device
WAIT = 5.0


# --------------------------------------------------------------------------- helpers


def rows(db: psycopg.Connection, table: str = "pushsync.outbox") -> list[dict[str, Any]]:
    with db.cursor(row_factory=dict_row) as cur:
        cur.execute(f"SELECT * FROM {table} ORDER BY device_id, created_at")
        return cur.fetchall()


def finished(db: psycopg.Connection) -> list[tuple[uuid.UUID, str]]:
    """Rows confirmed, expired or failed, in the outbox or already archived."""
    found = db.execute(
        "SELECT request_id, state FROM pushsync.outbox WHERE state IN ('confirmed', 'expired', "
        "'failed') UNION ALL SELECT request_id, state FROM pushsync.outbox_history"
    ).fetchall()
    return [(uuid.UUID(str(r)), s) for r, s in found]


def enqueue(
    db: psycopg.Connection,
    device: str,
    *,
    gateway: str = "auto",
    expires: str = "now() + interval '1 hour'",
    created: str = "now()",
) -> uuid.UUID:
    row = db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, gateway, coalescing, "
        f"created_at, expires_at, resend_every) VALUES ('r', %s, 'sync', 'go', %s, false, "
        f"{created}, {expires}, '1 hour') RETURNING request_id",
        (device, gateway),
    ).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


class _Inbox(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.queue.put_nowait((data, time.perf_counter()))


class Device:
    """A UDP socket on 127.0.0.1 playing a truck's listener."""

    def __init__(self, transport: asyncio.DatagramTransport, inbox: _Inbox) -> None:
        self.transport = transport
        self.inbox = inbox

    @classmethod
    async def bind(cls) -> Device:
        inbox = _Inbox()
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: inbox, local_addr=("127.0.0.1", 0)
        )
        return cls(transport, inbox)

    @property
    def address(self) -> str:
        host, port = self.transport.get_extra_info("sockname")[:2]
        return f"{host}:{port}"

    async def receive(self) -> tuple[bytes, float]:
        return await asyncio.wait_for(self.inbox.queue.get(), WAIT)


class BlockingGateway:
    """Starts every send and never finishes one (until cancelled)."""

    def __init__(self, name: str = "udp") -> None:
        self.name = name
        self.started: list[Claimed] = []

    async def send(self, item: Claimed) -> SendResult:
        self.started.append(item)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


# --------------------------------------------------------------------------- UDP end to end


@pytest.mark.asyncio
async def test_report_reaches_affected_trucks_over_udp_and_acks_confirm(
    db: psycopg.Connection, dsn: str
) -> None:
    trucking.setup(db)
    devices = {f"truck-{n}": await Device.bind() for n in range(1, 5)}
    for device_id, device in devices.items():
        set_address(db, device_id, "udp", device.address)
    dispatcher = Dispatcher(
        DispatcherSettings(dsn=dsn, poll_interval=30.0, housekeeping_interval=30.0)
    )
    udp = await UdpGateway.bind(
        ("127.0.0.1", 0), secret_for=dispatcher.secret_for, on_ack=dispatcher.on_ack
    )
    dispatcher.add_gateway(udp)
    try:
        async with running(dispatcher):
            await until_async(lambda: dispatcher_listens(db), "the dispatcher to LISTEN")
            committed = time.perf_counter()
            trucking.report(db, location=100, by=1)  # autocommit: committed on return
            # Drivers 2 and 4 pass location 100; 1 reported it, 3 does not pass it.
            received = {}
            for device_id in ("truck-2", "truck-4"):
                data, at = await devices[device_id].receive()
                msg = protocol.decode_message(data, SECRET, time.time())
                assert msg.device == device_id
                assert msg.subject == "sync"
                received[device_id] = (msg, at)
            latency = max(at for _, at in received.values()) - committed
            print(f"\ncommit-to-receive latency (2 devices): {latency * 1000:.1f} ms")
            assert latency < 2.0  # the poll is every 30 s: only NOTIFY explains this
            for device_id in ("truck-1", "truck-3"):
                assert devices[device_id].inbox.queue.empty()
            await until_async(lambda: states(db) == {"sent": 2}, "both rows sent")
            assert {r["gateway_used"] for r in rows(db)} == {"udp"}

            # truck-2 acks to the gateway's socket; only its row is confirmed.
            msg, _ = received["truck-2"]
            ack = protocol.Ack(request_id=msg.request_id, device="truck-2", confirmed=time.time())
            devices["truck-2"].transport.sendto(protocol.encode_ack(ack, SECRET), udp.local_address)
            # (The first housekeeping pass may archive it as soon as it is confirmed.)
            await until_async(
                lambda: finished(db) == [(msg.request_id, "confirmed")], "the confirmation"
            )
            assert states(db).get("sent") == 1
        for device in devices.values():
            assert device.inbox.queue.qsize() == 0  # exactly one datagram each
    finally:
        udp.close()
        for device in devices.values():
            device.transport.close()


# --------------------------------------------------------------------------- rows and gateways


@pytest.mark.asyncio
async def test_rows_committed_while_stopped_are_sent_at_start(
    db: psycopg.Connection, dsn: str
) -> None:
    trucking.setup(db)
    set_address(db, "truck-2", "udp", "127.0.0.1:9")
    set_address(db, "truck-4", "udp", "127.0.0.1:9")
    trucking.report(db, location=100, by=1)
    assert states(db) == {"pending": 2}
    udp = RecordingGateway("udp")
    async with running(Dispatcher(DispatcherSettings(dsn=dsn, poll_interval=60.0), {"udp": udp})):
        await until_async(lambda: states(db) == {"sent": 2}, "the rows written before start")
    assert sorted(item.device_id for item in udp.items) == ["truck-2", "truck-4"]


@pytest.mark.asyncio
async def test_failed_gateway_falls_back_to_the_next(db: psycopg.Connection, dsn: str) -> None:
    trucking.add_devices(db, "d1")
    set_address(db, "d1", "udp", "127.0.0.1:9")
    set_address(db, "d1", "email", "d1@example.org")
    request_id = enqueue(db, "d1")
    udp = RecordingGateway("udp", fail_with="boom")
    smtp = RecordingGateway("smtp")
    async with running(
        Dispatcher(DispatcherSettings(dsn=dsn, poll_interval=0.1), {"udp": udp, "smtp": smtp})
    ):
        await until_async(lambda: states(db) == {"sent": 1}, "the send")
    [row] = rows(db)
    assert row["request_id"] == request_id
    assert row["gateway_used"] == "smtp"
    assert [i.request_id for i in udp.items] == [i.request_id for i in smtp.items] == [request_id]


@pytest.mark.asyncio
async def test_unreachable_device_is_retried_not_lost(db: psycopg.Connection, dsn: str) -> None:
    trucking.add_devices(db, "far", "mail-only")
    set_address(db, "mail-only", "email", "m@example.org")  # but no SMTP gateway here
    enqueue(db, "far")
    enqueue(db, "mail-only")
    udp = RecordingGateway("udp")
    async with running(Dispatcher(DispatcherSettings(dsn=dsn, poll_interval=0.1), {"udp": udp})):
        await until_async(lambda: all(r["last_error"] for r in rows(db)), "both failures recorded")
    assert udp.items == []
    for row in rows(db):
        assert row["state"] == "sent"  # due again at next_attempt_at, until its TTL
        assert row["sent_at"] is None
        assert row["lease_owner"] is None
        assert row["last_error"] == f"no gateway can reach device {row['device_id']}"


@pytest.mark.asyncio
async def test_many_unreachable_rows_are_recorded_together_and_logged_in_one_line(
    db: psycopg.Connection, dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A fleet no gateway reaches (its SYNC dispatcher died, say) costs one statement and
    one warning per group of failures, not one of each per row."""
    devices = [f"far-{n}" for n in range(40)]
    trucking.add_devices(db, *devices)
    for device in devices:
        enqueue(db, device)
    udp = RecordingGateway("udp")
    caplog.set_level(logging.INFO, logger="pushsync.dispatcher.daemon")
    async with running(Dispatcher(DispatcherSettings(dsn=dsn, poll_interval=0.1), {"udp": udp})):
        await until_async(lambda: all(r["last_error"] for r in rows(db)), "every failure recorded")
    assert {(r["state"], r["lease_owner"]) for r in rows(db)} == {("sent", None)}
    retries = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "not sent, will retry" in r.getMessage()
    ]

    def counted(line: str) -> int:  # "N notifications not sent, …" or one row's own line
        return int(line.split()[0]) if "notifications not sent" in line else 1

    assert sum(map(counted, retries)) == len(devices), retries
    assert len(retries) < len(devices) / 4, retries


class Subscriptions:
    """Stands in for the SYNC server: the devices subscribed here, nothing else."""

    def __init__(self) -> None:
        self.by_device: dict[str, object] = {}

    def is_connected(self, device: str) -> bool:
        return device in self.by_device

    def credentials(self) -> list[tuple[str, bytes | None]]:
        return []

    def cut_off(self, device: str, reason: str) -> int:
        return 0


@pytest.mark.asyncio
async def test_a_device_that_subscribes_while_its_failure_is_recorded_is_sent_at_once(
    db: psycopg.Connection, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The subscription's record can reach the database before the failure does, find the
    row still leased and leave it; recorded as failed after, the row would wait for its
    next resend (an hour here). It goes down the new connection at once instead."""
    trucking.add_devices(db, "late")
    set_address(db, "late", "udp", "127.0.0.1:9")
    request_id = enqueue(db, "late")
    udp = RecordingGateway("udp", fail_with="refused")
    sync = RecordingGateway("sync")
    dispatcher = Dispatcher(
        DispatcherSettings(dsn=dsn, poll_interval=0.1), {"udp": udp, "sync": sync}
    )
    subscriptions = Subscriptions()
    dispatcher.connections = cast("ConnectionServer", subscriptions)
    record = OutboxStore.failed_many

    async def subscribed_meanwhile(
        store: OutboxStore, failures: list[tuple[uuid.UUID, str, bool]]
    ) -> set[uuid.UUID]:
        subscriptions.by_device["late"] = object()  # SUBSCRIBE, while this is at the database
        return await record(store, failures)

    monkeypatch.setattr(OutboxStore, "failed_many", subscribed_meanwhile)
    async with running(dispatcher):
        await until_async(lambda: sync.items, "sent down the new connection")
    assert [item.request_id for item in udp.items] == [request_id]
    assert [item.request_id for item in sync.items] == [request_id]


@pytest.mark.asyncio
async def test_final_failures_of_every_gateway_fail_the_row(
    db: psycopg.Connection, dsn: str
) -> None:
    trucking.add_devices(db, "d1")
    set_address(db, "d1", "udp", "127.0.0.1:9")
    enqueue(db, "d1")
    udp = RecordingGateway("udp", fail_with="too large", final=True)
    async with running(Dispatcher(DispatcherSettings(dsn=dsn, poll_interval=0.1), {"udp": udp})):
        # Housekeeping may move the failed row to history at once: look in both.
        def finished() -> list[dict[str, Any]]:
            return [
                r
                for table in ("pushsync.outbox", "pushsync.outbox_history")
                for r in rows(db, table)
                if r["state"] == "failed"
            ]

        await until_async(lambda: len(finished()) == 1, "the final failure")
    assert finished()[0]["last_error"] == "udp: too large"
    assert len(udp.items) == 1


@pytest.mark.asyncio
async def test_expired_rows_are_never_sent_and_finished_rows_are_archived(
    db: psycopg.Connection, dsn: str
) -> None:
    trucking.add_devices(db, "d1")
    set_address(db, "d1", "udp", "127.0.0.1:9")
    stale = enqueue(
        db, "d1", created="now() - interval '2 hours'", expires="now() - interval '1 hour'"
    )
    done = enqueue(db, "d1")
    db.execute(
        "UPDATE pushsync.outbox SET state = 'confirmed', sent_at = now(), confirmed_at = now(), "
        "gateway_used = 'udp', attempts = 1 WHERE request_id = %s",
        (done,),
    )
    udp = RecordingGateway("udp")
    dispatcher = Dispatcher(
        DispatcherSettings(dsn=dsn, poll_interval=0.1, housekeeping_interval=0.1), {"udp": udp}
    )
    async with running(dispatcher):
        await until_async(lambda: not rows(db), "the outbox to empty")
    assert udp.items == []
    history = {r["request_id"]: r["state"] for r in rows(db, "pushsync.outbox_history")}
    assert history == {stale: "expired", done: "confirmed"}


# --------------------------------------------------------------------------- stop and leases


@pytest.mark.asyncio
async def test_stop_releases_claimed_rows_not_sent(db: psycopg.Connection, dsn: str) -> None:
    trucking.add_devices(db, "d1", "d2", "d3")
    for device in ("d1", "d2", "d3"):
        set_address(db, device, "udp", "127.0.0.1:9")
        enqueue(db, device)
    udp = BlockingGateway()
    dispatcher = Dispatcher(
        DispatcherSettings(dsn=dsn, owner="stopper", poll_interval=0.1), {"udp": udp}
    )
    async with running(dispatcher):
        await until_async(lambda: len(udp.started) == 3, "three sends in flight")
        assert states(db) == {"sending": 3}
    found = rows(db)
    assert {r["state"] for r in found} == {"pending"}
    assert {r["lease_owner"] for r in found} == {None}
    assert {r["attempts"] for r in found} == {0}


@pytest.mark.asyncio
async def test_two_dispatchers_send_every_row_exactly_once(
    db: psycopg.Connection, dsn: str
) -> None:
    devices = [f"d{n}" for n in range(10)]
    trucking.add_devices(db, *devices)
    for device in devices:
        set_address(db, device, "udp", "127.0.0.1:9")
    db.execute(
        "INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, "
        "expires_at, resend_every) "
        "SELECT 'bulk', 'd' || (n % 10), 'sync', n::text, false, now() + interval '1 hour', "
        "'1 hour' FROM generate_series(1, 5000) AS n"
    )
    ids = {uuid.UUID(str(r[0])) for r in db.execute("SELECT request_id FROM pushsync.outbox")}
    first, second = RecordingGateway("udp"), RecordingGateway("udp")
    a = Dispatcher(
        DispatcherSettings(dsn=dsn, owner="a", batch=100, poll_interval=0.05), {"udp": first}
    )
    b = Dispatcher(
        DispatcherSettings(dsn=dsn, owner="b", batch=100, poll_interval=0.05), {"udp": second}
    )
    started = time.perf_counter()
    async with running(a), running(b):
        await until_async(lambda: states(db) == {"sent": 5000}, "all 5,000 rows sent", timeout=60)
    elapsed = time.perf_counter() - started
    sent = [i.request_id for i in first.items] + [i.request_id for i in second.items]
    print(f"\n5,000 rows: a sent {len(first.items)}, b {len(second.items)} in {elapsed:.2f} s")
    assert len(sent) == 5000  # none twice
    assert set(sent) == ids
    assert first.items
    assert second.items  # both took part


def test_gateways_satisfy_the_protocol() -> None:
    gateways: list[Gateway] = [RecordingGateway("udp"), BlockingGateway()]
    assert [g.name for g in gateways] == ["udp", "udp"]


@pytest.mark.asyncio
async def test_reconnects_after_the_database_drops_its_connections(
    db: psycopg.Connection, dsn: str
) -> None:
    trucking.add_devices(db, "d1")
    set_address(db, "d1", "udp", "127.0.0.1:9")
    udp = RecordingGateway("udp")
    async with running(Dispatcher(DispatcherSettings(dsn=dsn, poll_interval=0.1), {"udp": udp})):
        await until_async(lambda: dispatcher_listens(db), "the dispatcher to LISTEN")
        db.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        enqueue(db, "d1")
        await until_async(lambda: states(db) == {"sent": 1}, "the send after reconnecting")
    assert len(udp.items) == 1


@pytest.mark.asyncio
async def test_unconfirmed_message_is_resent_then_confirmed(
    db: psycopg.Connection, dsn: str
) -> None:
    trucking.add_devices(db, "truck-1")
    device = await Device.bind()
    set_address(db, "truck-1", "udp", device.address)
    request_id = enqueue(db, "truck-1")
    db.execute(
        "UPDATE pushsync.outbox SET resend_every = interval '300 milliseconds' "
        "WHERE request_id = %s",
        (request_id,),
    )
    dispatcher = Dispatcher(
        DispatcherSettings(dsn=dsn, poll_interval=0.05, housekeeping_interval=30.0)
    )
    udp = await UdpGateway.bind(
        ("127.0.0.1", 0), secret_for=dispatcher.secret_for, on_ack=dispatcher.on_ack
    )
    dispatcher.add_gateway(udp)
    try:
        async with running(dispatcher):
            first, first_at = await device.receive()  # lost ack: nothing sent back
            second, second_at = await device.receive()  # the resend
            assert first == second  # the same signed message, byte for byte
            assert second_at - first_at >= 0.25
            msg = protocol.decode_message(second, SECRET, time.time())
            ack = protocol.Ack(request_id=msg.request_id, device="truck-1", confirmed=time.time())
            device.transport.sendto(protocol.encode_ack(ack, SECRET), udp.local_address)
            await until_async(
                lambda: finished(db) == [(request_id, "confirmed")], "the confirmation"
            )
            row = db.execute(
                "SELECT attempts, confirmed_at IS NOT NULL FROM pushsync.outbox "
                "WHERE request_id = %s",
                (request_id,),
            ).fetchone()
            assert row is not None
            assert row[0] >= 2
            assert row[1]
            while not device.inbox.queue.empty():  # a resend that crossed the ack
                device.inbox.queue.get_nowait()
            await asyncio.sleep(0.6)  # confirmed: never sent again
            assert device.inbox.queue.empty()
    finally:
        udp.close()
        device.transport.close()
