"""Grafana dashboards, Prometheus alert rules and the operations runbook against the code.

A dashboard panel or an alert on a metric that no service exports shows nothing and never
fires, silently. So every PromQL expression of `deploy/grafana/dashboards/*.json` (panel
targets and template variables) and `deploy/prometheus/rules/*.yml` is read by a small
PromQL lexer here, and every metric, label name and literal label value it uses is checked
against what the services define. The defined set is parsed from the source (`services/**`):
metrics are created in constructors (`services.common.metrics.metric`), not at import, so
importing would define nothing. Names are expanded as prometheus_client exposes them (`_total`,
`_bucket`, `_count`, `_sum`), and the worker loop's `sluice_{service}_*` names once per
`KafkaWorker(service=...)`.

`docs/operations.md` is checked the same way: one section per alert rule (the anchor of its
`runbook_url`), links to existing anchors, every `sluice ...` command it shows answers `--help`
and accepts the options shown, every Python snippet compiles and imports what exists, every
rollout plan parses, every `SLUICE_*` variable is a setting, every dashboard is listed.
Where `promtool` is installed, it also parses every dashboard expression and runs the rule unit
tests in `deploy/prometheus/tests/`.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from services.cli import app as sluice_app
from services.common.settings import SluiceSettings

REPO = Path(__file__).resolve().parents[1]
SERVICES_DIR = REPO / "services"
SCHEMAS_DIR = REPO / "schemas"
DASHBOARDS_DIR = REPO / "deploy" / "grafana" / "dashboards"
DATASOURCES_FILE = REPO / "deploy" / "grafana" / "provisioning" / "datasources" / "datasources.yml"
PROMETHEUS_FILE = REPO / "deploy" / "prometheus" / "prometheus.yml"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"
RULE_TESTS_DIR = REPO / "deploy" / "prometheus" / "tests"
RUNBOOK = REPO / "docs" / "operations.md"
COMPOSE_FILE = REPO / "deploy" / "docker-compose.yml"
K8S_DIR = REPO / "deploy" / "k8s"

PROMETHEUS_SERIES = {"up": frozenset()}
"""Series Prometheus itself writes for every target (plus the target labels)."""

GRAFANA_INTERVALS = re.compile(r"\$__(rate_interval|interval|range)\b")


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


# --- what the services define (parsed from their source) ---------------------------------------


@dataclass(frozen=True)
class Defined:
    """One collector as created in the code: its prometheus_client type, name and labels."""

    kind: str
    name: str
    labels: tuple[str, ...]
    where: str


COLLECTOR_TYPES = {"Counter", "Gauge", "Histogram", "Summary"}


def _source_files() -> list[Path]:
    return sorted(SERVICES_DIR.rglob("*.py"))


def _prometheus_aliases(tree: ast.Module) -> dict[str, str]:
    """Local names bound to prometheus_client collector classes (`Counter as PromCounter`)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client":
            for alias in node.names:
                if alias.name in COLLECTOR_TYPES:
                    aliases[alias.asname or alias.name] = alias.name
    return aliases


def _module_tuples(tree: ast.Module) -> dict[str, tuple[str, ...]]:
    """Module-level `NAME = ("a", "b")` constants (label lists shared by several metrics)."""
    found = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Tuple | ast.List)
            and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.value.elts
            )
        ):
            found[node.targets[0].id] = tuple(e.value for e in node.value.elts)
    return found


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


@cache
def worker_services() -> tuple[str, ...]:
    """The `service=` of every `KafkaWorker(...)`: each gets the worker loop's metrics."""
    names = set()
    for path in _source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _call_name(node) == "KafkaWorker":
                for keyword in node.keywords:
                    if keyword.arg == "service":
                        assert isinstance(keyword.value, ast.Constant), (
                            f"{path}:{node.lineno}: KafkaWorker(service=...) must be a literal "
                            "for this test to know its metric names"
                        )
                        names.add(keyword.value.value)
    return tuple(sorted(names))


