"""The rule generator: rules YAML -> validated model -> passes -> SQL migration.

    rules = load("rules.yaml")          # raises RulesError listing every problem
    sql = compile_rules(rules)          # the migration, as text

The stages live in their own modules: :mod:`.source` (YAML with locations),
:mod:`.validate` (the frozen model in :mod:`.model`), :mod:`.passes` (checks
across rules, then the plan) and :mod:`.render` (Jinja templates).
"""

from __future__ import annotations

from pathlib import Path

from pushsync.errors import Location, Problem, Problems, RulesError, UsageError
from pushsync.generator import passes, render, validate
from pushsync.generator.model import RuleSet

__all__ = ["compile_rules", "load", "loads"]


def loads(text: str, path: str = "<rules>") -> RuleSet:
    """Validate rules given as text; ``path`` is used in messages and the header."""
    problems = Problems()
    rules = validate.build(text, path, problems)
    problems.raise_if_any()
    assert rules is not None  # noqa: S101  type narrowing; no problems means rules were built
    passes.check(rules, problems)
    problems.raise_if_any()
    return rules


def load(path: str | Path) -> RuleSet:
    """Read and validate a rules file."""
    shown = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read rules file {shown}: {exc.strerror}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        where = Location(shown, data[: exc.start].count(b"\n") + 1, 1)
        raise RulesError([Problem(where, "the rules file is not UTF-8 text")]) from exc
    return loads(text, shown)


def compile_rules(rules: RuleSet, source: str | None = None) -> str:
    """The SQL migration for ``rules``; ``source`` overrides the path in its header."""
    return render.migration(passes.plan(rules), source)
