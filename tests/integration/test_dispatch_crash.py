"""``pushsync dispatch`` as a real process through crashes: kill -9 mid-batch, PostgreSQL restart.

The dispatcher runs as a subprocess (the installed console script); the devices
are UDP sockets in this process, served by one thread, that check every message
with their own secret, record its request id and ack it to the address it came
from, as ``pushsync listen`` does. Deliveries are counted per request id, so a
row sent twice shows up as a duplicate.

What must hold: every row ends confirmed; nothing is lost; a row is sent again
only when the dispatcher holding it died (once its lease runs out) or when it
is due for a resend because no ack was recorded (UDP may lose either datagram:
at-least-once), never twice at once.
"""

from __future__ import annotations

import contextlib
import itertools
import selectors
import signal
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psycopg
import pytest

from pushsync import devices
from pushsync.wire import protocol
from tests.support.cli import run_cli
from tests.support.dispatching import dispatcher_listens
from tests.support.metrics import http_get, scrape
from tests.support.postgres import OwnServer, start_postgres
from tests.support.processes import Dispatch
from tests.support.waiting import until

WAIT = 30.0
"""Seconds any one phase may take before the test fails (it takes far less)."""


# --------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class Delivery:
    request_id: uuid.UUID
    device: str
    at: float  # time.monotonic() on arrival


class Fleet:
    """Device sockets on 127.0.0.1, served by one thread; every message is checked and acked.

    ``on_delivery(n)`` is called (on the fleet's thread) after the n-th delivery.
    """

    def __init__(self, secrets: dict[str, bytes]) -> None:
        self.secrets = secrets
        self.sockets: dict[str, socket.socket] = {}
        for device in secrets:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            self.sockets[device] = sock
        self.on_delivery: Callable[[int], None] | None = None
        self.rejected: list[str] = []
        self._deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fleet", daemon=True)

    def address(self, device: str) -> str:
        host, port = self.sockets[device].getsockname()[:2]
        return f"{host}:{port}"

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets.values():
            sock.close()

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def count(self) -> int:
        with self._lock:
            return len(self._deliveries)

    def settle(self, quiet: float = 0.2) -> int:
        """Wait until nothing has arrived for ``quiet`` seconds; the delivery count."""
        last, since = -1, time.monotonic()
        while True:
            now = self.count()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return now
            time.sleep(0.02)

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        for device, sock in self.sockets.items():
            selector.register(sock, selectors.EVENT_READ, device)
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(0.05):
                    self._drain(self.sockets[key.data], key.data)
        finally:
            selector.close()

    def _drain(self, sock: socket.socket, device: str) -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error for an ack to a dead dispatcher
                continue
            secret = self.secrets[device]
            try:
                msg = protocol.decode_message(data, secret, time.time())
            except protocol.ProtocolError as exc:
                self.rejected.append(f"{device}: {type(exc).__name__}: {exc}")
                continue
            if msg.device != device:
                self.rejected.append(f"{device}: message for {msg.device}")
                continue
            with self._lock:
                self._deliveries.append(Delivery(msg.request_id, device, time.monotonic()))
                n = len(self._deliveries)
            ack = protocol.Ack(request_id=msg.request_id, device=device, confirmed=time.time())
            with contextlib.suppress(OSError):  # the dispatcher is gone; its rows are sent again
                sock.sendto(protocol.encode_ack(ack, secret), peer)
            if self.on_delivery is not None:
                self.on_delivery(n)


@pytest.fixture
def fleet_of() -> Iterator[Callable[[psycopg.Connection, int], Fleet]]:
    """``fleet_of(db, n)``: register n devices (``pushsync.devices.add``) and serve them."""
    fleets: list[Fleet] = []

    def make(db: psycopg.Connection, n: int) -> Fleet:
        names = [f"dev-{i:02d}" for i in range(n)]
        fleet = Fleet(dict.fromkeys(names, b""))
        for name in names:
            device = devices.NewDevice(name, udp=fleet.address(name))
            fleet.secrets[name] = devices.add(db, device, None)
        fleets.append(fleet)
        fleet.start()
        return fleet

    yield make
    for fleet in fleets:
        fleet.close()


# --------------------------------------------------------------------------- database


RESEND = 1.0
"""Seconds between resends of an unconfirmed row: a lost datagram or ack costs that."""


