"""Devices install pushsync without the server extras: the CLI and listener stay light."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import pushsync.cli, pushsync.listener, pushsync.listener.limits
import pushsync.listener.runtime, pushsync.listener.channels
import pushsync.listener.localdb, pushsync.listener.sync, pushsync.listener.sync_client
pushsync.cli.build_parser().parse_args(["device", "list"])
pushsync.cli.build_parser().parse_args(["listen", "listener.yaml"])
heavy = sorted({"psycopg", "sqlglot", "jinja2"} & {m.split(".")[0] for m in sys.modules})
print(",".join(heavy))
"""


def test_cli_and_listener_import_no_server_packages() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
