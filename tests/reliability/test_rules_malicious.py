"""Malicious and malformed rules files: refused with located errors, the database untouched.

300 files (times the scale) are made from ``examples/trucking/rules.yaml`` by one to
three mutations, each of which on its own makes the file invalid: SQL injected
into identifiers and fragments, writes and dangerous functions in ``when`` and
``recipients``, huge, deep and alias-bombed YAML, wrong types, unknown keys,
YAML syntax errors. For each, ``pushsync.generator.loads`` must raise
``RulesError`` — nothing else — whose every problem is located
(``rules.yaml:LINE:COL:`` with the line inside the file).

A sample (20 times the scale), together with files only the database can refuse
(tables, columns, trusted functions and owners that do not exist), is given to
``pushsync migrate --dsn`` as a subprocess, on a database holding the
example's schema with its valid rules applied: it must exit 2 with located
errors and no traceback, and a snapshot of the catalog and of pushsync's own
tables must be the same before and after.

The tests at the end pin bugs found this way, now fixed: a character YAML
refuses was reported at 1:1 over two lines; a library's warning reached the
CLI's stderr next to the located problems.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pushsync import generator
from pushsync.errors import RulesError
from tests.integration.trucking import EXAMPLE, RULES
from tests.reliability.harness import Knobs, Report
from tests.support.cli import run_cli

FILES = 300
MIGRATED = 20
MIGRATE_AT_ONCE = 2

Mutation = Callable[[random.Random, str], tuple[str, str] | None]
"""Mutate the text; (new text, what was done), or None when its site is gone."""

# --------------------------------------------------------------------------- payloads

IDENTIFIERS = [
    'route"; DROP TABLE public.drivers; --',
    "public.disruption_reports; DROP TABLE public.drivers",
    "x' OR '1'='1",
    "status --",
    "Route_Disruption",
    "public.drivers WHERE true",
    "pg_catalog.pg_authid; --",
    "(SELECT 1)",
    "route disruption",
    "public.$1",
    'public."drivers"',
    "public.drivers/**/",
    "name\u00a0x",
]
"""Rule, table, column and publication names; each breaks the names' patterns."""

CONDITIONS = [
    "new.status = 'open'; DROP TABLE public.drivers",
    "new.status = 'open' AND EXISTS (WITH d AS (DELETE FROM public.drivers RETURNING 1) "
    "SELECT 1 FROM d)",
    "(UPDATE public.drivers SET name = 'x' RETURNING true)",
    "pg_sleep(10) IS NOT NULL",
    "pg_terminate_backend(pg_backend_pid())",
    "set_config('search_path', 'public', false) <> ''",
    "nextval('public.seq') > 0",
    "lo_import('/etc/passwd') > 0",
    "pg_read_file('/etc/passwd') <> ''",
    "query_to_xml('DELETE FROM public.drivers', true, true, '') IS NOT NULL",
    "dblink_exec('dbname=x', 'DROP TABLE public.drivers') <> ''",
    "pg_advisory_lock(1) IS NULL",
    "pg_notify('pushsync', 'x') IS NULL",
    "txid_current() > 0",
    "ts_stat('SELECT pg_catalog.set_config(''role'', ''x'', false)') IS NOT NULL",
    "pg_catalog.ts_rewrite('a'::tsquery, 'SELECT 1') IS NULL",
    "new.status::regclass IS NOT NULL",
    "EXISTS (SELECT FROM pg_catalog.pg_authid)",
    "new.status = $1",
    "new.status = 'open' /* unterminated",
    "new.status = 'open",
    "new.status = 'open')) OR ((true",
    "status = 'open'",
    "EXISTS (SELECT 1 FROM drivers)",
    "EXISTS (SELECT 1 FROM public.drivers FOR UPDATE)",
    "EXISTS (SELECT * INTO public.stolen FROM public.drivers)",
    "SELECT 1; SELECT 2",
    "new.status = 'open' AND (COPY public.drivers TO '/tmp/x')",
]
"""``when``: writes, dangerous functions, parameters, broken SQL, unqualified names."""

