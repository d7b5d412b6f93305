"""Parsing, policing and re-rendering the SQL written in rules."""

from __future__ import annotations

import pytest

from pushsync.generator import fragments
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
        ("pg_sleep(10) IS NULL", "function pg_sleep() is not allowed"),
        ("nextval('s') > 0", "function nextval() is not allowed"),
        ("set_config('role', 'x', true) = ''", "function set_config() is not allowed"),
        ("lo_import('/etc/passwd') > 0", "function lo_import() is not allowed"),
        ("pg_read_file('/etc/passwd') <> ''", "function pg_read_file() is not allowed"),
        ("pg_advisory_lock(1) IS NULL", "function pg_advisory_lock() is not allowed"),
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
        ("SELECT * FROM dblink_exec('x')", "function dblink_exec() is not allowed"),
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
