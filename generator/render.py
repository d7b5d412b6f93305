"""Render a plan into the SQL migration with the Jinja templates in ``templates/``.

Everything that reaches the SQL from the rules file goes through one of the
helpers here: identifiers are double-quoted, text becomes a string literal,
SQL fragments are re-rendered from their parsed trees, and bodies are
dollar-quoted with a tag that does not occur in them.
"""

from __future__ import annotations

import re
import textwrap
from datetime import timedelta
from pathlib import PurePath

import jinja2

from pushsync import __version__
from pushsync.generator import fragments
from pushsync.generator.model import Fragment, Literal_, Rule, Template
from pushsync.generator.passes import RESERVED, Plan, TriggerPlan

KEY_MARKER = RESERVED + "key*/"
NOTIFY_CHANNEL = "pushsync"
PINNED = "\n".join(
    (
        "SET search_path = pg_catalog, pg_temp",
        "SET standard_conforming_strings = on",
        "SET jit = off",
    )
)
"""The settings every generated function runs with, whatever the calling session set:
names resolve in pg_catalog (never in a schema the application can write), string
literals mean what they say, and no plan is JIT-compiled."""


def ident(name: str) -> str:
    """A quoted SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


def literal(text: str) -> str:
    """A SQL string literal that means the same whatever standard_conforming_strings says."""
    return fragments.escape_string(text)


def regclass(table: str) -> str:
    """``'schema.table'::regclass``."""
    return f"{literal(table)}::regclass"


def interval(value: timedelta) -> str:
    seconds = value.total_seconds()
    shown = int(seconds) if seconds == int(seconds) else seconds
    return f"interval '{shown} seconds'"


def dollar_quote(body: str, tag: str = "pushsync") -> str:
    """``$tag$body$tag$`` with a tag that does not occur in ``body``."""
    candidate, n = tag, 0
    while f"${candidate}$" in body:
        n += 1
        candidate = f"{tag}{n}"
    return f"${candidate}${body}${candidate}$"


def text_sql(template: Template) -> str:
    """A SQL expression producing the template's text; values never pasted."""
    if not template.parts:
        return "''"
    pieces = [
        literal(part.text)
        if isinstance(part, Literal_)
        else f"{ident(part.scope)}.{ident(part.column)}::text"
        for part in template.parts
    ]
    if len(pieces) == 1 and isinstance(template.parts[0], Literal_):
        return pieces[0]
    return "concat(" + ", ".join(pieces) + ")"


def sql(fragment: Fragment | None, pretty: bool = False, indent: int = 0) -> str:
    if fragment is None:
        return "true"
    text = fragments.render(fragment.tree, pretty=pretty)
    return textwrap.indent(text, " " * indent).lstrip() if indent else text


def changed(rule: Rule) -> str:
    """The ``columns`` filter of an update rule."""
    return " OR ".join(f'"new".{ident(c)} IS DISTINCT FROM "old".{ident(c)}' for c in rule.columns)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pushsync.generator", "templates"),
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701  SQL, not HTML: values go through the SQL filters below
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ident=ident,
        literal=literal,
        regclass=regclass,
        interval=interval,
        dollar_quote=dollar_quote,
        text_sql=text_sql,
        sql=sql,
        changed=changed,
    )
    env.globals.update(KEY_MARKER=KEY_MARKER, NOTIFY_CHANNEL=NOTIFY_CHANNEL, PINNED=PINNED)
    return env


_ENV = _environment()


_BLOCK = re.compile(r"^-- ([a-z_]+) --$", re.MULTILINE)


def named_blocks(template: str) -> dict[str, str]:
    """The ``-- name --`` blocks of a template that holds one SQL statement per block."""
    parts = _BLOCK.split(_ENV.get_template(template).render())
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def trigger_function(trigger: TriggerPlan) -> str:
    return _ENV.get_template("trigger_function.sql.j2").render(t=trigger).rstrip()


def migration(plan: Plan, source: str | None = None) -> str:
    """The whole migration for ``plan``; ``source`` is the path named in the header."""
    rules = plan.rules
    shown = source if source is not None else PurePath(rules.path).as_posix()
    shown = shown.replace("\r", "\\r").replace("\n", "\\n")  # in -- comments: one line
    functions = {t.function: trigger_function(t) for t in plan.triggers}
    return _ENV.get_template("migration.sql.j2").render(
        plan=plan,
        functions=functions,
        source=shown,
        sha256=rules.sha256,
        version=__version__,
    )
