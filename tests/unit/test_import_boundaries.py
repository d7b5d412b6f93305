"""Who may import what: test helpers live once in tests/support/, test doubles in pushsync.testing.

* No module of tests/, bench/ or examples/ imports a test module
  (``tests.<tier>.test_*``) or a tier's ``conftest``: what two modules share
  lives in ``tests/support/``.
* examples/ imports nothing of tests/: an example runs without the test suite.
* The product never imports :mod:`pushsync.testing`, its test doubles.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEST_MODULE = re.compile(r"^tests\.[a-z_]+\.(test_\w+|conftest)(\.|$)")


def python_files(*directories: str) -> list[Path]:
    """The .py files under ``directories`` of the repository, each once (symlinks resolved)."""
    found = {
        path.resolve()
        for directory in directories
        if (ROOT / directory).is_dir()
        for path in (ROOT / directory).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    return sorted(found)


def imported(path: Path) -> Iterator[tuple[int, str]]:
    """Every module ``path`` imports (``from a import b`` also as ``a.b``), with its line."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def offences(paths: list[Path], forbidden: re.Pattern[str]) -> list[str]:
    return sorted(
        {
            f"{path.relative_to(ROOT)}:{line}: {module}"
            for path in paths
            for line, module in imported(path)
            if forbidden.match(module)
        }
    )


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    paths = python_files("tests", "bench", "examples")
    assert len(paths) > 50
    assert offences(paths, TEST_MODULE) == []


def test_examples_import_nothing_of_the_test_suite() -> None:
    paths = python_files("examples")
    assert paths
    assert offences(paths, re.compile(r"^tests(\.|$)")) == []


def test_the_product_never_imports_its_test_doubles() -> None:
    testing = (ROOT / "pushsync" / "testing.py").resolve()
    paths = python_files("pushsync", "dispatcher", "listener", "generator")
    assert testing in paths
    paths.remove(testing)
    assert offences(paths, re.compile(r"^pushsync\.testing(\.|$)")) == []


@pytest.mark.parametrize(
    ("source", "found"),
    [
        ("from tests.integration.test_x import helper\n", True),
        ("import tests.acceptance.conftest\n", True),
        ("from tests.acceptance import conftest\n", True),
        ("from tests.integration import test_sync_gateway as gateway\n", True),
        ("from tests.support.waiting import until\n", False),
        ("from tests.integration import trucking\n", False),
    ],
)
def test_the_check_sees_every_spelling_of_such_an_import(
    tmp_path: Path, source: str, found: bool
) -> None:
    module = tmp_path / "probe.py"
    module.write_text(source, encoding="utf-8")
    hits = [m for _, m in imported(module) if TEST_MODULE.match(m)]
    assert bool(hits) is found, (source, hits)
