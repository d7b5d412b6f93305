"""A publication's ``upload_check:``: parsed and policed like a download, located, compiled."""

from __future__ import annotations

import pytest

from pushsync import generator
from pushsync.errors import RulesError
from pushsync.generator import fragments

BASE = """\
version: 1
publications:
  - name: driver
    tables:
      - table: public.disruption_reports
        download: SELECT * FROM public.disruption_reports
        upload: {upload}
        upload_check: {check}
"""
OWN = "new.reported_by = (SELECT d.driver_id FROM public.drivers d WHERE d.device_id = :device_id)"


def problems(upload: str, check: str) -> list[str]:
    with pytest.raises(RulesError) as refused:
        generator.loads(BASE.format(upload=upload, check=check), "rules.yaml")
    return [str(p) for p in refused.value.problems]


def test_the_device_parameter_becomes_the_first_argument() -> None:
    tree = fragments.parse_upload_check(OWN)
    assert fragments.render(tree) == (
        '"new"."reported_by" = (SELECT "d"."driver_id" FROM "public"."drivers" AS "d" '
        'WHERE "d"."device_id" = $1)'
    )
    whole = fragments.parse_upload_check("old IS NULL OR new.n >= old.n")
    assert fragments.render(whole) == '"old" IS NULL OR "new"."n" >= "old"."n"'


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ("new.a = :other", "unknown parameter :other: only :device_id may be used"),
        ("status = 'open'", "column status must be written new.status or old.status"),
        ("new.a IN (SELECT a FROM drivers)", "table drivers must be named with its schema"),
        ("new.a = 1; DELETE FROM public.drivers", "SQL syntax error"),
    ],
)
def test_what_is_refused_in_the_fragment(check: str, message: str) -> None:
    with pytest.raises(fragments.FragmentError) as refused:
        fragments.parse_upload_check(check)
    assert message in refused.value.message


def test_problems_are_located_in_the_rules_file() -> None:
    assert problems("[insert]", "old.status = 'open'") == [
        "rules.yaml:8:23: publication driver: old.status: uploaded inserts have no old row"
    ]
    assert problems("[]", OWN) == [
        "rules.yaml:8:9: publication driver: upload_check: upload allows nothing, so there "
        "is nothing to check"
    ]
    [found] = problems("[insert]", "pg_sleep(1) IS NOT NULL")
    assert found.startswith(
        "rules.yaml:8:23: publication driver: upload_check: function pg_sleep() is not allowed"
    )


def test_it_compiles_to_a_security_definer_function_kept_by_the_migration() -> None:
    sql = generator.compile_rules(
        generator.loads(BASE.format(upload="[insert]", check=OWN), "rules.yaml")
    )
    name = '"pub__driver__public__disruption_reports__upload_check"'
    assert (
        f"CREATE OR REPLACE FUNCTION pushsync.{name}(pushsync_device_id text, "
        '"new" "public"."disruption_reports", "old" "public"."disruption_reports")'
    ) in sql
    body = sql[sql.index(f"FUNCTION pushsync.{name}") :]
    assert "SECURITY DEFINER\nSET search_path = pg_catalog, pg_temp\n" in body
    assert "'pub__driver__public__disruption_reports__upload_check', 'rows')" in sql  # registered
    keep = next(line for line in sql.splitlines() if "keep text[]" in line)
    assert "'pub__driver__public__disruption_reports__upload_check'" in keep
