"""Parsing, policing and re-rendering the SQL written in rules."""

from __future__ import annotations

import pytest

from pushsync.generator import allowed, fragments
from pushsync.generator.fragments import FragmentError


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("new.status = 'open'", '"new"."status" = \'open\''),
        ("NEW.Status = 'Open'", '"new"."status" = \'Open\''),  # unquoted names fold to lower
        ('new."Status" = 1', '"new"."Status" = 1'),  # quoted names keep their case
        ("new.a = 1 /* ; DROP TABLE t */ OR old.b", '"new"."a" = 1 OR "old"."b"'),
        (
            "EXISTS (SELECT 1 FROM public.x WHERE x.id = new.id)",
            'EXISTS(SELECT 1 FROM "public"."x" WHERE "x"."id" = "new"."id")',
        ),
        ("lower(new.name) LIKE '%ab%'", 'LOWER("new"."name") LIKE \'%ab%\''),
    ],
)
def test_condition_is_rendered_quoted_without_comments(text: str, rendered: str) -> None:
    assert fragments.render(fragments.parse_condition(text)) == rendered


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected an expression, found nothing"),
        ("new.a = ", "SQL syntax error"),
        ("1) FROM public.t WHERE (true", "expected one expression"),
        ("true; SELECT 1", "SQL syntax error"),
        ("new.a = $1", "found a parameter"),
        ("new.a = :x", "found a parameter"),
        ("x = 1", "column x must be written new.x or old.x"),
        ("EXISTS (SELECT 1 FROM t)", "table t must be named with its schema"),
    ],
)
def test_condition_rejects(text: str, message: str) -> None:
    with pytest.raises(FragmentError) as caught:
        fragments.parse_condition(text)
    assert message in caught.value.message


def test_syntax_error_position_is_within_the_fragment() -> None:
    with pytest.raises(FragmentError) as caught:
        fragments.parse_query("SELECT device_id\nFROM public.t\nWHERE")
    assert (caught.value.line, caught.value.column) == (3, 5)
    with pytest.raises(FragmentError) as caught:
        fragments.parse_condition("new.a = = 1")
    assert caught.value.line == 1
    assert caught.value.column <= len("new.a = = 1")


@pytest.mark.parametrize(
    "text",
    [
        "SELECT device_id FROM public.t UNION SELECT device_id FROM public.u",
        "WITH x AS (SELECT device_id FROM public.t) SELECT device_id FROM x",
        "SELECT 'd1' AS device_id",
        "SELECT g::text AS device_id FROM generate_series(1, 3) AS g",
    ],
)
def test_queries_that_only_read_are_accepted(text: str) -> None:
    query = fragments.parse_query(text)
    assert fragments.output_columns(query) == ["device_id"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("INSERT INTO public.t VALUES (1)", "found a INSERT statement"),
        ("UPDATE public.t SET a = 1", "found a UPDATE statement"),
        ("DELETE FROM public.t", "found a DELETE statement"),
        ("DROP TABLE public.t", "found a DROP statement"),
        ("TRUNCATE public.t", "found a TRUNCATETABLE statement"),
        ("COPY public.t TO PROGRAM 'sh'", "found a COPY statement"),
        ("SELECT 1; SELECT 2", "found more than one statement"),
        ("SELECT a FROM public.t FOR SHARE", "locking clause"),
        ("VACUUM", "only reading is allowed here"),
    ],
)
def test_query_rejects(text: str, message: str) -> None:
    with pytest.raises(FragmentError) as caught:
        fragments.parse_query(text)
    assert message in caught.value.message


def test_star_hides_output_columns() -> None:
    assert fragments.output_columns(fragments.parse_query("SELECT * FROM public.t")) is None
    assert fragments.output_columns(fragments.parse_query("SELECT t.* FROM public.t")) is None


def test_row_references_are_found_with_positions() -> None:
    tree = fragments.parse_query("SELECT d.device_id\nFROM public.d WHERE d.x = new.x AND old.y")
    refs = fragments.row_references(tree)
    assert [(r.scope, r.column, r.line, r.column_number) for r in refs] == [
        ("new", "x", 2, 27),
        ("old", "y", 2, 37),
    ]


def refusals(text: str, trusted: frozenset[str] = frozenset()) -> list[str]:
    return [r.message for r in allowed.refusals(fragments.parse_query(text), trusted)]


