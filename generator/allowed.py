"""What SQL in a rules file may call, cast to and read: allow-lists, not deny-lists.

Rules SQL runs inside ``SECURITY DEFINER`` functions, so only what is known to
be read-only and free of side effects is accepted: the built-in functions of
:data:`ALLOWED_FUNCTIONS`, the types of :data:`ALLOWED_TYPES`, and no table in
:data:`CLOSED_SCHEMAS`. The reasons and the full rules are in ``docs/rules.md``
("What rules SQL may call, cast to and read").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import sqlglot.expressions as exp

from pushsync.generator.fragments import DIALECT, render

ALLOWED_FUNCTIONS = frozenset(
    """
    abs cbrt ceil ceiling degrees div exp factorial floor gcd lcm ln log log10 min_scale
    mod pi power radians round scale sign sqrt trim_scale trunc width_bucket
    acos asin atan atan2 cos cosh cot sin sinh tan tanh

    coalesce greatest least nullif num_nonnulls num_nulls row

    ascii bit_length btrim char_length character_length chr concat concat_ws decode encode
    format initcap left length lower lpad ltrim md5 normalize octet_length overlay position
    quote_ident quote_literal quote_nullable regexp_count regexp_instr regexp_like
    regexp_match regexp_matches regexp_replace regexp_split_to_array regexp_split_to_table
    regexp_substr repeat replace reverse right rpad rtrim sha224 sha256 sha384 sha512
    split_part starts_with string_to_array string_to_table strpos substr substring to_hex
    translate trim unistr upper

    age clock_timestamp date_bin date_part date_trunc extract isfinite justify_days
    justify_hours justify_interval make_date make_interval make_time make_timestamp
    make_timestamptz statement_timestamp timezone to_char to_date to_number to_timestamp
    transaction_timestamp

    array_to_json json_array_elements json_array_elements_text json_array_length
    json_build_array json_build_object json_each json_each_text json_extract_path
    json_extract_path_text json_object json_object_keys json_strip_nulls json_to_record
    json_to_recordset json_typeof jsonb_array_elements jsonb_array_elements_text
    jsonb_array_length jsonb_build_array jsonb_build_object jsonb_each jsonb_each_text
    jsonb_extract_path jsonb_extract_path_text jsonb_insert jsonb_object jsonb_object_keys
    jsonb_path_exists jsonb_path_match jsonb_path_query jsonb_path_query_array
    jsonb_path_query_first jsonb_pretty jsonb_set jsonb_set_lax jsonb_strip_nulls
    jsonb_to_record jsonb_to_recordset jsonb_typeof row_to_json to_json to_jsonb

    array_append array_cat array_dims array_fill array_length array_lower array_ndims
    array_position array_positions array_prepend array_remove array_replace array_to_string
    array_upper cardinality generate_series generate_subscripts trim_array unnest

    array_agg avg bit_and bit_or bool_and bool_or count every json_agg json_object_agg
    jsonb_agg jsonb_object_agg max min mode percentile_cont percentile_disc stddev
    stddev_pop stddev_samp string_agg sum var_pop var_samp variance

    cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank rank
    row_number

    phraseto_tsquery plainto_tsquery setweight to_tsquery to_tsvector ts_headline ts_rank
    ts_rank_cd websearch_to_tsquery

    abbrev broadcast family host hostmask inet_merge inet_same_family masklen netmask network

    daterange int4range int8range isempty lower_inc lower_inf numrange range_merge tsrange
    tstzrange upper_inc upper_inf
    """.split()  # noqa: SIM905  grouped by kind, a block each
)
"""Built-in functions known to read nothing but their arguments and to change nothing.

Accepted unqualified or as ``pg_catalog.name``: the generated functions pin
``search_path`` to ``pg_catalog, pg_temp``, and functions are never looked up
in ``pg_temp``.