def _expand(node: ast.expr, assigned: dict[str, ast.expr], where: str) -> list[str]:
    """Every value a metric-name expression takes: literals, and f-strings whose parts are
    local f-string assignments or `service` (one value per worker service)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append([value.value])
            elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                name = value.value.id
                if name in assigned:
                    parts.append(_expand(assigned[name], assigned, where))
                elif name == "service":
                    parts.append(list(worker_services()))
                else:
                    raise AssertionError(f"{where}: cannot resolve {{{name}}} in a metric name")
            else:
                raise AssertionError(f"{where}: unsupported metric name expression")
        return ["".join(combo) for combo in itertools.product(*parts)]
    raise AssertionError(f"{where}: metric name is not a literal or an f-string")


def _labels(node: ast.expr | None, tuples: dict[str, tuple[str, ...]], where: str) -> tuple:
    if node is None:
        return ()
    if isinstance(node, ast.Name) and node.id in tuples:
        return tuples[node.id]
    if isinstance(node, ast.List | ast.Tuple):
        labels: list[str] = []
        for element in node.elts:
            if isinstance(element, ast.Constant) and isinstance(element.value, str):
                labels.append(element.value)
            elif isinstance(element, ast.Starred):
                labels.extend(_labels(element.value, tuples, where))
            else:
                raise AssertionError(f"{where}: label names must be literals")
        return tuple(labels)
    raise AssertionError(f"{where}: label names must be a literal list or a module constant")


def _argument(call: ast.Call, position: int, keyword: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == keyword:
            return kw.value
    return call.args[position] if len(call.args) > position else None


@cache
def defined_metrics() -> dict[str, Defined]:
    """Every collector created in `services/`, through `metric()` or a prometheus_client class."""
    found: dict[str, Defined] = {}
    for path in _source_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = _prometheus_aliases(tree)
        tuples = _module_tuples(tree)
        scopes: list[ast.AST] = [tree] + [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for scope in scopes:
            assigned = {
                node.targets[0].id: node.value
                for node in ast.walk(scope)
                if isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
            }
            for call in ast.walk(scope):
                if not isinstance(call, ast.Call):
                    continue
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                function = _call_name(call)
                if function == "metric" and call.args and isinstance(call.args[0], ast.Name):
                    kind = aliases.get(call.args[0].id)
                    name_node, labels_node = (
                        _argument(call, 1, "name"),
                        _argument(call, 3, "labels"),
                    )
                elif function in aliases and call.args:
                    kind = aliases[function]
                    name_node, labels_node = call.args[0], _argument(call, 2, "labelnames")
                else:
                    continue
                if kind is None or name_node is None:
                    continue
                labels = _labels(labels_node, tuples, where)
                for name in _expand(name_node, assigned, where):
                    found[name] = Defined(kind, name, labels, where)
    return found


def exposed_names(metric: Defined) -> dict[str, tuple[str, ...]]:
    """The sample names prometheus_client writes for `metric`, with their labels."""
    labels = metric.labels
    if metric.kind == "Counter":
        base = metric.name.removesuffix("_total")
        return {f"{base}_total": labels, f"{base}_created": labels}
    if metric.kind == "Gauge":
        return {metric.name: labels}
    if metric.kind == "Histogram":
        return {
            f"{metric.name}_bucket": (*labels, "le"),
            f"{metric.name}_count": labels,
            f"{metric.name}_sum": labels,
            f"{metric.name}_created": labels,
        }
    return {  # Summary
        metric.name: (*labels, "quantile"),
        f"{metric.name}_count": labels,
        f"{metric.name}_sum": labels,
        f"{metric.name}_created": labels,
    }


@cache
def target_labels() -> frozenset[str]:
    """Labels Prometheus attaches to every scraped series: job, instance and static labels."""
    labels = {"job", "instance"}
    for job in load_yaml(PROMETHEUS_FILE)["scrape_configs"]:
        for static in job.get("static_configs") or []:
            labels |= set(static.get("labels") or {})
    return frozenset(labels)


@cache
def series() -> dict[str, frozenset[str]]:
    """Every series name a query may use, with its label names (target labels included)."""
    result = {name: labels | target_labels() for name, labels in PROMETHEUS_SERIES.items()}
    for metric in defined_metrics().values():
        for name, labels in exposed_names(metric).items():
            result[name] = frozenset(labels) | target_labels()
    return result


@cache
def known_strings() -> frozenset[str]:
    """Every string literal of the services and schemas, plus the scrape config's values: a
    label value a query matches on must be one of them (it is set somewhere, or it is a typo)."""
    strings: set[str] = set()
    for path in [*_source_files(), *sorted(SCHEMAS_DIR.rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    for job in load_yaml(PROMETHEUS_FILE)["scrape_configs"]:
        strings.add(job["job_name"])
        for static in job.get("static_configs") or []:
            strings.update(static["targets"])
            strings.update((static.get("labels") or {}).values())
    return frozenset(strings)


def test_the_services_define_the_metrics_the_docs_promise() -> None:
    """The parser finds what the service docs list (a parser that finds nothing passes all)."""
    names = set(series())
    assert {"inference", "features", "monitor"} <= set(worker_services())
    for expected in (
        "sluice_ingest_predictions_total",
        "sluice_ingest_prediction_seconds_bucket",
        "sluice_inference_consumer_lag",
        "sluice_inference_rows_total",
        "sluice_features_late_events_total",
        "sluice_monitor_rows_inserted_total",
        "sluice_monitor_drift",
        "sluice_rollout_decisions_total",
        "sluice_rollout_evaluation_seconds_count",
    ):
        assert expected in names, expected
    assert "sluice_ingest_predictions" not in names, "a counter is exposed with _total only"
    assert "sluice_ingest_prediction_seconds" not in names, "a histogram has no bare series"
    assert series()["sluice_inference_rows_total"] >= {"model", "version", "route", "job"}
    assert "le" in series()["sluice_inference_stage_seconds_bucket"]


# --- PromQL ---------------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<number>(?:\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])?)+|\.\d+)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},@])
    """,
    re.X,
)
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"bool", "and", "or", "unless", "offset", "inf", "nan", "atan2"}


