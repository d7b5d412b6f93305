"""The listener config: the DESIGN example loads, and every mistake gets one located line."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from pushsync.errors import RulesError, UsageError
from pushsync.listener import config
from pushsync.listener.config import (
    RunAction,
    ShutdownAction,
    SocketAction,
    StartAction,
    SyncAction,
    Template,
    TemplateError,
    Variable,
    load_config,
    loads_config,
    parse_template,
    read_secret_file,
)
from pushsync.source import parse_duration
from pushsync.wire.addresses import Address, parse_address

DESIGN_EXAMPLE = """\
device: truck-17
secret_file: truck-17.key
state_dir: ./state                 # dedupe store, sync state, local database
channels:                          # any subset
  sync: {server: "127.0.0.1:2439"} # persistent connection: pushes, confirmations, tracking
  udp:  {bind: "0.0.0.0:5001"}
  maildir: {path: ./Maildir}       # where SMTP-delivered messages land
  poll: {server: "127.0.0.1:2439", every: 60s}   # light-weight polling
handlers:                          # first match wins unless continue: true
  - name: disruption
    subject: sync                  # exact, like MobiLink dblsn filters
    message_start: "[sync]disruption"
    action: sync                   # built-in sync client
    altaction: {run: [logger, "sync failed for $request_id"]}
  - name: route-changed
    subject_matches: "^route"      # regex variants: *_matches
    action: {run: [notify-send, "Route changed", "$content"]}   # waits; argv, never a shell
  - name: beacon
    sender: pushsync
    action: {start: [./beacon.sh, "$content"]}                  # background
    continue: true
"""

GOOD = """\
device: d1
secret_file: d1.key
channels:
  udp: {bind: "0.0.0.0:5001"}
handlers:
  - name: h
    action: sync
