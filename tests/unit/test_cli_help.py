"""Every command's ``--help`` ends with an example that works, and the shell completes pushsync."""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess

import pytest

from pushsync import cli
from tests.support.cli import clean_env, executable


def places(parser: argparse.ArgumentParser, path: str = "") -> list[str]:
    found = []
    for name, sub in cli._subparsers(parser).items():
        found.append(f"{path}{name}")
        found += places(sub, f"{path}{name} ")
    return found


PLACES = places(cli.build_parser())


def test_every_command_and_action_has_examples() -> None:
    assert sorted(PLACES) == sorted(cli.EXAMPLES)


@pytest.mark.parametrize("place", PLACES)
def test_the_help_ends_with_examples_that_parse(
    place: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args([*place.split(), "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    examples = cli.EXAMPLES[place]
    assert text.rstrip().endswith("\n".join(f"  {line}" for line in examples))
    for line in examples:
        argv = shlex.split(line)
        assert argv[0] == "pushsync"
        assert argv[1 : len(place.split()) + 1] == place.split()
        cli.build_parser().parse_args(argv[1:])  # SystemExit, failing the test, if not


BASH = shutil.which("bash")


@pytest.mark.skipif(BASH is None, reason="no bash on this machine")
def test_bash_completes_commands_actions_options_and_choices() -> None:
    script = subprocess.run(
        [*executable(), "completion", "bash"],
        env=clean_env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    probe = """
complete_for() {
    COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _pushsync
    echo "${COMPREPLY[*]}"
}
complete_for pushsync de
complete_for pushsync device r
complete_for pushsync device add --secret-
complete_for pushsync --log-level ""
complete_for pushsync send truck-7 sync --gateway ""
complete_for pushsync --log-format json st
complete_for pushsync listen ""
"""
    assert BASH is not None
    out = subprocess.run(
        [BASH, "-c", script + probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines() == [
        "device demo",
        "revoke rotate-secret remove",
        "--secret-from --secret-dir --secret-file",
        "debug info warning error",
        "auto sync mqtt udp smtp",
        "status",
        "",  # an argument: the shell's own file names
    ]
