"""Message templates: placeholders, literal braces, and their SQL."""

from __future__ import annotations

import pytest

from pushsync.errors import Location
from pushsync.generator import render, template
from pushsync.generator.model import Literal_, Placeholder


def at(column: int) -> Location:
    return Location("rules.yaml", 3, column)


def test_parts_and_sql() -> None:
    parsed = template.parse("disruption {new.location_id} on {{ {recipient.route} }}", at)
    assert parsed.parts == (
        Literal_(text="disruption "),
        Placeholder(scope="new", column="location_id", location=at(12)),
        Literal_(text=" on { "),
        Placeholder(scope="recipient", column="route", location=at(36)),
        Literal_(text=" }"),
    )
    assert parsed.static_text == "disruption  on {  }"
    assert render.text_sql(parsed) == (
        "concat('disruption ', \"new\".\"location_id\"::text, ' on { ', "
        '"recipient"."route"::text, \' }\')'
    )


@pytest.mark.parametrize(
    ("text", "sql"),
    [
        ("", "''"),
        ("plain", "'plain'"),
        ("it's", "'it''s'"),
        ("back\\slash", "E'back\\\\slash'"),
        ("{old.x}", 'concat("old"."x"::text)'),
    ],
)
def test_text_is_quoted_never_pasted(text: str, sql: str) -> None:
    assert render.text_sql(template.parse(text, at)) == sql


@pytest.mark.parametrize(
    ("text", "column", "message"),
    [
        ("a } b", 3, "unbalanced '}'"),
        ("a { b", 3, "unbalanced '{'"),
        ("{new}", 1, "bad placeholder {new}"),
        ("{row.x}", 1, "bad placeholder {row.x}"),
        ("{new.x; drop}", 1, "bad placeholder"),
    ],
)
def test_bad_templates(text: str, column: int, message: str) -> None:
    with pytest.raises(template.TemplateError) as caught:
        template.parse(text, at)
    assert caught.value.column == column
    assert message in caught.value.message


def test_dollar_quote_picks_an_unused_tag() -> None:
    assert render.dollar_quote("x") == "$pushsync$x$pushsync$"
    assert render.dollar_quote("a $pushsync$ b") == "$pushsync1$a $pushsync$ b$pushsync1$"


def test_identifiers_are_quoted() -> None:
    assert render.ident('we"ird') == '"we""ird"'
