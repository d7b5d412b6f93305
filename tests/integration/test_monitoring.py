"""The Grafana dashboard and the Prometheus alert rules shipped in ``docs/``.

* Every metric and label a dashboard panel or an alert rule names is one a
  real ``pushsync dispatch`` exposes: its ``/metrics`` is scraped after it has
  sent one message and failed one for good, so that the labelled series exist.
  (``up`` is the one name Prometheus adds itself.)
* ``promtool test rules docs/prometheus/alerts.test.yml`` passes, every alert
  has a case where it fires and one where it stays quiet, and the cases bite:
  with each alert made to never fire, or to always fire, the tests fail.
* Every panel's expression parses as PromQL (``promtool check rules``).
* The rules judge real scrapes right: those of a connected dispatcher and of
  one whose database refuses connections, held ten minutes as promtool input.

promtool comes from ``scripts/ensure-promtool`` (``make test`` runs it). Without
it the promtool tests fail where that script could have installed it (root
with apt-get) and are skipped, saying so, elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql
from pytest_postgresql.executors import PostgreSQLExecutor

from tests.support.dispatching import add_device, set_address
from tests.support.metrics import http_get
from tests.support.processes import Dispatch, free_udp_port
from tests.support.waiting import until

DOCS = Path(__file__).resolve().parents[2] / "docs"
DASHBOARD = DOCS / "grafana" / "pushsync.json"
ALERTS = DOCS / "prometheus" / "alerts.yml"
ALERT_TESTS = DOCS / "prometheus" / "alerts.test.yml"

PROMETHEUS_OWN = {"up"}
"""Series Prometheus adds to every scrape target itself."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus attaches to every scraped series."""

PROMTOOL = shutil.which(os.environ.get("PUSHSYNC_PROMTOOL") or "promtool")
"""Read when the module is imported, before the session clears ``PUSHSYNC_*``."""


@pytest.fixture(scope="module")
def promtool() -> str:
    if PROMTOOL is not None:
        return PROMTOOL
    if os.geteuid() == 0 and shutil.which("apt-get"):
        pytest.fail(
            "promtool is missing although scripts/ensure-promtool can install it here "
            "(root, apt-get): run scripts/ensure-promtool (make test does)"
        )
    pytest.skip(
        "PROMTOOL MISSING: the alert rules and dashboard expressions are NOT checked; "
        "run scripts/ensure-promtool as root, or put promtool on PATH"
    )


# --------------------------------------------------------------------------- PromQL names


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][\w:]*(?!\w)(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan", "atan2"}


@dataclass
class Names:
    """Metric and label names an expression refers to."""

    metrics: set[str] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)

    def add(self, other: Names) -> None:
        self.metrics |= other.metrics
        self.labels |= other.labels


def names_in(expr: str) -> Names:
    """The metric names (selectors) and label names (matchers, grouping) of a PromQL
    expression; function and aggregation names, keywords, numbers and durations are not
    names. Grafana's ``$variables`` may stand in label values and ranges."""
    found = Names()
    text = _STRING.sub('""', expr)
    for body in _MATCHERS.findall(text):
        found.labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", body))
    text = _RANGE.sub(" ", _MATCHERS.sub(" ", text))
    for body in _GROUPING.findall(text):
        found.labels |= set(re.findall(r"[A-Za-z_]\w*", body))
    text = _GROUPING.sub(" ", text)
    found.metrics = {m.group(0) for m in _IDENTIFIER.finditer(text)} - _KEYWORDS
    return found


