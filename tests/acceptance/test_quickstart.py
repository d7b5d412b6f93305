"""The README's quickstart, command by command as written, on a fresh database.

The shell lines of the "Quickstart" section run in order in a folder holding
``examples/``, with ``truck-bo.yaml`` as the README shows it. What a test
cannot do as written it does to the same effect, and only that:

* ``. .venv/bin/activate`` — ``pushsync`` is this checkout's command already;
* ``createdb fleet`` — the test's own fresh database stands in for ``fleet``;
* ``psql "$PUSHSYNC_DSN" -f FILE`` / ``-c SQL`` and ``sqlite3 FILE SQL`` — the
  same SQL through psycopg and Python's sqlite3 (the clients may not be installed);
* port 2439 — a free port, in the commands and in ``truck-bo.yaml`` alike.

It ends where the README does: Bo's local database has the detour.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
from functools import partial
from pathlib import Path

import psycopg

from tests.support.cli import clean_env, executable
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> tuple[list[str], str]:
    """The shell lines and the device config of the README's quickstart."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    lines = [
        line for kind, text in blocks if kind == "sh" for line in text.splitlines() if line.strip()
    ]
    (config,) = [text for kind, text in blocks if kind == "yaml"]
    return lines, config


def says(log: Path, text: str) -> bool:
    return text in log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_readme_quickstart_ends_with_the_detour_on_bos_device(
    db: psycopg.Connection, dsn: str, tmp_path: Path
) -> None:
    lines, config = quickstart()
    port = str(free_port())
    shutil.copytree(ROOT / "examples" / "trucking", tmp_path / "examples" / "trucking")
    (tmp_path / "truck-bo.yaml").write_text(config.replace("2439", port), encoding="utf-8")
    env = clean_env()
    background: list[subprocess.Popen[bytes]] = []
    answers: list[list[tuple[object, ...]]] = []
    try:
        for number, line in enumerate(lines, 1):
            argv = shlex.split(line.replace("2439", port), comments=True)
            detached = argv[-1] == "&"
            argv = [arg.replace("$PUSHSYNC_DSN", env.get("PUSHSYNC_DSN", "")) for arg in argv]
            argv = argv[:-1] if detached else argv
            program, args = argv[0], argv[1:]
            if program == ".":  # activating the venv: pushsync is on hand already
                continue
            if program == "createdb":  # the test's fresh database plays `fleet`
                continue
            if program == "export":
                name, _, value = args[0].partition("=")
                env[name] = dsn if name == "PUSHSYNC_DSN" else value
                continue
            if program == "psql":
                flag, what = args[1], args[2]
                db.execute((tmp_path / what).read_text(encoding="utf-8") if flag == "-f" else what)
                continue
            if program == "sqlite3":
                with sqlite3.connect(tmp_path / args[0]) as local:
                    query = args[1]

                    def answered(local: sqlite3.Connection = local, query: str = query) -> bool:
                        rows = local.execute(query).fetchall()
                        answers.append(rows)
                        return any(row[1] for row in rows)

                    until(answered, "the detour in Bo's local database")
                continue
            assert program == "pushsync", f"README quickstart line {number}: {line}"
            if detached:
                log = tmp_path / f"line-{number}.log"
                with log.open("wb") as out:
                    background.append(
                        subprocess.Popen(
                            [*executable(), *args],
                            cwd=tmp_path,
                            env=env,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                        )
                    )
                if args[0] == "dispatch":
                    until(partial(says, log, "SYNC gateway on"), "the dispatcher", logs=[log])
                continue
            done = subprocess.run(
                [*executable(), *args],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            assert "Traceback" not in done.stderr
    finally:
        for process in reversed(background):
            process.terminate()
            process.wait(30)
    assert answers[-1] == [("south", "avoid location 100 (bridge closed)")]
    assert [p.returncode for p in background] == [0, 0]
