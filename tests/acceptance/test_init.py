"""``pushsync init``, then the commands it prints, on a fresh database: a task reaches the device.

Each printed command runs as written, as a subprocess, with two changes only:
the dispatcher's SYNC port is one the OS picked (the config's 2439 is edited to
it), and ``psql -f schema.sql`` is the same file run through psycopg.
"""

from __future__ import annotations

import re
import shlex
import sqlite3
import subprocess
from pathlib import Path

import psycopg

from tests.support.cli import Run, clean_env, executable
from tests.support.processes import Dispatch
from tests.support.waiting import until


def printed_commands(stdout: str) -> list[list[str]]:
    """The ``pushsync ...`` lines of ``init``'s advice, as argv lists without the ``&``."""
    lines = [line.split("#")[0].strip() for line in stdout.splitlines()]
    return [
        shlex.split(line.removesuffix("&").strip())
        for line in lines
        if line.startswith("pushsync ")
    ]


def with_dsn(argv: list[str], dsn: str) -> list[str]:
    """``argv`` with ``$DSN`` as the shell would expand it."""
    return [dsn if arg == "$DSN" else arg for arg in argv]


def test_init_then_its_commands_bring_a_task_to_the_device(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    result = pushsync("init", "fleet", "--device", "laptop-1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [
        "wrote fleet/rules.yaml",
        "wrote fleet/schema.sql",
        "wrote fleet/listener.yaml",
        "wrote fleet/.gitignore",
        "wrote fleet/device.key",
    ]
    fleet = tmp_path / "fleet"
    assert oct((fleet / "device.key").stat().st_mode & 0o777) == "0o600"
    migrate, add, dispatch, listen, send = printed_commands(result.stdout)

    db.execute((fleet / "schema.sql").read_text())  # what `psql -f schema.sql` does
    for argv in (migrate, add):
        done = pushsync(*with_dsn(argv, dsn)[1:])
        assert done.returncode == 0, (argv, done.stderr)
    check = pushsync("check", "fleet/rules.yaml", "--dsn", dsn)
    assert check.returncode == 0, check.stderr

    # The one change: the SYNC port the OS picks, instead of 2439.
    assert dispatch == ["pushsync", "dispatch", "--dsn", "$DSN", "--sync-listen", "127.0.0.1:2439"]
    server = Dispatch(dsn, tmp_path / "dispatch.log")
    listener: subprocess.Popen[bytes] | None = None
    try:
        until(lambda: "SYNC gateway on " in server.output(), "the SYNC gateway", logs=[server.log])
        address = re.findall(r"SYNC gateway on (\S+)", server.output())[0]
        config = fleet / "listener.yaml"
        config.write_text(config.read_text().replace("127.0.0.1:2439", address))
        with (tmp_path / "listen.log").open("wb") as out:
            listener = subprocess.Popen(
                [*executable(), *listen[1:]],
                cwd=tmp_path,
                env=clean_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        hello = subprocess.run(
            [*executable(), *with_dsn(send, dsn)[1:]],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert hello.returncode == 0, hello.stderr + (tmp_path / "listen.log").read_text()
        assert hello.stderr.splitlines()[-1].startswith("confirmed over sync")

        db.execute(
            "INSERT INTO public.tasks (device_id, title) VALUES ('laptop-1', 'water the plants')"
        )
        db.execute("INSERT INTO public.tasks (device_id, title) VALUES ('laptop-2', 'not mine')")
        local = fleet / "state" / "local.db"

        def titles() -> list[str]:
            if not local.exists():
                return []
            with sqlite3.connect(local) as conn:
                try:
                    return [title for (title,) in conn.execute("SELECT title FROM tasks")]
                except sqlite3.OperationalError:  # not synchronized yet
                    return []

        until(lambda: titles() == ["water the plants"], "the task in the device's database")
    finally:
        if listener is not None:
            listener.terminate()
            listener.wait(30)
        server.stop()


def test_init_never_overwrites_and_a_shared_key_is_refused(
    pushsync: Run, tmp_path: Path, db: psycopg.Connection, dsn: str
) -> None:
    (tmp_path / "fleet").mkdir()
    (tmp_path / "fleet" / "listener.yaml").write_text("mine\n")
    result = pushsync("init", "fleet")
    assert result.returncode == 2
    assert result.stderr == (
        "pushsync: not overwriting fleet/listener.yaml: choose another directory\n"
    )
    assert [p.name for p in (tmp_path / "fleet").iterdir()] == ["listener.yaml"]
    assert (tmp_path / "fleet" / "listener.yaml").read_text() == "mine\n"

    assert pushsync("init", "other").returncode == 0
    key = tmp_path / "other" / "device.key"
    key.chmod(0o644)
    shared = pushsync("device", "add", "device-1", "--dsn", dsn, "--secret-from", str(key))
    assert shared.returncode == 2
    assert shared.stderr == (
        f"pushsync: {key}: the key file is open to other users (mode 0644); chmod 600 {key}\n"
    )
    key.write_text("not hex\n")
    key.chmod(0o600)
    bad = pushsync("device", "add", "device-1", "--dsn", dsn, "--secret-from", str(key))
    assert bad.returncode == 2
    assert bad.stderr.startswith(f"pushsync: {key}: key file: expected 64 hexadecimal digits")
    assert db.execute("SELECT count(*) FROM pushsync.devices").fetchone() == (0,)
