"""For the benchmarks: a throwaway database, and ``pushsync dispatch`` as a subprocess."""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

SERVER_OPTIONS = (
    "-c synchronous_commit=off -c shared_buffers=256MB -c max_connections=50 "
    "-c listen_addresses=127.0.0.1"
)


@contextmanager
def throwaway_database(dbname: str = "bench") -> Iterator[str]:
    """A new PostgreSQL server with an empty database ``dbname``; its DSN."""
    import psycopg
    from psycopg import sql

    from tests.support.postgres import start_postgres

    with start_postgres(
        dbname=dbname, postgres_options=SERVER_OPTIONS, create_template=False
    ) as executor:
        base = f"host={executor.host} port={executor.port} user={executor.user}"
        with psycopg.connect(f"{base} dbname=postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        yield f"{base} dbname={dbname}"


@dataclass(slots=True)
class DispatcherProcess:
    process: subprocess.Popen[str]
    lines: list[str]
    """Its log, as it comes (a thread drains stderr so that it never blocks)."""
    sync_port: int

    def rss_kib(self) -> int:
        """Its resident set size (VmRSS), in KiB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found is not None
        return int(found[1])


def _drain(stream: IO[str], lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))


@contextmanager
def dispatcher_process(
    dsn: str, *extra: str, nofile: int | None = None
) -> Iterator[DispatcherProcess]:
    """Run ``pushsync dispatch`` on loopback ports until the block ends (SIGTERM); with
    ``nofile``, at most that many open files (as systemd's ``LimitNOFILE=``)."""
    command = [
        sys.executable, "-m", "pushsync", "dispatch", "--dsn", dsn,
        "--sync-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0", *extra,
    ]  # fmt: skip

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    lines: list[str] = []
    assert process.stderr is not None
    drain = threading.Thread(target=_drain, args=(process.stderr, lines), daemon=True)
    drain.start()
    try:
        port = _wait_for(lines, r"SYNC gateway on 127\.0\.0\.1:(\d+)", process)
        _wait_for(lines, r"listening on channel", process)
        yield DispatcherProcess(process, lines, int(port))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        drain.join(10)
        process.stderr.close()


def _wait_for(lines: list[str], pattern: str, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in list(lines):
            if found := re.search(pattern, line):
                return found[1] if found.groups() else line
        if process.poll() is not None:
            raise RuntimeError("the dispatcher exited:\n" + "\n".join(lines))
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {pattern!r}:\n" + "\n".join(lines))


__all__ = ["DispatcherProcess", "dispatcher_process", "throwaway_database"]