BUSINESS_LOGIC = [
    "SELECT d.device_id FROM public.t d WHERE lower(d.name) LIKE 'a%' AND d.x ~ '\\d+'",
    "SELECT d.device_id, coalesce(d.a, 'x') AS a, nullif(d.b, 0), greatest(1, 2), least(1, 2) "
    "FROM public.t d",
    "SELECT d.device_id FROM public.t d WHERE d.j ->> 'k' = 'v' AND d.j #>> '{a,b}' = 'c' "
    "AND d.j @> '{}' AND d.j ? 'k' AND d.arr && ARRAY[1, 2] AND 1 = ANY (d.arr)",
    "SELECT d.device_id FROM public.t d WHERE d.ts > now() - interval '1 hour' "
    "AND d.day = current_date AND extract(epoch FROM d.ts) > 0 "
    "AND date_trunc('day', d.ts) = d.day AND age(d.ts) < interval '1 day'",
    "SELECT device_id, count(*) AS n, min(a), max(a), sum(a), avg(a), array_agg(a ORDER BY a), "
    "string_agg(b, ','), bool_and(c), bool_or(c), jsonb_agg(a) FROM public.t "
    "GROUP BY device_id HAVING count(*) FILTER (WHERE a > 1) > 0",
    "SELECT device_id FROM (SELECT device_id, row_number() OVER (PARTITION BY g ORDER BY ts) "
    "AS rn FROM public.t) AS s WHERE s.rn = 1",
    "SELECT x.device_id FROM public.t d CROSS JOIN LATERAL "
    "jsonb_array_elements_text(d.j) AS x(device_id)",
    "SELECT d.device_id, CASE WHEN d.a > 1 THEN 'big' ELSE 'small' END AS size, d.a % 2, "
    "d.a::text, CAST(d.b AS integer), d.c::numeric(10, 2), d.e::timestamptz, d.g::int[] "
    "FROM public.t d",
    "SELECT d.device_id, concat(d.a, '-', d.b), d.a || d.b, substr(d.a, 1, 3), "
    "position('x' in d.a), trim(d.a), replace(d.a, 'x', 'y'), split_part(d.a, ',', 1), "
    "upper(d.a), length(d.a), format('%s', d.a), to_char(d.ts, 'YYYY'), md5(d.a), "
    "regexp_replace(d.a, 'x', 'y', 'g'), array_to_string(d.arr, ','), cardinality(d.arr) "
    "FROM public.t d",
    "SELECT d.device_id FROM public.t d WHERE EXISTS (SELECT 1 FROM public.u u "
    "WHERE u.x = d.x) AND d.y IN (SELECT y FROM public.v) AND d.z BETWEEN 1 AND 2",
    "SELECT d.device_id, to_jsonb(d), row_to_json(d), jsonb_build_object('a', d.a), "
    'ROW(d.a, d.b), ARRAY(SELECT 1), d.a COLLATE "C" FROM public.t d',
    "SELECT d.device_id FROM public.t d WHERE to_tsvector('english', d.body) "
    "@@ plainto_tsquery('english', 'x') AND pg_catalog.lower(d.a) = 'x'",
    "SELECT r.device_id FROM jsonb_to_recordset('[]'::jsonb) AS r(device_id text, n int)",
    "SELECT g::text AS device_id FROM generate_series(1, 3) AS g",
]


