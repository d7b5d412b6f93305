"""Devices install pushsync without the server extras: what they run stays light.

The import contracts in pyproject.toml (``lint-imports``, run by ``make lint``)
keep ``pushsync.listener`` from importing the server side and its libraries,
and ``pushsync.wire`` from importing either side. Two things they cannot see
are checked here, each in a fresh process: the ``pushsync`` command reaches the
server side only through imports inside its functions, so ``pushsync listen``
and ``pushsync sync`` must get through it without loading psycopg, sqlglot,
jinja2 or the HTTP stack; and the wire must load the standard library and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

COMMANDS = """
import sys
import pushsync.cli
for argv in (["listen", "missing.yaml"], ["sync", "missing.yaml"]):
    assert pushsync.cli.main(argv) == 2, argv  # the command ran up to reading its config
pushsync.cli.build_parser().parse_args(["device", "list"])
assert "pushsync.listener.runtime" in sys.modules and "pushsync.listener.sync" in sys.modules
heavy = {"psycopg", "psycopg_pool", "sqlglot", "jinja2", "prometheus_client", "starlette",
         "uvicorn"} & {m.split(".")[0] for m in sys.modules}
print(",".join(sorted(heavy)))
"""

WIRE = """
import pkgutil, sys
before = set(sys.modules)
import pushsync.wire
names = [f"pushsync.wire.{m.name}" for m in pkgutil.iter_modules(pushsync.wire.__path__)]
assert "pushsync.wire.protocol" in names and len(names) >= 3, names
for name in names:
    __import__(name)
ours = {"pushsync", "pushsync.errors", "pushsync.wire", *names}
loaded = set(sys.modules) - before
assert ours <= loaded, ours - loaded
print(",".join(sorted(
    m for m in loaded - ours if m.split(".")[0] not in sys.stdlib_module_names
)))
"""


def run(probe: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=cwd
    )
    return result.stdout.strip()


def test_listen_and_sync_commands_load_no_server_library(tmp_path: Path) -> None:
    assert run(COMMANDS, tmp_path) == ""


def test_the_wire_loads_only_the_standard_library(tmp_path: Path) -> None:
    assert run(WIRE, tmp_path) == ""
