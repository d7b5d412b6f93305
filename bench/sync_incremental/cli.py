"""Initial download, incremental sync and full re-download of N rows, on real parts.

A throwaway PostgreSQL with ``rules.yaml`` compiled and applied, ``pushsync
dispatch`` as a subprocess, and one device in this process: the real listener
(SYNC channel, handler ``action: sync``) and its SQLite database.

1. **initial download** — the device's first ``pushsync sync`` of N rows
   (``sync_once`` over its own connection): rows/s.
2. **incremental, push to synced** — 10 of the N rows are updated in one
   committed transaction; the rule pushes the device over its SYNC
   connection; its handler synchronizes; the clock stops when the last of
   the 10 new values is in the local database (polled every 0.5 ms).
   Repeated; the median is reported.
3. **incremental sync alone** — ``sync_once`` after 10 rows changed.
4. **full re-download** — the same, after the device forgot its watermark:
   the baseline the incremental sync is compared with.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.dispatcher_process import dispatcher_process, throwaway_database
from pushsync import generator, schema
from pushsync.listener.config import ListenerConfig, load_config
from pushsync.listener.runtime import Listener
from pushsync.listener.sync import local_database, sync_once
from pushsync.wire import protocol

HERE = Path(__file__).resolve().parent
DBNAME = "bench"
DEVICE = "dev-1"
SECRET = bytes(range(32))
CHANGED = 10
TARGETS = {"speedup": 20.0, "push_to_synced_ms": 50.0}


def prepare(conn: psycopg.Connection, rows: int) -> None:
    schema.migrate(conn)
    conn.execute(
        "CREATE TABLE public.items (item_id integer PRIMARY KEY, device_id text NOT NULL, "
        "name text NOT NULL, price numeric(10,2) NOT NULL, updated_at timestamptz NOT NULL)"
    )
    conn.execute("CREATE INDEX items_device ON public.items (device_id)")
    rules_sql = generator.compile_rules(generator.load(HERE / "rules.yaml"), "rules.yaml")
    schema.migrate(conn, rules_sql)
    conn.execute(
        "INSERT INTO pushsync.devices (device_id, secret) VALUES (%s, %s)", (DEVICE, SECRET)
    )
    conn.execute(
        "INSERT INTO pushsync.device_publications (device_id, publication) VALUES (%s, 'items')",
        (DEVICE,),
    )
    conn.execute(
        "INSERT INTO public.items SELECT n, %s, 'item ' || n, n %% 1000 + 0.99, now() "
        "FROM generate_series(1, %s) AS n",
        (DEVICE, rows),
    )
    conn.execute("VACUUM ANALYZE public.items")


def write_config(directory: Path, port: int) -> ListenerConfig:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "device.key").write_text(protocol.format_secret(SECRET), encoding="ascii")
    (directory / "device.key").chmod(0o600)  # the listener refuses a key others can read
    path = directory / "listener.yaml"
    path.write_text(
        f"device: {DEVICE}\nsecret_file: device.key\nstate_dir: state\npublication: items\n"
        f'channels:\n  sync: {{server: "127.0.0.1:{port}"}}\n'
        "handlers:\n  - name: sync\n    subject: sync\n    action: sync\n",
        encoding="utf-8",
    )
    return load_config(path)


def change(conn: psycopg.Connection, round_: int, rows: int) -> list[int]:
    """Update CHANGED rows spread over the table (one transaction); their ids."""
    step = rows // CHANGED
    ids = [1 + (round_ * 7 + n * step) % rows for n in range(CHANGED)]
    conn.execute(
        "UPDATE public.items SET name = %s, updated_at = now() WHERE item_id = ANY(%s)",
        (f"round {round_}", ids),
    )
    return ids


def local_names(local: sqlite3.Connection, ids: list[int]) -> set[str]:
    marks = ",".join("?" * len(ids))
    found = local.execute(f"SELECT DISTINCT name FROM items WHERE item_id IN ({marks})", ids)  # noqa: S608  ? placeholders; the ids are parameters
    return {str(name) for (name,) in found}


async def measure(
    conn: psycopg.Connection, config: ListenerConfig, rows: int, rounds: int
) -> dict[str, Any]:
    figures: dict[str, Any] = {"rows": rows}
    started = time.perf_counter()
    first = await sync_once(config, SECRET)
    figures["initial_seconds"] = time.perf_counter() - started
    assert first.upserted == rows, first

    incremental = []
    for round_ in range(rounds):
        change(conn, 1000 + round_, rows)
        started = time.perf_counter()
        result = await sync_once(config, SECRET)
        incremental.append(time.perf_counter() - started)
        assert result.upserted == CHANGED, result
        assert not result.full, result
    figures["incremental_ms"] = statistics.median(incremental) * 1000

    full = []
    for _ in range(max(1, rounds // 3)):
        db = local_database(config)
        try:
            db.forget(config.publication or "default")
        finally:
            db.close()
        started = time.perf_counter()
        result = await sync_once(config, SECRET)
        full.append(time.perf_counter() - started)
        assert result.full, result
    figures["full_ms"] = statistics.median(full) * 1000

    listener = Listener(config)
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    pushes = []
    try:
        await asyncio.wait_for(listener.started.wait(), 10)
        from pushsync.listener.channels import SyncChannel

        await asyncio.wait_for(listener.channel(SyncChannel).connected.wait(), 10)
        await asyncio.sleep(0.5)
        local = sqlite3.connect(config.state_dir / "local.db")
        try:
            for round_ in range(rounds):
                started = time.perf_counter()
                ids = change(conn, round_, rows)
                wanted = {f"round {round_}"}
                deadline = started + 10
                while local_names(local, ids) != wanted:
                    if time.perf_counter() > deadline:
                        raise RuntimeError("the pushed device did not synchronize")
                    await asyncio.sleep(0.0005)
                pushes.append(time.perf_counter() - started)
                await asyncio.sleep(0.05)
        finally:
            local.close()
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
    figures["push_to_synced_ms"] = statistics.median(pushes) * 1000
    figures["push_to_synced_max_ms"] = max(pushes) * 1000
    return figures


def run(rows: int, rounds: int, workdir: Path) -> dict[str, Any]:
    with throwaway_database(DBNAME) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        prepare(conn, rows)
        with dispatcher_process(dsn) as node:
            config = write_config(workdir, node.sync_port)
            return asyncio.run(measure(conn, config, rows, rounds))


def report(figures: dict[str, Any]) -> str:
    rows = figures["rows"]
    speedup = figures["full_ms"] / figures["incremental_ms"]
    push = figures["push_to_synced_ms"]
    lines = [
        f"initial download          {rows} rows in {figures['initial_seconds']:.2f} s "
        f"({rows / figures['initial_seconds']:,.0f} rows/s)",
        f"full re-download          {figures['full_ms']:.0f} ms (baseline)",
        f"incremental sync          {figures['incremental_ms']:.1f} ms for {CHANGED} changed rows "
        f"-> {speedup:.0f}x faster than full (target >= {TARGETS['speedup']:g}x) "
        f"{'ok' if speedup >= TARGETS['speedup'] else 'MISSED'}",
        f"push to synced            {push:.1f} ms median, "
        f"{figures['push_to_synced_max_ms']:.1f} ms max "
        f"(target <= {TARGETS['push_to_synced_ms']:g} ms) "
        f"{'ok' if push <= TARGETS['push_to_synced_ms'] else 'MISSED'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.sync_incremental", description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="rows the device holds")
    parser.add_argument("--rounds", type=int, default=15, help="repetitions of each measure")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pushsync-bench-") as workdir:
        figures = run(args.rows, args.rounds, Path(workdir))
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0
