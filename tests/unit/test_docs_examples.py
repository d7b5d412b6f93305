"""The examples in README.md and docs/*.md work as written.

Every fenced code block is found and checked by what it is:

* a ```yaml rules file (top-level ``version:`` and ``rules:``, ``polls:`` or
  ``publications:``) compiles; a listener config (``device:`` and
  ``handlers:``) loads; every other ```yaml block is at least YAML;
* every ``pushsync ...`` command line in ```sh, ```bash, ```shell and
  ```console blocks parses with the real argument parser (lines with pipes,
  redirections, ``$(...)`` and the like are left out);
* the systemd units (```ini blocks with a ``[Service]`` section) carry what
  docs/operations.md says they do, and their ``ExecStart`` parses;
* ``pushsync status`` shown next to ``pushsync status --json`` is what
  ``pushsync.status.render`` prints for that JSON;
* every ``PUSHSYNC_...`` variable named anywhere is one the CLI reads;
  docs/operations.md's table of ``pushsync dispatch`` options lists exactly the
  parser's options, and the values the docs give those options (on command
  lines and in environment files) are ones the dispatcher accepts.

A block right after the HTML comment ``<!-- invalid -->`` is an example of a
mistake: it must be refused. No database is needed.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from pushsync import cli, generator, status
from pushsync.errors import RulesError
from pushsync.listener.config import load_config, read_secret_file
from tests.support.keys import write_key

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
OPERATIONS = ROOT / "docs" / "operations.md"

OPENING = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*(?P<text>.*?)\s*-->\s*$")
TOP_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):", re.MULTILINE)
SHELLS = frozenset({"sh", "bash", "shell", "console"})
SHELL_SYNTAX = ("$(", "`", "<(", ">(")
ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
ENV_MENTION = re.compile(r"\bPUSHSYNC_[A-Z0-9_]+")
HARNESS_VARIABLES = frozenset(
    {
        "PUSHSYNC_PG_BINDIR",
        "PUSHSYNC_PG_USER",
        "PUSHSYNC_UPDATE_GOLDEN",
        "PUSHSYNC_RELIABILITY_SCALE",
        "PUSHSYNC_RELIABILITY_REPORT",
        "PUSHSYNC_FUZZ_SCALE",
        "PUSHSYNC_CHROMIUM",
        "PUSHSYNC_SCREENSHOT",
    }
)
"""Variables of the test harness (docs/development.md), not of the CLI."""


# --------------------------------------------------------------------------- extraction


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block: where it starts, its language, its text, the comment before it."""

    path: Path
    line: int
    lang: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def invalid(self) -> bool:
        return self.marker == "invalid"

    def top_keys(self) -> set[str]:
        return set(TOP_KEY.findall(self.text))


