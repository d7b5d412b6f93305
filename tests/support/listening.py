"""A device's listener in this process, set up to record every action it runs.

:func:`write_config` writes a listener config for :data:`DEVICE` whose one
handler appends each run to ``runs.jsonl``; :func:`runs` reads that file back;
:func:`listening` runs the listener for a block.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pushsync.listener.config import load_config
from pushsync.listener.runtime import Listener
from pushsync.wire.addresses import Address
from tests.support.dispatching import DEVICE, SECRET, WAIT
from tests.support.keys import write_key

SCRIPT = """\
import json, pathlib, sys
out = pathlib.Path(__file__).with_name("runs.jsonl")
with out.open("a", encoding="utf-8") as f:
    f.write(json.dumps({"request_id": sys.argv[1], "content": sys.argv[2]}) + "\\n")
"""
"""The ``run`` action's program: append its request id and content to ``runs.jsonl``."""

ARGV_RECORDER = """\
import json, sys
with open(sys.argv[1], "a", encoding="utf-8") as out:
    out.write(json.dumps(sys.argv[2:]) + "\\n")
"""
"""A ``run`` action's program: append its other arguments, as a JSON list, to the file
named by its first argument."""


def write_config(
    directory: Path, server: Address, *, channel: str = "sync", extra: str = "", udp: bool = False
) -> Path:
    """``listener.yaml`` in ``directory``: one channel to ``server``, one recording handler."""
    script = directory / "record.py"
    script.write_text(SCRIPT, encoding="utf-8")
    write_key(directory / "device.key", SECRET)
    argv = [sys.executable, str(script), "$request_id", "$content"]
    udp_line = '  udp: {bind: "127.0.0.1:0"}\n' if udp else ""
    path = directory / "listener.yaml"
    path.write_text(
        f"""\
device: {DEVICE}
secret_file: device.key
state_dir: state
channels:
  {channel}: {{server: "{server}"{extra}}}
{udp_line}handlers:
  - name: record
    subject: sync
    action: {{run: {json.dumps(argv)}, timeout: 10s}}
""",
        encoding="utf-8",
    )
    return path


def runs(directory: Path) -> list[dict[str, Any]]:
    """The runs the recording handler wrote, oldest first."""
    out = directory / "runs.jsonl"
    if not out.exists():
        return []
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


@asynccontextmanager
async def listening(config_path: Path) -> AsyncIterator[Listener]:
    """The listener of ``config_path``, started, for the block; stopped (bounded) after."""
    listener = Listener(load_config(config_path))
    stop = asyncio.Event()
    task = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.started.wait(), WAIT)
        yield listener
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
