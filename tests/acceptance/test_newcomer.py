"""A newcomer's first mistakes, through the real CLI: one located line and exit 2, no traceback.

Running a server command before ``pushsync migrate``, piping a listing into
``head``, a listener-only install, a malformed DSN or address, a global option
after the command, a boolean variable that says neither yes nor no.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from pushsync import schema
from tests.support.cli import Run, clean_env, executable

MIGRATE = "run `pushsync migrate`"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trucking"


def refused(result: subprocess.CompletedProcess[str], first_line: str, status: int = 2) -> None:
    """Exit ``status``, ``first_line`` first on stderr, and no traceback anywhere."""
    assert result.returncode == status, result.stderr
    assert result.stderr.splitlines()[0] == first_line
    assert "Traceback" not in result.stdout + result.stderr


@pytest.fixture
def bare_dsn(db: psycopg.Connection) -> Iterator[str]:
    """A fresh database on the test server without the pushsync schema."""
    name = f"bare_{uuid.uuid4().hex[:12]}"
    db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    info = db.info
    yield f"host={info.host} port={info.port} user={info.user} dbname={name}"
    db.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


# --- a server command before `pushsync migrate` -----------------------------------

SCHEMA_COMMANDS = [
    ("status",),
    ("status", "--json"),
    ("device", "list"),
    ("device", "list", "--json"),
    ("device", "add", "truck-1"),
    ("device", "grant", "truck-1", "driver"),
    ("device", "revoke", "truck-1", "driver"),
    ("device", "disable", "truck-1"),
    ("device", "enable", "truck-1"),
    ("device", "remove", "truck-1"),
    ("device", "rotate-secret", "truck-1"),
    ("device", "set-address", "truck-1", "--udp", "192.0.2.7:5001"),
    ("send", "truck-1", "hello"),
    ("dispatch", "--sync-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0"),
]


@pytest.mark.parametrize("command", SCHEMA_COMMANDS, ids=" ".join)
def test_a_command_before_migrate_says_to_migrate(
    pushsync: Run, bare_dsn: str, command: tuple[str, ...]
) -> None:
    result = pushsync(*command, "--dsn", bare_dsn)
    refused(result, f"pushsync: the pushsync schema is missing: {MIGRATE}")
    assert result.stdout == ""


def test_an_older_schema_names_both_versions(pushsync: Run, bare_dsn: str) -> None:
    first = schema.migrations()[0]
    with psycopg.connect(bare_dsn, autocommit=True) as conn:
        conn.execute(first.sql)
    latest = schema.migrations()[-1].version
    for command in (("status",), ("device", "list"), ("dispatch", "--sync-listen", "off")):
        refused(
            pushsync(*command, "--dsn", bare_dsn),
            f"pushsync: the pushsync schema is at version {first.version}, "
            f"this pushsync needs {latest}: {MIGRATE}",
        )
    migrated = pushsync("migrate", "--dsn", bare_dsn)
    assert migrated.returncode == 0, migrated.stderr
    assert pushsync("status", "--dsn", bare_dsn).returncode == 0


def test_migrate_status_says_what_is_applied_and_pending_and_changes_nothing(
    pushsync: Run, bare_dsn: str, tmp_path: Path
) -> None:
    every = schema.migrations()
    bare = pushsync("migrate", "--status", "--dsn", bare_dsn)
    assert bare.returncode == 1, bare.stderr
    assert bare.stdout.splitlines() == [
        f"base schema: 0 of {len(every)} migrations applied",
        *(f"  {m.version:04d}_{m.name}  pending" for m in every),
        "rules: none applied",
        "`pushsync migrate` applies the pending migrations",
    ]
    with psycopg.connect(bare_dsn, autocommit=True) as conn:
        assert schema.applied_versions(conn) == set()  # --status changed nothing
        conn.execute(EXAMPLE.joinpath("schema.sql").read_text(encoding="utf-8"))
    rules = tmp_path / "rules.yaml"
    rules.write_text(EXAMPLE.joinpath("rules.yaml").read_text(encoding="utf-8"))
    assert pushsync("migrate", "rules.yaml", "--dsn", bare_dsn).returncode == 0

    current = pushsync("migrate", "--status", "rules.yaml", "--dsn", bare_dsn)
    assert current.returncode == 0, current.stderr
    lines = current.stdout.splitlines()
    assert lines[0] == f"base schema: {len(every)} of {len(every)} migrations applied"
    assert lines[1].startswith("  0001_base  applied 20")
    assert lines[-2].startswith("rules: 5 rules, 0 polls applied from rules.yaml (sha256 ")
    assert lines[-1] == "rules.yaml: as applied"

    text = rules.read_text(encoding="utf-8")
    rules.write_text(text.replace("name: fleet_notice", "name: roster_notice"), encoding="utf-8")
    changed = pushsync("migrate", "--status", "rules.yaml", "--dsn", bare_dsn)
    assert changed.returncode == 1
    assert changed.stdout.splitlines()[-1].startswith("rules.yaml: differs from what was applied")
    assert changed.stdout.splitlines()[-1].endswith(
        ": adds roster_notice; removes fleet_notice; `pushsync migrate rules.yaml` applies it"
    )
    with psycopg.connect(bare_dsn) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM pushsync.rules ORDER BY 1")]
    assert "fleet_notice" in names  # --status applied nothing
    assert "roster_notice" not in names


def test_an_unreachable_database_is_still_a_failure_not_a_mistake(pushsync: Run) -> None:
    result = pushsync("status", "--dsn", "host=127.0.0.1 port=1 dbname=x connect_timeout=5")
    assert result.returncode == 1
    assert result.stderr.startswith("pushsync: database: cannot connect to ")
    assert "Traceback" not in result.stderr


# --- stdout closed early (`| head`) -------------------------------------------------


@pytest.mark.parametrize("json_flag", [(), ("--json",)], ids=["table", "json"])
def test_a_listing_piped_into_head_stops_quietly(
    db: psycopg.Connection, dsn: str, tmp_path: Path, json_flag: tuple[str, ...]
) -> None:
    # Far more than a pipe holds (64 KiB), so the writer meets the closed end.
    db.execute(
        "INSERT INTO pushsync.devices (device_id, secret) "
        "SELECT 'truck-' || i, decode(repeat('ab', 16), 'hex') FROM generate_series(1, 3000) i"
    )
    process = subprocess.Popen(
        [*executable(), "device", "list", *json_flag, "--dsn", dsn],
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    first = process.stdout.readline()
    process.stdout.close()  # what `head -1` does after its line
    stderr = process.stderr.read()
    process.stderr.close()
    assert process.wait(timeout=60) == 141  # 128 + SIGPIPE, as the shell reports `yes | head`
    assert first.startswith("[" if json_flag else "DEVICE")
    assert stderr == ""


# --- a listener-only install ------------------------------------------------------

WITHOUT_PSYCOPG = (
    "import sys; sys.modules['psycopg'] = None; "
    "from pushsync.cli import main; sys.exit(main(sys.argv[1:]))"
)


def without_psycopg(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI in an interpreter where ``import psycopg`` fails, as without the server extra."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PSYCOPG, *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [("status",), ("device", "list"), ("dispatch",), ("migrate",)],
    ids=" ".join,
)
def test_a_server_command_without_the_server_extra_says_what_to_install(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    result = without_psycopg(*command, "--dsn", "dbname=x", cwd=tmp_path)
    refused(
        result,
        f"pushsync: {' '.join(command)} needs psycopg, which is not installed: "
        "pip install 'pushsync[server]'",
    )


def test_a_device_command_without_the_server_extra_is_unaffected(tmp_path: Path) -> None:
    result = without_psycopg("sync", "missing.yaml", cwd=tmp_path)
    assert "psycopg" not in result.stderr
    assert "Traceback" not in result.stderr


# --- input mistakes: exit 2, naming the option ------------------------------------


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("host=a b", 'missing "=" after "b" in connection info string'),
        ("hots=localhost", 'invalid connection option "hots"'),
        (
            "postgresql://127.0.0.1:notaport/x",
            'invalid integer value "notaport" for connection option "port"',
        ),
        ("host=127.0.0.1 sslmode=maybe", 'invalid sslmode value: "maybe"'),
    ],
)
def test_a_malformed_dsn_is_a_mistake_in_dsn(pushsync: Run, dsn: str, message: str) -> None:
    for command in (("status",), ("device", "list"), ("migrate",), ("dispatch",)):
        refused(pushsync(*command, "--dsn", dsn), f"pushsync: --dsn: {message}")
    refused(pushsync("status", env={"PUSHSYNC_DSN": dsn}), f"pushsync: PUSHSYNC_DSN: {message}")


ADDRESS = "expected HOST:PORT (IPv6 as [::1]:2439), port 0 to 65535"


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--sync-listen", "localhost"),
        ("--metrics", "nope"),
        ("--udp-listen", "192.0.2.7"),
        ("--sync-listen", "[::1]:70000"),
    ],
)
def test_a_bad_address_names_its_option(pushsync: Run, dsn: str, flag: str, value: str) -> None:
    refused(
        pushsync("dispatch", "--dsn", dsn, flag, value),
        f"pushsync: {flag}: bad address {value!r}: {ADDRESS}",
    )
    variable = "PUSHSYNC_" + flag.lstrip("-").replace("-", "_").upper()
    refused(
        pushsync("dispatch", "--dsn", dsn, env={variable: value}),
        f"pushsync: {variable}: bad address {value!r}: {ADDRESS}",
    )


def test_an_address_in_use_names_its_option(pushsync: Run, dsn: str) -> None:
    with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        udp.bind(("127.0.0.1", 0))
        taken = {
            "tcp": f"127.0.0.1:{tcp.getsockname()[1]}",
            "udp": f"127.0.0.1:{udp.getsockname()[1]}",
        }
        free = ("--sync-listen", "127.0.0.1:0", "--udp-listen", "127.0.0.1:0")
        for flag, address in (
            ("--sync-listen", taken["tcp"]),
            ("--metrics", taken["tcp"]),
            ("--udp-listen", taken["udp"]),
        ):
            refused(
                pushsync("dispatch", "--dsn", dsn, *free, flag, address),
                f"pushsync: {flag}: cannot listen on {address}: Address already in use",
            )


def test_a_bad_device_address_names_its_option(pushsync: Run, dsn: str) -> None:
    refused(
        pushsync("device", "add", "truck-1", "--dsn", dsn, "--udp", "localhost"),
        "pushsync: --udp: bad UDP address 'localhost': expected HOST:PORT "
        "(IPv6 as [::1]:5001), e.g. 192.0.2.7:5001",
    )
    refused(
        pushsync("device", "add", "truck-1", "--dsn", dsn, "--email", "nobody"),
        "pushsync: --email: bad email address 'nobody'",
    )
    refused(
        pushsync("device", "add", "truck-1", "--dsn", dsn, env={"PUSHSYNC_PUBLICATION": "Driver"}),
        "pushsync: PUSHSYNC_PUBLICATION: bad publication name 'Driver': use lower-case letters, "
        "digits and _, starting with a letter, at most 63 characters",
    )


# --- global options after the command; boolean variables --------------------------


def test_global_options_go_after_the_command_too(pushsync: Run, dsn: str) -> None:
    warned = pushsync("device", "add", "truck-1", "--publication", "nope", "--dsn", dsn)
    assert warned.returncode == 0, warned.stderr
    assert "no applied rules file defines publication nope" in warned.stderr
    for args in (
        ("device", "grant", "truck-1", "nope", "--dsn", dsn, "--log-level", "error"),
        ("device", "--log-level", "error", "grant", "truck-1", "nope", "--dsn", dsn),
        ("--log-level", "error", "device", "grant", "truck-1", "nope", "--dsn", dsn),
    ):
        quiet = pushsync(*args)
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == "", args
    as_json = pushsync("device", "grant", "truck-1", "nope", "--dsn", dsn, "--log-format", "json")
    assert as_json.returncode == 0
    assert as_json.stderr.startswith('{"ts": ')
    # The top-level option and its variable still hold when the command gives none.
    quiet = pushsync(
        "device", "grant", "truck-1", "nope", "--dsn", dsn, env={"PUSHSYNC_LOG_LEVEL": "error"}
    )
    assert quiet.stderr == ""
    loud = pushsync("status", "--dsn", dsn, "--log-level", "loud")
    assert loud.returncode == 2
    assert loud.stderr.splitlines()[-1] == (
        "pushsync status: error: argument --log-level: invalid choice: 'loud' "
        "(choose from 'debug', 'info', 'warning', 'error')"
    )


@pytest.mark.parametrize(
    ("variable", "command"),
    [
        ("PUSHSYNC_JSON", ("status",)),
        ("PUSHSYNC_JSON", ("device", "list")),
        ("PUSHSYNC_MESSAGE_LOG", ("listen", "missing.yaml")),
    ],
)
def test_a_boolean_variable_that_is_neither_is_an_error(
    pushsync: Run, dsn: str, variable: str, command: tuple[str, ...]
) -> None:
    args = (*command, "--dsn", dsn) if command[0] != "listen" else command
    refused(
        pushsync(*args, env={variable: "maybe"}),
        f"pushsync: {variable}='maybe': expected 1, true, yes or on; 0, false, no, off or nothing",
    )


def test_boolean_variables_read_the_usual_words(pushsync: Run, dsn: str) -> None:
    for word in ("1", "TRUE", "yes", "On"):
        result = pushsync("status", "--dsn", dsn, env={"PUSHSYNC_JSON": word})
        assert result.returncode == 0, (word, result.stderr)
        assert result.stdout.startswith("{"), word
    for word in ("0", "false", "No", "off", ""):
        result = pushsync("status", "--dsn", dsn, env={"PUSHSYNC_JSON": word})
        assert result.returncode == 0, (word, result.stderr)
        assert result.stdout.startswith("outbox:"), word


def test_a_bad_variable_of_another_command_does_not_matter(pushsync: Run, tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("version: 2\n")
    result = pushsync("check", "rules.yaml", env={"PUSHSYNC_JSON": "maybe"})
    refused(result, "rules.yaml:1:10: unsupported version 2: use 1")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_output_to_a_full_disk_is_said_once(tmp_path: Path) -> None:
    rules = Path(__file__).resolve().parents[2] / "examples" / "trucking" / "rules.yaml"
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [*executable(), "compile", str(rules)],
            cwd=tmp_path,
            env=clean_env(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 1
    assert result.stderr == "pushsync: cannot write the output: No space left on device\n"


def test_a_listener_channel_that_cannot_bind_names_the_channel_and_address(
    pushsync: Run, tmp_path: Path
) -> None:
    assert pushsync("init", ".", "--device", "d1").returncode == 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        config = tmp_path / "listener.yaml"
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace("channels:\n", f'channels:\n  udp: {{bind: "{address}"}}\n'))
        result = pushsync("listen", "listener.yaml")
    refused(
        result,
        f"cannot start the listener: udp channel: cannot bind {address}: Address already in use",
        status=1,
    )
