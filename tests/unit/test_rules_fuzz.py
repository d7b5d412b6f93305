"""Whatever the rules file holds, the generator answers with rules or located problems."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pushsync import generator
from pushsync.errors import RulesError
from tests.integration.trucking import RULES

EXAMPLE = RULES.read_text()
LOCATED = re.compile(r"^rules\.yaml:\d+:\d+: ")


def outcome(text: str) -> None:
    try:
        generator.compile_rules(generator.loads(text, "rules.yaml"))
    except RulesError as exc:
        problems = exc.problems
    else:
        return
    assert problems
    for problem in problems:
        assert LOCATED.match(str(problem)), str(problem)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
@example("=")  # a YAML value-tag scalar: the constructor refuses it
@example("a: !!python/object:os.system ls")
def test_random_text(text: str) -> None:
    outcome(text)


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = EXAMPLE
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = draw(
            st.one_of(
                st.text(max_size=8),
                st.sampled_from(
                    [
                        "{",
                        "}",
                        ":",
                        "- ",
                        "\n",
                        "'",
                        '"',
                        ";",
                        "--",
                        "/*",
                        "new.",
                        "old.",
                        "DROP TABLE public.t",
                        "pg_sleep(1)",
                        "$$",
                        "\t",
                        "&a",
                        "*a",
                        "|",
                    ]
                ),
            )
        )
        length = draw(st.integers(0, 12))
        if action == "insert":
            text = text[:position] + chunk + text[position:]
        elif action == "delete":
            text = text[:position] + text[position + length :]
        else:
            text = text[:position] + chunk + text[position + length :]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_example())
def test_mutated_example(text: str) -> None:
    outcome(text)