@dataclass
class Selector:
    name: str | None
    matchers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class Query:
    """What a PromQL expression refers to: selectors, grouping labels, its output labels."""

    selectors: list[Selector]
    grouping: set[str]
    output: frozenset[str] | None
    """Labels of the result when the expression starts with an aggregation `by (...)` (or
    histogram_quantile of one); None when only the union of the selectors' labels is known."""


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) pairs of a PromQL expression; whitespace dropped."""
    expr = GRAFANA_INTERVALS.sub("5m", expr)
    result, position = [], 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        assert match, f"cannot read PromQL at {expr[position:]!r} in {expr!r}"
        position = match.end()
        if match.lastgroup != "space":
            result.append((match.lastgroup, match.group()))
    return result


def _unquote(text: str) -> str:
    return text[1:-1].encode().decode("unicode_escape") if text[0] != "`" else text[1:-1]


def parse_promql(expr: str) -> Query:
    """The selectors and grouping labels of `expr` (enough to check names, not to evaluate)."""
    toks = tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    first_by: set[str] | None = None
    i = 0

    def matchers(start: int) -> tuple[list[tuple[str, str, str]], int]:
        found, j = [], start + 1
        while toks[j][1] != "}":
            if toks[j][1] == ",":
                j += 1
                continue
            label, op, value = toks[j], toks[j + 1], toks[j + 2]
            assert label[0] == "ident" and op[0] == "op" and value[0] == "string", (expr, toks[j])
            found.append((label[1], op[1], _unquote(value[1])))
            j += 3
        return found, j + 1

    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "ident" and text in GROUPING:
            if following == "(":
                j, labels = i + 2, set()
                while toks[j][1] != ")":
                    if toks[j][0] == "ident":
                        labels.add(toks[j][1])
                    j += 1
                grouping |= labels
                if text == "by" and first_by is None:
                    first_by = labels
                i = j + 1
                continue
            i += 1
        elif kind == "ident" and (
            following == "(" or (text in AGGREGATIONS and following in GROUPING)
        ):
            i += 1  # a function or an aggregation
        elif kind == "ident" and text.lower() not in KEYWORDS:
            selector = Selector(text)
            i += 1
            if i < len(toks) and toks[i][1] == "{":
                selector.matchers, i = matchers(i)
            selectors.append(selector)
        elif kind == "op" and text == "{":
            selector = Selector(None)
            selector.matchers, i = matchers(i)
            selectors.append(selector)
        else:
            i += 1
    output = None
    if first_by is not None and toks and toks[0][0] == "ident":
        if toks[0][1] in AGGREGATIONS:
            output = frozenset(first_by)
        elif toks[0][1] == "histogram_quantile":
            output = frozenset(first_by - {"le"})
    return Query(selectors, grouping, output)


def test_promql_reader_finds_names_labels_and_values() -> None:
    query = parse_promql(
        'histogram_quantile(0.99, sum by (stage, le) (rate(sluice_x_bucket{stage="queue",'
        ' model=~"$model"}[$__rate_interval]))) / ignoring(stage) group_left '
        'sum({__name__=~"sluice_[a-z]+_y"} offset 5m) > 1e3 and on() vector(1)'
    )
    assert [s.name for s in query.selectors] == ["sluice_x_bucket", None]
    assert query.selectors[0].matchers == [("stage", "=", "queue"), ("model", "=~", "$model")]
    assert query.selectors[1].matchers == [("__name__", "=~", "sluice_[a-z]+_y")]
    assert query.grouping == {"stage", "le"}
    assert query.output == {"stage"}
    assert parse_promql("time() - max(up)").output is None


def names_of(selector: Selector) -> list[str]:
    """The defined series a selector can match (several for a `__name__=~` regex)."""
    if selector.name is not None:
        return [selector.name]
    for label, op, value in selector.matchers:
        if label == "__name__" and op == "=":
            return [value]
        if label == "__name__" and op == "=~":
            return [name for name in series() if re.fullmatch(value, name)]
    return []


_SIMPLE_ALTERNATIVES = re.compile(r"[\w.\-:/]+(\|[\w.\-:/]+)*")


def check_promql(expr: str, where: str) -> tuple[list[str], frozenset[str]]:
    """Problems with `expr`, and the labels its result can carry."""
    problems = []
    query = parse_promql(expr)
    if not query.selectors:
        problems.append(f"{where}: no metric in {expr!r}")
    union: set[str] = set()
    for selector in query.selectors:
        names = names_of(selector)
        if not names:
            problems.append(f"{where}: selector {selector} matches no defined metric")
        for name in names:
            if name not in series():
                problems.append(f"{where}: {name} is not defined by any service")
                continue
            labels = series()[name]
            union |= labels
            for label, op, value in selector.matchers:
                if label == "__name__":
                    continue
                if label not in labels:
                    problems.append(f"{where}: {name} has no label {label!r}")
                if "$" in value or value == "" or op in ("=~", "!~") and value in (".*", ".+"):
                    continue
                if op in ("=~", "!~") and not _SIMPLE_ALTERNATIVES.fullmatch(value):
                    continue
                for literal in value.split("|") if op in ("=~", "!~") else [value]:
                    if literal not in known_strings():
                        problems.append(
                            f"{where}: {label}{op}{value!r}: {literal!r} is never set in the code"
                        )
    for label in query.grouping - union:
        problems.append(f"{where}: grouping label {label!r} is on none of the metrics")
    output = query.output if query.output is not None else frozenset(union)
    return problems, output


# --- dashboards ---------------------------------------------------------------------------------


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def panels_of(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels including those nested in collapsed rows."""
    result = []
    for panel in panels:
        result.append(panel)
        result.extend(panels_of(panel.get("panels") or []))
    return result


def variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    return query.get("query", "") if isinstance(query, dict) else query or ""


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, expression, legend) of every panel target."""
    found = []
    for panel in panels_of(dashboard["panels"]):
        for target in panel.get("targets") or []:
            where = f"{dashboard['uid']}/{panel['title']}/{target.get('refId')}"
            found.append((where, target.get("expr", ""), target.get("legendFormat", "")))
    return found


def test_dashboards_are_one_per_service_area_with_unique_uids_and_titles() -> None:
    dashboards = [load_dashboard(path) for path in dashboard_files()]
    uids = [d["uid"] for d in dashboards]
    titles = [d["title"] for d in dashboards]
    assert len(uids) == len(set(uids)), f"duplicate uids: {uids}"
    assert len(titles) == len(set(titles)), f"duplicate titles: {titles}"
    assert {
        "sluiceway-overview",
        "sluiceway-gateway",
        "sluiceway-inference",
        "sluiceway-features",
        "sluiceway-monitor",
        "sluiceway-rollout",
    } <= set(uids)
    for path, dashboard in zip(dashboard_files(), dashboards, strict=True):
        assert path.stem == dashboard["uid"], f"{path.name}: name the file after its uid"
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"]), dashboard["uid"]
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
        assert "sluiceway" in dashboard["tags"], f"{path.name}: the dashboard links use the tag"
        assert dashboard.get("id") is None, f"{path.name}: provisioned dashboards carry no id"


def test_every_query_uses_the_provisioned_prometheus_data_source() -> None:
    uids = {
        s["uid"] for s in load_yaml(DATASOURCES_FILE)["datasources"] if s["type"] == "prometheus"
    }
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        items = [
            *(p for p in panels_of(dashboard["panels"]) if p["type"] != "row"),
            *(t for p in panels_of(dashboard["panels"]) for t in p.get("targets") or []),
            *(v for v in dashboard["templating"]["list"] if v["type"] == "query"),
        ]
        for item in items:
            source = item.get("datasource")
            assert isinstance(source, dict), f"{path.name}: {item.get('title')}: no data source"
            assert source.get("type") == "prometheus" and source.get("uid") in uids, (
                f"{path.name}: {item.get('title') or item.get('name')}: {source}"
            )


def test_panels_do_not_overlap() -> None:
    for path in dashboard_files():
        taken: dict[tuple[int, int], str] = {}
        for panel in panels_of(load_dashboard(path)["panels"]):
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, f"{path.name}: {panel['title']}"
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    other = taken.setdefault((x, y), panel["title"])
                    assert other == panel["title"], f"{path.name}: {panel['title']!r} on {other!r}"


def test_dashboard_queries_use_only_defined_metrics_labels_and_values() -> None:
    problems = []
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        variables = {v["name"] for v in dashboard["templating"]["list"]}
        for where, expr, legend in dashboard_queries(dashboard):
            found, output = check_promql(expr, where)
            problems += found
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
                if label not in output:
                    problems.append(f"{where}: legend {{{{{label}}}}} is not a label of the result")
            for name in re.findall(r"\$(\w+)", expr):
                if not name.startswith("__"):
                    assert name in variables, f"{where}: ${name} is not a dashboard variable"
        for variable in dashboard["templating"]["list"]:
            where = f"{dashboard['uid']}/${variable['name']}"
            call = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query(variable).strip())
            assert call, f"{where}: use label_values(metric, label)"
            found, output = check_promql(call.group(1), where)
            problems += found
            if call.group(2) not in output:
                problems.append(f"{where}: no label {call.group(2)!r}")
    assert not problems, "\n".join(problems)


def test_dashboards_cover_what_on_call_needs() -> None:
    """The signals each service area is read by (a renamed metric must move, not vanish)."""
    wanted = {
        "sluiceway-gateway": [
            "sluice_ingest_predictions_total", 'outcome="deadline_exceeded"',
            'outcome="broker_error"', "sluice_ingest_prediction_seconds_bucket",
            "sluice_ingest_in_flight",
        ],
        "sluiceway-inference": [
            "sluice_inference_batch_size_bucket", "sluice_inference_batch_seconds_bucket",
            "sluice_inference_rows_total", "sluice_inference_consumer_lag", 'stage="features"',
            "sluice_inference_loaded_versions", "sluice_inference_online_store_errors_total",
        ],
        "sluiceway-features": [
            "sluice_features_events_total", "sluice_features_late_events_total",
            "sluice_features_commit_seconds_bucket", "sluice_features_consumer_lag",
            "sluice_features_retries_total",
        ],
        "sluiceway-monitor": [
            "sluice_monitor_rows_inserted_total", "sluice_monitor_insert_seconds_bucket",
            "sluice_monitor_retries_total", 'kind="feature"', "sluice_monitor_quality",
            "sluice_monitor_alert_active",
        ],
        "sluiceway-rollout": [
            "sluice_rollout_candidate_weight", "sluice_rollout_decisions_total",
            "sluice_rollout_evaluation_seconds_bucket", 'method="agreement"',
        ],
    }  # fmt: skip
    for uid, needles in wanted.items():
        exprs = " ".join(
            expr for _, expr, _ in dashboard_queries(load_dashboard(DASHBOARDS_DIR / f"{uid}.json"))
        )
        for needle in needles:
            assert needle in exprs, f"{uid}: no panel reads {needle}"


def test_promtool_parses_every_dashboard_expression(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = []
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        exprs = [expr for _, expr, _ in dashboard_queries(dashboard)]
        for variable in dashboard["templating"]["list"]:
            call = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable_query(variable).strip())
            exprs.append(call.group(1))
        for n, expr in enumerate(exprs):
            expr = GRAFANA_INTERVALS.sub("5m", expr)
            expr = re.sub(r"\$\w+", "x", expr)
            rules.append({"record": f"dashboard:{path.stem.replace('-', '_')}:{n}", "expr": expr})
    file = tmp_path / "dashboards.yml"
    file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- alert rules --------------------------------------------------------------------------------


def alert_rules() -> list[tuple[str, dict[str, Any]]]:
    """(file name, rule) of every alerting rule."""
    return [
        (path.name, rule)
        for path in sorted(RULES_DIR.glob("*.yml"))
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def rule_expressions() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (f"{name}/{rule.get('alert') or rule.get('record')}", rule["expr"], rule)
        for path in sorted(RULES_DIR.glob("*.yml"))
        for name in [path.name]
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]


def test_rule_expressions_use_only_defined_metrics_labels_and_values() -> None:
    problems = []
    for where, expr, rule in rule_expressions():
        found, output = check_promql(expr, where)
        problems += found
        for text in (rule.get("annotations") or {}).values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                if label not in output:
                    problems.append(f"{where}: $labels.{label} is not a label of the result")
    assert not problems, "\n".join(problems)


def test_rules_cover_the_failures_on_call_must_hear_about() -> None:
    alerts = {rule["alert"]: rule for _, rule in alert_rules()}
    for name, needle in {
        "SluicewayConsumerLagHigh": "_consumer_lag",
        "SluicewayDeadLetters": "_dead_letters_total",
        "SluicewayGatewayDeadlinesExceeded": "deadline_exceeded",
        "SluicewayGatewayBrokerErrors": "broker_error",
        "SluicewayFeaturesLateEvents": "sluice_features_late_events_total",
        "SluicewayMonitorSinkRetrying": "sluice_monitor_retries_total",
        "SluicewayMonitorRowsRejected": "sluice_monitor_rejected_total",
        "SluicewayInferenceOnlineStoreUnavailable": "sluice_inference_online_store_errors_total",
        "SluicewayRolloutRolledBack": 'action="rollback"',
    }.items():
        assert name in alerts, f"missing alert {name}"
        assert needle in alerts[name]["expr"], name
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"].get("summary") and rule["annotations"].get("description"), name


def runbook_text() -> str:
    return RUNBOOK.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside fenced code."""
    found = []
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"(#{1,6}) (.+)", line)):
            found.append((len(match.group(1)), match.group(2)))
    return found