Left out on purpose, among others: everything that runs SQL given as text
(``ts_stat``, ``ts_rewrite``, ``query_to_xml``), reads files, settings or
session state (``pg_read_file``, ``current_setting``, ``currval``), writes or
signals (``set_config``, ``nextval``, ``pg_notify``, advisory locks), sleeps,
and ``*_populate_record*`` (it runs the input functions of any row type).
"""

ALLOWED_TYPES = frozenset(
    {
        exp.DType.BOOLEAN,
        exp.DType.SMALLINT,
        exp.DType.INT,
        exp.DType.BIGINT,
        exp.DType.DECIMAL,
        exp.DType.FLOAT,
        exp.DType.DOUBLE,
        exp.DType.MONEY,
        exp.DType.TEXT,
        exp.DType.VARCHAR,
        exp.DType.CHAR,
        exp.DType.BPCHAR,
        exp.DType.NAME,
        exp.DType.DATE,
        exp.DType.TIME,
        exp.DType.TIMETZ,
        exp.DType.TIMESTAMP,
        exp.DType.TIMESTAMPTZ,
        exp.DType.INTERVAL,
        exp.DType.UUID,
        exp.DType.JSON,
        exp.DType.JSONB,
        exp.DType.VARBINARY,
        exp.DType.INET,
        exp.DType.BIT,
        exp.DType.ARRAY,
        exp.DType.INT4RANGE,
        exp.DType.INT8RANGE,
        exp.DType.NUMRANGE,
        exp.DType.TSRANGE,
        exp.DType.TSTZRANGE,
        exp.DType.DATERANGE,
    }
)
"""Built-in types a value may be cast to (arrays of them too)."""

ALLOWED_TYPE_NAMES = frozenset({"cidr", "macaddr", "macaddr8", "tsquery", "tsvector", "varbit"})
"""Built-in types sqlglot knows only by name; ``pg_catalog`` is searched first for them."""

CLOSED_SCHEMAS = frozenset({"pushsync", "pg_catalog", "information_schema", "pg_toast"})
"""Schemas whose tables rules may not read: device secrets, roles, settings."""

_CLOSED_PREFIXES = ("pg_temp", "pg_toast_temp")

KEYWORDS = frozenset({"array", "cast", "exists", "row"})
"""Constructs of PostgreSQL's grammar that are written like calls: ``ARRAY(SELECT ...)``."""

# Typed sqlglot nodes that render as SQL syntax rather than as a call by name:
# operators (resolved in pg_catalog) and constructs of PostgreSQL's grammar.
SYNTAX: tuple[type[exp.Expr], ...] = (
    exp.Binary,
    exp.Predicate,
    exp.Array,
    exp.ArrayContainsAll,
    exp.ArrayContainedBy,
    exp.ArrayOverlaps,
    exp.Case,
    exp.Cast,
    exp.CurrentDate,
    exp.CurrentTime,
    exp.CurrentTimestamp,
    exp.DateAdd,
    exp.DateSub,
    exp.If,
    exp.JSONBContains,
    exp.JSONBContainsAllTopKeys,
    exp.JSONBContainsAnyTopKeys,
    exp.JSONBContainsTopKey,
    exp.JSONBExtract,
    exp.JSONBExtractScalar,
    exp.JSONExtract,
    exp.JSONExtractScalar,
    exp.Localtime,
    exp.Localtimestamp,
    exp.RegexpILike,
    exp.RegexpLike,
    exp.Struct,
)

_CALL = re.compile(r'\s*(?:"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*))\s*\(')


@dataclass(frozen=True, slots=True)
class Refusal:
    """Something a fragment may not do, at ``line``:``column`` of its text."""

    message: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Read:
    """A relation a fragment reads: ``schema.name``."""

    schema: str
    name: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"


def closed(schema: str) -> bool:
    """Whether ``schema`` is one that rules may not read or trust functions in."""
    return schema in CLOSED_SCHEMAS or schema.startswith(_CLOSED_PREFIXES)


def position(node: exp.Expr) -> tuple[int, int]:
    """Where ``node`` starts in the parsed text (else where its parent starts)."""
    current: exp.Expr | None = node
    while current is not None:
        found = [_start(part.meta) for part in current.walk() if "line" in part.meta]
        if found:
            return min(found)
        current = current.parent
    return 1, 1


def _start(meta: dict[str, int]) -> tuple[int, int]:
    width = int(meta.get("end", 0)) - int(meta.get("start", 0))
    return int(meta["line"]), max(int(meta["col"]) - width, 1)


def _identifier(value: object) -> str:
    """The name PostgreSQL sees: quoted names as written, others folded to lower case."""
    if isinstance(value, exp.Identifier):
        name = str(value.this)
        return name if value.quoted else name.lower()
    return str(value).lower()


def _qualifier(node: exp.Expr | None) -> str | None:
    """``schema`` of ``schema.name``; None for a longer or missing prefix."""
    if isinstance(node, exp.Identifier):
        return _identifier(node)
    return None


def called_name(node: exp.Func) -> str | None:
    """The name PostgreSQL will call for ``node``; None when it renders as syntax."""
    if isinstance(node, exp.Anonymous | exp.AnonymousAggFunc):
        return _identifier(node.this)
    text = render(node)
    first = next(iter(node.iter_expressions()), None)
    if first is not None and text.startswith(render(first)):
        return None  # an infix construct, such as a % b
    match = _CALL.match(text)
    if match is None:
        return None
    quoted, bare = match.groups()
    return quoted.replace('""', '"') if quoted is not None else bare.lower()


def _function(node: exp.Func, trusted: frozenset[str]) -> Iterator[Refusal]:
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        schema = _qualifier(parent.this)
        where = position(parent)
    elif isinstance(parent, exp.Table) and parent.this is node and parent.args.get("db"):
        schema = _qualifier(parent.args["db"]) if not parent.args.get("catalog") else None
        where = position(parent)
    else:
        yield from _unqualified(node)
        return
    name = called_name(node) or type(node).__name__.lower()
    if schema is None:
        yield Refusal(f"function {render(node)[:40]}: name functions as schema.name", *where)
    elif f"{schema}.{name}" in trusted or (schema == "pg_catalog" and name in ALLOWED_FUNCTIONS):
        return
    else:
        yield Refusal(_not_allowed(f"{schema}.{name}"), *where)