def test_names_in_tells_metrics_from_functions_labels_and_numbers() -> None:
    found = names_in(
        "histogram_quantile(0.99, sum by (le) ("
        'rate(pushsync_commit_to_send_seconds_bucket{job=~"$job"}[$__rate_interval])))'
        " / on (instance) group_left (gateway) max(x:recorded offset 1h) > bool 2e3"
        ' and absent(up{state!="a{b}"}) or vector(1)'
    )
    assert found.metrics == {"pushsync_commit_to_send_seconds_bucket", "x:recorded", "up"}
    assert found.labels == {"le", "job", "instance", "gateway", "state"}


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target, including panels inside rows."""
    panels = list(dashboard["panels"])
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} target {target['refId']}", target["expr"]


def legend_labels(dashboard: dict[str, Any]) -> set[str]:
    """Labels the panels' legends print (``{{label}}``)."""
    panels = list(dashboard["panels"])
    found: set[str] = set()
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            found |= set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
    return found


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(variable, metric) of every ``label_values(METRIC…, label)`` variable, and the label."""
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if found := re.fullmatch(r"label_values\((.*),\s*(\w+)\)", text):
            yield variable["name"], found[1]
            yield variable["name"], "{" + found[2] + '=""}'  # the label, as a matcher


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def alert_test_series() -> Iterator[tuple[str, str]]:
    document = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    for case in document["tests"]:
        for series in case["input_series"]:
            yield f"test {case['name']!r}", series["series"]


def unknown(
    queries: Iterable[tuple[str, str]], metrics: set[str], labels: set[str]
) -> dict[str, Names]:
    """Per place, the names its expression uses that the scrape does not have."""
    problems: dict[str, Names] = {}
    for where, expr in queries:
        found = names_in(expr)
        missing = Names(found.metrics - metrics - PROMETHEUS_OWN, found.labels - labels)
        if missing.metrics or missing.labels:
            problems[where] = missing
    return problems


# --------------------------------------------------------------------------- a real scrape


@dataclass
class Scraped:
    """Sample names and label names of a real dispatcher's ``/metrics``."""

    metrics: set[str]
    labels: set[str]


def scraped_names(text: str) -> Scraped:
    metrics: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            metrics.add(sample.name)
            labels |= set(sample.labels)
    return Scraped(metrics, labels)


def answers(url: str, status: int) -> Callable[[], bool]:
    return lambda: http_get(url)[0] == status


