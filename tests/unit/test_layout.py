"""Each module of pushsync has one import name, and the tree holds no links.

generator/, dispatcher/, listener/ and sql/ sit at the top of the tree and are
installed as ``pushsync.generator`` and so on (``package-dir`` in
pyproject.toml). The repository root is on ``sys.path`` for the tests (they
import ``tests.*``), so ``import listener`` would load a second copy of the
device code with, say, a second ``ProtocolError`` class. Nothing may do that.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP_LEVEL = ("generator", "dispatcher", "listener", "sql")
SOURCES = ("pushsync", *TOP_LEVEL, "tests", "bench", "examples", "scripts")


def package_dirs() -> dict[str, Path]:
    """Every package of the distribution and the folder its files come from."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    mapping: dict[str, str] = setuptools["package-dir"]
    found: dict[str, Path] = {}
    for package in setuptools["packages"]:
        parts = package.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in mapping:
                found[package] = ROOT / mapping[prefix] / Path(*parts[cut:])
                break
        else:
            found[package] = ROOT / Path(*parts)
    return found


def product_modules() -> list[str]:
    """The name of every module of the distribution, from the files on disk."""
    names = []
    for package, folder in package_dirs().items():
        for path in sorted(folder.glob("*.py")):
            if path.stem == "__init__":
                names.append(package)
            elif path.stem != "__main__":  # runs the command when imported
                names.append(f"{package}.{path.stem}")
    return names


def test_the_top_level_folders_install_under_pushsync() -> None:
    dirs = package_dirs()
    for name in TOP_LEVEL:
        assert dirs[f"pushsync.{name}"] == ROOT / name
        assert not (ROOT / "pushsync" / name).exists(), f"pushsync/{name} shadows {name}/"


def test_no_module_loads_twice() -> None:
    names = product_modules()
    for name in names:
        importlib.import_module(name)
    # Enough of every part, each from its own folder: the check cannot pass empty.
    for part in ("wire", "generator", "dispatcher", "listener"):
        assert sum(n.startswith(f"pushsync.{part}.") for n in names) >= 2, part
    assert "pushsync.sql" in names
    config = sys.modules["pushsync.listener.config"].__file__
    assert config is not None
    assert Path(config).parts[-2:] == ("listener", "config.py")
    # By now every test module has been imported too (pytest collects before it runs).
    by_file: dict[str, list[str]] = {}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file is not None:
            by_file.setdefault(os.path.realpath(file), []).append(name)
    package = sys.modules["pushsync"].__file__
    assert package is not None
    folders = [Path(package).resolve().parent, *package_dirs().values()]
    folders += [ROOT / "tests", ROOT / "bench", ROOT / "examples"]
    ours = tuple(str(folder) + os.sep for folder in folders)
    twice = {
        file: found for file, found in by_file.items() if len(found) > 1 and file.startswith(ours)
    }
    assert twice == {}
    assert [n for n in sys.modules if n.split(".")[0] in TOP_LEVEL] == []


def imported_names(path: Path) -> set[str]:
    """The modules ``path`` names in an import statement (absolute imports only)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_nothing_imports_a_top_level_folder_by_its_own_name() -> None:
    paths = [p for d in SOURCES for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts]
    assert len(paths) > 100
    offences = sorted(
        f"{path.relative_to(ROOT)}: {name}"
        for path in paths
        for name in imported_names(path)
        if name.split(".")[0] in TOP_LEVEL
    )
    assert offences == []


def test_the_tree_holds_no_symbolic_links() -> None:
    links = sorted(
        str(path.relative_to(ROOT))
        for d in SOURCES
        for path in (ROOT / d).rglob("*")
        if path.is_symlink()
    )
    assert links == []


def test_the_example_keeps_the_demo_files() -> None:
    """examples/trucking/ holds copies of the demo's schema and rules (no links)."""
    for name in ("schema.sql", "rules.yaml"):
        example = (ROOT / "examples" / "trucking" / name).read_text("utf-8")
        assert example == (ROOT / "pushsync" / "demo" / name).read_text("utf-8"), name


def test_the_example_seed_is_the_demo_fleet() -> None:
    """examples/trucking/seed.sql inserts the drivers, routes and stops of ``pushsync demo``."""
    from pushsync.demo import DRIVERS

    seed = (ROOT / "examples" / "trucking" / "seed.sql").read_text("utf-8")
    blocks = {
        table: re.findall(r"\(([^()]*)\)", values)
        for table, values in re.findall(
            r"INSERT INTO public\.(\w+) \([^)]*\) VALUES(.*?)ON CONFLICT", seed, re.S
        )
    }
    rows = {
        table: [tuple(v.strip(" '") for v in t.split(",")) for t in found]
        for table, found in blocks.items()
    }
    assert rows["drivers"] == [(str(d.driver_id), d.name, d.device) for d in DRIVERS]
    assert rows["routes"] == [(str(d.route_id), d.route, str(d.driver_id)) for d in DRIVERS]
    assert rows["route_stops"] == [
        (str(d.route_id), str(seq), str(location))
        for d in DRIVERS
        for seq, location in enumerate(d.stops, start=1)
    ]
