"""Parse, police and render again the SQL written in a rules file.

Every fragment (``when``, ``recipients``, ``polls.query``, a publication's
``download``) is parsed with sqlglot's postgres dialect and accepted only if it
is exactly one SELECT (or one boolean expression) that reads: no DML, DDL,
second statement, locking clause, ``SELECT INTO`` or bind parameter. What it may
call, cast to and read is decided by the allow-lists of
:mod:`pushsync.generator.allowed`, for every fragment of the file at once.

Comments are dropped when the fragment is rendered again, so nothing can hide
in them, and a string with a backslash is rendered ``E'...'`` with the
backslash doubled: it means the same whatever ``standard_conforming_strings``
the session has.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import sqlglot
import sqlglot.expressions as exp
from sqlglot.dialects.postgres import Postgres
from sqlglot.errors import ParseError, SqlglotError, TokenError
from sqlglot.generators.postgres import PostgresGenerator
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

DIALECT = "postgres"


def escape_string(text: str) -> str:
    """A string literal that means ``text`` whatever standard_conforming_strings says."""
    if "\\" in text:
        return "E'" + text.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + text.replace("'", "''") + "'"


class _Rendering(Postgres):
    """PostgreSQL as pushsync writes it: strings safe under either string setting."""

    class Generator(PostgresGenerator):
        def literal_sql(self, expression: exp.Literal) -> str:
            if expression.is_string:
                return escape_string(str(expression.this or ""))
            return str(super().literal_sql(expression))

        def rawstring_sql(self, expression: exp.RawString) -> str:
            return escape_string(str(expression.this))

        def anonymous_sql(self, expression: exp.Anonymous) -> str:
            name = expression.this
            if isinstance(name, exp.Identifier) and name.quoted:
                # sqlglot would upper-case a quoted name, making it another function.
                return str(self.func(self.sql(name), *expression.expressions, normalize=False))
            return str(super().anonymous_sql(expression))


# Statement kinds that have no business inside a SELECT or a condition.
_FORBIDDEN_NODES: tuple[type[exp.Expr], ...] = (
    exp.DML,
    exp.DDL,
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Copy,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.TruncateTable,
    exp.Command,
    exp.Into,
    exp.Lock,
    exp.Set,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Grant,
    exp.Revoke,
    exp.Use,
    exp.Pragma,
    exp.Describe,
    exp.Cache,
    exp.Uncache,
    exp.Refresh,
    exp.Analyze,
    exp.Kill,
    exp.LoadData,
    exp.Comment,
    exp.Placeholder,
    exp.Parameter,
    exp.SessionParameter,
)

PLACEHOLDER_SCOPES = ("new", "old")


class FragmentError(Exception):
    """A fragment is not acceptable; ``line``/``column`` are within the fragment."""

    def __init__(self, message: str, line: int = 1, column: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


CONDITION_PREFIX = "SELECT ("


@dataclass(frozen=True, slots=True)
class RowReference:
    """``new.col`` or ``old.col`` inside a fragment, at ``line``:``column`` of the parsed text."""

    scope: str
    column: str
    line: int
    column_number: int


def _parse(text: str, prefix: str = "") -> list[exp.Expr]:
    try:
        trees = sqlglot.parse(prefix + text, read=DIALECT)
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        line = int(first.get("line") or 1)
        column = int(first.get("col") or 1)
        if line == 1:
            column = max(column - len(prefix), 1)
        description = _readable(str(first.get("description") or exc))
        raise FragmentError(f"SQL syntax error: {description}", line, column) from exc
    except TokenError as exc:
        raise FragmentError(f"SQL syntax error: {_token_error(exc)}") from exc
    except SqlglotError as exc:
        raise FragmentError(f"SQL syntax error: {exc}") from exc
    return [t for t in trees if t is not None and not isinstance(t, exp.Semicolon)]


_MISSING = re.compile(r"Required keyword: '\w+' missing for <class '[\w.]*\.(\w+)'>")


def _readable(description: str) -> str:
    """sqlglot's wording for an unfinished clause, said as a user would."""
    match = _MISSING.search(description)
    if match:
        return f"incomplete {match.group(1).upper()} clause"
    return description


