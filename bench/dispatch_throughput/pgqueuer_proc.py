"""A pgqueuer worker as its own process, consuming no-op jobs of entrypoint ``noop``.

    python -m bench.dispatch_throughput.pgqueuer_proc --dsn DSN count N [--batch B ...]
    python -m bench.dispatch_throughput.pgqueuer_proc --dsn DSN record FILE [...]

It runs ``--consumers`` pgqueuer ``QueueManager``\\ s (one connection each, in
one event loop, as pgqueuer's own benchmark does) in continuous mode with
``--batch`` jobs per dequeue, on pgqueuer's ``--driver`` (asyncpg by default,
as pgqueuer's CLI prefers; psycopg is the other). Once every consumer's LISTEN works (a health
check round trip through it) it prints ``ready``.

* ``count N``: the no-op handler counts jobs; at the N-th it prints
  ``done N FIRST LAST`` (the times the first and the last handler ran).
* ``record FILE``: the handler keeps ``(time, payload)``; on SIGTERM every pair
  is written to FILE as ``TIME PAYLOAD`` and ``done COUNT`` is printed.

On SIGTERM the workers stop (pgqueuer flushes its buffers) and the process
exits 0. Times are ``CLOCK_MONOTONIC`` seconds, as in ``receiver.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
from pgqueuer import AsyncpgDriver, Job, PsycopgDriver, Queries, QueueManager
from pgqueuer.db import Driver
from pgqueuer.errors import FailingListenerError

ENTRYPOINT = "noop"


def _now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)


class Counter:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.first = 0.0

    async def handle(self, job: Job) -> None:
        now = _now()
        self.seen += 1
        if self.seen == 1:
            self.first = now
        if self.seen == self.expected:
            print(f"done {self.seen} {self.first:.6f} {now:.6f}", flush=True)


class Recorder:
    def __init__(self) -> None:
        self.got: list[tuple[float, bytes]] = []

    async def handle(self, job: Job) -> None:
        self.got.append((_now(), job.payload or b""))

    def write(self, path: str) -> None:
        with open(path, "w", encoding="ascii") as out:
            out.writelines(f"{t:.6f} {p.decode('ascii')}\n" for t, p in self.got)
        print(f"done {len(self.got)}", flush=True)


def driver_available(name: str) -> bool:
    """Whether pgqueuer's ``name`` driver can be used here (asyncpg is an optional extra)."""
    return name == "psycopg" or importlib.util.find_spec(name) is not None


async def _connect(driver: str, dsn: str) -> tuple[Driver, Callable[[], Awaitable[None]]]:
    """A pgqueuer driver on a new connection, and how to close that connection."""
    if driver == "asyncpg":
        asyncpg: Any = importlib.import_module("asyncpg")
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        conn = await asyncpg.connect(
            host=params.get("host"),
            port=int(params.get("port") or 5432),
            user=params.get("user"),
            database=params.get("dbname"),
        )
        return AsyncpgDriver(conn), conn.close
    pconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    return PsycopgDriver(pconn), pconn.close


async def _listening(qm: QueueManager, timeout: float = 30.0) -> None:  # noqa: ASYNC109  a deadline that fails the run naming the wait
    """Until a health check goes round through ``qm``'s LISTEN (set up once it runs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await qm.listener_healthy(timeout=timedelta(seconds=0.2))
            return
        except FailingListenerError:
            if time.monotonic() > deadline:
                raise


async def run(args: argparse.Namespace) -> None:
    counter = Counter(int(args.arg)) if args.mode == "count" else None
    recorder = Recorder() if args.mode == "record" else None
    handler = counter.handle if counter is not None else recorder.handle  # type: ignore[union-attr]
    connections = [await _connect(args.driver, args.dsn) for _ in range(args.consumers)]
    managers = [QueueManager(Queries(driver)) for driver, _ in connections]
    for qm in managers:
        qm.entrypoint(ENTRYPOINT)(handler)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [
        asyncio.create_task(
            qm.run(
                batch_size=args.batch,
                dequeue_timeout=timedelta(seconds=args.dequeue_timeout),
            )
        )
        for qm in managers
    ]
    try:
        for qm in managers:
            await _listening(qm)
        print("ready", flush=True)
        await stop.wait()
    finally:
        for qm in managers:
            qm.shutdown.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, close in connections:
            await close()
    if recorder is not None:
        recorder.write(args.arg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch_throughput.pgqueuer_proc")
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--batch", type=int, default=10, help="jobs per dequeue (batch_size)")
    parser.add_argument("--consumers", type=int, default=1, help="QueueManagers in this process")
    parser.add_argument(
        "--dequeue-timeout", type=float, default=30.0, help="seconds between polls when idle"
    )
    parser.add_argument(
        "--driver",
        choices=("asyncpg", "psycopg"),
        default="asyncpg",
        help="pgqueuer's database driver (default asyncpg, which pgqueuer's CLI prefers)",
    )
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("mode", choices=("count", "record"))
    parser.add_argument("arg", metavar="N|FILE")
    args = parser.parse_args(argv)
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