QUERIES = [
    "SELECT d.device_id FROM public.drivers d; DELETE FROM public.drivers",
    "DELETE FROM public.drivers RETURNING device_id",
    "UPDATE public.drivers SET name = 'x' RETURNING device_id",
    "INSERT INTO public.drivers VALUES (9, 'x', 'y') RETURNING device_id",
    "SELECT device_id INTO public.stolen FROM public.drivers",
    "SELECT d.device_id FROM public.drivers d FOR UPDATE",
    "SELECT device_id FROM drivers",
    "WITH x AS (UPDATE public.drivers SET name = 'x' RETURNING device_id) SELECT device_id FROM x",
    "SELECT * FROM public.drivers",
    "COPY public.drivers TO '/tmp/x'",
    "SELECT d.device_id FROM public.drivers d WHERE pg_sleep(1) IS NULL",
    "CALL public.p()",
    "SELECT 1",
    "TRUNCATE public.drivers",
    "DROP TABLE public.drivers",
    "SELECT d.device_id FROM public.drivers d WHERE d.driver_id = $1",
    "SELECT set_config('role', 'postgres', false) AS device_id",
    "SELECT d.device_id FROM public.drivers d UNION SELECT lo_export(1, '/tmp/x')::text",
    "GRANT ALL ON public.drivers TO PUBLIC",
    "SELECT d.device_id, d.secret FROM pushsync.devices d",
    "SELECT name AS device_id FROM pg_catalog.pg_settings",
    "SELECT d.device_id FROM public.drivers d, ts_stat('SELECT 1') AS s",
    "SELECT d.device_id FROM public.drivers d WHERE d.name = 'x",
]
"""``recipients``: the same, as a query."""

DOWNLOADS = [
    "DELETE FROM public.disruption_reports RETURNING *",
    "SELECT * FROM public.disruption_reports; DROP TABLE public.routes",
    "SELECT * FROM public.disruption_reports FOR UPDATE",
    "SELECT report_id FROM public.disruption_reports",
    "SELECT * FROM disruption_reports",
    "SELECT * FROM public.disruption_reports WHERE pg_sleep(1) IS NULL",
    "SELECT * FROM public.routes",
    "WITH x AS (DELETE FROM public.routes RETURNING *) SELECT * FROM public.disruption_reports",
    "SELECT * FROM public.disruption_reports WHERE EXISTS (SELECT FROM pushsync.devices)",
]
"""A publication's ``download``."""

TEMPLATES = [
    "cleared {new.location_id",
    "cleared {evil.x}",
    "cleared {new.}",
    "cleared {}",
    "cleared {new.location_id}" + "x" * 1000,
    "cleared {recipient.route_name}",
    "cleared {new.location_id}}{",
]
"""``content`` templates: broken placeholders, unknown scopes, too long."""

WRONG_VALUES: list[tuple[str, list[str]]] = [
    ("version: 1", ["version: 2", "version: [1]", "version: {v: 1}", "version: one"]),
    (
        "    on: [insert, update]",
        [
            "    on: 5",
            "    on: []",
            "    on: [upsert]",
            "    on: {insert: true}",
            "    on: [insert, insert2]",
        ],
    ),
    ("  ttl: 1h", ["  ttl: 30", "  ttl: -1h", "  ttl: forever", "  ttl: [1h]", "  ttl: 1y"]),
    ("  resend_every: 5m", ["  resend_every: 5", "  resend_every: {m: 5}", "  resend_every: 5x"]),
    ("  gateway: auto", ["  gateway: fax", "  gateway: [auto]", "  gateway: 7"]),
    ("    priority: high", ["    priority: urgent", "    priority: [high]"]),
    ("    coalesce: true", ["    coalesce: maybe", "    coalesce: [true]"]),
    ("    recipients: all", ["    recipients: [all]", "    recipients: {all: true}"]),
    ("    subject: roster", ["    subject: [roster]", "    subject: {a: b}"]),
    ("        upload: [update]", ["        upload: [drop]", "        upload: {update: 1}"]),
    ("        conflict: server_wins", ["        conflict: server_loses", "        conflict: 3"]),
    ("    columns: [status]", ["    columns: status; DROP", "    columns: {status: 1}"]),
]
"""Lines of the example and values of the wrong type or out of range for them."""

UNKNOWN_KEYS: list[tuple[str, list[str]]] = [
    ("    subject: sync", ["    resend: 5m", "    trigger: x", "    tabel: public.x"]),
    ("version: 1", ["rule: []", "defaultz: {}", "drop: table"]),
    ("  ttl: 1h", ["  tll: 1h", "  retries: 3"]),
    ("        upload: [update]", ["        downlaod: SELECT 1", "        owner: postgres"]),
]
"""Lines of the example, and unknown keys to put after them at the same depth."""