"""


def load(text: str) -> config.ListenerConfig:
    return loads_config(textwrap.dedent(text), "/etc/pushsync/listener.yaml")


def problems_of(text: str) -> list[str]:
    with pytest.raises(RulesError) as caught:
        loads_config(text, "listener.yaml")
    return [str(p) for p in caught.value]


def only_problem(text: str) -> str:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


def with_handler(body: str) -> str:
    """GOOD with its handler replaced by ``body`` (handler lines, indented 4)."""
    return GOOD.replace("  - name: h\n    action: sync\n", body)


# --------------------------------------------------------------------------- the example


def test_design_example_loads() -> None:
    loaded = loads_config(DESIGN_EXAMPLE, "/etc/pushsync/listener.yaml")
    base = Path("/etc/pushsync")
    assert loaded.device == "truck-17"
    assert loaded.secret_file == base / "truck-17.key"
    assert loaded.state_dir == base / "state"
    channels = loaded.channels
    assert channels.sync is not None
    assert channels.sync.server == Address(host="127.0.0.1", port=2439)
    assert not channels.sync.tls
    assert channels.udp is not None
    assert channels.udp.bind == Address(host="0.0.0.0", port=5001)  # noqa: S104  parsed, not bound
    assert channels.maildir is not None
    assert channels.maildir.path == base / "Maildir"
    assert channels.poll is not None
    assert channels.poll.every == timedelta(seconds=60)
    assert channels.imap is None
    assert [h.name for h in loaded.handlers] == ["disruption", "route-changed", "beacon"]
    disruption, route, beacon = loaded.handlers
    assert disruption.subject == "sync"
    assert disruption.message_start == "[sync]disruption"
    assert disruption.action == SyncAction(timeout=timedelta(seconds=60))
    assert isinstance(disruption.altaction, RunAction)
    assert [t.text for t in disruption.altaction.argv] == ["logger", "sync failed for $request_id"]
    assert route.subject_matches is not None
    assert route.subject_matches.pattern == "^route"
    assert isinstance(route.action, RunAction)
    assert route.action.timeout == timedelta(seconds=60)
    assert isinstance(beacon.action, StartAction)
    assert beacon.action.timeout is None
    assert beacon.continue_
    assert beacon.confirm
    assert not disruption.continue_


def test_load_config_reads_the_file_and_resolves_paths_next_to_it(tmp_path: Path) -> None:
    where = tmp_path / "listener.yaml"
    where.write_text(GOOD, encoding="utf-8")
    loaded = load_config(where)
    assert loaded.path == where
    assert loaded.secret_file == tmp_path / "d1.key"
    assert loaded.state_dir == tmp_path / "state"  # the default


def test_load_config_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read the listener config"):
        load_config(tmp_path / "nope.yaml")


def test_absolute_paths_stay_absolute() -> None:
    loaded = load(GOOD.replace("secret_file: d1.key", "secret_file: /var/lib/d1.key"))
    assert loaded.secret_file == Path("/var/lib/d1.key")


def test_read_secret_file(tmp_path: Path) -> None:
    (tmp_path / "d1.key").write_text("ab" * 32 + "\n", encoding="ascii")
    (tmp_path / "d1.key").chmod(0o600)
    loaded = loads_config(GOOD, str(tmp_path / "listener.yaml"))
    assert read_secret_file(loaded) == bytes.fromhex("ab" * 32)


def test_read_secret_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "d1.key").write_text("not hex\n", encoding="ascii")
    (tmp_path / "d1.key").chmod(0o600)
    loaded = loads_config(GOOD, str(tmp_path / "listener.yaml"))
    with pytest.raises(UsageError, match=re.escape(f"{tmp_path / 'd1.key'}: key file:")):
        read_secret_file(loaded)
    (tmp_path / "d1.key").unlink()
    with pytest.raises(UsageError, match="cannot read the key file"):
        read_secret_file(loaded)


# --------------------------------------------------------------------------- defaults


def test_defaults_of_channels_and_actions() -> None:
    loaded = load(
        """\
        device: d1
        secret_file: d1.key
        channels:
          sync: {server: "[::1]:2439", tls: true, ca_file: ca.pem}
          imap: {host: mail.example.com, user: truck, password_file: imap.pw}
          poll: {server: "hub.example.com:2439", tls: true}
        handlers:
          - name: everything
            action: {socket: {port: 7000, send: "$message"}}
            confirm: false
          - name: timed
            action: {sync: true, timeout: 10m}
          - name: stop
            subject: stop
            action: shutdown
          - name: started
            action: {start: [prog], timeout: 1h30m}
        """
    )
    channels = loaded.channels
    assert channels.sync is not None
    assert channels.sync.tls
    assert channels.sync.server == Address(host="::1", port=2439)
    assert str(channels.sync.server) == "[::1]:2439"
    assert channels.sync.ca_file == Path("/etc/pushsync/ca.pem")
    imap = channels.imap
    assert imap is not None
    assert (imap.port, imap.folder, imap.every) == (993, "INBOX", timedelta(seconds=30))
    assert channels.sync.heartbeat == timedelta(seconds=30)
    assert channels.poll is not None
    assert channels.poll.every == timedelta(seconds=60)
    assert channels.poll.tls
    assert channels.poll.ca_file is None
    everything, timed, stop, started = loaded.handlers
    assert everything.action == SocketAction(
        host="localhost",
        port=7000,
        send=Template(text="$message", parts=(Variable("message"),)),
        reply=False,
        timeout=timedelta(seconds=60),
    )
    assert not everything.confirm
    assert timed.action == SyncAction(timeout=timedelta(minutes=10))
    assert stop.action == ShutdownAction()
    assert started.action == StartAction(
        argv=(Template(text="prog", parts=("prog",)),), timeout=timedelta(hours=1, minutes=30)
    )


def test_filters_are_text_as_written() -> None:
    loaded = load(
        with_handler(
            "  - name: h\n    subject: yes\n    content: 0017\n    priority: high\n"
            "    action: sync\n"
        )
    )
    handler = loaded.handlers[0]
    assert (handler.subject, handler.content, handler.priority) == ("yes", "0017", "high")


def test_argv_numbers_are_taken_as_written() -> None:
    loaded = load(with_handler("  - name: h\n    action: {run: [sleep, 5, 1.50]}\n"))
    action = loaded.handlers[0].action
    assert isinstance(action, RunAction)
    assert [t.text for t in action.argv] == ["sleep", "5", "1.50"]


def test_program_may_hold_a_literal_dollar() -> None:
    loaded = load(with_handler("  - name: h\n    action: {run: [./a$$b]}\n"))
    action = loaded.handlers[0].action
    assert isinstance(action, RunAction)
    assert action.argv[0].parts == ("./a$b",)


# --------------------------------------------------------------------------- errors

# (case id, config text, the whole expected message)
CASES = [
    (
        "invalid yaml",
        "device: d1\nhandlers:\n  - name: h\n   action: sync\n",
        "listener.yaml:4:4: invalid YAML: expected <block end>, but found '<block mapping start>'",
    ),
    (
        "not a mapping",
        "- device\n",
        "listener.yaml:1:1: the listener config must be a mapping",
    ),
    (
        "duplicate key",
        GOOD + "device: d2\n",
        "listener.yaml:8:1: duplicate key 'device' (first given at line 1)",
    ),
    (
        "unknown top-level key with suggestion",
        GOOD + "handler: []\n",
        "listener.yaml:8:1: unknown key 'handler' (did you mean 'handlers'?)",
    ),
    (
        "keys are taken as written",
        GOOD + "on: true\n",
        "listener.yaml:8:1: unknown key 'on'",
    ),
    (
        "unknown handler key with suggestion",
        with_handler("  - name: h\n    subjet: sync\n    action: sync\n"),
        "listener.yaml:7:5: handler h: unknown key 'subjet' (did you mean 'subject'?)",
    ),
    (
        "unknown action key with suggestion",
        with_handler("  - name: h\n    action: {run: [a], timout: 5s}\n"),
        "listener.yaml:7:24: handler h: unknown key 'timout' (did you mean 'timeout'?)",
    ),
    (
        "unknown channel key with suggestion",
        GOOD.replace("udp: {bind:", "udp: {bnid:"),
        "listener.yaml:4:9: channels.udp: unknown key 'bnid' (did you mean 'bind'?)",
    ),
    (
        "unknown channel with suggestion",
        GOOD.replace("udp: {", "ucp: {"),
        "listener.yaml:4:3: unknown key 'ucp' (did you mean 'udp'?)",
    ),
    (
        "missing device",
        GOOD.replace("device: d1\n", ""),
        "listener.yaml:1:1: missing required key 'device'",
    ),
    (
        "missing action",
        with_handler("  - name: h\n    subject: sync\n"),
        "listener.yaml:6:5: handler h: missing required key 'action'",
    ),
    (
        "missing name",
        with_handler("  - action: sync\n"),
        "listener.yaml:6:5: handler #1: missing required key 'name'",
    ),
    (
        "argv given as a string",
        with_handler("  - name: h\n    action: {run: notify-send hello}\n"),
        "listener.yaml:7:19: handler h: action.run must be a list of arguments, e.g. "
        '[program, "$content"]: no shell is used, so a command line in one string cannot '
        "be split",
    ),
    (
        "command line as an action",
        with_handler("  - name: h\n    action: notify-send hello\n"),
        "listener.yaml:7:13: handler h: action must be sync, shutdown or a mapping with run, "
        "start or socket, not 'notify-send hello' (to run a command write action: "
        "{run: [program, argument, ...]})",
    ),
    (
        "unknown named action",
        with_handler("  - name: h\n    action: snyc\n"),
        "listener.yaml:7:13: handler h: action must be sync, shutdown or a mapping with run, "
        "start or socket, not 'snyc' (did you mean 'sync'?)",
    ),
    (
        "empty argv",
        with_handler("  - name: h\n    action: {start: []}\n"),
        "listener.yaml:7:21: handler h: action.start must name at least the program to run",
    ),
    (
        "argv element not text",
        with_handler("  - name: h\n    action: {run: [a, [b]]}\n"),
        "listener.yaml:7:23: handler h: action.run must be text",
    ),
    (
        "variable as the program",
        with_handler("  - name: h\n    action: {run: [$content]}\n"),
        "listener.yaml:7:20: handler h: action.run: the program is written literally, without "
        "variables: a message must not choose what runs",
    ),
    (
        "two action kinds",
        with_handler("  - name: h\n    action: {run: [a], start: [b]}\n"),
        "listener.yaml:7:13: handler h: action must name exactly one of sync, run, start, "
        "socket; found run, start",
    ),
    (
        "sync false",
        with_handler("  - name: h\n    action: {sync: false}\n"),
        "listener.yaml:7:20: handler h: action.sync must be true: it names the action",
    ),
    (
        "socket without port",
        with_handler("  - name: h\n    action: {socket: {send: hi}}\n"),
        "listener.yaml:7:22: handler h: action.socket: missing required key 'port'",
    ),
    (
        "socket with a bad port",
        with_handler("  - name: h\n    action: {socket: {port: 70000, send: hi}}\n"),
        "listener.yaml:7:29: handler h: action.socket.port must be a port number from 1 to 65535",
    ),
    (
        "bad regex",
        with_handler('  - name: h\n    subject_matches: "route("\n    action: sync\n'),
        "listener.yaml:7:28: handler h: subject_matches: bad regular expression 'route(': "
        "missing ), unterminated subpattern",
    ),
    (
        "bad duration",
        with_handler("  - name: h\n    action: {run: [a], timeout: 5 minutes}\n"),
        "listener.yaml:7:33: handler h: bad duration '5 minutes' for action.timeout: expected "
        "a number and a unit, e.g. 250ms, 30s, 5m, 1h30m",
    ),
    (
        "bare number as duration",
        GOOD.replace('udp: {bind: "0.0.0.0:5001"}', 'poll: {server: "h:1", every: 30}'),
        "listener.yaml:4:32: channels.poll: bad duration '30' for every: expected a number "
        "and a unit, e.g. 250ms, 30s, 5m, 1h30m",
    ),
    (
        "no channels",
        GOOD.replace('  udp: {bind: "0.0.0.0:5001"}\n', "  {}\n"),
        "listener.yaml:4:3: channels must name at least one of "
        "sync, udp, maildir, imap, poll, mqtt",
    ),
    (
        "channel without settings",
        GOOD.replace('udp: {bind: "0.0.0.0:5001"}', "udp:"),
        "listener.yaml:4:7: channels.udp: channels.udp must be a mapping",
    ),
    (
        "no handlers",
        GOOD.replace("  - name: h\n    action: sync\n", "  []\n"),
        "listener.yaml:6:3: handlers must list at least one handler",
    ),
    (
        "duplicate handler name",
        GOOD + "  - name: h\n    action: shutdown\n",
        "listener.yaml:8:11: handler h: duplicate name 'h' (first used at line 6)",
    ),
    (
        "bad handler name",
        with_handler("  - name: my handler\n    action: sync\n"),
        "listener.yaml:6:11: handler #1: bad name 'my handler': use letters, digits, '.', '_' "
        "and '-', starting with a letter or digit, at most 64 characters",
    ),
    (
        "bad device id",
        GOOD.replace("device: d1", "device: truck 17"),
        "listener.yaml:1:9: bad device id 'truck 17': use letters, digits, '.', '_' and '-', "
        "starting with a letter or digit, at most 64 characters",
    ),
    (
        "device id too long",
        GOOD.replace("device: d1", "device: " + "d" * 65),
        f"listener.yaml:1:9: bad device id '{'d' * 65}': use letters, digits, '.', '_' and "
        "'-', starting with a letter or digit, at most 64 characters",
    ),
    (
        "bad host:port",
        GOOD.replace("0.0.0.0:5001", "0.0.0.0"),  # noqa: S104  parsed, not bound
        "listener.yaml:4:15: channels.udp: bad address '0.0.0.0' for bind: expected host:port "
        "with a port from 0 to 65535 (IPv6 as [::1]:2439)",
    ),
    (
        "port out of range",
        GOOD.replace("0.0.0.0:5001", "0.0.0.0:65536"),
        "listener.yaml:4:15: channels.udp: bad address '0.0.0.0:65536' for bind: expected "
        "host:port with a port from 0 to 65535 (IPv6 as [::1]:2439)",
    ),
    (
        "ipv6 without brackets",
        GOOD.replace("0.0.0.0:5001", "::1:5001"),
        "listener.yaml:4:15: channels.udp: bad address '::1:5001' for bind: expected host:port "
        "with a port from 0 to 65535 (IPv6 as [::1]:2439)",
    ),
    (
        "ca_file without tls",
        GOOD.replace('udp: {bind: "0.0.0.0:5001"}', 'sync: {server: "h:1", ca_file: ca.pem}'),
        "listener.yaml:4:34: channels.sync: ca_file is used only with tls: true",
    ),
    (
        "poll ca_file without tls",
        GOOD.replace('udp: {bind: "0.0.0.0:5001"}', 'poll: {server: "h:1", ca_file: ca.pem}'),
        "listener.yaml:4:34: channels.poll: ca_file is used only with tls: true",
    ),
    (
        "bad heartbeat",
        GOOD.replace('udp: {bind: "0.0.0.0:5001"}', 'sync: {server: "h:1", heartbeat: 0s}'),
        "listener.yaml:4:36: channels.sync: bad duration '0s' for heartbeat: expected a number "
        "and a unit, e.g. 250ms, 30s, 5m, 1h30m",
    ),
    (
        "bad priority",
        with_handler("  - name: h\n    priority: hihg\n    action: sync\n"),
        "listener.yaml:7:15: handler h: priority must be one of low, normal, high, not 'hihg' "
        "(did you mean 'high'?)",
    ),
    (
        "continue not a boolean",
        with_handler("  - name: h\n    action: sync\n    continue: 1\n"),
        "listener.yaml:8:15: handler h: continue must be true or false, not '1'",
    ),
    (
        "empty filter",
        with_handler("  - name: h\n    subject:\n    action: sync\n"),
        "listener.yaml:7:13: handler h: subject needs a value (write '' for empty text)",
    ),
    (
        "unknown variable",
        with_handler('  - name: h\n    action: {run: [a, "x $foo"]}\n'),
        "listener.yaml:7:26: handler h: action.run: unknown variable $foo",
    ),
    (
        "unknown variable with suggestion",
        with_handler('  - name: h\n    action: {run: [a, "$sujbect"]}\n'),
        "listener.yaml:7:24: handler h: action.run: unknown variable $sujbect "
        "(did you mean $subject?)",
    ),
    (
        "variable run into text",
        with_handler('  - name: h\n    action: {run: [a, "$subjectx"]}\n'),
        "listener.yaml:7:24: handler h: action.run: unknown variable $subjectx: write "
        "${subject}x for text right after $subject",
    ),
    (
        "stray dollar",
        with_handler('  - name: h\n    action: {run: [a, "costs 5$"]}\n'),
        "listener.yaml:7:31: handler h: action.run: a $ must start a variable: write $$ for a "
        "dollar sign",
    ),
    (
        "unclosed brace",
        with_handler('  - name: h\n    action: {run: [a, "${subject"]}\n'),
        "listener.yaml:7:24: handler h: action.run: unclosed ${: write ${name}, or $$ for a "
        "dollar sign",
    ),
    (
        "message_end without message_start filter",
        with_handler("  - name: h\n    action: {socket: {port: 1, send: $message_end}}\n"),
        "listener.yaml:7:38: handler h: action.socket.send: $message_end needs a message_start "
        "filter on this handler",
    ),
    (
        "unknown variable in altaction",
        with_handler("  - name: h\n    action: sync\n    altaction: {start: [b, $remote_id]}\n"),
        "listener.yaml:8:28: handler h: altaction.start: unknown variable $remote_id "
        "(did you mean $request_id?)",
    ),
    (
        "merge key",
        GOOD + "x: &a {b: 1}\ny:\n  <<: *a\n",
        "listener.yaml:10:3: merge keys (<<) are not supported",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_is_located(text: str, expected: str) -> None:
    assert only_problem(text) == expected


def test_every_problem_is_reported_in_order() -> None:
    text = GOOD.replace("device: d1", "device: 'a b'") + (
        "  - name: h2\n    action: {run: x}\n  - name: h3\n    subject_matches: '['\n"
        "    action: sync\n"
    )
    found = problems_of(text)
    assert [p.split(": ", 1)[0] for p in found] == [
        "listener.yaml:1:9",
        "listener.yaml:9:19",
        "listener.yaml:11:23",
    ]


def test_alias_bomb_is_refused() -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 10)]
    message = only_problem("\n".join(lines) + "\n")
    assert "more than 100000 values (do aliases expand too far?)" in message


def test_deep_nesting_is_a_located_error() -> None:
    message = only_problem("a: " + "[" * 5000 + "]" * 5000 + "\n")
    assert message.startswith("listener.yaml:1:")
    assert "invalid YAML" in message


def test_empty_file_names_what_is_missing() -> None:
    assert problems_of("") == [
        "listener.yaml:1:1: missing required key 'device'",
        "listener.yaml:1:1: missing required key 'secret_file'",
        "listener.yaml:1:1: missing required key 'channels'",
        "listener.yaml:1:1: missing required key 'handlers'",
    ]


# --------------------------------------------------------------------------- small parsers

DURATIONS = [
    ("30s", timedelta(seconds=30)),
    ("5m", timedelta(minutes=5)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("250ms", timedelta(milliseconds=250)),
    ("2d", timedelta(days=2)),
    ("30", None),
    (30, None),
    ("", None),
    ("5 minutes", None),
    ("-5s", None),
]


@pytest.mark.parametrize(("text", "expected"), DURATIONS)
def test_parse_duration(text: object, expected: timedelta | None) -> None:
    assert parse_duration(text) == expected


ADDRESSES = [
    ("127.0.0.1:2439", Address(host="127.0.0.1", port=2439)),
    ("hub.example.com:1", Address(host="hub.example.com", port=1)),
    ("[::1]:2439", Address(host="::1", port=2439)),
    ("[fe80::1]:65535", Address(host="fe80::1", port=65535)),
    ("host:0", None),
    ("host:65536", None),
    ("host:", None),
    (":80", None),
    ("host", None),
    ("::1:80", None),
    ("[host]:80", None),
    ("[::g]:80", None),
    ("bad host:80", None),
    ("host:\uff18\uff10", None),  # full-width digits
]


@pytest.mark.parametrize(("text", "expected"), ADDRESSES)
def test_parse_address(text: str, expected: Address | None) -> None:
    assert parse_address(text) == expected


TEMPLATES = [
    ("plain", ("plain",)),
    ("", ()),
    ("$subject", (Variable("subject"),)),
    ("${subject}x", (Variable("subject"), "x")),
    ("a$$b", ("a$b",)),
    ("$$subject", ("$subject",)),
    ("$$$subject", ("$", Variable("subject"))),
    ("[$year-$month]", ("[", Variable("year"), "-", Variable("month"), "]")),
    ("$subject.$content", (Variable("subject"), ".", Variable("content"))),
]


@pytest.mark.parametrize(("text", "parts"), TEMPLATES)
def test_parse_template(text: str, parts: tuple[str | Variable, ...]) -> None:
    assert parse_template(text).parts == parts


@pytest.mark.parametrize(
    ("text", "offset"), [("x $nope", 2), ("$", 0), ("a ${b", 2), ("${}", 0), ("$1", 0)]
)
def test_parse_template_errors_say_where(text: str, offset: int) -> None:
    with pytest.raises(TemplateError) as caught:
        parse_template(text)
    assert caught.value.offset == offset


def test_listener_modules_import_no_server_packages() -> None:
    probe = (
        "import sys\n"
        "import pushsync.listener.config, pushsync.listener.handlers\n"
        "heavy = {'psycopg', 'sqlglot', 'jinja2'} & {m.split('.')[0] for m in sys.modules}\n"
        "print(','.join(sorted(heavy)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
