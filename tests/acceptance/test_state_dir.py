"""One state folder, one device: shared folders are refused, never mixed.

Two device configs in one folder (both with ``state_dir: state``) made Ann's
``sync`` reuse Bo's watermark and keep Bo's routes in Ann's database; two
listeners on one folder evicted each other forever. Through the real CLI.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import psycopg
import pytest

from pushsync.listener.state import SYNC_LOCK, FolderLock
from tests.integration import trucking
from tests.support.cli import clean_env, executable, run_cli_async
from tests.support.dispatching import SECRET, dispatching, server_address
from tests.support.keys import write_key
from tests.support.waiting import until


def write_device(folder: Path, name: str, device: str, server: str) -> Path:
    """``NAME.yaml`` in ``folder`` for ``device``, with ``state_dir: state`` like every other."""
    write_key(folder / f"{name}.key", SECRET)
    config = folder / f"{name}.yaml"
    config.write_text(
        f"device: {device}\nsecret_file: {name}.key\nstate_dir: state\npublication: driver\n"
        f'channels:\n  sync: {{server: "{server}"}}\n'
        "handlers:\n  - name: sync\n    subject: sync\n    action: sync\n",
        encoding="utf-8",
    )
    return config


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    done = await run_cli_async(*args, cwd=cwd)
    return done.returncode, done.stdout, done.stderr


def local_routes(folder: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(folder / "state" / "local.db") as conn:
        return conn.execute("SELECT route_id, driver_id FROM routes ORDER BY 1").fetchall()


@pytest.mark.asyncio
async def test_a_second_device_in_the_same_folder_is_refused_and_nothing_mixes(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    async with dispatching(dsn) as dispatcher:
        server = str(server_address(dispatcher))
        write_device(tmp_path, "ann", "truck-1", server)
        write_device(tmp_path, "bo", "truck-2", server)
        status, out, err = await cli("sync", "bo.yaml", cwd=tmp_path)
        assert status == 0, err
        bo_rows = local_routes(tmp_path)
        assert bo_rows
        assert {driver for _, driver in bo_rows} == {2}

        status, out, err = await cli("sync", "ann.yaml", cwd=tmp_path)
    assert status == 2
    assert out == ""
    assert err == (
        "sync failed: ann.yaml: state_dir state: state/local.db "
        "holds the data of device truck-2 (publication driver), not of device truck-1 "
        "(publication driver); give each device (and each publication) its own state_dir\n"
    )
    assert local_routes(tmp_path) == bo_rows  # Bo's rows, and only Bo's, as they were


def test_a_second_listener_on_one_folder_is_refused(tmp_path: Path) -> None:
    # Nothing listens on the server's port: the first listener keeps retrying, and runs.
    config = write_device(tmp_path, "ann", "truck-1", "127.0.0.1:9")
    with (tmp_path / "first.log").open("wb") as out:
        first = subprocess.Popen(
            [*executable(), "listen", "ann.yaml"],
            cwd=tmp_path,
            env=clean_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        until(
            lambda: "listening as truck-1" in (tmp_path / "first.log").read_text(),
            "the first listener",
            logs=[tmp_path / "first.log"],
        )
        second = subprocess.run(
            [*executable(), "listen", str(config)],
            cwd=tmp_path,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert second.returncode == 2
        assert second.stderr == (
            f"{config}: state_dir {tmp_path / 'state'} is in use by pid {first.pid} "
            "(pushsync listen): give each device its own state_dir, and run one listener "
            "per device\n"
        )
        assert first.poll() is None  # the first one goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(30)
    assert first.returncode == 0


@pytest.mark.asyncio
async def test_sync_waits_for_a_synchronization_under_way_in_its_folder(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    trucking.setup(db)
    db.execute("UPDATE pushsync.devices SET secret = %s", (SECRET,))
    async with dispatching(dsn) as dispatcher:
        write_device(tmp_path, "bo", "truck-2", str(server_address(dispatcher)))
        held = FolderLock(tmp_path / "state", SYNC_LOCK)  # as the listener's sync holds it
        assert held.try_acquire()
        process = await asyncio.create_subprocess_exec(
            *executable(),
            "sync",
            "bo.yaml",
            cwd=tmp_path,
            env=clean_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            assert process.stderr is not None
            first = await asyncio.wait_for(process.stderr.readline(), 60)
            assert first.decode() == (
                f"waiting for the synchronization of pid {os.getpid()} in state\n"
            )
            assert not (tmp_path / "state" / "local.db").exists()  # it waits, it does not race
            held.release()
            out, err = await asyncio.wait_for(process.communicate(), 60)
        finally:
            held.release()
            if process.returncode is None:
                process.kill()
                await process.wait()
    assert process.returncode == 0, err.decode()
    assert out.decode().startswith("synchronized driver in ")


@pytest.mark.asyncio
async def test_sync_with_a_key_the_server_refuses_says_so_and_exits_2(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    trucking.setup(db)  # truck-9 is not registered
    async with dispatching(dsn) as dispatcher:
        write_device(tmp_path, "nine", "truck-9", str(server_address(dispatcher)))
        status, out, err = await cli("sync", "nine.yaml", cwd=tmp_path)
    assert status == 2
    assert out == ""
    assert err == (
        "sync failed: the server refused the key of device truck-9 (unknown, disabled or "
        "wrong secret): check device and secret_file against `pushsync device list`\n"
    )
    with sqlite3.connect(tmp_path / "state" / "local.db") as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert [n for (n,) in tables if not n.startswith(("_pushsync_", "sqlite_"))] == []  # no rows
