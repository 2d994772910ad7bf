"""The analyzer: every interval, the rolling windows that closed are measured from ClickHouse and
written back as `health`, `drift` and `quality` rows; breaches become alerts.

Per window `[end − window, end)` and per (model, version, route):
- **health**: requests, errors and error codes, latency p50/p95/p99, freshness (seconds from the
  series' newest request to the window end), host GPU utilisation;
- **feature and prediction drift** against the version's reference profile (`drift.verdicts`:
  the chosen method plus PSI), for columns with at least `monitor_min_samples` values;
- **versus the champion** (kind `champion`): canary and shadow score distributions against the
  champion route's (Jensen-Shannon, PSI) and, for shadows, agreement with the live prediction
  of the same request at each version's decision threshold and |score delta| quantiles.

Quality (AUC, log-loss, accuracy, precision, recall, F1, label delay) uses tumbling windows of
`monitor_quality_window_s` by prediction time. Labels arrive late, so every
`monitor_quality_refresh_s` the windows holding newly labelled predictions are recomputed; the
`quality` table keeps the newest computation (ReplacingMergeTree on `computed_at`).

Rows are written before alerts are decided, so a window that fails half-way (ClickHouse down) is
simply computed again next cycle and its alerts are decided once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import Alert
from services.inference.client import Manifest
from services.monitor import sql
from services.monitor.alerts import AlertBook, Check, Direction, Hysteresis, SeriesKey
from services.monitor.drift import ReferenceBins, reference_bins, verdicts
from services.monitor.export import AnalyzerMetrics
from services.monitor.gpu import gpu_utilization
from services.monitor.policy import DriftMethod, FeaturePolicy, ModelPolicy, feature_policy
from services.monitor.references import References
from services.monitor.settings import MonitorSettings
from services.monitor.stats import jensen_shannon, psi, quality_metrics
from services.monitor.store import Store, StoreUnavailable
from services.monitor.windows import Window, due_windows, tumbling

log = logging.getLogger(__name__)

Series = tuple[str, str, str]
"""(model, version, route)."""

Publish = Callable[[Sequence[Alert]], None]
"""Delivers alerts (to `sluice.alerts`); raises if they were not acknowledged."""

DRIFT_COLUMNS = (
    "window_start", "window_end", "model", "version", "route", "feature", "kind", "method",
    "value", "p_value", "threshold", "drifted", "sample_size", "reference_size", "computed_at",
)  # fmt: skip
HEALTH_COLUMNS = (
    "window_start", "window_end", "model", "version", "route", "requests", "errors",
    "error_rate", "error_codes", "error_counts", "p50_ms", "p95_ms", "p99_ms", "freshness_s",
    "gpu_utilization", "computed_at",
)  # fmt: skip
QUALITY_COLUMNS = (
    "window_start", "window_end", "model", "version", "route", "metric", "value", "sample_size",
    "label_delay_p50_s", "computed_at",
)  # fmt: skip


@dataclass
class WindowOutput:
    """What one window produced: rows per table and the checks to feed the alert book."""

    drift: list[tuple] = field(default_factory=list)
    health: list[tuple] = field(default_factory=list)
    quality: list[tuple] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _columns(names: Sequence[str], rows: list[tuple]) -> dict[str, list]:
    return {name: [row[i] for row in rows] for i, name in enumerate(names)}


class Analyzer:
    """Computes due windows, writes their rows, publishes alerts. One instance per process."""

    def __init__(
        self,
        settings: MonitorSettings,
        store: Store,
        references: References,
        publish: Publish,
        book: AlertBook | None = None,
        gpu: Callable[[], float | None] = gpu_utilization,
    ) -> None:
        self.settings = settings
        self.store = store
        self.references = references
        self.publish = publish
        self.book = book or AlertBook(
            Hysteresis(
                settings.monitor_hysteresis_band,
                settings.monitor_fire_after,
                settings.monitor_clear_after,
            )
        )
        self.gpu = gpu
        self.metrics = AnalyzerMetrics()
        self.last_end_s: int | None = None
        self.labels_since_s: int | None = None
        self.next_quality_s = 0.0
        self.pending: list[Alert] = []

    # -- the loop -----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Run cycles until `stop` is set; a ClickHouse outage is logged and retried."""
        while not stop.is_set():
            started = time.time()
            try:
                self.run_cycle(started)
            except StoreUnavailable as exc:
                log.warning("analysis postponed", extra={"error": str(exc)})
            self.metrics.cycle_seconds.observe(time.time() - started)
            interval = self.settings.monitor_interval_s
            next_due = (started - self.settings.monitor_lateness_s) // interval * interval
            stop.wait(
                max(1.0, next_due + interval + self.settings.monitor_lateness_s - time.time())
            )

    def run_cycle(self, now_s: float) -> list[Alert]:
        """Compute every due window, refresh quality if due, check freshness; returns the alerts
        decided in this cycle (published, or pending until the broker takes them)."""
        settings = self.settings
        if self.last_end_s is None:
            (last,) = self.store.query(sql.LAST_WINDOW_END, settings.scope())[0]
            self.last_end_s = int(last) or None
        decided: list[Alert] = []
        for window in due_windows(
            self.last_end_s,
            now_s,
            interval_s=settings.monitor_interval_s,
            window_s=settings.monitor_window_s,
            lateness_s=settings.monitor_lateness_s,
            max_catchup=settings.monitor_max_catchup_windows,
        ):
            decided += self.analyze_window(window, now_s)
            self.last_end_s = window.end_s
            self.metrics.last_window_end.set(window.end_s)
        if now_s >= self.next_quality_s:
            decided += self.refresh_quality(now_s)
            self.next_quality_s = now_s + settings.monitor_quality_refresh_s
        decided += self.check_freshness(now_s)
        return decided

    def analyze_window(self, window: Window, now_s: float) -> list[Alert]:
        """Measure one window, write its rows, then decide and publish its alerts."""
        out = WindowOutput()
        series = self._health(window, out)
        versions: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for model, version, route in series:
            versions[model][version].add(route)
        for model, model_versions in versions.items():
            score_counts: dict[tuple[str, str], tuple[ReferenceBins, np.ndarray]] = {}
            for version in model_versions:
                manifest = self.references.manifest(model, version)
                if manifest is not None and manifest.reference is not None:
                    score_counts.update(self.drift(window, model, version, manifest, out))
            self._versus_champion(window, model, score_counts, out)
            if any("shadow" in routes for routes in model_versions.values()):
                self._agreement(window, model, list(model_versions), out)
        computed = int(now_s)
        self.store.insert("health", _columns(HEALTH_COLUMNS, [(*r, computed) for r in out.health]))
        self.store.insert("drift", _columns(DRIFT_COLUMNS, [(*r, computed) for r in out.drift]))
        return self._decide(out.checks, now_s)

    # -- health -------------------------------------------------------------------------------

    def _health(self, window: Window, out: WindowOutput) -> list[Series]:
        params = {**window.params(), **self.settings.scope()}
        codes: dict[Series, tuple[list[str], list[int]]] = defaultdict(lambda: ([], []))
        for model, version, route, code, count in self.store.query(sql.ERROR_CODES, params):
            codes[(model, version, route)][0].append(code)
            codes[(model, version, route)][1].append(int(count))
        gpu = self.gpu()
        if gpu is not None:
            self.metrics.gpu.set(gpu)
        series: list[Series] = []
        for model, version, route, requests, errors, latency, newest_ms in self.store.query(
            sql.HEALTH, params
        ):
            key = (model, version, route)
            series.append(key)
            error_rate = errors / requests
            p50, p95, p99 = (float(v) for v in latency)
            freshness_s = max(0.0, (window.end_ms - newest_ms) / 1000)
            error_codes, error_counts = codes[key]
            out.health.append(
                (window.start_s, window.end_s, model, version, route, requests, errors,
                 error_rate, error_codes, error_counts, p50, p95, p99, freshness_s, gpu)
            )  # fmt: skip
            self.metrics.requests.labels(*key).set(requests)
            self.metrics.error_ratio.labels(*key).set(error_rate)
            for quantile, value in (("0.5", p50), ("0.95", p95), ("0.99", p99)):
                self.metrics.latency.labels(*key, quantile).set(value / 1000)
            if requests >= self.settings.monitor_min_requests:
                policy = self.settings.policy(model) or ModelPolicy()
                out.checks += [
                    self._check(key, "errors", "error_rate", error_rate,
                                _pick(policy.max_error_rate, self.settings.monitor_max_error_rate),
                                "above", window),
                    self._check(key, "latency", "p99_ms", p99,
                                _pick(policy.max_p99_ms, self.settings.monitor_max_p99_ms),
                                "above", window),
                ]  # fmt: skip
        return series

    # -- drift ----------------------------------------------------------------------------------

    def drift(
        self, window: Window, model: str, version: str, manifest: Manifest, out: WindowOutput
    ) -> dict[tuple[str, str], tuple[ReferenceBins, np.ndarray]]:
        """Feature and prediction drift of one version in one window, all routes, into `out`
        (rows and checks); returns the score bins and counts per (version, route) for the
        comparison with the champion. One ClickHouse query bins every column."""
        reference = manifest.reference
        names = ["", *manifest.feature_names]
        profiles = [reference.prediction, *(reference.features[n] for n in names[1:])]
        columns = [reference_bins(profile) for profile in profiles]
        edge_arrays = max(
            [c.interior_edges.size for c in columns if c is not None and c.kind == "numeric"] + [1]
        )
        params: dict[str, object] = {
            **window.params(),
            "model": model,
            "version": version,
            "names": names[1:],
            "categorical": [int(c is not None and c.kind == "categorical") for c in columns],
        }
        for j in range(edge_arrays):
            params[f"e{j}"] = [
                float(c.interior_edges[j])
                if c is not None and c.kind == "numeric" and j < c.interior_edges.size
                else math.inf
                for c in columns
            ]
        counts: dict[tuple[str, int], np.ndarray] = {}
        for route, position, key, n in self.store.query(sql.drift_bins(edge_arrays), params):
            column = columns[position - 1]
            if column is None or math.isinf(key):
                continue
            bins = counts.setdefault((route, position), np.zeros(column.bins))
            bins[_bin_of(column, key)] += n
        policy = self.settings.policy(model)
        scores: dict[tuple[str, str], tuple[ReferenceBins, np.ndarray]] = {}
        for (route, position), current in sorted(counts.items()):
            column, name = columns[position - 1], names[position - 1]
            if position == 1:
                scores[(version, route)] = (column, current)
            column_policy = (
                (policy.prediction if policy else FeaturePolicy())
                if position == 1
                else feature_policy(policy, name)
            )
            if not column_policy.enabled or current.sum() < self.settings.monitor_min_samples:
                continue
            kind = "prediction" if position == 1 else "feature"
            found = verdicts(
                column,
                current,
                column_policy,
                self.settings.monitor_drift_thresholds,
                self.settings.monitor_small_sample_max,
            )
            for verdict in found:
                out.drift.append(
                    (window.start_s, window.end_s, model, version, route, name, kind,
                     verdict.method, verdict.value, verdict.p_value, verdict.threshold,
                     int(verdict.drifted), int(current.sum()), column.size)
                )  # fmt: skip
                self.metrics.drift.labels(model, version, route, kind, name, verdict.method).set(
                    verdict.value
                )
            chosen = found[0]
            out.checks.append(
                Check(
                    SeriesKey(
                        model,
                        version,
                        route,
                        "drift" if position > 1 else "prediction_drift",
                        chosen.method,
                        name,
                    ),
                    chosen.checked_value,
                    chosen.threshold,
                    chosen.direction,
                    window.start_ms,
                    window.end_ms,
                    breached=chosen.drifted,
                    critical_at=self.settings.monitor_psi_critical
                    if chosen.method == DriftMethod.psi
                    else None,
                )  # fmt: skip
            )
        return scores

    def _versus_champion(
        self,
        window: Window,
        model: str,
        scores: dict[tuple[str, str], tuple[ReferenceBins, np.ndarray]],
        out: WindowOutput,
    ) -> None:
        """Score distributions of canary and shadow routes against the champion route's."""
        thresholds = self.settings.monitor_drift_thresholds
        for (version, route), (column, current) in sorted(scores.items()):
            if route not in ("canary", "shadow") or column.kind != "numeric":
                continue
            champion = np.zeros(column.bins)
            edges = column.interior_edges.tolist()
            for key, n in self.store.query(
                sql.champion_score_bins(len(edges)),
                {**window.params(), "model": model, **sql.edge_params(edges)},
            ):
                if not math.isinf(key):
                    champion[int(key)] += n
            minimum = self.settings.monitor_min_samples
            if champion.sum() < minimum or current.sum() < minimum:
                continue
            for method, value in (
                (DriftMethod.jensenshannon, jensen_shannon(champion, current)),
                (DriftMethod.psi, psi(champion, current)),
            ):
                threshold = thresholds[method]
                out.drift.append(
                    (window.start_s, window.end_s, model, version, route, "", "champion",
                     method.value, value, None, threshold, int(value >= threshold),
                     int(current.sum()), int(champion.sum()))
                )  # fmt: skip
                self.metrics.drift.labels(model, version, route, "champion", "", method).set(value)

    def _agreement(
        self, window: Window, model: str, versions: list[str], out: WindowOutput
    ) -> None:
        """Shadow versus live prediction of the same request (kind `champion`)."""
        decision = []
        for version in versions:
            manifest = self.references.manifest(model, version)
            decision.append(manifest.decision_threshold if manifest else 0.5)
        params = {**window.params(), "model": model, "versions": versions, "thresholds": decision}
        policy = self.settings.policy(model) or ModelPolicy()
        minimum = _pick(policy.min_agreement, self.settings.monitor_min_agreement)
        for version, pairs, agreeing, delta in self.store.query(sql.SHADOW_AGREEMENT, params):
            rate = agreeing / pairs
            rows = [("agreement", rate, minimum, int(rate < minimum))] + [
                (f"score_delta_p{level}", float(value), 0.0, 0)
                for level, value in zip(("50", "95", "99"), delta, strict=True)
            ]
            for method, value, threshold, drifted in rows:
                out.drift.append(
                    (window.start_s, window.end_s, model, version, "shadow", "", "champion",
                     method, value, None, threshold, drifted, pairs, pairs)
                )  # fmt: skip
                self.metrics.drift.labels(model, version, "shadow", "champion", "", method).set(
                    value
                )
            if pairs >= self.settings.monitor_min_samples:
                out.checks.append(
                    self._check((model, version, "shadow"), "agreement", "agreement_rate", rate,
                                minimum, "below", window)
                )  # fmt: skip

    # -- quality --------------------------------------------------------------------------------

    def refresh_quality(self, now_s: float) -> list[Alert]:
        """Recompute the quality windows that got labels since the last refresh."""
        settings = self.settings
        server_now = self.store.server_time_s()
        since = self.labels_since_s
        if since is None:
            since = server_now - settings.monitor_label_horizon_s
        window_ms = settings.monitor_quality_window_s * 1000
        touched = self.store.query(
            sql.LABELLED_WINDOWS,
            {
                **settings.scope(),
                "window_ms": window_ms,
                "horizon_s": int(now_s) - settings.monitor_label_horizon_s,
                "since_s": since - 1,
            },
        )
        out = WindowOutput()
        newest: dict[Series, Check] = {}
        for model, start_ms in sorted(touched, key=lambda row: (row[0], row[1])):
            window = tumbling(int(start_ms), settings.monitor_quality_window_s)
            for check in self._quality(window, model, out):
                newest[check.key.model, check.key.version, check.key.route] = check
        computed = int(now_s)
        self.store.insert(
            "quality", _columns(QUALITY_COLUMNS, [(*r, computed) for r in out.quality])
        )
        self.labels_since_s = server_now
        return self._decide(list(newest.values()), now_s)

    def _quality(self, window: Window, model: str, out: WindowOutput) -> list[Check]:
        params = {**window.params(), "model": model}
        grouped: dict[Series, list[tuple[float, int, int]]] = defaultdict(list)
        for version, route, score, y, n in self.store.query(
            sql.labelled_scores(sql.WINDOW), params
        ):
            grouped[(model, version, route)].append((score, y, n))
        delays = {
            (model, version, route): float(delay)
            for version, route, delay, _ in self.store.query(sql.label_delay(sql.WINDOW), params)
        }
        checks = []
        for key, rows in grouped.items():
            table = np.array(rows, dtype=np.float64)
            scores, labels, weights = table[:, 0], table[:, 1], table[:, 2]
            manifest = self.references.manifest(key[0], key[1])
            threshold = manifest.decision_threshold if manifest else 0.5
            labelled = int(weights.sum())
            values = quality_metrics(labels, scores, threshold, weights)
            for metric, value in values.items():
                if math.isnan(value):
                    continue
                out.quality.append(
                    (window.start_s, window.end_s, *key, metric, value, labelled, delays[key])
                )
                self.metrics.quality.labels(*key, metric).set(value)
            self.metrics.label_delay.labels(*key).set(delays[key])
            minimum = self._min_auc(key[0], manifest)
            if minimum is not None and labelled >= self.settings.monitor_min_labels:
                checks.append(
                    self._check(key, "quality", "auc", values["auc"], minimum, "below", window)
                )
        return checks

    def _min_auc(self, model: str, manifest: Manifest | None) -> float | None:
        """The model's AUC floor: its override, the global setting, or the training AUC in the
        manifest's metrics (`auc` or `roc_auc`) minus `monitor_max_auc_drop`."""
        policy = self.settings.policy(model) or ModelPolicy()
        floor = _pick(policy.min_auc, self.settings.monitor_min_auc)
        if floor is not None or manifest is None:
            return floor
        trained = manifest.metrics.get("auc", manifest.metrics.get("roc_auc"))
        return None if trained is None else trained - self.settings.monitor_max_auc_drop

    # -- freshness ------------------------------------------------------------------------------

    def check_freshness(self, now_s: float) -> list[Alert]:
        """Data age per series seen within the lookback; alerts when it exceeds the limit."""
        settings = self.settings
        since_s = int(now_s) - settings.monitor_freshness_lookback_s
        rows = self.store.query(sql.NEWEST_PREDICTION, {**settings.scope(), "since_s": since_s})
        window = Window(since_s, int(now_s))
        checks = []
        for model, version, route, newest_ms in rows:
            key = (model, version, route)
            age = max(0.0, now_s - newest_ms / 1000)
            self.metrics.data_age.labels(*key).set(age)
            policy = settings.policy(model) or ModelPolicy()
            limit = _pick(policy.max_freshness_s, settings.monitor_max_freshness_s)
            checks.append(self._check(key, "freshness", "data_age_s", age, limit, "above", window))
        return self._decide(checks, now_s)

    # -- alerts ---------------------------------------------------------------------------------

    @staticmethod
    def _check(
        key: Series,
        kind: str,
        metric: str,
        value: float,
        threshold: float,
        direction: Direction,
        window: Window,
    ) -> Check:
        return Check(
            SeriesKey(*key, kind, metric), value, threshold, direction,
            window.start_ms, window.end_ms,
        )  # fmt: skip

    def _decide(self, checks: list[Check], now_s: float) -> list[Alert]:
        """Feed the checks to the alert book, export firing states, publish transitions."""
        decided = []
        for check in checks:
            alert = self.book.observe(check, int(now_s * 1000))
            if alert is not None:
                decided.append(alert)
                self.metrics.alerts.labels(alert.kind, alert.state.value).inc()
            key = check.key
            firing = self.book.states[key].firing
            self.metrics.alert_active.labels(
                key.model, key.version, key.route, key.kind, key.metric, key.feature
            ).set(int(firing))
        self.pending += decided
        self.flush_alerts()
        return decided

    def flush_alerts(self) -> None:
        """Publish pending alerts; on failure they stay pending for the next attempt."""
        if not self.pending:
            return
        try:
            self.publish(self.pending)
        except Exception as exc:  # noqa: BLE001 - the broker may be down; retried next cycle
            log.warning("alerts not published", extra={"alerts": len(self.pending),
                                                        "error": str(exc)})  # fmt: skip
            return
        self.pending = []


def _pick(override: float | None, default: float | None) -> float | None:
    return default if override is None else override


def _bin_of(column: ReferenceBins, key: float) -> int:
    """The bin of a key from sql.drift_bins: a numeric bin index, or a category value (unseen
    categories go to the last bin)."""
    if column.kind == "numeric":
        return int(key)
    matches = np.flatnonzero(column.categories == key)
    return int(matches[0]) if matches.size else column.bins - 1