def fenced_blocks(path: Path, text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order."""
    lines = text.splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = OPENING.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence, indent = opening["fence"], len(opening["indent"])
        closing = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        info = opening["info"].split()
        body: list[str] = []
        end = index + 1
        while end < len(lines) and not closing.match(lines[end]):
            line = lines[end]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            end += 1
        blocks.append(
            Block(
                path=path,
                line=index + 1,
                lang=info[0].lower() if info else "",
                text="\n".join(body) + "\n",
                marker=_marker_before(lines, index),
            )
        )
        index = end + 1
    return blocks


def _marker_before(lines: list[str], index: int) -> str | None:
    """The HTML comment on the last non-blank line before ``lines[index]``, if it is one."""
    for line in reversed(lines[:index]):
        if line.strip():
            found = MARKER.match(line)
            return found["text"] if found else None
    return None


def all_blocks() -> list[Block]:
    return [
        block
        for path in DOC_FILES
        for block in fenced_blocks(path, path.read_text(encoding="utf-8"))
    ]


@dataclass(frozen=True, slots=True)
class Command:
    """A ``pushsync`` command line of a shell block, and the output shown after it."""

    block: Block
    line: str
    argv: tuple[str, ...]
    output: str

    @property
    def where(self) -> str:
        return f"{self.block.where} pushsync {shlex.join(self.argv)}"


def shell_lines(block: Block) -> Iterator[tuple[str, str]]:
    """(command line, output after it): ``$ `` prompts in console blocks, every line else."""
    pending: list[str] = []
    command: str | None = None
    output: list[str] = []
    prompted = block.lang == "console"
    for raw in block.text.splitlines():
        if pending:
            pending.append(raw.strip())
        elif prompted and not raw.startswith("$ "):
            output.append(raw)
            continue
        else:
            if command is not None:
                yield command, "\n".join(output)
            command, output = None, []
            pending = [raw[2:] if prompted else raw]
        if pending[-1].endswith("\\"):
            pending[-1] = pending[-1][:-1].rstrip()
            continue
        command, pending = " ".join(pending).strip(), []
    if command is not None:
        yield command, "\n".join(output)


def pushsync_argv(line: str) -> tuple[str, ...] | None:
    """The arguments of a ``pushsync`` command line; None for anything else.

    Lines a shell would do more with than run one command (pipes, lists,
    redirections, substitutions) are left out: their arguments are not all
    the command's. Leading ``NAME=value`` assignments are skipped.
    """
    if any(syntax in line for syntax in SHELL_SYNTAX):
        return None
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: not one command
        return None
    if any(token and set(token) <= set(lexer.punctuation_chars) for token in tokens):
        return None
    while tokens and ASSIGNMENT.match(tokens[0]):
        tokens.pop(0)
    if not tokens or not (tokens[0] == "pushsync" or tokens[0].endswith("/pushsync")):
        return None
    return tuple(tokens[1:])


def all_commands() -> list[Command]:
    found: list[Command] = []
    for block in all_blocks():
        if block.lang not in SHELLS:
            continue
        for line, output in shell_lines(block):
            argv = pushsync_argv(line)
            if argv is not None:
                found.append(Command(block=block, line=line, argv=argv, output=output))
    return found


def parses(argv: tuple[str, ...]) -> str | None:
    """None if the CLI's parser takes ``argv``; else what it said."""
    try:
        cli.build_parser().parse_args(list(argv))
    except SystemExit as exc:
        return None if exc.code in (0, None) else f"argparse exit status {exc.code}"
    return None


def is_rules_file(block: Block) -> bool:
    keys = block.top_keys()
    return "version" in keys and bool(keys & {"rules", "polls", "publications"})


BLOCKS = all_blocks()
RULES = [b for b in BLOCKS if b.lang == "yaml" and is_rules_file(b)]
LISTENER = [b for b in BLOCKS if b.lang == "yaml" and {"device", "handlers"} <= b.top_keys()]
YAML = [b for b in BLOCKS if b.lang in ("yaml", "yml") and not b.invalid]
COMMANDS = all_commands()
UNITS = [b for b in BLOCKS if b.lang in ("ini", "systemd") and "[Service]" in b.text]


def ids(blocks: list[Block]) -> list[str]:
    return [block.where for block in blocks]


# --------------------------------------------------------------------------- the extractor


def test_the_extractor_reads_fences_markers_and_prompts() -> None:
    text = (
        "Intro.\n\n<!-- invalid -->\n```yaml\nversion: 2\n```\n\n"
        "````console\n$ pushsync status \\\n    --json\n{}\n$ pushsync --version\n````\n"
        "  ```sh\n  pushsync check a.yaml | less\n  ```\n"
    )
    first, second, third = fenced_blocks(ROOT / "x.md", text)
    assert (first.line, first.lang, first.text, first.invalid) == (4, "yaml", "version: 2\n", True)
    assert second.marker is None
    assert second.lang == "console"
    assert list(shell_lines(second)) == [
        ("pushsync status --json", "{}"),
        ("pushsync --version", ""),
    ]
    assert third.text == "pushsync check a.yaml | less\n"
    assert [pushsync_argv(line) for line, _ in shell_lines(third)] == [None]


@pytest.mark.parametrize(
    ("line", "argv"),
    [
        ('pushsync check r.yaml --dsn "$DSN"  # comment', ("check", "r.yaml", "--dsn", "$DSN")),
        (".venv/bin/pushsync compile r.yaml -o r.sql", ("compile", "r.yaml", "-o", "r.sql")),
        ("PUSHSYNC_DSN=x pushsync status", ("status",)),
        ("pushsync status > out.txt", None),
        ("pushsync status && echo ok", None),
        ("echo $(pushsync status)", None),
        ("psql -1 -f rules.sql", None),
    ],
)
def test_command_lines(line: str, argv: tuple[str, ...] | None) -> None:
    assert pushsync_argv(line) == argv


def test_the_examples_are_found() -> None:
    """A change to the extractor or to the docs that leaves nothing to check fails here."""
    assert len(RULES) >= 3
    assert len(LISTENER) >= 2
    assert len(COMMANDS) >= 15
    assert {unit_command(b)[0] for b in UNITS} == {"dispatch", "listen"}
    assert any(b.path.name == "README.md" for b in RULES)
    assert any(c.block.path.name == "README.md" for c in COMMANDS)


# --------------------------------------------------------------------------- YAML


@pytest.mark.parametrize("block", RULES, ids=ids(RULES))
def test_rules_examples_compile(block: Block) -> None:
    if block.invalid:
        with pytest.raises(RulesError):
            generator.loads(block.text, "doc.yaml")
        return
    rules = generator.loads(block.text, "doc.yaml")
    assert generator.compile_rules(rules).strip()


@pytest.mark.parametrize("block", LISTENER, ids=ids(LISTENER))
def test_listener_examples_load(block: Block, tmp_path: Path) -> None:
    path = tmp_path / "listener.yaml"
    path.write_text(block.text, encoding="utf-8")
    if block.invalid:
        with pytest.raises(RulesError):
            load_config(path)
        return
    data = yaml.safe_load(block.text)
    secret_file = data.get("secret_file") if isinstance(data, dict) else None
    if isinstance(secret_file, str) and not Path(secret_file).is_absolute():
        key = tmp_path / secret_file
        key.parent.mkdir(parents=True, exist_ok=True)
        write_key(key, bytes(range(32)))
    config = load_config(path)
    if config.secret_file.is_relative_to(tmp_path):
        assert read_secret_file(config) == bytes(range(32))


@pytest.mark.parametrize("block", YAML, ids=ids(YAML))
def test_every_yaml_example_is_yaml(block: Block) -> None:
    yaml.safe_load(block.text)


# --------------------------------------------------------------------------- commands


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_command_examples_parse(command: Command, capsys: pytest.CaptureFixture[str]) -> None:
    problem = parses(command.argv)
    if command.block.invalid:
        assert problem is not None, f"{command.where}: marked invalid, but it parses"
    else:
        assert problem is None, f"{command.where}: {capsys.readouterr().err.strip()}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        flag
        for action in parser._actions
        for flag in action.option_strings
        if flag.startswith("--") and flag not in ("--help", "--version")
    }


