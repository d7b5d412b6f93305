"""The web console's views over real rows, through its HTTP server on 127.0.0.1:0."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pushsync import queries
from pushsync.monitor import data, params
from tests.support.dispatching import SECRET, add_device, enqueue
from tests.support.http import EventStream, get
from tests.support.monitor import console, finished, monitoring_role_statements, synchronized


@pytest.fixture
def fleet(db: psycopg.Connection) -> psycopg.Connection:
    for device in ("truck-1", "truck-2", "van-3"):
        add_device(db, device)
    db.execute("UPDATE pushsync.devices SET enabled = false WHERE device_id = 'van-3'")
    db.execute(
        "INSERT INTO pushsync.sync_connections (device_id, owner, peer) "
        "VALUES ('truck-1', 'node-a', '127.0.0.1:50000')"
    )
    db.execute(
        "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
        "VALUES ('truck-2', 'udp', 'tracking', '192.0.2.2:5001')"
    )
    return db


@pytest.mark.asyncio
async def test_every_view_reads_what_the_tables_hold(fleet: psycopg.Connection, dsn: str) -> None:
    now = datetime.now(UTC)
    done = finished(fleet, "truck-1", created=now - timedelta(seconds=30), sent_after=0.01,
                    confirmed_after=0.2)  # fmt: skip
    finished(fleet, "truck-2", created=now - timedelta(seconds=20), state="expired")
    finished(fleet, "truck-2", created=now - timedelta(days=3))  # outside every window asked
    waiting = enqueue(fleet, "truck-2", content="later")
    synchronized(fleet, "truck-1", started=now - timedelta(seconds=29), seconds=0.5,
                 uploaded=3, downloaded=5, conflicts=1)  # fmt: skip
    async with console(dsn) as served:
        address = served.address
        fleet_view = (await get(address, "/api/fleet")).json()
        flow = (await get(address, "/api/flow?window=5m")).json()
        latency = (await get(address, "/api/latency?window=1h")).json()
        timeline = (await get(address, "/api/timeline")).json()
        one = (await get(address, f"/api/request/{done}")).json()
        pending = (await get(address, f"/api/request/{waiting}")).json()
        page = await get(address, "/")
        script = await get(address, "/static/console.js")

    devices = {d["device_id"]: d for d in fleet_view["devices"]}
    assert sorted(devices) == ["truck-1", "truck-2", "van-3"]
    assert devices["truck-1"]["dispatcher"] == "node-a"
    assert devices["truck-1"]["confirmed"] == 1
    assert devices["truck-1"]["last_sync"]["download_rows"] == 5
    assert devices["truck-2"]["dispatcher"] is None
    assert (devices["truck-2"]["pending"], devices["truck-2"]["expired"]) == (1, 1)
    assert devices["truck-2"]["addresses"][0]["address"] == "192.0.2.2:5001"
    assert devices["van-3"]["enabled"] is False

    totals: dict[str, int] = {}
    for bucket in flow["buckets"]:
        totals[bucket["kind"]] = totals.get(bucket["kind"], 0) + bucket["n"]
    assert flow["step"] == "second"
    # written: the two recent finished rows and the waiting one; the 3-day-old row is not in
    assert totals == {"written": 3, "sent": 2, "confirmed": 1, "expired": 1}

    series = latency["series"]
    assert series["written_to_sent"]["n"] == 2
    assert series["sent_to_confirmed"]["n"] == 1
    # an hour is read from the per-minute roll-ups: percentiles within 10 %
    assert series["sent_to_confirmed"]["estimated"] is True
    assert series["sent_to_confirmed"]["p50"] == pytest.approx(200, rel=0.1)
    assert series["sync"]["p99"] == pytest.approx(500, rel=0.1)
    assert sum(series["sync"]["histogram"]) == 1

    assert {p["request_id"] for p in timeline["pushes"]} == {str(done), str(waiting)} | {
        p["request_id"] for p in timeline["pushes"] if p["state"] == "expired"
    }
    assert len(timeline["pushes"]) == 3
    assert timeline["syncs"][0]["upload_rows"] == 3

    assert one["request"]["state"] == "confirmed"
    assert one["request"]["place"] == "history"
    assert [s["conflicts"] for s in one["syncs"]] == [1]
    assert pending["request"]["place"] == "outbox"
    assert page.status == 200
    assert b"pushsync monitor" in page.body
    assert script.status == 200
    assert script.headers["content-type"].startswith("text/javascript")


@pytest.mark.asyncio
async def test_the_fleet_searches_filters_and_pages(fleet: psycopg.Connection, dsn: str) -> None:
    async with console(dsn) as served:
        address = served.address
        search = (await get(address, "/api/fleet?search=TRUCK")).json()
        connected = (await get(address, "/api/fleet?show=connected")).json()
        offline = (await get(address, "/api/fleet?show=disconnected")).json()
        disabled = (await get(address, "/api/fleet?show=disabled")).json()
        after = (await get(address, "/api/fleet?after=truck-1")).json()
    names = {
        key: [d["device_id"] for d in body["devices"]]
        for key, body in (("search", search), ("connected", connected), ("offline", offline),
                          ("disabled", disabled), ("after", after))
    }  # fmt: skip
    assert names == {
        "search": ["truck-1", "truck-2"],
        "connected": ["truck-1"],
        "offline": ["truck-2", "van-3"],
        "disabled": ["van-3"],
        "after": ["truck-2", "van-3"],
    }


@pytest.mark.asyncio
async def test_bad_parameters_are_named_and_unknown_requests_are_404(dsn: str) -> None:
    async with console(dsn) as served:
        address = served.address
        answers = {
            path: await get(address, path)
            for path in (
                "/api/flow?window=2y",
                "/api/fleet?show=everything",
                "/api/timeline?since=yesterday",
                "/api/timeline?since=0&until=172800001",
                "/api/request/not-a-uuid",
                f"/api/request/{uuid.uuid4()}",
                "/api/nothing",
            )
        }
    status = {path: answer.status for path, answer in answers.items()}
    assert list(status.values()) == [400, 400, 400, 400, 400, 404, 404]
    assert answers["/api/flow?window=2y"].json()["error"].startswith("window: expected one of")
    assert "24 hours" in answers["/api/timeline?since=0&until=172800001"].json()["error"]


@pytest.mark.asyncio
async def test_the_event_stream_says_when_something_changes(
    fleet: psycopg.Connection, dsn: str
) -> None:
    async with console(dsn) as served:
        stream = await EventStream.open(served.address)
        try:
            assert stream.status == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            first = await stream.next()
            assert first["outbox"] == {}
            enqueue(fleet, "truck-2")
            second = await stream.next()
            assert second["outbox"] == {"pending": 1}
            fleet.execute("DELETE FROM pushsync.sync_connections")
            third = await stream.next()
            assert (first["connected"], third["connected"]) == (1, 0)
        finally:
            await stream.close()


@pytest.mark.asyncio
async def test_no_answer_carries_a_device_secret(fleet: psycopg.Connection, dsn: str) -> None:
    request_id = enqueue(fleet, "truck-1")
    paths = ["/api/fleet", "/api/pulse", "/api/timeline", f"/api/request/{request_id}"]
    async with console(dsn) as served:
        bodies = [(await get(served.address, path)).body for path in paths]
    for body in bodies:
        for form in (SECRET.hex(), SECRET.hex().upper(), "\\\\x" + SECRET.hex()):
            assert form.encode() not in body


@pytest.mark.asyncio
async def test_the_consoles_connections_cannot_write(dsn: str) -> None:
    pool = data.open_pool(dsn)
    await pool.open()
    try:
        async with pool.connection() as db:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                await db.execute("DELETE FROM pushsync.devices")
    finally:
        await pool.close()


@pytest.mark.asyncio
async def test_the_documented_monitoring_role_runs_every_view(
    fleet: psycopg.Connection, dsn: str
) -> None:
    """The role of docs/operations.md, which cannot read secrets, is enough for the console."""
    role = f"pushsync_monitor_{uuid.uuid4().hex[:8]}"
    for statement in monitoring_role_statements(role):
        fleet.execute(statement)  # our own documentation's SQL
    request_id = enqueue(fleet, "truck-1")
    try:
        async with console(make_conninfo(dsn, user=role)) as served:
            paths = ["/api/pulse", "/api/fleet", "/api/flow", "/api/flow?window=24h",
                     "/api/latency?window=5m", "/api/latency?window=24h",
                     "/api/timeline"]  # fmt: skip
            answers = [
                await get(served.address, path) for path in [*paths, f"/api/request/{request_id}"]
            ]
        assert [a.status for a in answers] == [200] * 8
        assert answers[1].json()["devices"][0]["device_id"] == "truck-1"
        # it reads the roll-ups and cannot change them, even on a writable connection
        with psycopg.connect(make_conninfo(dsn, user=role), autocommit=True) as own:
            for table in ("flow_minutes", "latency_minutes"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    own.execute(f"DELETE FROM pushsync.{table}")
    finally:
        fleet.execute(f'DROP OWNED BY "{role}"')
        fleet.execute(f'DROP ROLE "{role}"')


ROLLUP_FROM_HISTORY = """
    SELECT date_trunc('minute', e.at), h.rule, coalesce(h.gateway_used, h.gateway), e.kind,
           count(*)
    FROM pushsync.outbox_history AS h
    CROSS JOIN LATERAL (VALUES ('written', h.created_at), ('sent', h.sent_at),
        ('confirmed', h.confirmed_at),
        ('expired', CASE WHEN h.state = 'expired' THEN h.finished_at END),
        ('failed', CASE WHEN h.state = 'failed' THEN h.finished_at END)) AS e(kind, at)
    WHERE e.at IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4"""
ROLLUP = (
    "SELECT minute, rule, gateway, kind, n FROM pushsync.flow_minutes"
    " WHERE n > 0 ORDER BY 1, 2, 3, 4"
)


def test_archiving_and_pruning_keep_the_rollup_equal_to_the_history(
    fleet: psycopg.Connection,
) -> None:
    finished(fleet, "truck-1", created=datetime.now(UTC) - timedelta(hours=2))
    ids = [enqueue(fleet, "truck-1", content=f"n{i}") for i in range(30)]
    fleet.execute(
        "UPDATE pushsync.outbox SET attempts = 1, sent_at = created_at + interval '15 ms',"
        " gateway_used = 'udp', state = CASE WHEN content IN ('n1', 'n2') THEN 'expired'"
        " WHEN content = 'n3' THEN 'failed' ELSE 'confirmed' END,"
        " confirmed_at = CASE WHEN content NOT IN ('n1', 'n2', 'n3')"
        " THEN created_at + interval '40 ms' END WHERE request_id = ANY(%s)",
        (ids,),
    )
    archive = queries.get("archive", "dispatcher.sql")
    assert fleet.execute(archive, {"batch": 20}).rowcount == 20
    assert fleet.execute(archive, {"batch": 20}).rowcount == 10
    rollup = fleet.execute(ROLLUP).fetchall()
    assert rollup == fleet.execute(ROLLUP_FROM_HISTORY).fetchall()
    assert sum(r[4] for r in rollup if r[3] == "written") == 31
    assert {r[3]: r[4] for r in rollup if r[2] == "udp"} == {
        "written": 30, "sent": 30, "confirmed": 27, "expired": 2, "failed": 1
    }  # fmt: skip
    latency: dict[str, int] = dict(fleet.execute(
        "SELECT series, sum(n) FROM pushsync.latency_minutes GROUP BY 1").fetchall())  # fmt: skip
    assert latency == {"written_to_sent": 31, "sent_to_confirmed": 28}

    fleet.execute("DELETE FROM pushsync.outbox_history WHERE content IN ('n1', 'n5', 'detour')")
    assert fleet.execute(ROLLUP).fetchall() == fleet.execute(ROLLUP_FROM_HISTORY).fetchall()
    latency = dict(fleet.execute(
        "SELECT series, sum(n) FROM pushsync.latency_minutes GROUP BY 1").fetchall())  # fmt: skip
    assert latency == {"written_to_sent": 28, "sent_to_confirmed": 26}


@pytest.mark.asyncio
async def test_long_windows_read_the_rollups_and_agree_with_the_rows(
    fleet: psycopg.Connection, dsn: str
) -> None:
    now = datetime.now(UTC)
    rng = random.Random(7)
    for i in range(240):  # durations spread from a few ms to several seconds
        finished(fleet, f"truck-{1 + i % 2}", rule=("a", "b")[i % 2],
                 gateway=("udp", "sync")[i % 3 % 2],
                 created=now - timedelta(minutes=50) + timedelta(seconds=10 * i),
                 sent_after=math.exp(rng.uniform(-6, 1)),
                 confirmed_after=math.exp(rng.uniform(-5, 2)),
                 state="expired" if i % 11 == 0 else "confirmed")  # fmt: skip
    for i in range(40):
        synchronized(fleet, "truck-1", started=now - timedelta(minutes=40 - i),
                     seconds=math.exp(rng.uniform(-4, 1)))  # fmt: skip
    enqueue(fleet, "truck-2")
    since = (now - timedelta(hours=1)).replace(second=0, microsecond=0)  # whole minutes
    window = params.Window(since=since, step="minute", bucket_seconds=60)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        flow = await data.flow(db, window)
        rows = await data._json_rows(db, "monitor_flow", {"since": since, "step": "minute"})
        latency = await data.latency(db, window)
        exact = await data.latency(db, params.Window(since=since, step="second", bucket_seconds=1))
    assert flow["buckets"] == rows
    assert sum(b["n"] for b in rows if b["kind"] == "written") == 241
    for name in ("written_to_sent", "sent_to_confirmed", "sync"):
        rolled, counted = latency["series"][name], exact["series"][name]
        assert rolled["estimated"] is True
        assert counted["estimated"] is False
        assert rolled["n"] == counted["n"] > 30
        for p in ("p50", "p95", "p99"):
            assert rolled[p] == pytest.approx(counted[p], rel=0.1), (name, p)
        assert counted["max"] <= rolled["max"] <= counted["max"] * 1.2
        assert sum(rolled["histogram"]) == counted["n"]
