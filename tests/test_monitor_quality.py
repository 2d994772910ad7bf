"""Quality and the client's evidence, computed by the monitor from ClickHouse, equal sklearn and
numpy on the same joined data — with replayed rows, labels for any model, corrected labels and
error predictions in the mix."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics

from schemas.messages import ErrorBody, Label, LatencyBreakdown, Prediction, Route
from services.inference.manifest import FeatureSpec, Manifest, OutputSpec, build_profile
from services.monitor import stats
from services.monitor.app import build_analyzer
from services.monitor.client import MonitorClient
from services.monitor.rows import label_columns, prediction_columns
from services.monitor.settings import MonitorSettings
from services.monitor.store import Store
from services.monitor.windows import Window
from tests.support import unique

pytestmark = pytest.mark.integration

HOUR = 3600
LIVE, CANARY = 500, 100
TOL = 1e-9


def quantile_exact(values: np.ndarray, level: float) -> float:
    """ClickHouse `quantileExact`: the element at rank floor(level·n) of the sorted values."""
    ordered = np.sort(values)
    return float(ordered[min(int(level * ordered.size), ordered.size - 1)])


def write_manifest(root: Path, model: str, version: str) -> None:
    rng = np.random.default_rng(int(version))
    matrix = rng.normal(size=(2000, 2))
    manifest = Manifest(
        model=model, version=version, input_name="x",
        features=[FeatureSpec(name="a"), FeatureSpec(name="b")],
        outputs=[OutputSpec(name="p")], score_output="p", decision_threshold=0.5,
        metrics={"auc": 0.99},
        reference=build_profile(matrix, ["a", "b"], 1 / (1 + np.exp(-matrix[:, 0]))),
        created_at_ms=0,
    )  # fmt: skip
    (root / model / version).mkdir(parents=True)
    manifest.save(root / model / version / "manifest.json")


@pytest.fixture(scope="module")
def world(cluster, tmp_path_factory):
    """One hour of champion, canary and shadow traffic with labels; numpy's view of it."""
    model = unique("quality").replace(".", "-")
    root = tmp_path_factory.mktemp("models")
    for version in ("1", "2"):
        write_manifest(root, model, version)
    rng = np.random.default_rng(11)
    hour_s = (int(time.time()) // HOUR - 3) * HOUR
    created = hour_s * 1000 + np.arange(LIVE + CANARY) * 5000
    live = 1 / (1 + np.exp(-rng.normal(0, 1.5, LIVE)))
    shadow = np.clip(live + rng.normal(0, 0.1, LIVE), 0, 1)
    canary = 1 / (1 + np.exp(-rng.normal(0.3, 1.5, CANARY)))
    latency = rng.gamma(2.0, 10.0, LIVE)
    truth = (rng.random(LIVE) < live).astype(float)

    def prediction(i: int, version: str, route: Route, score: float, total_ms: float):
        return Prediction(
            request_id=f"r{i}", model=model, version=version, route=route, entity_id=f"e{i}",
            score=score, features={"a": score, "b": 0.0},
            latency=LatencyBreakdown(total_ms=total_ms), created_at_ms=int(created[i]),
            scored_at_ms=int(created[i]) + 10,
        )  # fmt: skip

    rows = [prediction(i, "1", Route.champion, live[i], latency[i]) for i in range(LIVE)]
    rows += [prediction(i, "2", Route.shadow, shadow[i], latency[i]) for i in range(LIVE)]
    rows += [prediction(LIVE + j, "2", Route.canary, canary[j], 5.0) for j in range(CANARY)]
    errors = [
        Prediction(
            request_id=f"x{i}", model=model, version="1", route=Route.champion, entity_id="e",
            error=ErrorBody(code="missing_feature", message="no a"),
            latency=LatencyBreakdown(total_ms=1.0), created_at_ms=int(created[i]) + 1,
            scored_at_ms=int(created[i]) + 2,
        )
        for i in range(20)
    ]  # fmt: skip
    labelled = np.arange(400)
    delays_ms = rng.integers(10_000, 1_000_000, labelled.size)
    labels = [
        Label(request_id=f"r{i}", model=None if i % 2 else model, entity_id=f"e{i}",
              value=truth[i], ts_ms=int(created[i] + delays_ms[k]))
        for k, i in enumerate(labelled)
    ]  # fmt: skip
    wrong_first = [  # corrected later: the newer label wins
        label.model_copy(update={"value": 1 - label.value, "ts_ms": label.ts_ms - 5000})
        for label in labels[:50]
    ]
    settings = MonitorSettings(
        **{k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()},
        model_repository=root, monitor_models=[model], monitor_interval_s=HOUR,
        monitor_window_s=HOUR, monitor_quality_window_s=HOUR, monitor_min_samples=50,
    )  # fmt: skip
    store = Store.from_settings(settings)
    store.insert("predictions", prediction_columns(rows + errors + rows[:100]))  # a replay
    store.insert("labels", label_columns(wrong_first + labels))
    published = []
    analyzer = build_analyzer(settings, publish=published.extend)
    window = Window(hour_s, hour_s + HOUR)
    now_s = hour_s + 2 * HOUR
    analyzer.analyze_window(window, now_s)
    analyzer.refresh_quality(now_s)
    return {
        "model": model, "store": store, "client": MonitorClient(store), "window": window,
        "live": live, "shadow": shadow, "canary": canary, "truth": truth, "latency": latency,
        "labelled": labelled, "delays_s": delays_ms / 1000, "now_s": now_s,
        "published": published,
    }  # fmt: skip


def sklearn_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    predicted = scores >= 0.5
    return {
        "auc": metrics.roc_auc_score(labels, scores),
        "log_loss": metrics.log_loss(labels, scores),
        "accuracy": metrics.accuracy_score(labels, predicted),
        "precision": metrics.precision_score(labels, predicted, zero_division=0),
        "recall": metrics.recall_score(labels, predicted, zero_division=0),
        "f1": metrics.f1_score(labels, predicted, zero_division=0),
    }


@pytest.mark.parametrize(
    ("version", "route", "scores"), [("1", "champion", "live"), ("2", "shadow", "shadow")]
)
def test_quality_rows_equal_sklearn_on_the_joined_data(world, version, route, scores):
    rows = world["store"].query(
        "SELECT metric, value, sample_size, label_delay_p50_s FROM {db}.quality FINAL "
        "WHERE model = %(m)s AND version = %(v)s AND route = %(r)s",
        {"m": world["model"], "v": version, "r": route},
    )
    labelled = world["labelled"]
    expected = sklearn_metrics(world["truth"][labelled], world[scores][labelled])
    assert {metric: value for metric, value, _, _ in rows} == pytest.approx(expected, abs=TOL)
    assert {size for _, _, size, _ in rows} == {labelled.size}
    assert {delay for *_, delay in rows} == {quantile_exact(world["delays_s"], 0.5)}


def test_client_quality_delta_compares_candidate_and_champion(world):
    window, labelled = world["window"], world["labelled"]
    delta = world["client"].quality_delta(
        world["model"], "2", "1", since_ms=window.start_ms, until_ms=window.end_ms
    )
    truth = world["truth"][labelled]
    champion = metrics.roc_auc_score(truth, world["live"][labelled])
    candidate = metrics.roc_auc_score(truth, world["shadow"][labelled])
    assert delta.champion.value == pytest.approx(champion, abs=TOL)
    assert delta.candidate.value == pytest.approx(candidate, abs=TOL)
    assert delta.delta == pytest.approx(candidate - champion, abs=TOL)
    assert delta.candidate.samples == delta.champion.samples == labelled.size


def test_client_error_rate_and_latency_count_each_request_once(world):
    client, window, model = world["client"], world["window"], world["model"]
    span = {"since_ms": window.start_ms, "until_ms": window.end_ms}
    errors = client.error_rate(model, "1", route="champion", **span)
    assert (errors.value, errors.samples) == (pytest.approx(20 / 520), 520)
    p99 = client.latency(model, "1", route="champion", quantile=0.99, **span)
    assert p99.value == pytest.approx(quantile_exact(np.r_[world["latency"], [1.0] * 20], 0.99))
    assert client.error_rate(model, "3", **span).value is None


def test_shadow_agreement_from_client_and_analyzer_match_numpy(world):
    live, shadow = world["live"], world["shadow"]
    window = world["window"]
    agreement = world["client"].shadow_agreement(
        world["model"], "2", since_ms=window.start_ms, until_ms=window.end_ms
    )
    expected = float(np.mean((live >= 0.5) == (shadow >= 0.5)))
    deltas = np.abs(shadow - live)
    assert (agreement.rate.value, agreement.rate.samples) == (pytest.approx(expected), LIVE)
    assert agreement.delta_p95 == pytest.approx(quantile_exact(deltas, 0.95), abs=TOL)
    stored = dict(
        world["store"].query(
            "SELECT method, value FROM {db}.drift FINAL WHERE model = %(m)s AND version = '2' "
            "AND kind = 'champion' AND route = 'shadow'",
            {"m": world["model"]},
        )
    )
    assert stored["agreement"] == pytest.approx(expected)
    assert stored["score_delta_p50"] == pytest.approx(quantile_exact(deltas, 0.5), abs=TOL)


def test_prediction_drift_versus_champion_matches_numpy(world):
    window = world["window"]
    found = world["client"].prediction_drift_vs_champion(
        world["model"], "2", since_ms=window.start_ms, until_ms=window.end_ms
    )
    champion = world["live"]
    candidate = np.r_[world["shadow"], world["canary"]]
    edges = [round(0.1 * i, 1) for i in range(1, 10)]  # probability scores: equal-width bins
    bins = len(edges) + 1
    expected = stats.jensen_shannon(
        np.bincount(np.searchsorted(edges, champion, side="right"), minlength=bins),
        np.bincount(np.searchsorted(edges, candidate, side="right"), minlength=bins),
    )
    assert (found.samples, found.reference_samples) == (LIVE + CANARY, LIVE)
    assert found.value == pytest.approx(expected, abs=TOL)


def test_scorecard_joins_health_and_quality_in_one_statement(world):
    rows = world["client"].scorecard(world["model"], now_ms=world["now_s"] * 1000,
                                     lookback_s=2 * HOUR)  # fmt: skip
    card = {(row.version, row.route): row for row in rows}
    champion = card[("1", "champion")]
    assert (champion.requests, champion.error_rate) == (520, pytest.approx(20 / 520))
    assert champion.labelled == 400 and champion.auc == pytest.approx(
        metrics.roc_auc_score(world["truth"][:400], world["live"][:400]), abs=TOL
    )
    assert card[("2", "canary")].labelled == 0 and card[("2", "canary")].auc is None
    assert champion.gpu_utilization is None or 0 <= champion.gpu_utilization <= 1


def test_quality_alert_fires_below_the_training_auc_floor(world):
    """The manifests claim a training AUC of 0.99: live AUC below 0.99 - 0.05 raises an alert."""
    (alert,) = [a for a in world["published"] if a.kind == "quality" and a.version == "1"]
    auc = metrics.roc_auc_score(world["truth"][:400], world["live"][:400])
    assert auc < 0.94
    assert (alert.metric, alert.route, alert.state.value) == ("auc", "champion", "firing")
    assert (alert.value, alert.threshold) == (pytest.approx(auc), pytest.approx(0.94))
