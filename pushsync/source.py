"""Read YAML into a tree that remembers where every value came from.

PyYAML's composer gives nodes with marks; this module turns them into plain
values wrapped in :class:`Node`, so validation can point at ``file:line:col``
for any key or value, and at a line and column *inside* a value (a block of
SQL, a template). The rules file and the listener config are both read with
it; it needs only the standard library and PyYAML.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import yaml

from pushsync.errors import Location, Problem, RulesError


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML value with its location.

    ``value`` is a ``str``/``int``/``float``/``bool``/``None`` for scalars, a
    ``list[Node]`` for sequences and a ``dict[str, Node]`` for mappings.
    ``key_locations`` maps each key of a mapping to where the key is written.
    """

    value: Any
    location: Location
    style: str | None = None  # YAML scalar style: None (plain), "'", '"', "|", ">"
    raw: str | None = None  # a scalar's text as written, before YAML typed it
    source_line: str = ""  # the text of the line the value starts on
    exact: bool = False  # a one-line scalar written exactly as its value reads (no escapes)
    key_locations: dict[str, Location] = field(default_factory=dict)

    def inner(self, line: int, column: int) -> Location:
        """Where character ``column`` of line ``line`` of this scalar's text is.

        ``line`` and ``column`` count from 1, as parsers report them. Exact for
        plain, quoted and literal (``|``) scalars; for folded scalars the line
        is the best guess.
        """
        here = self.location
        if self.style in ("|", ">"):
            indent = _block_indent(self)
            return Location(here.path, here.line + line, indent + column)
        if line <= 1:
            if not self.exact:
                return here  # escapes or folding: columns of the value are not the file's
            quote = 1 if self.style in ("'", '"') else 0
            return here.shifted(column=here.column + quote + column - 1)
        return here.shifted(lines=line - 1, column=column)

    def at(self, offset: int) -> Location:
        """Where character ``offset`` (from 0) of a one-line scalar is."""
        return self.inner(1, offset + 1)


def _block_indent(node: Node) -> int:
    """Column (from 0) where a block scalar's content lines start."""
    first = str(node.value).split("\n", 1)[0]
    # The content's first line follows the indicator line; its indent is
    # whatever precedes its text in the source.
    return max(node.source_line.find(first), 0) if first else 0


MAX_NODES = 100_000
"""More values than a rules file needs; aliases that expand past it are refused."""


class _Reader:
    def __init__(self, text: str, path: str) -> None:
        self.lines = text.splitlines()
        self.path = path
        self.nodes = 0

    def location(self, mark: yaml.Mark) -> Location:
        return Location(self.path, mark.line + 1, mark.column + 1)

    def line_text(self, index: int) -> str:
        return self.lines[index] if 0 <= index < len(self.lines) else ""

    def convert(self, node: yaml.Node) -> Node:
        where = self.location(node.start_mark)
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise RulesError(
                [Problem(where, f"more than {MAX_NODES} values (do aliases expand too far?)")]
            )
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, where)
        if isinstance(node, yaml.SequenceNode):
            return Node([self.convert(item) for item in node.value], where)
        assert isinstance(node, yaml.ScalarNode)  # noqa: S101  type narrowing; YAML has no fourth node kind
        constructed = _construct_scalar(node)
        if isinstance(constructed, str) and (problem := _bad_text(constructed)):
            raise RulesError([Problem(where, problem)])
        style = node.style or None
        content_line = node.start_mark.line + (1 if style in ("|", ">") else 0)
        return Node(
            constructed,
            where,
            style=style,
            raw=node.value,
            source_line=self.line_text(content_line),
            exact=self._exact(node),
        )

    def _exact(self, node: yaml.ScalarNode) -> bool:
        start, end = node.start_mark, node.end_mark
        if start.line != end.line or node.style in ("|", ">"):
            return False
        quote = 1 if node.style in ("'", '"') else 0
        written = self.line_text(start.line)[start.column : end.column]
        return bool(written[quote : len(written) - quote] == node.value)

    def _mapping(self, node: yaml.MappingNode, where: Location) -> Node:
        values: dict[str, Node] = {}
        keys: dict[str, Location] = {}
        problems: list[Problem] = []
        for key_node, value_node in node.value:
            key_where = self.location(key_node.start_mark)
            if key_node.tag == "tag:yaml.org,2002:merge":
                problems.append(Problem(key_where, "merge keys (<<) are not supported"))
                continue
            # Keys are taken as written: YAML 1.1 would read the key `on` as true.
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                problems.append(Problem(key_where, "keys must be plain words"))
                continue
            if key in values:
                first = keys[key]
                problems.append(
                    Problem(key_where, f"duplicate key {key!r} (first given at line {first.line})")
                )
                continue
            values[key] = self.convert(value_node)
            keys[key] = key_where
        if problems:
            raise RulesError(problems)
        return Node(values, where, key_locations=keys)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad_text(text: str) -> str | None:
    """Why ``text`` cannot be used anywhere (PostgreSQL, SQLite, UTF-8), or None."""
    if "\x00" in text:
        return "text may not contain NUL (\\0): PostgreSQL text cannot hold it"
    if _SURROGATE.search(text):
        return "text may not contain a lone surrogate (\\ud800-\\udfff): it is not UTF-8"
    return None


_CONSTRUCTOR = yaml.SafeLoader("")


def _construct_scalar(node: yaml.ScalarNode) -> Any:
    """The Python value of a scalar, with YAML 1.1 type resolution as safe_load does."""
    try:
        return _CONSTRUCTOR.construct_object(node, deep=True)
    finally:
        _CONSTRUCTOR.constructed_objects.clear()


def load(text: str, path: str) -> Node:
    """Parse YAML ``text`` (from ``path``) into a located tree.

    Raises :class:`RulesError` pointing at the syntax error.
    """
    try:
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        if document is None:
            return Node({}, Location(path, 1, 1))
        return _Reader(text, path).convert(document)
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        line = before.count("\n") + 1
        column = exc.position - (before.rfind("\n") + 1) + 1
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1])
        problem = f"invalid YAML: character U+{code:04X} is not allowed in YAML text"
        raise RulesError([Problem(Location(path, line, column), problem)]) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = Location(path, mark.line + 1, mark.column + 1) if mark else Location(path, 1, 1)
        reason = exc.problem or exc.context or "invalid YAML"
        raise RulesError([Problem(where, f"invalid YAML: {reason}")]) from exc
    except yaml.YAMLError as exc:
        raise RulesError([Problem(Location(path, 1, 1), f"invalid YAML: {exc}")]) from exc
    except RecursionError as exc:
        too_deep = Problem(Location(path, 1, 1), "invalid YAML: nested too deeply")
        raise RulesError([too_deep]) from exc


# --- values every YAML file of pushsync uses -------------------------------------

_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: object) -> timedelta | None:
    """``30s``, ``5m``, ``1h30m``, ``2d``, ``250ms``; ``None`` if not a duration."""
    if not isinstance(text, str) or not text.strip():
        return None
    compact = text.replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    if "".join(n + u for n, u in parts) != compact:
        return None
    return timedelta(seconds=sum(int(n) * _UNITS[u] for n, u in parts))


def suggestion(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``, if one is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def closest(word: str, choices: Iterable[str], sigil: str = "") -> str:
    """`` (did you mean 'x'?)`` when a choice is close to ``word``."""
    match = suggestion(word, choices)
    if match is None:
        return ""
    return f" (did you mean {sigil}{match}?)" if sigil else f" (did you mean {match!r}?)"
