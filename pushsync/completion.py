"""``pushsync completion bash|zsh``: a completion script made from the command's own parser.

Commands, sub-commands, options and the values of options with a fixed set of
choices complete; other arguments complete as file names. zsh runs the bash
script through ``bashcompinit``. Standard library only.
"""

from __future__ import annotations

import argparse
import shlex

ZSH_PREAMBLE = "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _walk(
    parser: argparse.ArgumentParser, path: str = ""
) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for name, sub in _subparsers(parser).items():
        found += _walk(sub, f"{path} {name}".strip())
    return found


def _words(values: list[str]) -> str:
    return shlex.quote(" ".join(values))


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (``bash`` or ``zsh``)."""
    places = _walk(parser)
    steps: list[str] = []
    offers: list[str] = []
    values: list[str] = []
    for path, sub in places:
        children = list(_subparsers(sub))
        for child in children:
            steps.append(f'            "{path}|{child}") path="{f"{path} {child}".strip()}" ;;')
        flags = [f for a in sub._actions for f in a.option_strings if f.startswith("--")]
        offers.append(f'        "{path}") subs={_words(children)}; flags={_words(flags)} ;;')
        for action in sub._actions:
            if action.choices is None or isinstance(action, argparse._SubParsersAction):
                continue
            choices = [str(c) for c in action.choices]
            for flag in action.option_strings:
                values.append(f'        "{path}|{flag}") words={_words(choices)} ;;')
            if not action.option_strings and path:  # the first argument after the command
                values.append(f'        "{path}|{path.split()[-1]}") words={_words(choices)} ;;')
    text = f"""\
# Completion for pushsync, made by `pushsync completion {shell}`.
_pushsync() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local path="" subs="" flags="" words="" i
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "$path|${{COMP_WORDS[i]}}" in
{chr(10).join(steps)}
        esac
    done
    case "$path" in
{chr(10).join(offers)}
    esac
    case "$path|$prev" in
{chr(10).join(values)}
    esac
    if [[ -n $words ]]; then
        :
    elif [[ $cur == -* ]]; then
        words="$flags"
    elif [[ -n $subs ]]; then
        words="$subs"
    else
        COMPREPLY=()  # an argument: file names (complete -o default)
        return
    fi
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
}}
complete -o default -F _pushsync pushsync
"""
    return (ZSH_PREAMBLE + text) if shell == "zsh" else text