def every_flag() -> set[str]:
    parser = cli.build_parser()
    found = _options(parser)
    for sub in _subcommands(parser).values():
        found |= _options(sub)
        for deeper in _subcommands(sub).values():
            found |= _options(deeper)
    return found


def test_every_variable_named_in_the_docs_exists() -> None:
    known = {cli.env_name(flag) for flag in every_flag()} | HARNESS_VARIABLES
    named = {
        (path.relative_to(ROOT).as_posix(), variable)
        for path in DOC_FILES
        for variable in ENV_MENTION.findall(path.read_text(encoding="utf-8"))
    }
    assert sorted(item for item in named if item[1] not in known) == []


def test_the_dispatch_options_table_is_complete() -> None:
    """docs/operations.md lists every option of ``pushsync dispatch`` (and of ``pushsync``)."""
    row = re.compile(r"^\| `(--[a-z0-9-]+)[^`]*` \| `(PUSHSYNC_[A-Z0-9_]+)` \|", re.MULTILINE)
    listed = dict(row.findall(OPERATIONS.read_text(encoding="utf-8")))
    parser = cli.build_parser()
    dispatch = _subcommands(parser)["dispatch"]
    assert sorted(listed) == sorted(_options(dispatch) | _options(parser))
    assert {flag: cli.env_name(flag) for flag in listed} == listed


