"""docs/security.md and tests/security/ name each other: every attack file is described."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"


def named_in_the_doc() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    found = set(re.findall(r"tests/security/(test_[a-z0-9_]+\.py)", text))
    for pattern in re.findall(r"tests/security/(test_[a-z0-9_]*\*\.py)", text):
        found |= {p.name for p in (ROOT / "tests" / "security").glob(pattern)}
    return found


def test_every_file_the_doc_names_exists() -> None:
    missing = {n for n in named_in_the_doc() if not (ROOT / "tests" / "security" / n).exists()}
    assert missing == set()


def test_every_attack_file_is_in_the_doc() -> None:
    files = {p.name for p in (ROOT / "tests" / "security").glob("test_*.py")}
    assert files - named_in_the_doc() == set()
