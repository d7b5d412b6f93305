"""Every kind of bad rules file gets one located, readable problem and nothing else."""

from __future__ import annotations

import dataclasses
import textwrap
from dataclasses import dataclass

import pytest

from pushsync import generator, source
from pushsync.errors import Problems, RulesError
from pushsync.generator import fragments, passes
from pushsync.generator.model import Fragment

GOOD_RULE = """\
version: 1
rules:
  - name: r
    table: public.t
    on: [insert]
    recipients: SELECT device_id FROM public.devices_of_t
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(RulesError) as caught:
        generator.loads(textwrap.dedent(text), "rules.yaml")
    return [str(p) for p in caught.value]


def only_problem(text: str) -> str:
    found = problems_of(text)
    assert len(found) == 1, found
    return found[0]


BUILTIN = ": only read-only built-in functions are allowed (see docs/rules.md)"

# (case id, rules text, the whole expected message)
CASES = [
    (
        "NUL escape",
        "version: 1\nrules:\n  - name: r\n    table: public.t\n    on: insert\n"
        '    recipients: all\n    subject: "a\\0b"\n',
        "rules.yaml:7:14: text may not contain NUL (\\0): PostgreSQL text cannot hold it",
    ),
    (
        "lone surrogate escape",
        "version: 1\nrules:\n  - name: r\n    table: public.t\n    on: insert\n"
        "    recipients: all\n    when: \"new.x = '\\ud800'\"\n",
        "rules.yaml:7:11: text may not contain a lone surrogate (\\ud800-\\udfff): it is not UTF-8",
    ),
    (
        "invalid yaml",
        "version: 1\nrules:\n  - name: r\n   table: x\n",
        "rules.yaml:4:4: invalid YAML: expected <block end>, but found '<block mapping start>'",
    ),
    (
        "unknown key with suggestion",
        GOOD_RULE + "    recipeints: all\n",
        "rules.yaml:7:5: rule r: unknown key 'recipeints' (did you mean 'recipients'?)",
    ),
    (
        "unknown top-level key",
        GOOD_RULE + "rulez: []\n",
        "rules.yaml:7:1: unknown key 'rulez' (did you mean 'rules'?)",
    ),
    (
        "missing required key",
        "version: 1\nrules:\n  - name: r\n    on: insert\n    recipients: all\n",
        "rules.yaml:3:5: rule r: missing required key 'table'",
    ),
    (
        "missing version",
        "rules: []\n",
        "rules.yaml:1:1: missing required key 'version'",
    ),
    (
        "duplicate rule name",
        GOOD_RULE + "  - name: r\n    table: public.u\n    on: delete\n    recipients: all\n",
        "rules.yaml:7:5: rule r: duplicate name 'r' (first used at line 3)",
    ),
    (
        "bad name",
        GOOD_RULE.replace("name: r", "name: Route-Disruption"),
        "rules.yaml:3:11: rule #1: bad name 'Route-Disruption': use lower-case letters, digits "
        "and _, starting with a letter, at most 63 characters",
    ),
    (
        "bad duration",
        GOOD_RULE + "    ttl: 5 minutes\n",
        "rules.yaml:7:10: rule r: bad duration '5 minutes' for ttl: expected a number and a "
        "unit, e.g. 30s, 5m, 1h, 2d",
    ),
    (
        "unknown event",
        GOOD_RULE.replace("on: [insert]", "on: [insert, upsert]"),
        "rules.yaml:5:18: rule r: on must be one of insert, update, delete, not 'upsert' "
        "(did you mean 'insert'?)",
    ),
    (
        "sql syntax error",
        GOOD_RULE.replace("FROM public.devices_of_t", "FROM public.devices_of_t WHERE"),
        "rules.yaml:6:63: rule r: recipients: SQL syntax error: incomplete WHERE clause",
    ),
    (
        "second statement in recipients",
        GOOD_RULE.replace("devices_of_t", "devices_of_t; DROP TABLE public.t"),
        "rules.yaml:6:17: rule r: recipients: expected one SELECT, found more than one statement",
    ),
    (
        "second statement in when",
        GOOD_RULE + "    when: new.a = 1); DELETE FROM public.t; SELECT (true\n",
        "rules.yaml:7:11: rule r: when: expected one expression, found more than one statement",
    ),
    (
        "dml in recipients",
        GOOD_RULE.replace(
            "SELECT device_id FROM public.devices_of_t",
            "WITH gone AS (DELETE FROM public.t RETURNING 1) SELECT device_id FROM public.d",
        ),
        "rules.yaml:6:17: rule r: recipients: only reading is allowed here, found a DELETE "
        "statement",
    ),
    (
        "ddl in recipients",
        GOOD_RULE.replace(
            "SELECT device_id FROM public.devices_of_t", "CREATE TABLE public.x (device_id text)"
        ),
        "rules.yaml:6:17: rule r: recipients: only reading is allowed here, found a CREATE "
        "statement",
    ),
    (
        "select into",
        GOOD_RULE.replace("SELECT device_id FROM", "SELECT device_id INTO public.x FROM"),
        "rules.yaml:6:17: rule r: recipients: only reading is allowed here, found SELECT INTO",
    ),
    (
        "locking clause",
        GOOD_RULE.replace("devices_of_t", "devices_of_t FOR UPDATE"),
        "rules.yaml:6:17: rule r: recipients: only reading is allowed here, found a locking "
        "clause (FOR UPDATE/SHARE)",
    ),
    (
        "pg_terminate_backend in when",
        GOOD_RULE + "    when: pg_terminate_backend(42)\n",
        "rules.yaml:7:11: rule r: when: function pg_terminate_backend() is not allowed in rules"
        + BUILTIN,
    ),
    (
        "schema-qualified pg_terminate_backend",
        GOOD_RULE + "    when: pg_catalog.pg_terminate_backend(42)\n",
        "rules.yaml:7:11: rule r: when: function pg_catalog.pg_terminate_backend() is not allowed "
        "in rules" + BUILTIN,
    ),
    (
        "dblink in recipients",
        GOOD_RULE.replace(
            "SELECT device_id FROM public.devices_of_t",
            "SELECT device_id FROM dblink('host=x', 'DELETE FROM t') AS x(device_id text)",
        ),
        "rules.yaml:6:39: rule r: recipients: function dblink() is not allowed in rules" + BUILTIN,
    ),
    (
        "query_to_xml runs SQL given as text",
        GOOD_RULE + "    when: query_to_xml('DELETE FROM public.t', true, true, '') IS NULL\n",
        "rules.yaml:7:11: rule r: when: function query_to_xml() is not allowed in rules" + BUILTIN,
    ),
    (
        "ts_stat runs SQL given as text",
        GOOD_RULE + "    when: ts_stat('SELECT 1') IS NULL\n",
        "rules.yaml:7:11: rule r: when: function ts_stat() is not allowed in rules" + BUILTIN,
    ),
    (
        "a function of the application, not trusted",
        GOOD_RULE + "    when: public.is_open(new.status)\n",
        "rules.yaml:7:11: rule r: when: function public.is_open() is not allowed in rules: "
        "list it under trusted_functions if it only reads",
    ),
    (
        "a trusted function",
        "trusted_functions: [public.is_open]\n" + GOOD_RULE + "    when: public.is_open(new.x)\n",
        None,
    ),
    (
        "a built-in cannot be trusted",
        "trusted_functions: [pg_catalog.ts_stat]\n" + GOOD_RULE,
        "rules.yaml:1:21: trusted_functions: pg_catalog.ts_stat: functions in pg_catalog cannot "
        "be trusted; of the built-ins, only those of the allow-list may be called",
    ),
    (
        "a trusted function without its schema",
        "trusted_functions: [is_open]\n" + GOOD_RULE,
        "rules.yaml:1:21: trusted_functions: is_open: name the function as schema.function, "
        "in lower case",
    ),
    (
        "PUBLIC is not an owner to trust",
        "trusted_owners: [public]\n" + GOOD_RULE,
        "rules.yaml:1:18: trusted_owners: public: PUBLIC is every role: trust a role that owns "
        "what rules use",
    ),
    (
        "device secrets in recipients",
        GOOD_RULE.replace(
            "SELECT device_id FROM public.devices_of_t",
            "SELECT device_id, secret FROM pushsync.devices",
        ),
        "rules.yaml:6:47: rule r: recipients: pushsync.devices may not be read by rules: "
        "pushsync's own tables (devices and their secrets, the outbox) are not for rules",
    ),
    (
        "a rule on pushsync's own table",
        GOOD_RULE.replace("public.t", "pushsync.devices"),
        "rules.yaml:4:5: rule r: table pushsync.devices: tables of pushsync cannot be watched "
        "or published",
    ),
    (
        "comment cannot hide a statement",
        GOOD_RULE + '    when: "new.a = 1 /* ; DROP TABLE public.t */"\n',
        None,  # accepted: the comment is dropped when the SQL is rendered again
    ),
    (
        "oversized static message",
        GOOD_RULE + "    content: '" + "x" * 1000 + "'\n",
        "rules.yaml:7:5: rule r: subject and content take 1001 bytes before any placeholder is "
        "filled; a message carries at most 944 (one UDP datagram)",
    ),
    (
        "unbalanced open brace",
        GOOD_RULE + "    content: 'route {new.id changed'\n",
        "rules.yaml:7:21: rule r: content: unbalanced '{' (write '{{' for a literal brace)",
    ),
    (
        "unbalanced close brace",
        GOOD_RULE + "    content: 'route } changed'\n",
        "rules.yaml:7:21: rule r: content: unbalanced '}' (write '}}' for a literal brace)",
    ),
    (
        "brace never closed",
        GOOD_RULE + "    subject: 'sync {new.id'\n",
        "rules.yaml:7:20: rule r: subject: unbalanced '{' (write '{{' for a literal brace)",
    ),
    (
        "old in an insert rule",
        GOOD_RULE + "    when: old.status = 'open'\n",
        "rules.yaml:7:11: rule r: old.status: insert rules have no old row",
    ),
    (
        "new in a delete rule",
        GOOD_RULE.replace("on: [insert]", "on: [delete]") + "    content: 'gone {new.id}'\n",
        "rules.yaml:7:20: rule r: new.id: delete rules have no new row",
    ),
    (
        "unknown recipient column",
        GOOD_RULE + "    content: 'for {recipient.route}'\n",
        "rules.yaml:7:19: rule r: recipient.route is not a column of the recipients query "
        "(it returns device_id)",
    ),
    (
        "recipients without device_id",
        GOOD_RULE.replace("SELECT device_id FROM", "SELECT driver_id FROM"),
        "rules.yaml:6:17: rule r: recipients: the query must return a device_id column",
    ),
    (
        "recipients with a star",
        GOOD_RULE.replace("SELECT device_id FROM", "SELECT * FROM"),
        "rules.yaml:6:17: rule r: recipients: list the columns instead of *, so device_id can "
        "be found",
    ),
    (
        "unqualified table",
        GOOD_RULE.replace("public.devices_of_t", "devices_of_t"),
        "rules.yaml:6:17: rule r: recipients: table devices_of_t must be named with its schema, "
        "e.g. public.devices_of_t (rules run with a fixed search_path)",
    ),
    (
        "columns on an insert rule",
        GOOD_RULE + "    columns: [a]\n",
        "rules.yaml:7:5: rule r: columns applies only to update rules",
    ),
    (
        "unqualified column in when",
        GOOD_RULE + "    when: status = 'open'\n",
        "rules.yaml:7:11: rule r: when: column status must be written new.status or old.status",
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_located(text: str, expected: str | None) -> None:
    if expected is None:
        generator.loads(text, "rules.yaml")
        return
    message = only_problem(text)
    if expected.endswith("..."):
        assert message.startswith(expected[:-3])
    else:
        assert message == expected


def test_every_problem_is_reported_in_one_run() -> None:
    text = GOOD_RULE + "    ttl: soon\n    priority: urgent\n  - name: Bad\n"
    found = problems_of(text)
    assert found == [
        "rules.yaml:7:10: rule r: bad duration 'soon' for ttl: expected a number and a unit, "
        "e.g. 30s, 5m, 1h, 2d",
        "rules.yaml:8:15: rule r: priority must be one of low, normal, high, not 'urgent'",
        "rules.yaml:9:5: rule #2: missing required key 'table'",
        "rules.yaml:9:5: rule #2: missing required key 'on'",
        "rules.yaml:9:5: rule #2: missing required key 'recipients'",
        "rules.yaml:9:11: rule #2: bad name 'Bad': use lower-case letters, digits and _, "
        "starting with a letter, at most 63 characters",
    ]


def test_duplicate_yaml_key_is_located() -> None:
    message = only_problem(GOOD_RULE + "    table: public.u\n")
    assert message == "rules.yaml:7:5: duplicate key 'table' (first given at line 4)"


def test_not_utf8(tmp_path: pytest.TempPathFactory) -> None:
    path = tmp_path / "rules.yaml"  # type: ignore[operator]
    path.write_bytes(b"version: 1\n# caf\xe9\n")
    with pytest.raises(RulesError) as caught:
        generator.load(path)
    assert str(caught.value) == f"{path}:2:1: the rules file is not UTF-8 text"


def test_hostile_shapes_are_refused_quickly() -> None:
    deep_sql = GOOD_RULE + "    when: " + "(" * 3000 + "true" + ")" * 3000 + "\n"
    assert only_problem(deep_sql) == "rules.yaml:7:11: rule r: when: SQL nested too deeply"
    deep_yaml = "version: 1\nx: " + "[" * 5000 + "]" * 5000 + "\n"
    assert only_problem(deep_yaml) == "rules.yaml:1:1: invalid YAML: nested too deeply"
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for name, previous in zip("bcdefg", "abcdef", strict=True):
        bomb += f"{name}: &{name} [" + ", ".join([f"*{previous}"] * 10) + "]\n"
    assert only_problem(bomb).endswith("more than 100000 values (do aliases expand too far?)")


def test_the_generators_marker_is_reserved() -> None:
    message = only_problem(GOOD_RULE + "    when: new.note = '/*pushsync:key*/'\n")
    assert message == "rules.yaml:7:11: rule r: the text '/*pushsync:' is reserved by pushsync"


@dataclass(frozen=True)
class _LaterKind:
    """A part of the model that does not exist yet, holding SQL under a key of its own."""

    check: Fragment
    label: str = "later thing"


def test_every_fragment_the_model_holds_is_checked() -> None:
    """The allow-lists reach SQL wherever the model keeps it, also under keys added later."""
    rules = generator.loads(GOOD_RULE, "rules.yaml")
    tree = fragments.parse_condition("ts_stat('SELECT 1') IS NULL")
    node = source.load("x: 1\n", "rules.yaml").value["x"]
    offset = len(fragments.CONDITION_PREFIX)
    later = _LaterKind(check=Fragment(tree=tree, node=node, offset=offset))
    problems = Problems()
    passes.allowed_sql(dataclasses.replace(rules, publications=(later,)), problems)  # type: ignore[arg-type]
    assert [str(p) for p in problems] == [
        "rules.yaml:1:4: later thing: check: function ts_stat() is not allowed in rules" + BUILTIN
    ]