def _unqualified(node: exp.Func) -> Iterator[Refusal]:
    name = called_name(node)
    if name is None:
        if isinstance(node, SYNTAX):
            return
        shown = render(node).split("(")[0][:40]
        yield Refusal(f"{shown} is not allowed in rules", *position(node))
    elif name in KEYWORDS or name in ALLOWED_FUNCTIONS:
        return
    else:
        yield Refusal(_not_allowed(name), *position(node))


def _not_allowed(name: str) -> str:
    if "." in name and not closed(name.split(".")[0]):
        hint = "list it under trusted_functions if it only reads"
    else:
        hint = "only read-only built-in functions are allowed (see docs/rules.md)"
    return f"function {name}() is not allowed in rules: {hint}"


def _type(node: exp.DataType) -> Iterator[Refusal]:
    kind = node.this
    if kind in ALLOWED_TYPES:
        return
    if kind == exp.DType.USERDEFINED:
        name = node.args.get("kind")
        if isinstance(name, exp.Identifier) and _identifier(name) in ALLOWED_TYPE_NAMES:
            return
        shown = name.sql(dialect=DIALECT) if isinstance(name, exp.Expr) else str(name)
    else:
        shown = node.sql(dialect=DIALECT)
    yield Refusal(
        f"type {shown} is not allowed in rules: cast only to built-in types "
        "such as text, integer, numeric, timestamptz, jsonb",
        *position(node),
    )


def _table(node: exp.Table) -> Iterator[Refusal]:
    if not isinstance(node.this, exp.Identifier) or not node.args.get("db"):
        return  # a table function (checked as a call), or a CTE's name
    if node.args.get("catalog"):
        shown = node.sql(dialect=DIALECT)
        yield Refusal(f"table {shown}: name tables as schema.table", *position(node))
        return
    schema = _identifier(node.args["db"])
    if closed(schema):
        yield Refusal(_closed(schema, f"{schema}.{_identifier(node.this)}"), *position(node))


def _closed(schema: str, name: str) -> str:
    if schema == "pushsync":
        why = "pushsync's own tables (devices and their secrets, the outbox) are not for rules"
    elif schema.startswith(_CLOSED_PREFIXES):
        why = "temporary tables belong to the session that writes, which rules must not trust"
    else:
        why = "the system catalogs hold roles and settings, not business data"
    return f"{name} may not be read by rules: {why}"


def _column(node: exp.Column) -> Iterator[Refusal]:
    db = node.args.get("db")
    if db is not None:
        schema = _identifier(db)
        if closed(schema):
            yield Refusal(_closed(schema, f"{schema}.{node.table}"), *position(node))


def _string(node: exp.Expr) -> Iterator[Refusal]:
    if isinstance(node, exp.UnicodeString):
        yield Refusal(
            "U&'...' strings mean different things with standard_conforming_strings on and "
            "off: write the characters themselves",
            *position(node),
        )
    elif isinstance(node, exp.HexString | exp.BitString):
        if not re.fullmatch(r"[0-9A-Fa-f]*", str(node.this)):
            yield Refusal("a bit string may hold only hexadecimal digits", *position(node))
    elif isinstance(node, exp.National) and "\\" in str(node.this):
        yield Refusal("N'...' strings may not contain a backslash", *position(node))


def refusals(tree: exp.Expr, trusted: frozenset[str] = frozenset()) -> list[Refusal]:
    """Everything in ``tree`` that rules may not do; ``trusted`` holds ``schema.name``."""
    found: list[Refusal] = []
    for node in tree.walk():
        if isinstance(node, exp.Func):
            found += _function(node, trusted)
        elif isinstance(node, exp.DataType):
            found += _type(node)
        elif isinstance(node, exp.Table):
            found += _table(node)
        elif isinstance(node, exp.Column):
            found += _column(node)
        elif isinstance(node, exp.Operator):
            operator = str(node.args.get("operator") or "")
            if not operator.lower().startswith("pg_catalog."):
                found.append(
                    Refusal(f"OPERATOR({operator}) is not allowed in rules", *position(node))
                )
        elif isinstance(node, exp.TableSample):
            found.append(Refusal("TABLESAMPLE is not allowed in rules", *position(node)))
        else:
            found += _string(node)
    return found


def reads(tree: exp.Expr) -> list[Read]:
    """The schema-qualified relations ``tree`` reads, in order, each once."""
    found: dict[tuple[str, str], Read] = {}
    for node in tree.find_all(exp.Table):
        if isinstance(node.this, exp.Identifier) and node.args.get("db"):
            key = (_identifier(node.args["db"]), _identifier(node.this))
            found.setdefault(key, Read(*key, *position(node)))
    return list(found.values())