def enqueue(db: psycopg.Connection, device_ids: list[str], n: int, tag: str) -> set[uuid.UUID]:
    """``n`` rows spread over the devices, one transaction, with the trigger's NOTIFY."""
    with db.transaction():
        found = db.execute(
            "INSERT INTO pushsync.outbox (rule, device_id, subject, content, coalescing, "
            "expires_at, resend_every) "
            "SELECT 'bulk', (%(devices)s::text[])[1 + n %% cardinality(%(devices)s::text[])], "
            "'sync', %(tag)s || ' ' || n, false, now() + interval '1 hour', "
            "make_interval(secs => %(resend)s) "
            "FROM generate_series(1, %(n)s) AS n RETURNING request_id",
            {"devices": device_ids, "n": n, "tag": tag, "resend": RESEND},
        ).fetchall()
        db.execute("SELECT pg_notify('pushsync', '')")
    return {uuid.UUID(str(row[0])) for row in found}


def confirmed(db: psycopg.Connection) -> set[uuid.UUID]:
    """Confirmed rows, in the outbox or already archived."""
    found = db.execute(
        "SELECT request_id FROM pushsync.outbox WHERE state = 'confirmed' "
        "UNION ALL SELECT request_id FROM pushsync.outbox_history WHERE state = 'confirmed'"
    ).fetchall()
    return {uuid.UUID(str(row[0])) for row in found}