@pytest.mark.parametrize("text", BUSINESS_LOGIC)
def test_business_logic_is_allowed(text: str) -> None:
    assert refusals(text) == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # SQL given as text, and the ways around a check of names
        ("SELECT ts_stat('SELECT 1')::text AS device_id", "function ts_stat() is not allowed"),
        ("SELECT pg_catalog.ts_stat('x')::text AS device_id", "pg_catalog.ts_stat() is not"),
        ("SELECT \"ts_stat\"('x')::text AS device_id", "function ts_stat() is not allowed"),
        (
            "SELECT \"pg_catalog\".\"ts_rewrite\"('a'::tsquery, 'x')::text AS device_id",
            "function pg_catalog.ts_rewrite() is not allowed",
        ),
        (
            "SELECT s.device_id FROM ts_stat('x') AS s(device_id text, ndoc int, nentry int)",
            "function ts_stat() is not allowed",
        ),
        (
            "SELECT d.device_id FROM public.t d CROSS JOIN LATERAL "
            "(WITH q AS (SELECT query_to_xml('x', true, true, '') AS x) SELECT x FROM q) AS y",
            "function query_to_xml() is not allowed",
        ),
        # writes, session state, files, sleep
        ("SELECT set_config('a', 'b', false) AS device_id", "function set_config()"),
        ("SELECT nextval('public.s')::text AS device_id", "function nextval() is not allowed"),
        ("SELECT pg_read_file('/etc/passwd') AS device_id", "function pg_read_file()"),
        ("SELECT current_setting('role') AS device_id", "function current_setting()"),
        ("SELECT 'x' AS device_id WHERE pg_sleep(1) IS NULL", "function pg_sleep()"),
        ("SELECT lo_import('/etc/passwd')::text AS device_id", "function lo_import()"),
        ("SELECT * FROM dblink_exec('x')", "function dblink_exec()"),
        ("SELECT current_user AS device_id", "CURRENT_USER is not allowed"),
        # functions, types and operators of other schemas
        ("SELECT d.device_id FROM public.t d WHERE public.f(d.a)", "list it under trusted"),
        ("SELECT d.device_id FROM public.t d WHERE a.b.c(1)", "name functions as schema.name"),
        ("SELECT d.device_id FROM public.t d WHERE d.a::public.ty IS NULL", "type public.ty"),
        ("SELECT d.device_id FROM public.t d WHERE d.a::ty IS NULL", "type ty is not allowed"),
        ("SELECT d.device_id FROM public.t d WHERE d.a::regproc IS NULL", "type REGPROC"),
        (
            "SELECT x.device_id FROM public.t d, jsonb_populate_record(NULL::public.t, d.j) x",
            "function jsonb_populate_record() is not allowed",
        ),
        ("SELECT d.device_id FROM public.t d WHERE d.a OPERATOR(public.=) 1", "OPERATOR"),
        ("SELECT d.device_id FROM public.t d TABLESAMPLE SYSTEM (10)", "TABLESAMPLE"),
        ("SELECT U&'\\0041' AS device_id", "U&'...' strings"),
        # pushsync's own tables and the catalogs
        ("SELECT d.device_id FROM pushsync.devices d", "pushsync.devices may not be read"),
        (
            "WITH s AS (SELECT secret FROM pushsync.devices) SELECT s.secret AS device_id FROM s",
            "pushsync.devices may not be read",
        ),
        ("SELECT rolname AS device_id FROM pg_catalog.pg_authid", "pg_catalog.pg_authid may"),
        (
            "SELECT d.device_id FROM public.t d WHERE EXISTS (SELECT FROM pg_catalog.pg_settings)",
            "pg_catalog.pg_settings may not be read",
        ),
        (
            "SELECT d.device_id FROM public.t d, "
            "LATERAL (SELECT * FROM information_schema.tables) AS i",
            "information_schema.tables may not be read",
        ),
        ("SELECT d.device_id FROM pg_temp.t d", "pg_temp.t may not be read"),
    ],
)
def test_what_the_allow_lists_refuse(text: str, message: str) -> None:
    assert any(message in found for found in refusals(text)), refusals(text)


def test_trusted_functions_are_called_schema_qualified() -> None:
    trusted = frozenset({"public.is_open"})
    assert refusals("SELECT d.device_id FROM public.t d WHERE public.is_open(d.s)", trusted) == []
    assert refusals("SELECT d.device_id FROM public.t d WHERE is_open(d.s)", trusted) != []
    assert refusals("SELECT d.device_id FROM public.t d WHERE public.is_shut(d.s)", trusted) != []


def test_refusals_are_located_in_the_fragment() -> None:
    tree = fragments.parse_query("SELECT d.device_id\nFROM public.t d\nWHERE ts_stat('x') IS NULL")
    (refusal,) = allowed.refusals(tree)
    assert (refusal.line, refusal.column) == (3, 7)


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        ("new.a = 'x\\y'", '"new"."a" = E\'x\\\\y\''),
        ("new.a = $q$\\' OR true --$q$", "\"new\".\"a\" = E'\\\\'' OR true --'"),
        ("new.a = E'a\\\\b'", '"new"."a" = e\'a\\\\b\''),
        ("new.a = 'it''s'", "\"new\".\"a\" = 'it''s'"),
        ('"Is_Open"(new.a)', '"Is_Open"("new"."a")'),
    ],
)
def test_strings_and_quoted_names_render_as_written(text: str, rendered: str) -> None:
    assert fragments.render(fragments.parse_condition(text)) == rendered
