"""The reliability suite's knobs: how big its runs are, and where its figures go.

Every test here runs the real commands (``pushsync dispatch``, ``pushsync
listen``, ``pushsync migrate``) against a real PostgreSQL over real sockets,
and sizes its run by one factor, the *scale*:

* ``--reliability-scale X`` (a float, default 1.0), or the environment
  variable ``PUSHSYNC_RELIABILITY_SCALE``; the flag wins. At 1.0 the whole
  suite takes about two minutes on two cores, which is what CI runs. Bigger
  scales make the full-size runs: 5 gives 10,000 notifications in the kill -9
  test; 20 gives 100,000 datagrams and SYNC frames (and 40,000 mails) for
  each process in the fuzz test, and a 10-minute soak at 500 notifications/s;
  3.34 gives 1,000 rules files. Each test's docstring says what grows.
  The flag is known when this directory is named on the command line
  (``pytest tests/reliability --reliability-scale 5``); for a run of the
  whole tree use the environment variable.
* ``PUSHSYNC_RELIABILITY_REPORT=FILE``: each test appends one JSON object per
  line to FILE with its figures (the same ones it prints; run pytest with
  ``-s`` to see them, or read them in the report of a failed test).
* ``PUSHSYNC_RELIABILITY_SEED``: the seed of the random choices (kill points,
  fuzzed inputs, rules mutations); by default a new one per run, printed with
  the figures so that a failing run can be repeated.

The environment is read when pytest configures itself, before the session's
fixtures clear ``PUSHSYNC_*`` variables (``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import Knobs, Processes, Report

SCALE_VARIABLE = "PUSHSYNC_RELIABILITY_SCALE"
REPORT_VARIABLE = "PUSHSYNC_RELIABILITY_REPORT"
SEED_VARIABLE = "PUSHSYNC_RELIABILITY_SEED"

_KNOBS = pytest.StashKey[Knobs]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-scale",
        type=float,
        default=None,
        help=f"size factor of the reliability tests (default 1.0; env {SCALE_VARIABLE})",
    )


def pytest_configure(config: pytest.Config) -> None:
    flag = config.getoption("--reliability-scale", default=None)
    text = os.environ.get(SCALE_VARIABLE)
    try:
        scale = float(flag) if flag is not None else float(text) if text else 1.0
    except ValueError:
        raise pytest.UsageError(f"{SCALE_VARIABLE} must be a number, not {text!r}") from None
    if not scale > 0:
        raise pytest.UsageError(f"the reliability scale must be positive, not {scale}")
    seed_text = os.environ.get(SEED_VARIABLE)
    try:
        seed = int(seed_text) if seed_text else random.SystemRandom().randrange(2**32)
    except ValueError:
        raise pytest.UsageError(f"{SEED_VARIABLE} must be a whole number") from None
    report = os.environ.get(REPORT_VARIABLE) or None
    config.stash[_KNOBS] = Knobs(scale=scale, seed=seed, report=Path(report) if report else None)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.reliability)
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def knobs(request: pytest.FixtureRequest) -> Knobs:
    """The scale, the seed and the report file of this run."""
    return request.config.stash[_KNOBS]


@pytest.fixture
def report(request: pytest.FixtureRequest, knobs: Knobs) -> Iterator[Report]:
    """Figures of one test: printed as they come, written as one JSON line at the end."""
    figures = Report(request.node.name, knobs)
    started = time.monotonic()
    yield figures
    figures.add(test_seconds=round(time.monotonic() - started, 2))
    if knobs.report is not None:
        line = {
            "test": request.node.nodeid,
            "scale": knobs.scale,
            "seed": knobs.seed,
            "complete": figures.complete,
            "figures": figures.figures,
        }
        with knobs.report.open("a", encoding="utf-8") as out:
            out.write(json.dumps(line, default=str) + "\n")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Dispatchers and listeners of one test; whatever still runs at the end is killed."""
    logs = tmp_path / "logs"
    logs.mkdir()
    started = Processes(logs)
    try:
        yield started
    finally:
        started.close()