def without_send_record(db: psycopg.Connection) -> int:
    """Confirmed rows with no ``sent_at``: the ack was recorded before the send was."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM pushsync.outbox WHERE state = 'confirmed' "
        "AND sent_at IS NULL) + (SELECT count(*) FROM pushsync.outbox_history "
        "WHERE state = 'confirmed' AND sent_at IS NULL)"
    ).fetchone()
    return int(row[0]) if row else 0


def outbox(db: psycopg.Connection) -> dict[uuid.UUID, tuple[str, str | None]]:
    """Every outbox row: request id -> (state, lease owner)."""
    found = db.execute("SELECT request_id, state, lease_owner FROM pushsync.outbox").fetchall()
    return {uuid.UUID(str(r[0])): (r[1], r[2]) for r in found}


# --------------------------------------------------------------------------- processes


class Start(Protocol):
    def __call__(self, dsn: str, *options: str) -> Dispatch: ...


@pytest.fixture
def dispatchers(tmp_path: Path) -> Iterator[Start]:
    """``start(dsn, *options)`` runs a dispatcher; any still running at the end are killed."""
    started: list[Dispatch] = []

    def start(dsn: str, *options: str) -> Dispatch:
        log = tmp_path / f"dispatch-{len(started) + 1}.log"
        started.append(Dispatch(dsn, log, *options))
        return started[-1]

    yield start
    for dispatch in started:
        dispatch.close()


# --------------------------------------------------------------------------- kill -9


ROWS = 3000
KILL_AT = 250
"""Deliveries after which the first dispatcher is killed: part-way through a batch
(the CLI claims 500 rows at a time), while rows of it are still ``sending``."""
HOLD = 2.0
"""Seconds each UPDATE of the outbox waits while the first dispatcher runs."""


@pytest.mark.slow
def test_kill_9_mid_batch_then_restart_loses_nothing(
    db: psycopg.Connection,
    dsn: str,
    fleet_of: Callable[[psycopg.Connection, int], Fleet],
    dispatchers: Start,
) -> None:
    fleet = fleet_of(db, 20)
    ids = enqueue(db, sorted(fleet.secrets), ROWS, "kill")
    # Every UPDATE of the outbox first waits HOLD seconds: the claim of a batch, and the
    # statement that records its sends after they went out. The kill at the KILL_AT-th
    # delivery then falls inside a batch on any machine, however fast the dispatcher
    # sends and however slowly the devices count.
    db.execute(
        "CREATE FUNCTION public.hold_outbox_updates() RETURNS trigger LANGUAGE plpgsql "
        f"AS $$ BEGIN PERFORM pg_sleep({HOLD}); RETURN NULL; END $$"
    )
    db.execute(
        "CREATE TRIGGER hold_updates BEFORE UPDATE ON pushsync.outbox "
        "FOR EACH STATEMENT EXECUTE FUNCTION public.hold_outbox_updates()"
    )

    first = dispatchers(dsn)
    fired = threading.Event()

    def kill_at(n: int) -> None:
        if n == KILL_AT:
            first.process.send_signal(signal.SIGKILL)  # at once, from the devices' thread
            fired.set()

    fleet.on_delivery = kill_at
    started = time.monotonic()
    until(fired.is_set, f"{KILL_AT} deliveries", logs=[first.log])
    first.process.wait(WAIT)
    fleet.on_delivery = None
    db.execute("DROP TRIGGER hold_updates ON pushsync.outbox")  # the second one runs freely
    assert first.process.returncode == -signal.SIGKILL
    before = fleet.settle()  # datagrams already on their way when it died
    assert before < ROWS, "the dispatcher sent everything before it could be killed"

    at_kill = outbox(db) | {i: ("confirmed", None) for i in confirmed(db) - set(outbox(db))}
    assert set(at_kill) == ids
    by_state = Counter(state for state, _ in at_kill.values())
    leased = {i for i, (state, _) in at_kill.items() if state == "sending"}
    pending = {i for i, (state, _) in at_kill.items() if state == "pending"}
    done = {i for i, (state, _) in at_kill.items() if state == "confirmed"}
    owners = {owner for i, (_, owner) in at_kill.items() if i in leased}
    row = db.execute(
        "SELECT extract(epoch FROM min(lease_expires_at) - now())::float8 "
        "FROM pushsync.outbox WHERE state = 'sending'"
    ).fetchone()
    lease_left = time.monotonic() + (row[0] if row and row[0] is not None else 0.0)
    assert leased, f"killed between batches, not mid-batch: {dict(by_state)}"
    assert len(owners) == 1
    assert set(by_state) <= {"pending", "sending", "sent", "confirmed"}
    first_sent = {d.request_id for d in fleet.deliveries()}
    assert not first_sent & pending  # what it sent, it had claimed

    # A second dispatcher sends everything else, but leaves the dead one's leased
    # rows alone until their lease (30 s: the CLI has no --lease option) runs out.
    second = dispatchers(dsn)
    restarted = time.monotonic()
    until(lambda: pending <= confirmed(db), "the rows never claimed", logs=[second.log])
    fresh = time.monotonic() - restarted
    if time.monotonic() < lease_left - 1.0:  # else this machine was too slow to tell
        now = outbox(db)
        assert {i for i in leased if now[i] != at_kill[i]} == set()
        assert not {d.request_id for d in fleet.deliveries()[before:]} & leased

    # Let the dead dispatcher's leases run out, as 30 s would.
    aged = db.execute(
        "UPDATE pushsync.outbox SET lease_expires_at = now() - interval '1 millisecond', "
        "next_attempt_at = now() - interval '1 millisecond' "
        "WHERE state = 'sending' AND lease_owner = %s",
        (owners.pop(),),
    ).rowcount
    assert aged == len(leased)
    until(lambda: confirmed(db) == ids, "every row confirmed", logs=[second.log])
    total = time.monotonic() - started
    second.stop()

    times: dict[uuid.UUID, list[float]] = {}
    for delivery in fleet.deliveries():
        times.setdefault(delivery.request_id, []).append(delivery.at)
    assert fleet.rejected == []
    assert set(times) == ids  # every row reached its device at least once
    assert all(len(times[i]) == 1 for i in done)  # confirmed before the kill: never again
    # No row is ever sent twice in a row: a second delivery is the dead one's lease
    # running out, or the resend of a row whose ack was lost (UDP), never sooner.
    too_soon = {
        i: round(b - a, 3)
        for i, at in times.items()
        for a, b in itertools.pairwise(at)
        if b - a < RESEND / 2
    }
    assert too_soon == {}
    again = {i for i in leased & first_sent if len(times[i]) > 1}
    resent = sum(len(at) - 1 for i, at in times.items() if i not in again)
    print(
        f"\nkill -9 after {before} deliveries; at the kill: {dict(by_state)}; "
        f"unclaimed rows confirmed {fresh:.2f} s after the restart; "
        f"{len(again)} of the dead one's leased rows sent again after its lease, "
        f"{resent} resends after lost acks; all {ROWS} confirmed in {total:.2f} s; "
        f"{without_send_record(db)} confirmed without sent_at"
    )


# --------------------------------------------------------------------------- PostgreSQL restart


def accepts_sessions(dsn: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            psycopg.connect(dsn, connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    return check


@pytest.fixture
def own_server() -> Iterator[OwnServer]:
    """A dedicated server with the base schema applied by ``pushsync migrate``."""
    with start_postgres(create_template=False) as executor:
        where = f"host={executor.host} port={executor.port} user={executor.user}"
        with psycopg.connect(f"{where} dbname=postgres", autocommit=True) as admin:
            admin.execute("CREATE DATABASE pushsync")
        server = OwnServer(executor, f"{where} dbname=pushsync")
        migrated = run_cli("migrate", "--dsn", server.dsn)
        assert migrated.returncode == 0, migrated.stderr
        try:
            yield server
        finally:
            server.close()


@pytest.mark.slow
def test_postgres_restart_mid_run_every_row_delivered_and_confirmed(
    own_server: OwnServer,
    fleet_of: Callable[[psycopg.Connection, int], Fleet],
    dispatchers: Start,
) -> None:
    db = own_server.connect()
    fleet = fleet_of(db, 10)
    names = sorted(fleet.secrets)
    dispatch = dispatchers(own_server.dsn, "--metrics", "127.0.0.1:0")
    url = dispatch.metrics_url()
    until(lambda: dispatcher_listens(db), "the dispatcher to LISTEN", logs=[dispatch.log])
    until(lambda: http_get(f"{url}/healthz")[0] == 200, "/healthz to say ok", logs=[dispatch.log])

    under_way = threading.Event()
    fleet.on_delivery = lambda n: under_way.set() if n >= 300 else None
    ids = enqueue(db, names, 1500, "before")
    until(under_way.is_set, "the burst to be under way", logs=[dispatch.log])
    db.close()
    down = time.monotonic()
    own_server.executor.stop()  # pg_ctl stop -m fast, in the middle of the burst
    stopped = time.monotonic() - down
    sent_while_up = fleet.count()
    until(lambda: http_get(f"{url}/healthz")[0] == 503, "/healthz to say 503", logs=[dispatch.log])
    status, reason = http_get(f"{url}/healthz")
    assert status == 503, reason
    assert reason.startswith("database unavailable"), reason
    assert scrape(url)[("pushsync_database_up", ())] == 0
    time.sleep(max(0.0, down + 0.5 - time.monotonic()))  # long enough to fail reconnects
    own_server.executor.start()  # same port, same data directory
    up = time.monotonic()

    # The executor returns once the port is open, which can be a moment before the
    # server accepts sessions ("the database system is starting up").
    until(accepts_sessions(own_server.dsn), "PostgreSQL to accept sessions again")
    db = own_server.connect()
    later = enqueue(db, names, 500, "after")
    inserted = time.monotonic() - up
    ids |= later

    def first_after() -> bool:
        return any(d.request_id in later for d in fleet.deliveries())

    until(
        lambda: http_get(f"{url}/healthz")[0] == 200,
        "/healthz to say ok again",
        logs=[dispatch.log],
    )
    healthy = time.monotonic() - up
    until(first_after, "the first row written after the restart", logs=[dispatch.log])
    first_delivery = min(d.at for d in fleet.deliveries() if d.request_id in later) - up
    until(lambda: confirmed(db) == ids, "every row confirmed", logs=[dispatch.log])
    everything = time.monotonic() - up
    assert dispatch.process.poll() is None, "the dispatcher exited"
    # An ack can be recorded before the send loop records its batch's sends (and
    # counts them): the counter catches up a moment after the last confirmation.
    udp_sends = ("pushsync_sends_total", (("gateway", "udp"),))
    until(
        lambda: scrape(url).get(udp_sends, 0) >= len(ids), "the sends counted", logs=[dispatch.log]
    )
    figures = scrape(url)
    text = dispatch.stop()
    unrecorded = without_send_record(db)
    db.close()

    delivered = Counter(d.request_id for d in fleet.deliveries())
    assert fleet.rejected == []
    assert set(delivered) == ids
    twice = sum(1 for n in delivered.values() if n > 1)
    assert "database connection to" in text  # it saw the outage and retried
    assert figures[("pushsync_database_up", ())] == 1
    assert figures[("pushsync_confirmations_total", ())] >= len(ids)
    assert figures[udp_sends] >= len(ids)
    assert figures[("pushsync_commit_to_send_seconds_count", ())] > 0
    print(
        f"\nPostgreSQL stopped (fast) after {sent_while_up} of 1500 deliveries in {stopped:.2f} s, "
        f"down {up - down:.2f} s; after it was back: rows inserted in {inserted:.2f} s, "
        f"/healthz ok at {healthy:.2f} s, first new row delivered at {first_delivery:.2f} s, "
        f"all {len(ids)} confirmed at {everything:.2f} s; {twice} sent more than once; "
        f"{unrecorded} confirmed without sent_at"
    )