def anchors(text: str) -> set[str]:
    return {slug(title) for _, title in headings(text)}


def test_every_alert_links_its_own_runbook_section() -> None:
    sections = anchors(runbook_text())
    for name, rule in alert_rules():
        url = rule["annotations"].get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", f"{name}/{rule['alert']}: runbook_url {url!r}"
        assert anchor == slug(rule["alert"]), f"{rule['alert']}: anchor {anchor!r}"
        assert anchor in sections, f"{rule['alert']}: docs/operations.md has no #{anchor}"


def test_runbook_has_one_section_per_alert_and_no_other() -> None:
    level_two = None
    documented = []
    for level, title in headings(runbook_text()):
        if level == 2:
            level_two = title
        elif level == 3 and level_two == "Alerts":
            documented.append(title)
    names = [rule["alert"] for _, rule in alert_rules()]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert sorted(documented) == sorted(names), "docs/operations.md ## Alerts vs the rule files"


def test_rule_unit_tests_pass_in_promtool() -> None:
    promtool = shutil.which("promtool")
    tests = sorted(RULE_TESTS_DIR.glob("*.yml"))
    assert tests, "deploy/prometheus/tests/ has no rule tests"
    for path in tests:
        referenced = {(path.parent / f).resolve() for f in load_yaml(path)["rule_files"]}
        assert referenced <= {p.resolve() for p in RULES_DIR.glob("*.yml")}, path.name
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "test", "rules", *map(str, tests)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=RULE_TESTS_DIR,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the runbook --------------------------------------------------------------------------------


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)


