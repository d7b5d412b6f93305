"""Exact incremental synchronization at fleet scale, on real parts.

A throwaway PostgreSQL with ``rules.yaml`` compiled and applied, ``pushsync
dispatch`` as a subprocess, and N devices in this process, each with its own
SQLite database, synchronizing with the real client (``synchronize``) over its
own authenticated SYNC connection. Devices hold ~100 rows each: their depot
(shared by N / depots devices), their driver's routes and the routes' stops.

1. **initial** — every device's first synchronization (full): the bytes of a
   full download per device, the baseline of the same run.
2. **route reassigned** — one route of driver A goes to driver B (2 devices
   concerned); both of them and a sample of others synchronize.
3. **depot renamed** — one depot (N / depots devices) renamed; every device
   synchronizes: total bytes against full downloads of every device.
4. **nothing changed** — every device synchronizes once, one after the other,
   as its listener's ``sync`` action does (``idle.py``: the listener's call,
   its local database kept open, in a few processes), each over a connection
   opened while the ones before synchronized (a listener holds its own):
   server time per synchronization (``pushsync.sync_sessions``), the device's
   time, wall time.
5. **one change for many at once** — one depot renamed again; its devices all
   synchronize at once (as many connections): time until every one of their
   databases holds the new name.
6. **push -> synced** — the N / depots devices of another depot run their real
   listeners (``listeners.py``, in a few processes), each on its own SYNC
   connection; the depot is renamed, the rule of ``rules.yaml`` pushes ``sync``
   to each of them, and each listener's ``sync`` action synchronizes over its
   connection: time from the commit until every one of their databases holds
   the new name.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import machine as bench_machine
from bench.dispatcher_process import DispatcherProcess, dispatcher_process, throwaway_database
from bench.fleet_sync.idle import Counting, devices_per_process
from pushsync import generator, schema
from pushsync.listener.connection import Session, open_session
from pushsync.listener.localdb import LocalDatabase
from pushsync.listener.sync import LOCAL_DB, SyncResult, synchronize
from pushsync.wire import protocol
from pushsync.wire.addresses import Address

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DBNAME = "bench"
SECRET = bytes(range(32))
PUBLICATION = "fleet"
TARGETS = {
    "bytes_ratio": 100.0,
    "idle_server_ms_median": 5.0,
    "idle_total_s_per_10000": 60.0,
    "many_at_once_s": 5.0,
    "push_synced_s": 5.0,
}
PUSH_TIMEOUT = 300.0
"""Seconds the push -> synced phase waits for its devices before it fails."""


def prepare(conn: psycopg.Connection, devices: int, routes: int, stops: int, depots: int) -> None:
    schema.migrate(conn)
    conn.execute(
        """
        CREATE TABLE public.depots (depot_id integer PRIMARY KEY, name text NOT NULL);
        CREATE TABLE public.drivers (driver_id integer PRIMARY KEY, device_id text UNIQUE,
                                     depot_id integer NOT NULL REFERENCES public.depots);
        CREATE TABLE public.routes (route_id integer PRIMARY KEY, name text NOT NULL,
                                    driver_id integer REFERENCES public.drivers);
        CREATE INDEX routes_driver ON public.routes (driver_id);
        CREATE TABLE public.stops (route_id integer NOT NULL REFERENCES public.routes,
                                   seq integer NOT NULL, location text NOT NULL,
                                   address text NOT NULL, lat numeric(8, 5) NOT NULL,
                                   lon numeric(8, 5) NOT NULL, arrive_by time NOT NULL,
                                   PRIMARY KEY (route_id, seq));
        """
    )
    rules_sql = generator.compile_rules(generator.load(HERE / "rules.yaml"), "rules.yaml")
    schema.migrate(conn, rules_sql)
    params = {"n": devices, "routes": routes, "stops": stops, "depots": depots, "s": SECRET}
    conn.execute(
        "INSERT INTO public.depots SELECT d, 'depot ' || d FROM generate_series(1, %(depots)s) d",
        params,
    )
    conn.execute(
        "INSERT INTO pushsync.devices (device_id, secret) "
        "SELECT 'dev-' || n, %(s)s FROM generate_series(1, %(n)s) n",
        params,
    )
    conn.execute(
        "INSERT INTO pushsync.device_publications (device_id, publication) "
        "SELECT 'dev-' || n, 'fleet' FROM generate_series(1, %(n)s) n",
        params,
    )
    conn.execute(
        "INSERT INTO public.drivers SELECT n, 'dev-' || n, 1 + (n - 1) %% %(depots)s "
        "FROM generate_series(1, %(n)s) n",
        params,
    )
    conn.execute(
        "INSERT INTO public.routes SELECT r, 'route ' || r, 1 + (r - 1) / %(routes)s "
        "FROM generate_series(1, %(n)s::int * %(routes)s::int) r",
        params,
    )
    conn.execute(
        "INSERT INTO public.stops SELECT r, s, 'place ' || r || '-' || s, "
        "'Unit ' || s || ', ' || r || ' Harbour Road, Portsmouth', 50 + r %% 1000 / 1000.0, "
        "-1 - s / 100.0, time '08:00' + s * interval '20 minutes' "
        "FROM generate_series(1, %(n)s::int * %(routes)s::int) r, generate_series(1, %(stops)s) s",
        params,
    )
    conn.execute("DELETE FROM pushsync.changes")
    conn.execute("VACUUM ANALYZE")


@dataclass(slots=True)
class Device:
    """A device's local database, opened for each use, as ``pushsync sync`` does (a
    listener keeps its own open: the nothing-changed phase runs in ``idle.py``)."""

    name: str
    workdir: Path

    def open(self) -> LocalDatabase:
        return open_local(self.workdir, self.name)

    def depot_name(self) -> str:
        db = self.open()
        try:
            row = db.connection.execute("SELECT name FROM depots").fetchone()
        finally:
            db.close()
        return "" if row is None else str(row[0])

    def watermark(self) -> str | None:
        db = self.open()
        try:
            return db.watermark(PUBLICATION)
        finally:
            db.close()


@dataclass(slots=True)
class Phase:
    syncs: int = 0
    rows: int = 0
    bytes: int = 0
    seconds: list[float] = field(default_factory=list)

    def add(self, result: SyncResult, received: int) -> None:
        self.syncs += 1
        self.rows += result.upserted + result.deleted
        self.bytes += received
        self.seconds.append(result.seconds)


async def sync_over(session: Session, device: Device, phase: Phase) -> SyncResult:
    """One synchronization of ``device`` over ``session``, counted in ``phase``."""
    counting = Counting(session)
    db = device.open()
    try:
        result = await synchronize(counting, db, PUBLICATION)
    finally:
        db.close()
    phase.add(result, counting.received)
    return result


async def sync(server: Address, device: Device, phase: Phase) -> SyncResult:
    session = await open_session(server, device=device.name, secret=SECRET)
    try:
        return await sync_over(session, device, phase)
    finally:
        await session.close("sync done")


async def sync_all(server: Address, devices: list[Device], phase: Phase, at_once: int) -> None:
    gate = asyncio.Semaphore(at_once)

    async def one(device: Device) -> None:
        async with gate:
            await sync(server, device, phase)

    await asyncio.gather(*(one(d) for d in devices))


def server_ms(conn: psycopg.Connection, since: float) -> list[float]:
    """Server time of each synchronization recorded since ``since`` (epoch seconds)."""
    rows = conn.execute(
        "SELECT extract(epoch FROM finished_at - started_at) * 1000 FROM pushsync.sync_sessions "
        "WHERE started_at >= to_timestamp(%s) AND outcome = 'ok'",
        (since,),
    ).fetchall()
    return [float(ms) for (ms,) in rows]


async def untouched_statements(
    conn: psycopg.Connection, devices: list[Device]
) -> tuple[float, float]:
    """The dispatcher's statements for an untouched download (``sync_store``'s, as the
    dispatcher runs them: two round trips), run here on one connection and rolled back
    (nothing changes): median milliseconds per device; and the median of a ``SELECT 1`` on
    the same connection (the machine's round trip, the baseline)."""
    from pushsync.dispatcher import sync_store

    info = conn.info
    times = []
    async with await psycopg.AsyncConnection.connect(
        info.dsn, password=info.password, autocommit=True
    ) as db:
        for device in devices:
            watermark = device.watermark()
            started = time.perf_counter()
            opened = await sync_store.open_download(
                db, device.name, PUBLICATION, watermark, tables=True
            )
            held = opened.holdings
            assert held is not None
            assert held.confirmed is not None
            assert not held.changed
            async with db.pipeline():
                await sync_store.settle(db, held, opened.snapshot, sending=False)
                await db.execute("ROLLBACK")  # where the dispatcher commits
            times.append(time.perf_counter() - started)
        trivial = []
        for _ in devices:
            started = time.perf_counter()
            await db.execute("SELECT 1")
            trivial.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, statistics.median(trivial) * 1000


def storage(conn: psycopg.Connection) -> dict[str, float]:
    row = conn.execute(
        "SELECT pg_total_relation_size('pushsync.device_rows'), "
        "pg_total_relation_size('pushsync.device_rows_pending'), "
        "pg_total_relation_size('pushsync.device_holdings'), "
        "(SELECT count(*) FROM pushsync.device_rows)"
    ).fetchone()
    assert row is not None
    rows_bytes, pending_bytes, holdings_bytes, held = row
    return {
        "held_rows": int(held),
        "held_bytes": int(rows_bytes) + int(pending_bytes) + int(holdings_bytes),
        "bytes_per_held_row": (int(rows_bytes) + int(pending_bytes) + int(holdings_bytes))
        / max(1, int(held)),
    }


async def measure(
    conn: psycopg.Connection, node: DispatcherProcess, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    port = node.sync_port
    server = Address(host="127.0.0.1", port=port)
    devices = []
    for n in range(1, args.devices + 1):
        open_local(workdir, f"dev-{n}").close()
        devices.append(Device(f"dev-{n}", workdir))
    figures: dict[str, Any] = {"devices": args.devices, "machine": machine(conn, workdir)}
    at_once = args.at_once

    initial = Phase()
    started = time.perf_counter()
    await sync_all(server, devices, initial, at_once)
    figures["initial"] = {
        "seconds": time.perf_counter() - started,
        "rows_per_device": initial.rows / initial.syncs,
        "bytes_per_device": initial.bytes / initial.syncs,
    }
    progress(figures, "initial")
    await sync_all(server, devices, Phase(), at_once)  # confirm what the first answer sent
    full_bytes = initial.bytes / initial.syncs

    # 2. One route of dev-1 goes to dev-2's driver.
    conn.execute("UPDATE public.routes SET driver_id = 2 WHERE route_id = 1")
    concerned, others = Phase(), Phase()
    t0 = time.time()
    for device in devices[:2]:
        await sync(server, device, concerned)
    for device in devices[2 : 2 + args.sample]:
        await sync(server, device, others)
    times = server_ms(conn, t0)
    figures["route_reassigned"] = {
        "concerned_rows": concerned.rows,
        "concerned_bytes_per_sync": concerned.bytes / concerned.syncs,
        "others_synced": others.syncs,
        "others_rows": others.rows,
        "others_bytes_per_sync": others.bytes / max(1, others.syncs),
        "server_ms_median": statistics.median(times),
    }
    progress(figures, "route_reassigned")
    await sync_all(server, devices[2 + args.sample :], Phase(), at_once)

    # 3. Depot 1 renamed: its devices get one row each; the others nothing.
    conn.execute("UPDATE public.depots SET name = 'depot 1 (renamed)' WHERE depot_id = 1")
    renamed = Phase()
    t0 = time.time()
    await sync_all(server, devices, renamed, at_once)
    times = server_ms(conn, t0)
    baseline = full_bytes * len(devices)
    figures["depot_renamed"] = {
        "concerned": sum(1 for d in devices if d.depot_name() == "depot 1 (renamed)"),
        "rows": renamed.rows,
        "bytes": renamed.bytes,
        "full_download_bytes": baseline,
        "bytes_ratio": baseline / max(1, renamed.bytes),
        "server_ms_median": statistics.median(times),
    }
    progress(figures, "depot_renamed")

    # 4. Nothing changed: every device once, one after the other, as its listener does.
    t0 = time.time()
    idle = nothing_changed(workdir, devices, port, args.idle_connections)
    times = server_ms(conn, t0)
    figures["nothing_changed"] = {
        **idle,
        "server_ms_median": statistics.median(times),
        "server_ms_p99": sorted(times)[int(len(times) * 0.99) - 1],
        "server_seconds_total": sum(times) / 1000,
    }
    statements, trivial = await untouched_statements(conn, devices[: args.sample])
    figures["nothing_changed"]["statements_ms_median"] = statements
    figures["nothing_changed"]["select_1_ms_median"] = trivial
    figures["storage"] = storage(conn)
    progress(figures, "nothing_changed")
    progress(figures, "storage")

    # 5. Depot 2 renamed: all its devices synchronize at once.
    many = [d for d in devices if (int(d.name[4:]) - 1) % args.depots == 1]
    conn.execute("UPDATE public.depots SET name = 'depot 2 (renamed)' WHERE depot_id = 2")
    started = time.perf_counter()
    await sync_all(server, many, Phase(), min(len(many), args.connecting))
    assert all(d.depot_name() == "depot 2 (renamed)" for d in many)
    figures["many_at_once"] = {
        "devices": len(many),
        "connecting": min(len(many), args.connecting),
        "seconds": time.perf_counter() - started,
    }
    progress(figures, "many_at_once")

    # 6. Depot 3 renamed with the marker of rules.yaml: a push to each of its devices,
    # whose listeners synchronize on it.
    pushed = [d for d in devices if (int(d.name[4:]) - 1) % args.depots == 2]
    figures["push_synced"] = push_synced(conn, node, workdir, pushed, args.listener_processes)
    progress(figures, "push_synced")
    figures["machine"]["load_1min_end"] = bench_machine.load()[0]
    return figures


def nothing_changed(
    workdir: Path, devices: list[Device], port: int, connections: str
) -> dict[str, Any]:
    """Every device synchronizes once, one after the other, through its listener's call with
    its local database kept open (``idle.py``), over its connection ``held`` open from
    before the phase (authenticated, idle) or opened ``ahead``, in as
    few processes as the limit of open files allows, run one after the other: rows, bytes,
    the device's seconds per synchronization, and the wall time of the synchronizations
    (the processes' start, the opening of the databases and of held connections, which
    running listeners have done long before, are not in it)."""
    configs = [listener_config(workdir, d.name, port) for d in devices]
    chunks = -(-len(configs) // devices_per_process())
    size = -(-len(configs) // chunks)
    seconds: list[float] = []
    rows = received = 0
    wall = 0.0
    for n in range(chunks):
        path = workdir / f"idle-{n}.txt"
        path.write_text("".join(f"{c}\n" for c in configs[n * size : (n + 1) * size]))
        done = _idle_process(path, port, connections)
        seconds += done["seconds"]
        rows += done["rows"]
        received += done["bytes"]
        wall += done["wall_seconds"]
    return {
        "processes": chunks,
        "connections": connections,
        "rows": rows,
        "bytes_per_sync": received / len(seconds),
        "wall_seconds": wall,
        "client_ms_median": statistics.median(seconds) * 1000,
        "client_ms_p99": sorted(seconds)[int(len(seconds) * 0.99) - 1] * 1000,
    }


def _idle_process(listing: Path, port: int, connections: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.fleet_sync.idle", str(port), str(listing), connections]
    with subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the devices' process did not start: {line!r}")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if proc.wait(PUSH_TIMEOUT) != 0 or not line:
            raise RuntimeError("the devices' process failed")
    figures: dict[str, Any] = json.loads(line)
    return figures


def progress(figures: dict[str, Any], phase: str) -> None:
    """A phase's figures on stderr as soon as they are known (a long run keeps them)."""
    print(json.dumps({phase: figures[phase]}), file=sys.stderr, flush=True)


def open_local(workdir: Path, name: str) -> LocalDatabase:
    """The device's local database where its listener keeps it (``state_dir``)."""
    state = workdir / name / "state"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = LocalDatabase.open(state / LOCAL_DB)
    db.claim(name, PUBLICATION)
    return db


def listener_config(workdir: Path, name: str, port: int) -> Path:
    """The device's listener config: its SYNC channel, and ``sync`` on the message ``sync``."""
    directory = workdir / name
    key = directory / "device.key"
    key.write_text(protocol.format_secret(SECRET), encoding="ascii")
    key.chmod(0o600)
    path = directory / "listener.yaml"
    path.write_text(
        f"""\
device: {name}
secret_file: device.key
state_dir: state
publication: {PUBLICATION}
channels:
  sync: {{server: "127.0.0.1:{port}"}}
handlers:
  - name: sync
    subject: sync
    action: sync
""",
        encoding="utf-8",
    )
    return path


def push_synced(
    conn: psycopg.Connection,
    node: DispatcherProcess,
    workdir: Path,
    devices: list[Device],
    processes: int,
) -> dict[str, Any]:
    """Start the devices' listeners, rename their depot (the rule pushes ``sync`` to each);
    the time from the commit until every device's database holds the new name, and the
    CPU seconds the dispatcher and the listeners took meanwhile."""
    depot = 3
    port = node.sync_port
    configs = [listener_config(workdir, d.name, port) for d in devices]
    lists = []
    for n in range(min(processes, len(configs))):
        path = workdir / f"listeners-{n}.txt"
        path.write_text("".join(f"{c}\n" for c in configs[n::processes]), encoding="utf-8")
        lists.append(path)
    command = [sys.executable, "-m", "bench.fleet_sync.listeners"]
    since = time.time()
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*command, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for path in lists
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"a listener process did not start: {line!r}")
        _recorded(conn, [d.name for d in devices], since)
        connected = time.perf_counter() - started
        name = f"depot {depot} (pushed)"
        pids = [node.process.pid, *(p.pid for p in procs)]
        cpu = _cpu(pids)
        committing = time.time()
        conn.execute("UPDATE public.depots SET name = %s WHERE depot_id = %s", (name, depot))
        committed = time.time()
        synced = _synced(procs, len(devices))
        cpu = [end - start for start, end in zip(cpu, _cpu(pids), strict=True)]
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    held = 0
    for device in devices:
        held += device.depot_name() == name
    assert held == len(devices), f"{len(devices) - held} devices lack the new name"
    after = sorted(t - committing for t in synced.values())
    return {
        "devices": len(devices),
        "listener_processes": len(procs),
        "connect_seconds": connected,
        "commit_seconds": committed - committing,
        "seconds": after[-1],
        "median_seconds": statistics.median(after),
        "p90_seconds": after[int(len(after) * 0.9) - 1] if len(after) >= 10 else after[-1],
        "dispatcher_cpu_seconds": cpu[0],
        "listeners_cpu_seconds": sum(cpu[1:]),
    }


def _cpu(pids: list[int]) -> list[float]:
    return [bench_machine.cpu_seconds(pid) for pid in pids]


def _recorded(conn: psycopg.Connection, names: list[str], since: float) -> None:
    """Wait until the dispatcher has recorded every listener's connection, as it has long
    done in a fleet whose listeners stay connected (the change comes after)."""
    deadline = time.monotonic() + PUSH_TIMEOUT
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT count(*) FROM pushsync.sync_connections "
            "WHERE device_id = ANY(%s) AND connected_at >= to_timestamp(%s)",
            (names, since),
        ).fetchone()
        if row is not None and row[0] == len(names):
            return
        time.sleep(0.05)
    raise RuntimeError("the dispatcher did not record every listener's connection")


def _synced(procs: list[subprocess.Popen[str]], expected: int) -> dict[str, float]:
    """When each device's ``sync`` action ended (epoch seconds), as its listener says;
    RuntimeError if one failed or they did not all end within PUSH_TIMEOUT.

    A thread reads each process's lines: waiting on the pipe with ``select`` misses the
    lines a ``readline`` already took into the file object's buffer, when many arrive
    at once."""
    import queue
    import threading

    lines: queue.Queue[str] = queue.Queue()

    def read(stream: Any) -> None:
        for line in stream:
            lines.put(line)
        lines.put("")  # the process ended

    for proc in procs:
        threading.Thread(target=read, args=(proc.stdout,), daemon=True).start()
    synced: dict[str, float] = {}
    deadline = time.monotonic() + PUSH_TIMEOUT
    while len(synced) < expected:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"{expected - len(synced)} devices did not synchronize") from None
        if not line:
            raise RuntimeError("a listener process ended")
        _, device, at, ok = line.split()
        if ok != "1":
            raise RuntimeError(f"{device}: its sync action failed")
        synced.setdefault(device, float(at))
    return synced


def machine(conn: psycopg.Connection, workdir: Path) -> dict[str, Any]:
    """CPUs, load when the run started, and how long an fsync takes (``bench/machine.py``,
    median of 20) next to the server's data and next to the devices' databases."""
    return {
        "cpus": bench_machine.cpus(),
        "load_1min": bench_machine.load()[0],
        "fsync_ms_median": bench_machine.fsync_ms(bench_machine.data_directory(conn), 20),
        "devices_fsync_ms_median": bench_machine.fsync_ms(workdir, 20),
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with throwaway_database(DBNAME) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        prepare(conn, args.devices, args.routes, args.stops, args.depots)
        # Every listener of the push phase connects at once, all from 127.0.0.1.
        admit = str(max(256, args.devices // args.depots))
        limits = ("--sync-max-handshakes", admit, "--sync-max-handshakes-per-address", admit)
        with dispatcher_process(dsn, *limits) as node:
            return asyncio.run(measure(conn, node, workdir, args))


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(f: dict[str, Any]) -> str:
    n = f["devices"]
    route, depot, idle, many, push = (
        f["route_reassigned"],
        f["depot_renamed"],
        f["nothing_changed"],
        f["many_at_once"],
        f["push_synced"],
    )
    per_10000 = idle["wall_seconds"] * 10_000 / n
    return "\n".join(
        [
            f"machine                   {f['machine']['cpus']} CPUs, load "
            f"{f['machine']['load_1min']:.1f} at the start and {f['machine']['load_1min_end']:.1f} "
            f"at the end, fsync {f['machine']['fsync_ms_median']:.2f} ms (server's data), "
            f"{f['machine']['devices_fsync_ms_median']:.2f} ms (devices' databases)",
            f"initial (full)            {n} devices in {f['initial']['seconds']:.1f} s, "
            f"{f['initial']['rows_per_device']:.0f} rows and "
            f"{f['initial']['bytes_per_device']:,.0f} bytes per device",
            f"route reassigned          the 2 concerned: {route['concerned_rows']} rows, "
            f"{route['concerned_bytes_per_sync']:,.0f} bytes per sync; "
            f"{route['others_synced']} others: {route['others_rows']} rows, "
            f"{route['others_bytes_per_sync']:,.0f} bytes per sync; server "
            f"{route['server_ms_median']:.1f} ms median",
            f"depot renamed             {depot['concerned']} concerned, {depot['rows']} rows, "
            f"{depot['bytes']:,} bytes vs {depot['full_download_bytes']:,.0f} for full "
            f"downloads: {depot['bytes_ratio']:,.0f}x fewer "
            f"(target >= {TARGETS['bytes_ratio']:g}x) "
            f"{_mark(depot['bytes_ratio'] >= TARGETS['bytes_ratio'])}",
            f"nothing changed           {idle['rows']} rows; server {idle['server_ms_median']:.2f} "
            f"ms median (target <= {TARGETS['idle_server_ms_median']:g}) "
            f"{_mark(idle['server_ms_median'] <= TARGETS['idle_server_ms_median'])}, "
            f"p99 {idle['server_ms_p99']:.2f} ms; {n} sequential syncs in "
            f"{idle['wall_seconds']:.1f} s = {per_10000:.0f} s per 10,000 (target <= "
            f"{TARGETS['idle_total_s_per_10000']:g}) "
            f"{_mark(per_10000 <= TARGETS['idle_total_s_per_10000'])}; each as its listener "
            f"does (database kept open, connection {idle['connections']}, "
            f"{idle['processes']} processes): "
            f"{idle['client_ms_median']:.2f} ms median on the device, p99 "
            f"{idle['client_ms_p99']:.2f} ms",
            f"                          the dispatcher's statements of an untouched sync, "
            f"run alone: {idle['statements_ms_median']:.2f} ms median = "
            f"{idle['statements_ms_median'] / idle['select_1_ms_median']:.0f}x a SELECT 1 "
            f"({idle['select_1_ms_median']:.2f} ms) on the same connection",
            f"held state                {f['storage']['held_rows']:,} held rows, "
            f"{f['storage']['bytes_per_held_row']:.0f} bytes per held row",
            f"one change, many at once  {many['devices']} devices ({many['connecting']} "
            f"connecting at once) synced in "
            f"{many['seconds']:.2f} s (target <= {TARGETS['many_at_once_s']:g}) "
            f"{_mark(many['seconds'] <= TARGETS['many_at_once_s'])}",
            f"push -> synced            {push['devices']} listeners ({push['listener_processes']} "
            f"processes, connected in {push['connect_seconds']:.1f} s): the last database held "
            f"the new name {push['seconds']:.2f} s after the commit (target <= "
            f"{TARGETS['push_synced_s']:g}) {_mark(push['seconds'] <= TARGETS['push_synced_s'])}; "
            f"median {push['median_seconds']:.2f} s, p90 {push['p90_seconds']:.2f} s; CPU "
            f"meanwhile: dispatcher {push['dispatcher_cpu_seconds']:.1f} s, listeners "
            f"{push['listeners_cpu_seconds']:.1f} s",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m bench.fleet_sync", description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--routes", type=int, default=9, help="routes per device")
    parser.add_argument("--stops", type=int, default=10, help="stops per route")
    parser.add_argument("--depots", type=int, default=10, help="depots, each shared")
    parser.add_argument("--sample", type=int, default=200, help="others synced after phase 2")
    parser.add_argument("--at-once", type=int, default=8, help="devices syncing at once")
    parser.add_argument(
        "--connecting",
        type=int,
        default=32,
        help="devices connecting at once in the last phase (the dispatcher refuses more "
        "handshakes at once than it allows)",
    )
    parser.add_argument(
        "--listener-processes",
        type=int,
        default=2,
        help="processes the listeners of the push -> synced phase run in",
    )
    parser.add_argument(
        "--idle-connections",
        choices=("held", "ahead"),
        default="held",
        help="nothing changed: each device's connection held open from before the phase, as "
        "its running listener holds it, or opened while the devices before synchronized",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    if args.devices < 2 * args.depots or args.depots < 3:
        parser.error("--devices must be at least twice --depots, and --depots at least 3")
    with tempfile.TemporaryDirectory(prefix="pushsync-fleet-") as workdir:
        figures = run(args, Path(workdir))
    print(report(figures))
    if args.json:
        print(json.dumps(figures))
    return 0
