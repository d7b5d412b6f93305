"""A publication's ``upload:`` (``rows`` or ``atomic``): parsed, refused where wrong, compiled."""

from __future__ import annotations

import pytest

from pushsync import generator
from pushsync.errors import RulesError
from pushsync.generator import passes
from pushsync.generator.model import RuleSet

RULES = """\
version: 1
publications:
  - name: driver
{upload}    tables:
      - table: public.reports
        download: SELECT * FROM public.reports
        upload: [insert, update]
"""


def loads(upload: str) -> RuleSet:
    return generator.loads(RULES.format(upload=upload), "rules.yaml")


def test_rows_by_default_atomic_when_asked_and_each_table_keeps_its_own_list() -> None:
    [default] = loads("").publications
    [atomic] = loads("    upload: atomic\n").publications
    assert default.upload == "rows"
    assert atomic.upload == "atomic"
    assert atomic.tables[0].upload == ("insert", "update")
    [planned] = passes.plan(loads("    upload: atomic\n")).published
    assert planned.upload_mode == "atomic"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("atomc", "upload must be one of rows, atomic, not 'atomc' (did you mean 'atomic'?)"),
        (
            "[insert]",
            "upload of a publication must be rows or atomic; "
            "the operations a device may upload are each table's upload: [insert, …]",
        ),
        ("yes", "upload must be one of rows, atomic, not True"),
    ],
)
def test_another_value_is_refused_where_it_stands(value: str, message: str) -> None:
    with pytest.raises(RulesError) as refused:
        loads(f"    upload: {value}\n")
    assert [str(p) for p in refused.value.problems] == [
        f"rules.yaml:4:13: publication driver: {message}"
    ]


def test_the_migration_stores_it_and_needs_the_schema_that_has_it() -> None:
    sql = generator.compile_rules(loads("    upload: atomic\n"))
    assert "upload_check_function, upload_mode)" in sql
    assert "NULL, 'atomic')" in sql
    assert "WHERE version = 10" in sql