def samples_of(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture(scope="module")
def scrapes(
    pg_server: PostgreSQLExecutor, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """``/metrics`` of two real ``pushsync dispatch`` processes, run at once: ``healthy``
    on a database of its own, once it has sent one message by UDP and failed one for good
    (too large for UDP), so that the labelled series (gateway, final) are there; and
    ``cut-off``, whose database refuses connections."""
    where = f"host={pg_server.host} port={pg_server.port} user={pg_server.user}"
    name = f"monitoring_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{where} dbname=postgres", autocommit=True) as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(pg_server.template_dbname)
            )
        )
    logs = tmp_path_factory.mktemp("scrapes")
    try:
        dsn = f"{where} dbname={name}"
        with psycopg.connect(dsn, autocommit=True) as db:
            add_device(db, "truck-1")
            set_address(db, "truck-1", "udp", f"127.0.0.1:{free_udp_port()}")
            db.execute(
                "INSERT INTO pushsync.outbox (rule, device_id, subject, content, gateway, "
                "coalescing, expires_at, resend_every) VALUES "
                "('r', 'truck-1', 'sync', 'go', 'udp', false, now() + interval '1 hour', "
                "'1 hour'), ('r', 'truck-1', 'sync', repeat('x', 70000), 'udp', false, "
                "now() + interval '1 hour', '1 hour')"
            )
        with socket.socket() as probe:  # a port nothing listens on once the probe closes
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        nowhere = f"host=127.0.0.1 port={closed} user=nobody dbname=none connect_timeout=2"
        healthy = Dispatch(dsn, logs / "healthy.log", "--metrics", "127.0.0.1:0")
        cut_off = Dispatch(nowhere, logs / "cut-off.log", "--metrics", "127.0.0.1:0")
        try:
            found: dict[str, str] = {}

            def sent_and_failed(url: str) -> Callable[[], bool]:
                def check() -> bool:
                    status, text = http_get(f"{url}/metrics")
                    samples = samples_of(text) if status == 200 else {}
                    udp = (("gateway", "udp"),)
                    final = (("final", "true"), ("gateway", "udp"))
                    if samples.get(("pushsync_sends_total", udp), 0) < 1:
                        return False
                    if samples.get(("pushsync_send_failures_total", final), 0) < 1:
                        return False
                    found["healthy"] = text
                    return True

                return check

            url = healthy.metrics_url()
            until(sent_and_failed(url), "a send and a final failure", logs=[healthy.log])
            url = cut_off.metrics_url()
            until(answers(f"{url}/healthz", 503), "/healthz 503", logs=[cut_off.log])
            status, found["cut-off"] = http_get(f"{url}/metrics")
            assert status == 200
            healthy.stop()
            cut_off.stop()
        finally:
            healthy.close()
            cut_off.close()
        yield found
    finally:
        with psycopg.connect(f"{where} dbname=postgres", autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def test_every_name_in_the_dashboard_and_the_alerts_is_one_a_dispatcher_exposes(
    scrapes: dict[str, str],
) -> None:
    scraped = scraped_names(scrapes["healthy"])
    labels = scraped.labels | TARGET_LABELS
    assert {"pushsync_outbox_rows", "pushsync_commit_to_send_seconds_bucket"} <= scraped.metrics

    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 15
    assert unknown(queries, scraped.metrics, labels) == {}
    assert unknown(variable_queries(dashboard), scraped.metrics, labels) == {}
    assert legend_labels(dashboard) - labels == set()

    rules = [(f"alert {r['alert']}", str(r["expr"])) for r in alert_rules()]
    assert unknown(rules, scraped.metrics, labels) == {}
    assert unknown(alert_test_series(), scraped.metrics, labels) == {}

    # The check finds a name the dispatcher does not have.
    wrong = [("typo", 'sum(rate(pushsync_send_total{gateway="udp"}[5m])) by (gatway)')]
    assert unknown(wrong, scraped.metrics, labels) == {
        "typo": Names({"pushsync_send_total"}, {"gatway"})
    }


# --------------------------------------------------------------------------- promtool


def run_promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_alert_rules_pass_their_promtool_tests(promtool: str) -> None:
    checked = run_promtool(promtool, "check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=ALERTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    required = {
        "PushsyncOutboxGrowing",
        "PushsyncOutboxOldestUnsent",
        "PushsyncConfirmationsFalling",
        "PushsyncDatabaseDown",
        "PushsyncNoDispatcher",
    }
    assert required <= set(names)
    document = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    assert document["rule_files"] == [ALERTS.name]
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in document["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    assert set(names) - fires == set()
    assert set(names) - quiet == set()


def test_the_alert_tests_fail_when_an_alert_never_fires_or_always_fires(
    promtool: str, tmp_path: Path
) -> None:
    """Two broken copies of the rules, tested at once: each alert's expression replaced by
    one that is never true, then by one that is always true. promtool must report every
    alert in both."""
    names = [rule["alert"] for rule in alert_rules()]
    runs: dict[str, subprocess.Popen[str]] = {}
    for variant, expr in (("never", "vector(1) < 0"), ("always", "vector(1)")):
        directory = tmp_path / variant
        directory.mkdir()
        document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
        for group in document["groups"]:
            for rule in group["rules"]:
                rule["expr"] = expr
                rule.pop("for", None)
        (directory / ALERTS.name).write_text(yaml.safe_dump(document), encoding="utf-8")
        shutil.copy(ALERT_TESTS, directory / ALERT_TESTS.name)
        runs[variant] = subprocess.Popen(
            [promtool, "test", "rules", ALERT_TESTS.name],
            cwd=directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    for variant, process in runs.items():
        output, _ = process.communicate(timeout=60)
        assert process.returncode != 0, (variant, output)
        reported = set(re.findall(r"alertname: (\w+)", output))
        assert reported == set(names), (variant, sorted(set(names) - reported), output[-3000:])


def test_every_dashboard_expression_parses(promtool: str, tmp_path: Path) -> None:
    """Grafana's variables replaced by values, each expression goes through promtool's parser
    as a recording rule; a broken expression is reported."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    substitutes = {"$__rate_interval": "5m", "$job": "pushsync", "$instance": ".*"}

    def check(queries: list[tuple[str, str]]) -> subprocess.CompletedProcess[str]:
        rules = []
        for n, (_, expr) in enumerate(queries):
            for variable, value in substitutes.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            rules.append({"record": f"dashboard_check_{n}", "expr": expr})
        path = tmp_path / "dashboard.rules.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": rules}]}))
        return run_promtool(promtool, "check", "rules", path.name, cwd=tmp_path)

    queries = list(dashboard_queries(dashboard))
    checked = check(queries)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(queries)} rules found" in checked.stdout
    broken = check([*queries, ("broken", "sum(rate(pushsync_sends_total[5m])")])
    assert broken.returncode != 0


# --------------------------------------------------------------------------- real scrapes


def scraped_series(text: str, instance: str, minutes: int) -> list[dict[str, str]]:
    """The ``pushsync_*`` samples of a scrape as promtool input series, as Prometheus
    would store them (``job`` and ``instance`` added), each held for ``minutes``."""
    series = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("pushsync_") or sample.name.endswith("_created"):
                continue
            labels = {**sample.labels, "job": "pushsync", "instance": instance}
            inside = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            series.append(
                {"series": f"{sample.name}{{{inside}}}", "values": f"{sample.value:g}x{minutes}"}
            )
    series.append(
        {"series": f'up{{job="pushsync", instance="{instance}"}}', "values": f"1x{minutes}"}
    )
    return series


def rendered(alert: str, instance: str) -> dict[str, str]:
    """The annotations of ``alert`` for a dispatcher ``instance``."""
    (rule,) = [r for r in alert_rules() if r["alert"] == alert]
    return {
        k: v.replace("{{ $labels.instance }}", instance) for k, v in rule["annotations"].items()
    }


def test_the_alerts_judge_real_dispatchers_scrapes(
    promtool: str, scrapes: dict[str, str], tmp_path: Path
) -> None:
    """The scrapes of a connected dispatcher and of one whose database refuses connections,
    held for ten minutes, go through the rules: the one cut off is PushsyncDatabaseDown,
    and PushsyncNoDispatcher fires only when it is alone."""
    assert samples_of(scrapes["healthy"])[("pushsync_database_up", ())] == 1
    assert samples_of(scrapes["cut-off"])[("pushsync_database_up", ())] == 0

    down = {
        "severity": "critical",
        "job": "pushsync",
        "instance": "cut-off:9187",
    }
    both = scraped_series(scrapes["healthy"], "healthy:9187", 10) + scraped_series(
        scrapes["cut-off"], "cut-off:9187", 10
    )
    alone = scraped_series(scrapes["cut-off"], "cut-off:9187", 10)
    cases = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": "a connected dispatcher and one cut off",
                "interval": "1m",
                "input_series": both,
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "PushsyncDatabaseDown",
                        "exp_alerts": [
                            {
                                "exp_labels": down,
                                "exp_annotations": rendered("PushsyncDatabaseDown", "cut-off:9187"),
                            }
                        ],
                    },
                    {"eval_time": "5m", "alertname": "PushsyncNoDispatcher", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "PushsyncOutboxOldestUnsent",
                        "exp_alerts": [],
                    },
                ],
            },
            {
                "name": "only the dispatcher cut off",
                "interval": "1m",
                "input_series": alone,
                "alert_rule_test": [
                    {
                        "eval_time": "5m",
                        "alertname": "PushsyncNoDispatcher",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "critical"},
                                "exp_annotations": rendered("PushsyncNoDispatcher", ""),
                            }
                        ],
                    }
                ],
            },
        ],
    }
    path = tmp_path / "scraped.test.yml"
    path.write_text(yaml.safe_dump(cases), encoding="utf-8")
    tested = run_promtool(promtool, "test", "rules", path.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