# --------------------------------------------------------------------------- mutations

ROUTE_REMOVED_RECIPIENTS = (
    "    recipients: SELECT d.device_id FROM public.drivers d WHERE d.driver_id = old.driver_id"
)


def replace_line(text: str, line: str, new: str) -> str | None:
    """``text`` with the first line equal to ``line`` (without its newline) replaced."""
    lines = text.split("\n")
    for index, found in enumerate(lines):
        if found == line:
            lines[index] = new
            return "\n".join(lines)
    return None


def quoted(value: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's) holding ``value`` exactly."""
    return json.dumps(value, ensure_ascii=False)


def ident_injection(rng: random.Random, text: str) -> tuple[str, str] | None:
    payload = rng.choice(IDENTIFIERS)
    site, template = rng.choice(
        [
            ("  - name: route_disruption", "  - name: {}"),
            ("    table: public.disruption_reports", "    table: {}"),
            ("    columns: [status, location_id]", '    columns: ["status", {}]'),
            ("  - name: driver", "  - name: {}"),
            (
                "      - table: public.routes          # the driver's own routes",
                "      - table: {}",
            ),
            ("  - name: fleet_notice", "  - name: {}"),
        ]
    )
    found = replace_line(text, site, template.format(quoted(payload)))
    return None if found is None else (found, f"identifier {site.split(':')[0].strip()}")


def fragment_injection(rng: random.Random, text: str) -> tuple[str, str] | None:
    site, payloads, what = rng.choice(
        [
            ("    when: new.status = 'open'", CONDITIONS, "when"),
            ("    when: old.status = 'open' AND new.status = 'cleared'", CONDITIONS, "when"),
            (ROUTE_REMOVED_RECIPIENTS, QUERIES, "recipients"),
            (
                "        download: SELECT * FROM public.disruption_reports WHERE status = 'open'",
                DOWNLOADS,
                "download",
            ),
        ]
    )
    key = site.split(":")[0]
    found = replace_line(text, site, f"{key}: {quoted(rng.choice(payloads))}")
    return None if found is None else (found, f"fragment {what}")


def template_injection(rng: random.Random, text: str) -> tuple[str, str] | None:
    site = '    content: "cleared {new.location_id}"'
    found = replace_line(text, site, f"    content: {quoted(rng.choice(TEMPLATES))}")
    return None if found is None else (found, "template")


def wrong_value(rng: random.Random, text: str) -> tuple[str, str] | None:
    site, values = rng.choice(WRONG_VALUES)
    found = replace_line(text, site, rng.choice(values))
    return None if found is None else (found, f"wrong value {site.split(':')[0].strip()}")


def unknown_key(rng: random.Random, text: str) -> tuple[str, str] | None:
    site, keys = rng.choice(UNKNOWN_KEYS)
    found = replace_line(text, site, f"{site}\n{rng.choice(keys)}")
    return None if found is None else (found, "unknown key")


def yaml_syntax(rng: random.Random, text: str) -> tuple[str, str] | None:
    kind = rng.choice(["tab", "unclosed", "python tag", "merge", "duplicate", "bad"])
    if kind == "tab":
        found = replace_line(text, "  ttl: 1h", "\tttl: 1h")
    elif kind == "unclosed":
        found = replace_line(text, "    on: [insert, update]", "    on: [insert, update")
    elif kind == "python tag":
        found = replace_line(
            text, "    subject: sync", '    subject: !!python/object/apply:os.system ["id"]'
        )
    elif kind == "merge":
        found = replace_line(text, "defaults:", "base: &base {ttl: 1h}\ndefaults:\n  <<: *base")
    elif kind == "duplicate":
        found = replace_line(text, "    subject: roster", "    subject: roster\n    subject: x")
    else:
        found = replace_line(text, "    subject: roster", "    subject: roster: x: y")
    return None if found is None else (found, f"yaml {kind}")


def huge(rng: random.Random, text: str) -> tuple[str, str] | None:
    kind = rng.choice(["content", "rules", "line"])
    if kind == "content":
        size = rng.randint(10_000, 300_000)
        found = replace_line(text, "    subject: roster", f"    subject: {'r' * size}")
    elif kind == "rules":
        copies = rng.randint(50, 800)
        rule = "  - name: twin\n    table: public.drivers\n    on: insert\n    recipients: all\n"
        found = replace_line(text, "rules:", "rules:\n" + rule * copies)
    else:
        size = rng.randint(10_000, 300_000)
        found = replace_line(text, "version: 1", f"version: 1\n{'k' * size}: 1")
    return None if found is None else (found, f"huge {kind}")


def deep(rng: random.Random, text: str) -> tuple[str, str] | None:
    depth = rng.choice([40, 200, 1000, 5000])
    kind = rng.choice(["flow", "block", "sql"])
    if kind == "flow":
        found = replace_line(
            text, "    columns: [status]", f"    columns: {'[' * depth}{']' * depth}"
        )
    elif kind == "block":
        nested = "".join(f"{'  ' * (3 + i)}- \n" for i in range(min(depth, 1500)))
        found = replace_line(text, "    columns: [status]", f"    columns:\n{nested}")
    else:
        condition = "(" * depth + "new.status = 'open'" + ")" * depth + " AND pg_sleep(1)"
        found = replace_line(
            text, "    when: new.status = 'open'", f"    when: {quoted(condition)}"
        )
    return None if found is None else (found, f"deep {kind}")


def alias_bomb(rng: random.Random, text: str) -> tuple[str, str] | None:
    width = rng.randint(8, 12)
    levels = rng.randint(5, 7)
    anchors = [f"bomb0: &b0 [{', '.join(['status'] * width)}]"]
    for level in range(1, levels + 1):
        anchors.append(f"bomb{level}: &b{level} [{', '.join([f'*b{level - 1}'] * width)}]")
    found = replace_line(text, "version: 1", "version: 1\n" + "\n".join(anchors))
    if found is not None:
        found = replace_line(found, "    columns: [status]", f"    columns: *b{levels}")
    return None if found is None else (found, "alias bomb")


ESCAPES = [
    ("    subject: sync", '    subject: "sy{}nc"'),
    ('    content: "cleared {new.location_id}"', '    content: "cleared{} {{new.location_id}}"'),
    ("    when: new.status = 'open'", "    when: \"new.status = 'op{}en'\""),
    (
        "        download: SELECT * FROM public.disruption_reports WHERE status = 'open'",
        "        download: \"SELECT * FROM public.disruption_reports WHERE status = 'op{}en'\"",
    ),
]
"""Text and SQL literals, for escapes YAML allows but PostgreSQL text or UTF-8 cannot hold."""


def text_escape(rng: random.Random, text: str) -> tuple[str, str] | None:
    site, line = rng.choice(ESCAPES)
    escape = rng.choice(["\\0", "\\ud800", "\\udfff", "\\x00"])
    found = replace_line(text, site, line.format(escape))
    return None if found is None else (found, f"escape {escape}")


MUTATIONS: list[tuple[Mutation, float]] = [
    (ident_injection, 3),
    (fragment_injection, 4),
    (template_injection, 2),
    (wrong_value, 3),
    (unknown_key, 2),
    (yaml_syntax, 2),
    (huge, 1),
    (deep, 1),
    (alias_bomb, 0.3),
    (text_escape, 1),
]
"""Each mutation and its weight: the big inputs take a tenth of a second or more each."""

DATABASE_ONLY = [
    ("    table: public.disruption_reports", "    table: public.no_such_table"),
    ("    columns: [status, location_id]", "    columns: [status, no_such_column]"),
    ("version: 1", "version: 1\ntrusted_functions: [public.no_such_function]"),
    ("version: 1", "version: 1\ntrusted_owners: [no_such_role]"),
    ("    when: new.status = 'open'", "    when: new.no_such_column = 'open'"),
    (ROUTE_REMOVED_RECIPIENTS, "    recipients: SELECT d.device_id FROM public.no_such_table d"),
]
"""Valid to the generator, refused by ``pushsync migrate``'s check against the database."""


def mutate(rng: random.Random, text: str) -> tuple[str, list[str]]:
    """One to three mutations of ``text``, each at a site still intact."""
    done: list[str] = []
    for _ in range(rng.randint(1, 3)):
        for _attempt in range(20):
            mutation = rng.choices([m for m, _ in MUTATIONS], [w for _, w in MUTATIONS])[0]
            result = mutation(rng, text)
            if result is not None:
                text = result[0]
                done.append(result[1])
                break
    assert done, "no mutation applied: has examples/trucking/rules.yaml changed?"
    return text, done


# --------------------------------------------------------------------------- checks

LOCATED = re.compile(r"^rules\.yaml:(\d+):(\d+): \S")


def refused(text: str) -> tuple[list[str], float]:
    """The problems ``loads`` reports for ``text`` and the seconds it took.

    Raises AssertionError, with what is wrong, if ``loads`` accepts the text or a
    problem is not located inside the file.
    """
    started = time.monotonic()
    try:
        generator.loads(text, "rules.yaml")
    except RulesError as exc:
        took = time.monotonic() - started
        problems = [str(p) for p in exc.problems]
        assert problems, "RulesError without problems"
        lines = text.count("\n") + 1
        for problem in problems:
            found = LOCATED.match(problem)
            assert found, f"not located: {problem[:300]}"
            line, column = int(found.group(1)), int(found.group(2))
            assert 1 <= line <= lines, f"outside the file: {problem[:300]}"
            assert column >= 1, f"outside the file: {problem[:300]}"
        return problems, took
    raise AssertionError("accepted")


def refusal(text: str) -> tuple[list[str], float]:
    """As ``refused``, as a test's failure."""
    try:
        return refused(text)
    except AssertionError as exc:
        pytest.fail(str(exc))


def judged(text: str) -> tuple[float, str | None]:
    """In a worker process: the seconds ``loads`` took to refuse ``text``, or what went wrong."""
    try:
        _, took = refused(text)
    except Exception as exc:  # reported with its file; the test fails once, for all
        return 0.0, f"{type(exc).__name__}: {exc}"
    return took, None


def snapshot(db: psycopg.Connection) -> dict[str, list[Any]]:
    """What a migration could change: relations, functions, triggers, roles, pushsync's rows."""
    user = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')"
    queries = {
        "namespaces": "SELECT nspname FROM pg_namespace ORDER BY 1",
        "relations": "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user} ORDER BY 1, 2",
        "functions": "SELECT p.oid::regprocedure::text, md5(p.prosrc), p.prosecdef "
        f"FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {user} ORDER BY 1",
        "triggers": "SELECT tgrelid::regclass::text, tgname, md5(pg_get_triggerdef(oid)) "
        "FROM pg_trigger WHERE NOT tgisinternal ORDER BY 1, 2",
        "roles": "SELECT rolname, rolsuper FROM pg_roles ORDER BY 1",
        "grants": "SELECT c.oid::regclass::text, c.relacl::text FROM pg_class c "
        f"JOIN pg_namespace n ON n.oid = c.relnamespace WHERE {user} ORDER BY 1",
        "schema_version": "SELECT version, name FROM pushsync.schema_version ORDER BY 1",
        "rules": "SELECT to_jsonb(r)::text FROM pushsync.rules r ORDER BY 1",
        "publications": "SELECT to_jsonb(p)::text FROM pushsync.publication_tables p ORDER BY 1",
        "rows": "SELECT (SELECT count(*) FROM public.drivers), (SELECT count(*) FROM "
        "public.routes), (SELECT count(*) FROM pushsync.outbox), "
        "(SELECT count(*) FROM pushsync.devices)",
    }
    return {
        name: [tuple(map(str, row)) for row in db.execute(sql)] for name, sql in queries.items()
    }


# --------------------------------------------------------------------------- tests


def test_mutated_rules_are_refused_located_and_migrate_changes_nothing(
    db: psycopg.Connection, dsn: str, tmp_path: Path, knobs: Knobs, report: Report
) -> None:
    example = RULES.read_text(encoding="utf-8")
    generator.loads(example, "rules.yaml")  # the starting point is valid
    rng = random.Random(knobs.seed)
    count = knobs.size(FILES)
    kinds: Counter[str] = Counter()
    slowest = (0.0, "")
    failures: list[str] = []
    texts: list[tuple[str, list[str]]] = []
    mutated = [mutate(rng, example) for _ in range(count)]
    started = time.monotonic()
    # loads is pure Python (YAML, sqlglot): the files are judged in worker processes, one
    # a CPU, which the test process's coverage tracer does not slow down.
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1, mp_context=spawn) as pool:
        verdicts = pool.map(judged, [text for text, _ in mutated], chunksize=10)
        for index, ((text, done), (took, wrong)) in enumerate(zip(mutated, verdicts, strict=True)):
            kinds.update(done)
            if wrong is not None:
                kept = tmp_path / f"refused-not-{index}.yaml"
                kept.write_text(text, encoding="utf-8")
                failures.append(f"{kept} ({', '.join(done)}): {wrong}"[:600])
                continue
            if took > slowest[0]:
                slowest = (took, ", ".join(done))
            texts.append((text, done))
    loads_seconds = time.monotonic() - started
    assert failures == [], "\n".join(failures[:20])

    db.execute((EXAMPLE / "schema.sql").read_text(encoding="utf-8"))
    valid = tmp_path / "valid.yaml"
    valid.write_text(example, encoding="utf-8")
    applied = run_cli("migrate", "--dsn", dsn, str(valid))
    assert applied.returncode == 0, applied.stderr
    before = snapshot(db)

    sample = rng.sample(texts, min(len(texts), knobs.size(MIGRATED)))
    candidates = [(text, ", ".join(done)) for text, done in sample]
    for site, replacement in DATABASE_ONLY:
        refused_by_the_database = replace_line(example, site, replacement)
        assert refused_by_the_database is not None, site
        generator.loads(refused_by_the_database, "rules.yaml")  # only the database can tell
        candidates.append((refused_by_the_database, f"database: {replacement.strip()}"))
    migrate_started = time.monotonic()
    outcomes: list[str] = []
    paths = []
    for index, (text, _) in enumerate(candidates):
        path = tmp_path / f"migrate-{index}.yaml"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    # Two runs at a time (each is mostly the start of a Python process): migrate holds an
    # advisory lock while it works, and the snapshot after each pair names the pair.
    with ThreadPoolExecutor(max_workers=MIGRATE_AT_ONCE) as pool:
        for start in range(0, len(candidates), MIGRATE_AT_ONCE):
            pair = list(zip(paths, candidates, strict=True))[start : start + MIGRATE_AT_ONCE]
            results = pool.map(
                lambda p: run_cli("migrate", "--dsn", dsn, str(p)), [p for p, _ in pair]
            )
            for (path, (_, what)), result in zip(pair, results, strict=True):
                # sqlglot's own warnings reach stderr: test_check_prints_only_located_lines.
                lines = [
                    line
                    for line in result.stderr.splitlines()
                    if line.strip() and not line.startswith("sqlglot: ")
                ]
                located = all(line.startswith(f"{path}:") for line in lines)
                refused = result.returncode == 2 and lines and located
                if not refused or "Traceback" in result.stderr:
                    outcomes.append(
                        f"{path} ({what}): exit {result.returncode}: {result.stderr[-500:]}"
                    )
            after = snapshot(db)
            if after != before:
                changed = [name for name in before if before[name] != after[name]]
                which = ", ".join(f"{path} ({what})" for path, (_, what) in pair)
                outcomes.append(f"one of {which} changed the database: {changed}")
                before = after
    migrate_seconds = time.monotonic() - migrate_started

    report.add(
        files=count,
        mutations=dict(kinds.most_common()),
        loads_seconds=round(loads_seconds, 2),
        slowest_refusal_s=round(slowest[0], 3),
        slowest_refusal_of=slowest[1],
        migrate_runs=len(candidates),
        migrate_seconds=round(migrate_seconds, 2),
    )
    assert outcomes == [], "\n".join(outcomes)
    report.done()


# --------------------------------------------------------------------------- bugs


def test_unacceptable_character_is_reported_where_it_is() -> None:
    bad = "    subject: ros\x07ter"
    text = replace_line(RULES.read_text(encoding="utf-8"), "    subject: roster", bad)
    assert text is not None
    line = text.split("\n").index(bad) + 1
    problems, _ = refusal(text)
    assert all("\n" not in problem for problem in problems), problems
    assert any(problem.startswith(f"rules.yaml:{line}:") for problem in problems), problems


def test_check_prints_only_located_lines(tmp_path: Path) -> None:
    text = replace_line(
        RULES.read_text(encoding="utf-8"),
        ROUTE_REMOVED_RECIPIENTS,
        '    recipients: "CALL public.p()"',
    )
    assert text is not None
    path = tmp_path / "rules.yaml"
    path.write_text(text, encoding="utf-8")
    result = run_cli("check", str(path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert lines, result.stderr
    assert all(line.startswith(f"{path}:") for line in lines), lines
