"""Golden files pin the generated SQL: tests/fixtures/golden/<case>.yaml -> <case>.sql.

After an intended change to the generator, regenerate them with
``PUSHSYNC_UPDATE_GOLDEN=1 pytest tests/unit/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pushsync import __version__, generator
from tests.support.golden import CASES


def compile_case(case: Path) -> str:
    rules = generator.load(case)
    sql = generator.compile_rules(rules, source=f"tests/fixtures/golden/{case.name}")
    # The version changes with every release; the golden files should not.
    return sql.replace(f"-- generator: pushsync {__version__}\n", "-- generator: pushsync\n")


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_generated_sql_matches_golden_file(case: Path) -> None:
    expected_file = case.with_suffix(".sql")
    actual = compile_case(case)
    if os.environ.get("PUSHSYNC_UPDATE_GOLDEN"):
        expected_file.write_text(actual)
    assert expected_file.exists(), f"run with PUSHSYNC_UPDATE_GOLDEN=1 to create {expected_file}"
    assert actual == expected_file.read_text()


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 3
