"""``pushsync send``: a test push through the real outbox, dispatcher and listener.

The command runs as a subprocess; the dispatcher and the device's listener run
in this process on real sockets.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.support.cli import run_cli_async
from tests.support.dispatching import (
    DEVICE,
    add_device,
    connections_of,
    dispatching,
    server_address,
)
from tests.support.listening import listening, runs, write_config
from tests.support.waiting import until_async


async def send(*args: str) -> tuple[int, str, str]:
    """``pushsync send ARGS...``: exit status, stdout, stderr."""
    done = await run_cli_async("send", *args)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.asyncio
async def test_a_push_the_device_confirms_and_one_it_does_not(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    add_device(db)
    async with dispatching(dsn) as dispatcher:
        config = write_config(tmp_path, server_address(dispatcher))
        async with listening(config):
            await until_async(
                lambda: connections_of(dispatcher).stats.subscribed >= 1, "the device"
            )
            status, out, err = await send(DEVICE, "sync", "hello", "--wait", "--dsn", dsn)
            assert status == 0, err
            request_id = out.strip()
            assert err.splitlines() == [
                f"queued for {DEVICE}; waiting up to 10m...",
                "confirmed over sync after 1 attempt",
            ]
            assert runs(tmp_path) == [{"request_id": request_id, "content": "hello"}]
            # No handler takes subject "other": like MobiLink, the device does not confirm it.
            status, out, err = await send(
                DEVICE, "other", "--wait", "--ttl", "2s", "--gateway", "sync", "--dsn", dsn
            )
            assert status == 1
            assert err.splitlines()[-1].startswith("not confirmed: expired over sync after ")
    row = db.execute(
        "SELECT rule, subject, gateway, state FROM pushsync.outbox_history "
        "UNION ALL SELECT rule, subject, gateway, state FROM pushsync.outbox ORDER BY 2 DESC"
    ).fetchall()
    assert row == [("(send)", "sync", "auto", "confirmed"), ("(send)", "other", "sync", "expired")]


@pytest.mark.asyncio
async def test_send_refuses_what_no_dispatcher_could_deliver(
    db: psycopg.Connection, dsn: str
) -> None:
    add_device(db)
    db.execute(
        "INSERT INTO pushsync.devices (device_id, secret, enabled) VALUES ('off', %s, false)",
        (bytes(32),),
    )
    cases = {
        ("truck-9", "hi"): "pushsync: there is no device truck-9",
        ("off", "hi"): "pushsync: device off is disabled: pushsync device enable it first",
        (DEVICE, "hi", "--ttl", "soon"): "pushsync: --ttl: expected a duration",
        (DEVICE, "hi", "--gateway", "pigeon"): "usage: ",
    }
    for args, first in cases.items():
        status, out, err = await send(*args, "--dsn", dsn)
        assert status == 2, args
        assert err.startswith(first), err
        assert "Traceback" not in err
        assert out == ""
    count = db.execute("SELECT count(*) FROM pushsync.outbox").fetchone()
    assert count == (0,)
