"""The console's page, script and style ship in the package: every file of
pushsync/monitor/static is package data, and the page refers to nothing else."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "pushsync" / "monitor" / "static"


def test_every_static_file_is_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    assert "pushsync.monitor" in config["packages"]
    assert "pushsync.monitor.static" in config["packages"]
    patterns = config["package-data"]["pushsync.monitor.static"]
    files = sorted(p.name for p in STATIC.iterdir() if p.is_file())
    assert files == ["console.css", "console.js", "index.html"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name


def test_the_page_loads_only_its_own_files() -> None:
    page = (STATIC / "index.html").read_text("utf-8")
    references = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert sorted(references) == ["/static/console.css", "/static/console.js"]
    for reference in references:
        assert (STATIC / reference.removeprefix("/static/")).is_file()
    script = (STATIC / "console.js").read_text("utf-8")
    # values reach the page as text: no markup is ever parsed from strings
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