def test_runbook_links_point_at_existing_anchors_and_files() -> None:
    text = runbook_text()
    own = anchors(text)
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            assert anchor in own, f"link to missing section #{anchor}"
            continue
        file = (RUNBOOK.parent / path).resolve()
        assert file.exists(), f"link to missing file {target}"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text(encoding="utf-8")), f"no #{anchor} in {path}"


def test_runbook_lists_every_dashboard() -> None:
    text = runbook_text()
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        row = re.search(
            rf"^\| {re.escape(dashboard['title'])} \| `{dashboard['uid']}` \|", text, re.M
        )
        assert row, f"docs/operations.md ## Dashboards: no row for {dashboard['title']}"


def shell_commands(text: str, inline: bool = True) -> list[list[str]]:
    """Words of every command in shell code blocks, and (`inline`) of `sluice ...` code spans."""
    commands = []
    for language, body in code_blocks(text):
        if language not in ("sh", "bash", "console", ""):
            continue
        logical = body.replace("\\\n", " ")
        for line in logical.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    if inline:
        prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
        for span in re.findall(r"`(sluice [^`]+)`", prose):
            commands.append(shlex.split(span))
    return commands


def sluice_invocations(text: str, inline: bool = True) -> list[list[str]]:
    """The arguments after `sluice` of every documented sluice command."""
    found = []
    for words in shell_commands(text, inline):
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words = words[1:]
        if words and words[0] == "sluice":
            found.append(words[1:])
    return found


