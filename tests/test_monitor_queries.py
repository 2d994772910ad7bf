"""Every query of docs/queries.md runs on ClickHouse 18.16 and gives the expected answers; every
cookbook query and every statement of services/monitor/sql.py also runs on current ClickHouse
(chdb, an in-process build of it, when installed) with the same number of rows."""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
import pytest
from clickhouse_driver import Client
from sklearn import metrics

from schemas.clickhouse import TABLES
from schemas.messages import ErrorBody, Event, Label, Prediction, Route
from services.inference.manifest import FeatureSpec, Manifest, OutputSpec, build_profile
from services.monitor import sql
from services.monitor.app import build_analyzer
from services.monitor.rows import event_columns, label_columns, prediction_columns
from services.monitor.settings import MonitorSettings
from services.monitor.store import MONITOR_TABLES, Store
from services.monitor.windows import Window
from tests.support import unique

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[1] / "docs" / "queries.md"
INTERVAL = 600
REQUESTS = 300


def cookbook() -> dict[str, list[str]]:
    """The SQL blocks of the cookbook, by the heading they stand under."""
    blocks: dict[str, list[str]] = defaultdict(list)
    heading = ""
    for part in re.split(r"(^## [^\n]*$|```sql\n.*?```)", DOC.read_text(), flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif part.startswith("```sql"):
            blocks[heading].append(part.removeprefix("```sql\n").removesuffix("```").strip())
    return blocks


def write_manifest(root: Path, model: str, version: str) -> None:
    rng = np.random.default_rng(int(version))
    matrix = rng.normal(size=(3000, 2))
    manifest = Manifest(
        model=model, version=version, input_name="x",
        features=[FeatureSpec(name="amount"), FeatureSpec(name="velocity")],
        outputs=[OutputSpec(name="probabilities")], score_output="probabilities",
        score_index=1, reference=build_profile(matrix, ["amount", "velocity"], rng.random(3000)),
        created_at_ms=0,
    )  # fmt: skip
    (root / model / version).mkdir(parents=True)
    manifest.save(root / model / version / "manifest.json")


@pytest.fixture(scope="module")
def seeded(cluster, tmp_path_factory):
    """Recent champion, canary and shadow traffic, labels and events of one model, analysed."""
    model = unique("cookbook").replace(".", "-")
    root = tmp_path_factory.mktemp("models")
    for version in ("1", "2"):
        write_manifest(root, model, version)
    rng = np.random.default_rng(5)
    end_s = (int(time.time()) - 60) // INTERVAL * INTERVAL
    start_s = end_s - 3 * INTERVAL
    created = start_s * 1000 + np.sort(rng.integers(0, 3 * INTERVAL * 1000, REQUESTS))
    scores = rng.random(REQUESTS)
    truth = (rng.random(REQUESTS) < scores).astype(float)

    def prediction(i: int, version: str, route: Route, shift: float = 0.0) -> Prediction:
        error = route is Route.champion and i % 30 == 29
        score = float(np.clip(scores[i] + shift, 0, 1))
        return Prediction(
            request_id=f"r-{i}", model=model, version=version, route=route, entity_id=f"c{i}",
            score=None if error else score,
            outputs={} if error else {"probabilities": [1 - score, score]},
            features={} if error else {"amount": float(rng.normal(shift)),
                                       "velocity": float(rng.normal())},
            error=ErrorBody(code="missing_feature", message="x") if error else None,
            created_at_ms=int(created[i]), scored_at_ms=int(created[i]) + 5,
        )  # fmt: skip

    rows = [prediction(i, "1", Route.champion) for i in range(REQUESTS)]
    rows += [prediction(i, "2", Route.shadow, 0.05) for i in range(REQUESTS)]
    rows += [prediction(i, "2", Route.canary, 1.0) for i in range(0, REQUESTS, 3)]
    labels = [
        Label(request_id=f"r-{i}", model=None if i % 2 else model, entity_id=f"c{i}",
              value=truth[i], ts_ms=int(created[i]) + 1000 * (i + 1))
        for i in range(REQUESTS)
    ]  # fmt: skip
    events = [
        Event(event_id=f"e{i}", event_type=f"{model}.txn", ts_ms=int(created[i]),
              entities={"card": f"c{i}"}, fields={"amount": 1.0})
        for i in range(50)
    ]  # fmt: skip
    settings = MonitorSettings(
        **{k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()},
        model_repository=root, monitor_models=[model], monitor_interval_s=INTERVAL,
        monitor_window_s=INTERVAL, monitor_quality_window_s=INTERVAL, monitor_min_samples=20,
    )  # fmt: skip
    store = Store.from_settings(settings)
    store.insert("predictions", prediction_columns(rows + rows[:40]))  # with a replay
    store.insert("labels", label_columns(labels))
    store.insert("events", event_columns(events, [0] * 50, list(range(50))))
    analyzer = build_analyzer(settings, publish=lambda alerts: None)
    for k in range(3):
        window = Window(start_s + k * INTERVAL, start_s + (k + 1) * INTERVAL)
        analyzer.analyze_window(window, window.end_s)
    analyzer.refresh_quality(time.time())
    ok = [i for i in range(REQUESTS) if i % 30 != 29]
    return {
        "model": model, "store": store, "scores": scores, "truth": truth, "created": created,
        "ok": ok, "start_s": start_s, "end_s": end_s,
    }  # fmt: skip


def run(seeded: dict, query: str) -> list[tuple]:
    return seeded["store"].query(query.replace("'fraud", f"'{seeded['model']}"))


def test_every_cookbook_query_runs_and_finds_the_seeded_data(seeded):
    blocks = cookbook()
    assert sum(len(queries) for queries in blocks.values()) >= 12
    for heading, queries in blocks.items():
        for query in queries:
            assert run(seeded, query), heading


def test_predictions_per_version_counts_a_replayed_row_once(seeded):
    (query,) = cookbook()["Predictions per version and route"]
    assert run(seeded, query) == [
        ("1", "champion", REQUESTS, REQUESTS // 30),
        ("2", "canary", REQUESTS // 3, 0),
        ("2", "shadow", REQUESTS, 0),
    ]


def test_label_delayed_auc_by_day_equals_sklearn(seeded):
    query = cookbook()["Label-delayed AUC by day"][0]
    found = {(day, version): (labelled, auc) for day, version, labelled, auc in run(seeded, query)}
    ok = np.array(seeded["ok"])
    days = np.array(
        [dt.datetime.fromtimestamp(ms // 1000, dt.UTC).date() for ms in seeded["created"][ok]]
    )
    for day in sorted(set(days)):
        chosen = ok[days == day]
        labelled, auc = found[(day, "1")]
        assert labelled == chosen.size
        expected = metrics.roc_auc_score(seeded["truth"][chosen], seeded["scores"][chosen])
        assert auc == pytest.approx(expected, abs=1e-9)


def test_top_drifting_features_put_the_shifted_feature_first(seeded):
    """The canary's `amount` is shifted by one standard deviation: its 3 windows drift (the
    query spans version 2's canary and shadow routes, 6 windows in all)."""
    query = cookbook()["Top drifting features"][0]
    rows = run(seeded, query)
    assert rows[0][0] == "amount" and rows[0][3] >= 3 and rows[0][4] == 6


def test_errors_by_code_and_scorecard_agree_with_the_traffic(seeded):
    errors = run(seeded, cookbook()["Errors by code over time"][0])
    assert sum(row[4] for row in errors) == REQUESTS // 30
    assert {row[3] for row in errors} == {"missing_feature"}
    card = {(row[1], row[2]): row for row in run(seeded, cookbook()["Health scorecard"][0])}
    assert set(card) == {("1", "champion"), ("2", "canary"), ("2", "shadow")}
    assert card[("1", "champion")][12] > 0  # labelled


def test_one_request_reads_features_and_outputs_from_the_parallel_arrays(seeded):
    rows = run(seeded, cookbook()["One request: served features and outputs"][0])
    score = float(seeded["scores"][42])
    assert [(r[0], r[1]) for r in rows] == [("1", "champion"), ("2", "canary"), ("2", "shadow")]
    assert rows[0][4] == pytest.approx(score) and rows[0][2] == pytest.approx(score)


def test_events_per_hour_count_every_event(seeded):
    rows = run(seeded, cookbook()["Events per type and hour"][0])
    assert sum(row[2] for row in rows) == 50


# -- current ClickHouse -----------------------------------------------------------------------


def monitor_statements(seeded: dict) -> dict[str, tuple[str, dict]]:
    """Every statement of sql.py with parameters that select the seeded data."""
    model, start_s, end_s = seeded["model"], seeded["start_s"], seeded["end_s"]
    window = {"start_s": start_s, "end_s": end_s, "model": model}
    scope = {"all_models": 0, "models": (model,)}
    span = {
        "since_ms": start_s * 1000,
        "until_ms": end_s * 1000,
        "since_s": start_s,
        "until_s": end_s,
        "model": model,
        "version": "2",
        "any_route": 1,
        "route": "",
    }
    edges = sql.edge_params([0.25, 0.5, 0.75])
    inf = float("inf")
    return {
        "HEALTH": (sql.HEALTH, {**window, **scope}),
        "ERROR_CODES": (sql.ERROR_CODES, {**window, **scope}),
        "drift_bins": (sql.drift_bins(2), {**window, "version": "2",
                                           "names": ["amount", "velocity"],
                                           "categorical": [0, 0, 1], "e0": [0.3, 0.0, inf],
                                           "e1": [0.6, inf, inf]}),
        "champion_score_bins": (sql.champion_score_bins(3), {**window, **edges}),
        "SHADOW_AGREEMENT": (sql.SHADOW_AGREEMENT, {**window, "versions": ["1", "2"],
                                                    "thresholds": [0.5, 0.6]}),
        "labelled_scores": (sql.labelled_scores(sql.WINDOW), window),
        "label_delay": (sql.label_delay(sql.WINDOW), window),
        "LABELLED_WINDOWS": (sql.LABELLED_WINDOWS, {**scope, "window_ms": INTERVAL * 1000,
                                                    "horizon_s": start_s, "since_s": 0}),
        "NEWEST_PREDICTION": (sql.NEWEST_PREDICTION, {**scope, "since_s": start_s}),
        "LAST_WINDOW_END": (sql.LAST_WINDOW_END, scope),
        "RANGE_TRAFFIC": (sql.RANGE_TRAFFIC, {**span, "quantile": 0.99}),
        "CHAMPION_DECILES": (sql.CHAMPION_DECILES, span),
        "scores_versus_champion": (sql.scores_versus_champion(3), {**span, **edges}),
        "RANGE_AGREEMENT": (sql.RANGE_AGREEMENT, {**span, "threshold": 0.5}),
        "range labelled_scores": (sql.labelled_scores(sql.VERSION_RANGE), span),
        "FEATURE_DRIFT": (sql.FEATURE_DRIFT, {**span, "method": "psi"}),
        "SCORECARD": (sql.SCORECARD, {"since_s": start_s, "quality_since_s": start_s - 86400,
                                      "any_model": 0, "model": model}),
    }  # fmt: skip


def test_every_statement_gives_the_same_rows_on_current_clickhouse(seeded):
    chdb_session = pytest.importorskip("chdb.session", reason="chdb (current ClickHouse) missing")
    store, model = seeded["store"], seeded["model"]
    current = chdb_session.Session()
    current.query("CREATE DATABASE IF NOT EXISTS sluice")
    for table in MONITOR_TABLES:
        current.query(TABLES[table].format(db="sluice"))
        copy_rows(store, current, table, model)
    render = Client("localhost")
    statements = {
        **{name: (text, params) for name, (text, params) in monitor_statements(seeded).items()},
        **{f"cookbook: {heading} #{i}": (query.replace("'fraud", f"'{model}"), {})
           for heading, queries in cookbook().items() for i, query in enumerate(queries)},
    }  # fmt: skip
    for name, (text, params) in statements.items():
        rendered = render.substitute_params(
            text.format(db="sluice") if params else text, params, render.connection.context
        ) if params else text  # fmt: skip
        legacy = store.query(rendered)
        answer = orjson.loads(current.query(rendered, "JSONCompact").bytes())
        assert len(answer["data"]) == len(legacy), name
        assert legacy, f"{name}: no rows on 18.16; the comparison would prove nothing"


def copy_rows(store: Store, current, table: str, model: str) -> None:
    """Copy the seeded rows of one table from the 18.16 server into chdb, as JSONEachRow."""
    where = {"events": "event_type = %(t)s", "labels": "request_id IN "
             "(SELECT request_id FROM {db}.predictions WHERE model = %(m)s)"}.get(
        table, "model = %(m)s")  # fmt: skip
    columns = [
        name
        for name, kind in store.query(f"SELECT name, type FROM system.columns WHERE "
                                      f"database = '{store.db}' AND table = '{table}'")
        if name != "inserted_at"
    ]  # fmt: skip
    rows = store.query(
        f"SELECT {', '.join(columns)} FROM {{db}}.{table} WHERE {where}",
        {"m": model, "t": f"{model}.txn"},
    )
    if not rows:
        return
    lines = b"\n".join(
        orjson.dumps(dict(zip(columns, map(_jsonable, row), strict=True))) for row in rows
    )
    current.query(f"INSERT INTO sluice.{table} FORMAT JSONEachRow " + lines.decode())


def _jsonable(value):
    if isinstance(value, dt.datetime):
        return int(value.replace(tzinfo=dt.UTC).timestamp())
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def test_cookbook_headings_are_unique():
    headings = [line for line in DOC.read_text().splitlines() if line.startswith("## ")]
    assert not [h for h, n in Counter(headings).items() if n > 1]