def _token_error(exc: TokenError) -> str:
    text = str(exc)
    if "'" in text:
        return "unterminated string or identifier"
    return text


def _police(tree: exp.Expr, *, parameters: tuple[type[exp.Expr], ...] = ()) -> None:
    for node in tree.walk():
        if parameters and isinstance(node, parameters):
            continue
        if isinstance(node, _FORBIDDEN_NODES):
            raise FragmentError(f"only reading is allowed here, found {_describe(node)}")


def _describe(node: exp.Expr) -> str:
    if isinstance(node, exp.Into):
        return "SELECT INTO"
    if isinstance(node, exp.Lock):
        return "a locking clause (FOR UPDATE/SHARE)"
    if isinstance(node, exp.Placeholder | exp.Parameter | exp.SessionParameter):
        return f"a parameter ({node.sql(dialect=DIALECT)})"
    return f"a {type(node).__name__.upper()} statement"


def _one_statement(text: str) -> exp.Expr:
    trees = _parse(text)
    if not trees:
        raise FragmentError("expected a SELECT, found nothing")
    if len(trees) > 1:
        raise FragmentError("expected one SELECT, found more than one statement")
    return trees[0]


def parse_query(text: str) -> exp.Query:
    """One read-only SELECT (set operations and CTEs allowed)."""
    tree = _one_statement(text)
    _police(tree)
    if not isinstance(tree, exp.Query):
        raise FragmentError(f"expected a SELECT, found {_describe(tree)}")
    _require_qualified_tables(tree)
    return normalize_identifiers(tree, dialect=DIALECT)


DEVICE_PARAMETER = "device_id"


def parse_download(text: str) -> exp.Query:
    """A publication's download: one read-only SELECT; ``:device_id`` is the syncing device.

    The parameter becomes ``$1``, the argument of the generated download function.
    """
    tree = _one_statement(text)
    _bind_device(tree)
    _police(tree, parameters=(exp.Parameter,))
    if not isinstance(tree, exp.Query):
        raise FragmentError(f"expected a SELECT, found {_describe(tree)}")
    _require_qualified_tables(tree)
    return normalize_identifiers(tree, dialect=DIALECT)


def _bind_device(tree: exp.Expr) -> None:
    """``:device_id`` becomes ``$1``; any other parameter is refused."""
    for node in list(tree.find_all(exp.Placeholder)):
        if node.name != DEVICE_PARAMETER:
            raise FragmentError(f"unknown parameter :{node.name}: only :device_id may be used")
        node.replace(exp.Parameter(this=exp.Literal.number(1)))


def parse_upload_check(text: str) -> exp.Expr:
    """A publication's ``upload_check``: one boolean expression over ``new`` and ``old``.

    Checked like a download (and like a rule's ``when``); ``:device_id`` is the
    uploading device and becomes ``$1``, the first argument of the generated
    check function. ``new`` and ``old`` may also stand alone (``old IS NULL``:
    an insert).
    """
    return _condition(text, device=True)


def download_tables(tree: exp.Expr) -> list[tuple[str, str]]:
    """The (schema, table) pairs a download reads, in order, without CTE names."""
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    found: list[tuple[str, str]] = []
    for table in tree.find_all(exp.Table):
        if not table.db and table.name.lower() in ctes:
            continue
        pair = (table.db, table.name)
        if table.name and pair not in found:
            found.append(pair)
    return found


def star_source(query: exp.Query) -> str | None:
    """For ``SELECT *`` or ``SELECT x.*``: ``"*"`` or ``"x"``; None for any other list."""
    if not isinstance(query, exp.Select) or len(query.expressions) != 1:
        return None
    only = query.expressions[0]
    if isinstance(only, exp.Star):
        return "*"
    if isinstance(only, exp.Column) and isinstance(only.this, exp.Star):
        return only.table
    return None


def table_alias_of(query: exp.Query, schema: str, name: str) -> list[str]:
    """The names ``schema.name`` goes by in the FROM/JOIN of ``query`` (its alias, else name)."""
    names = []
    for table in query.find_all(exp.Table):
        if table.db == schema and table.name == name:
            names.append(table.alias_or_name)
    return names