def dispatch_settings() -> list[tuple[str, str, str]]:
    """(where, option, value) of every dispatch option the docs give a value.

    From ``pushsync dispatch`` command lines, and from ``PUSHSYNC_...=value``
    lines (an environment file) in shell blocks.
    """
    found: list[tuple[str, str, str]] = []
    flags = _options(_subcommands(cli.build_parser())["dispatch"])
    by_variable = {cli.env_name(flag): flag for flag in flags}
    for command in COMMANDS:
        if command.argv[:1] != ("dispatch",):
            continue
        args = list(command.argv[1:])
        for index, arg in enumerate(args):
            flag, equals, value = arg.partition("=")
            if flag in flags and (equals or index + 1 < len(args)):
                found.append((command.where, flag, value if equals else args[index + 1]))
    for block in BLOCKS:
        if block.lang not in SHELLS:
            continue
        for line, _ in shell_lines(block):
            variable, equals, value = line.partition("=")
            if equals and variable in by_variable and " " not in line:
                found.append((f"{block.where} {variable}", by_variable[variable], value))
    return found


SETTINGS = dispatch_settings()


@pytest.mark.parametrize(("where", "flag", "value"), SETTINGS, ids=[s[0] for s in SETTINGS])
def test_dispatch_option_values_are_valid(where: str, flag: str, value: str) -> None:
    """The values the docs give are ones ``pushsync dispatch`` accepts when it starts."""
    from pushsync.dispatcher.daemon import split_listen
    from pushsync.dispatcher.gateways import smtp_from_url

    if flag in ("--sync-listen", "--udp-listen", "--metrics"):
        if not (flag == "--sync-listen" and value == "off"):
            split_listen(value)
    elif flag == "--smtp":
        smtp_from_url(value, password="secret")
    elif flag == "--heartbeat":
        cli._seconds(value, flag)
    elif flag == "--batch":
        cli._positive(value, flag)


def test_dispatch_option_values_are_found() -> None:
    assert {flag for _, flag, _ in SETTINGS} >= {"--sync-listen", "--smtp", "--metrics"}


# --------------------------------------------------------------------------- pushsync status


def test_the_status_example_is_what_status_prints() -> None:
    shown = {c.argv: c.output for c in COMMANDS if c.block.path == OPERATIONS}
    figures: dict[str, Any] = json.loads(shown[("status", "--json")])
    assert set(figures) == {
        "outbox",
        "oldest_unsent_seconds",
        "history_24h",
        "gateways",
        "connected_devices",
        "dispatchers",
    }
    assert list(figures["outbox"]) == list(status.STATES)
    assert status.render(figures) == shown[("status",)]


# --------------------------------------------------------------------------- systemd units


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values]}}; continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith(("#", ";"))):
            continue
        logical.append(line.removesuffix("\\").strip())
        if line.endswith("\\"):
            continue
        joined, logical = " ".join(logical), []
        if joined.startswith("[") and joined.endswith("]"):
            current = sections.setdefault(joined[1:-1], {})
            continue
        key, equals, value = joined.partition("=")
        assert equals, f"not a unit file line: {joined!r}"
        assert current is not None, f"not a unit file line: {joined!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_command(block: Block) -> tuple[str, ...]:
    """The pushsync arguments of the unit's ExecStart."""
    (start,) = unit_sections(block.text)["Service"]["ExecStart"]
    argv = pushsync_argv(start.lstrip("-@:+!"))
    assert argv is not None, f"{block.where}: ExecStart does not run pushsync"
    return argv


@pytest.mark.parametrize("block", UNITS, ids=ids(UNITS))
def test_systemd_units(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    unit = unit_sections(block.text)
    service = {key: values[-1] for key, values in unit["Service"].items()}
    argv = unit_command(block)
    assert parses(argv) is None, f"{block.where}: {capsys.readouterr().err.strip()}"
    assert unit["Unit"]["Description"]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert service["Restart"] == "on-failure"
    assert service["KillSignal"] == "SIGTERM"
    assert re.fullmatch(r"\d+s?", service["TimeoutStopSec"])
    assert service["NoNewPrivileges"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["User"]
    assert service["User"] != "root"
    # SIGHUP: the dispatcher reloads polls and forgets cached secrets; the listener
    # re-reads its handlers.
    assert re.fullmatch(r"/\S*kill -HUP \$MAINPID", service["ExecReload"])
    if argv[0] == "dispatch":
        assert service["EnvironmentFile"].startswith("/")
    else:
        assert argv[0] == "listen"
        assert service["StateDirectory"]