def is_group(command: Any) -> bool:
    """Whether a (click or typer-vendored click) command has sub-commands."""
    return isinstance(getattr(command, "commands", None), dict)


def resolve(words: list[str]) -> tuple[list[str], list[Any], list[str], list[str]]:
    """(sub-command path, the commands along it, options given, positional words) of
    `sluice WORDS`; an option belongs to the command it follows (`sluice rollout --url U ...`)."""
    command = typer.main.get_command(sluice_app)
    path, chain, options, positional = [], [command], [], []
    words = list(words)
    while words:
        word = words.pop(0)
        if word.startswith("-"):
            name = word.split("=")[0]
            options.append(name)
            param = next((p for p in command.params if name in p.opts), None)
            takes_value = param is not None and not getattr(param, "is_flag", False)
            if takes_value and "=" not in word and words:
                words.pop(0)  # the option's value
        elif is_group(command) and not positional and word in command.commands:
            command = command.commands[word]
            path.append(word)
            chain.append(command)
        else:
            positional.append(word)
    return path, chain, options, positional


def test_every_documented_sluice_command_exists_with_its_options() -> None:
    invocations = sluice_invocations(runbook_text())
    assert len(invocations) >= 10, "the runbook documents sluice commands"
    runner = CliRunner()
    for words in invocations:
        path, chain, options, _ = resolve(words)
        assert not is_group(chain[-1]), f"sluice {' '.join(words)}: incomplete"
        result = runner.invoke(sluice_app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert result.output.lstrip().startswith("Usage:") or "Usage:" in result.output
        accepted = {"--help"}
        for command in chain:
            for param in command.params:
                accepted.update(param.opts)
                accepted.update(param.secondary_opts)
        for option in options:
            assert option in accepted, f"sluice {' '.join(words)}: no option {option}"
    for words in sluice_invocations(runbook_text(), inline=False):
        # a command in a code block is meant to be run: it gives every required argument
        _, chain, _, positional = resolve(words)
        arguments = [p for p in chain[-1].params if p.param_type_name == "argument"]
        assert len(positional) >= sum(p.required for p in arguments), f"sluice {' '.join(words)}"
        assert len(positional) <= len(arguments), f"sluice {' '.join(words)}: extra arguments"


def test_documented_compose_services_and_deployments_exist() -> None:
    compose_services = set(load_yaml(COMPOSE_FILE)["services"])
    deployments = {
        document["metadata"]["name"]
        for path in K8S_DIR.rglob("*.yaml")
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and document.get("kind") == "Deployment"
    }
    checked = 0
    for words in shell_commands(runbook_text()):
        if words[:4] == ["docker", "compose", "-f", "deploy/docker-compose.yml"]:
            verb, *rest = words[4:]
            if verb in ("exec", "logs", "restart", "stop", "start"):
                service = next(w for w in rest if not w.startswith("-") and not w[0].isdigit())
                assert service in compose_services, f"{' '.join(words)}: no service {service}"
                checked += 1
        for name in re.findall(r"deployment/([\w-]+)", " ".join(words)):
            assert name in deployments, f"{' '.join(words)}: no Deployment {name}"
            checked += 1
    prose = " ".join(
        re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", runbook_text(), flags=re.M | re.S))
    )
    for name in re.findall(r"deployment/([\w-]+)", prose):
        assert name in deployments, f"no Deployment {name}"
    assert checked, "no compose or kubectl command was checked"


def test_runbook_python_compiles_and_imports_what_exists() -> None:
    blocks = [body for language, body in code_blocks(runbook_text()) if language == "python"]
    assert blocks, "the runbook shows the DLQ and routing snippets"
    for body in blocks:
        tree = ast.parse(body)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    importlib.import_module(alias.name)


def test_runbook_rollout_plans_are_valid() -> None:
    from services.rollout.plan import parse_plan

    plans = [body for language, body in code_blocks(runbook_text()) if language == "yaml"]
    assert plans
    for body in plans:
        plan = parse_plan(body, "docs/operations.md")
        assert plan.steps


def cli_envvars() -> set[str]:
    names: set[str] = set()
    stack = [typer.main.get_command(sluice_app)]
    while stack:
        command = stack.pop()
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        if is_group(command):
            stack.extend(command.commands.values())
    return names


def test_runbook_names_only_real_settings() -> None:
    classes = [SluiceSettings]
    for package in ("ingest", "features", "inference", "monitor", "rollout"):
        module = importlib.import_module(f"services.{package}.settings")
        classes += [
            value
            for value in vars(module).values()
            if isinstance(value, type)
            and issubclass(value, SluiceSettings)
            and value.__module__ == module.__name__
        ]
    known = {f"SLUICE_{name.upper()}" for cls in classes for name in cls.model_fields}
    known |= cli_envvars()
    named = set(re.findall(r"\bSLUICE_[A-Z0-9_]*[A-Z0-9]\b", runbook_text()))
    assert named, "the runbook names settings"
    assert named <= known, f"not a setting: {sorted(named - known)}"