def parse_condition(text: str) -> exp.Expr:
    """One boolean expression over ``new`` and ``old``."""
    return _condition(text, device=False)


def _condition(text: str, *, device: bool) -> exp.Expr:
    """One boolean expression over ``new`` and ``old``; with ``device``, ``:device_id``
    may appear (as ``$1``) and ``new``/``old`` may stand alone as whole rows."""
    if not text.strip():
        raise FragmentError("expected an expression, found nothing")
    trees = _parse(text + ")", CONDITION_PREFIX)
    if len(trees) != 1:
        raise FragmentError("expected one expression, found more than one statement")
    tree = trees[0]
    if device:
        _bind_device(tree)
        _police(tree, parameters=(exp.Parameter,))
    else:
        _police(tree)
    if (
        not isinstance(tree, exp.Select)
        or len(tree.expressions) != 1
        or any(v for k, v in tree.args.items() if k != "expressions")
    ):
        raise FragmentError("expected one expression")
    condition = tree.expressions[0]
    if isinstance(condition, exp.Paren):
        condition = condition.this
    _require_qualified_tables(condition)
    for column in _outer_columns(condition):
        whole_row = device and not column.table and column.name.lower() in PLACEHOLDER_SCOPES
        if column.table.lower() not in PLACEHOLDER_SCOPES and not whole_row:
            raise FragmentError(
                f"column {column.sql(dialect=DIALECT)} must be written new.{column.name} "
                f"or old.{column.name}"
            )
    normalized: exp.Expr = normalize_identifiers(condition.copy(), dialect=DIALECT)
    return normalized


def _outer_columns(tree: exp.Expr) -> Iterator[exp.Column]:
    """Columns of ``tree`` that are not inside a subquery."""
    for node in tree.walk(prune=lambda n: n is not tree and isinstance(n, exp.Query)):
        if isinstance(node, exp.Column):
            yield node


def _require_qualified_tables(tree: exp.Expr) -> None:
    ctes = {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}
    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            continue  # a table function such as generate_series(...)
        if table.db or table.name.lower() in ctes:
            continue
        raise FragmentError(
            f"table {table.name} must be named with its schema, e.g. public.{table.name} "
            "(rules run with a fixed search_path)"
        )


def row_references(tree: exp.Expr) -> list[RowReference]:
    """Every ``new.x`` / ``old.x`` in ``tree``, in order of appearance."""
    found = []
    for col in tree.find_all(exp.Column):
        if col.table.lower() not in PLACEHOLDER_SCOPES or col.args.get("db"):
            continue
        meta = col.args["table"].meta
        line = int(meta.get("line", 1))
        start = int(meta.get("col", 1)) - (int(meta.get("end", 0)) - int(meta.get("start", 0)))
        found.append(RowReference(col.table.lower(), col.name, line, start))
    return sorted(found, key=lambda ref: (ref.line, ref.column_number))


def table_aliases(tree: exp.Expr) -> set[str]:
    """Aliases and names that ``tree`` gives to the tables it reads."""
    names = {t.alias_or_name.lower() for t in tree.find_all(exp.Table)}
    names |= {s.alias.lower() for s in tree.find_all(exp.Subquery) if s.alias}
    return names


def output_columns(query: exp.Query) -> list[str] | None:
    """Names of the columns ``query`` returns; ``None`` if ``*`` hides them."""
    select = query
    while isinstance(select, exp.SetOperation):
        select = select.this
    if not isinstance(select, exp.Select):
        return None
    if any(
        isinstance(e, exp.Star) or (isinstance(e, exp.Column) and e.is_star)
        for e in select.expressions
    ):
        return None
    return [name.lower() for name in select.named_selects]


def render(tree: exp.Expr, pretty: bool = False) -> str:
    """SQL for ``tree``: every identifier quoted, no comments, strings safe either way."""
    return tree.sql(dialect=_Rendering, identify=True, comments=False, pretty=pretty)
