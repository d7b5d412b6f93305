"""YAML with locations: keys, values, and positions inside block scalars."""

from __future__ import annotations

import pytest

from pushsync import source
from pushsync.errors import Location, RulesError

TEXT = """\
version: 1
rules:
  - name: a
    on: insert
    when: new.x = 1
    recipients: |
      SELECT device_id
        FROM public.t
    content: "hi {new.x}"
    folded: >
      one
      two
"""


def test_locations_of_keys_and_values() -> None:
    root = source.load(TEXT, "r.yaml")
    rule = root.value["rules"].value[0]
    assert rule.location == Location("r.yaml", 3, 5)
    assert rule.key_locations["on"] == Location("r.yaml", 4, 5)
    # `on` stays a key: YAML 1.1 would have read it as the boolean true
    assert rule.value["on"].value == "insert"
    assert rule.value["when"].inner(1, 5) == Location("r.yaml", 5, 15)
    assert rule.value["recipients"].inner(2, 3) == Location("r.yaml", 8, 9)
    assert rule.value["content"].inner(1, 4) == Location("r.yaml", 9, 18)


def test_empty_file_is_an_empty_mapping() -> None:
    assert source.load("", "r.yaml").value == {}


def test_anchors_are_resolved_but_merge_keys_refused() -> None:
    with pytest.raises(RulesError, match="merge keys"):
        source.load("a: &x {b: 1}\nc:\n  <<: *x\n", "r.yaml")
    root = source.load("a: &x 5m\nb: *x\n", "r.yaml")
    assert root.value["b"].value == "5m"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h30m", 5400), ("2d", 172800), ("250ms", 0.25), ("1h 5s", 3605)],
)
def test_durations(text: str, seconds: float) -> None:
    parsed = source.parse_duration(text)
    assert parsed is not None
    assert parsed.total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "5", "m", "5 minutes", "-5m", "1.5h", "5m5", 300])
def test_bad_durations(text: object) -> None:
    assert source.parse_duration(text) is None
