"""The throughput benchmark's database: devices, the outbox fill, the floor loop, pgqueuer."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import timedelta
from typing import Any

import psycopg
from pgqueuer import PsycopgDriver, Queries
from pgqueuer.adapters.persistence.qb import QueryBuilderEnvironment
from pgqueuer.domain.settings import DBSettings, Durability

from bench.trigger_overhead.database import Server
from pushsync import schema
from pushsync.dispatcher.outbox import query

RULE = "bench_throughput"
DEVICE_PREFIX = "tp-"
LEASE = timedelta(seconds=30)

FILL = """
INSERT INTO pushsync.outbox
    (rule, device_id, subject, content, coalescing, expires_at, resend_every)
SELECT %(rule)s,
       %(prefix)s || (g %% %(devices)s),
       'sync',
       'bench row ' || g,
       false,
       now() + interval '1 hour',
       interval '1 hour'
FROM generate_series(1, %(rows)s) AS g
"""


def now() -> float:
    """``CLOCK_MONOTONIC`` seconds: the clock every process of the benchmark reads."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def dsn(server: Server, dbname: str) -> str:
    return f"host={server.host} port={server.port} user={server.user} dbname={dbname}"


def add_devices(conn: psycopg.Connection, prefix: str, devices: int) -> None:
    """Devices ``PREFIX0`` .. ``PREFIX<devices-1>``, secret ``md5(id)``, a placeholder UDP address.

    The secret is the 16 bytes of the MD5 of the device id, so that a benchmark
    can verify what it receives (:func:`secret_of`).
    """
    with conn.transaction():
        conn.execute(
            "INSERT INTO pushsync.devices (device_id, secret) "
            "SELECT %(prefix)s || i, decode(md5(%(prefix)s || i), 'hex') "
            "FROM generate_series(0, %(devices)s - 1) AS i",
            {"prefix": prefix, "devices": devices},
        )
        conn.execute(
            "INSERT INTO pushsync.device_addresses (device_id, medium, source, address) "
            "SELECT device_id, 'udp', 'manual', '127.0.0.1:9' FROM pushsync.devices "
            "WHERE starts_with(device_id, %s)",
            (prefix,),
        )
    conn.execute("ANALYZE pushsync.devices")
    conn.execute("ANALYZE pushsync.device_addresses")


def secret_of(device: str) -> bytes:
    """The secret :func:`add_devices` gave ``device``."""
    return hashlib.md5(device.encode(), usedforsecurity=False).digest()


def prepare(conn: psycopg.Connection, devices: int) -> None:
    """The pushsync schema and ``devices`` devices, each with a (placeholder) UDP address."""
    schema.migrate(conn)
    add_devices(conn, DEVICE_PREFIX, devices)


def point_devices_at(conn: psycopg.Connection, port: int) -> None:
    """Every device's UDP address becomes the receiver at 127.0.0.1:``port``."""
    conn.execute(
        "UPDATE pushsync.device_addresses SET address = %s WHERE medium = 'udp'",
        (f"127.0.0.1:{port}",),
    )


def install_pgqueuer(dsn_text: str, durability: str) -> None:
    """pgqueuer's tables, with ``durability`` (durable / balanced / volatile)."""

    async def install() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn_text, autocommit=True)
        try:
            settings = DBSettings(durability=Durability(durability))
            queries = Queries(PsycopgDriver(conn), qbe=QueryBuilderEnvironment(settings))
            await queries.install()
        finally:
            await conn.close()

    asyncio.run(install())


def reset(conn: psycopg.Connection) -> None:
    """Empty the outbox, its history and pgqueuer's tables; then CHECKPOINT."""
    conn.execute(
        "TRUNCATE pushsync.outbox, pushsync.outbox_history, pgqueuer, pgqueuer_log, "
        "pgqueuer_statistics"
    )
    conn.execute("CHECKPOINT")


def fill_outbox(conn: psycopg.Connection, rows: int, devices: int) -> float:
    """Insert ``rows`` pending notifications and NOTIFY in one transaction; when it committed."""
    params: dict[str, Any] = {
        "rule": RULE,
        "prefix": DEVICE_PREFIX,
        "devices": devices,
        "rows": rows,
    }
    with conn.transaction():
        conn.execute(FILL, params)
        conn.execute("SELECT pg_notify('pushsync', '')")
    return now()


def enqueue_jobs(dsn_text: str, jobs: int, entrypoint: str) -> float:
    """``jobs`` no-op jobs in one pgqueuer ``enqueue`` call; when it returned (committed)."""

    async def enqueue() -> float:
        conn = await psycopg.AsyncConnection.connect(dsn_text, autocommit=True)
        try:
            queries = Queries(PsycopgDriver(conn))
            await queries.enqueue([entrypoint] * jobs, [None] * jobs, [0] * jobs)
            return now()
        finally:
            await conn.close()

    return asyncio.run(enqueue())


def floor(conn: psycopg.Connection, batch: int, owner: str) -> int:
    """Claim ``batch`` rows at a time and record them sent, with the real ``claim`` and
    ``sent_many`` blocks, until none are left.

    As the dispatcher does: each round trip records the batch before and claims
    the next one (pipeline mode, one transaction); the last batch is recorded
    alone. Nothing is sent and nothing is done per row in Python: the least
    any relay of this outbox must do. Returns the number of rows claimed.
    """
    claim = query("claim")
    params: dict[str, Any] = {"owner": owner, "limit": batch, "lease": LEASE}
    done = 0
    ids = [row[0] for row in conn.execute(claim, params).fetchall()]
    while ids:
        done += len(ids)
        sent = {"owner": owner, "request_ids": ids, "gateways": ["udp"] * len(ids)}
        with conn.pipeline(), conn.transaction():
            conn.execute(query("sent_many"), sent)
            cur = conn.execute(claim, params)
        ids = [row[0] for row in cur.fetchall()]
    return done


def count(conn: psycopg.Connection, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    assert row is not None
    return int(row[0])


def sent_rows(conn: psycopg.Connection) -> int:
    return count(conn, "SELECT count(*) FROM pushsync.outbox WHERE state = 'sent'")


def queued_jobs(conn: psycopg.Connection) -> int:
    return count(conn, "SELECT count(*) FROM pgqueuer")


def wait_until(check: Any, timeout: float, interval: float = 0.005) -> float | None:
    """Poll ``check()`` until true; the time it first was, or None after ``timeout``."""
    deadline = now() + timeout
    while True:
        if check():
            return now()
        if now() > deadline:
            return None
        time.sleep(interval)
