"""The monitor's public face: evidence about a model version, read from ClickHouse.

This is the only monitor module other services may import (the rollout controller evaluates
its gates with it). Every answer carries the numbers it rests on, so a caller can require a
minimum sample before trusting a value:

    client = MonitorClient.from_settings(settings)
    errors = client.error_rate("fraud", "2", since_ms=step_start, until_ms=now, route="canary")
    if errors.samples >= 500 and errors.value > 0.01: ...

Time ranges are `[since_ms, until_ms)` of request time (`created_at_ms`), epoch milliseconds.
Traffic, latency, agreement and quality are computed from the raw `predictions`/`labels` rows
with one row per message identity (replays never count twice); feature drift comes from the
analyzer's per-window `drift` rows. A value is None when there were no samples. ClickHouse
failures raise `MonitorUnavailable`. A client holds one connection: use one per thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.settings import SluiceSettings
from services.monitor import sql, stats
from services.monitor.policy import P_VALUE_METHODS, DriftMethod
from services.monitor.store import Store
from services.monitor.store import StoreUnavailable as MonitorUnavailable

__all__ = [
    "Agreement",
    "Evidence",
    "FeatureDrift",
    "MonitorClient",
    "MonitorUnavailable",
    "QualityDelta",
    "ScorecardRow",
]


@dataclass(frozen=True)
class Evidence:
    """A measured value and the samples behind it.

    `samples` counts the rows the value rests on (requests, labelled predictions, request
    pairs); `reference_samples` those of the comparison side where there is one (the champion).
    """

    value: float | None
    samples: int
    reference_samples: int = 0


@dataclass(frozen=True)
class Agreement:
    """Shadow versus live predictions of the same requests.

    `rate.value` is the share of requests on which both sides make the same decision at the
    threshold; `delta_p*` are quantiles of |shadow score − live score| (None without pairs).
    """

    rate: Evidence
    delta_p50: float | None
    delta_p95: float | None
    delta_p99: float | None


@dataclass(frozen=True)
class QualityDelta:
    """A quality metric of the candidate and of the champion over the same time range."""

    metric: str
    candidate: Evidence
    champion: Evidence

    @property
    def delta(self) -> float | None:
        """candidate − champion, None unless both were measured."""
        if self.candidate.value is None or self.champion.value is None:
            return None
        return self.candidate.value - self.champion.value


@dataclass(frozen=True)
class FeatureDrift:
    """The most drifted feature of a version over a time range, by one distance method.

    `value` is the largest per-window value among the `windows` that ended in the range, of
    which `drifted_windows` crossed `threshold`; `samples` sums the windows' sample sizes.
    """

    feature: str
    method: str
    value: float
    threshold: float
    drifted_windows: int
    windows: int
    samples: int


@dataclass(frozen=True)
class ScorecardRow:
    """The health scorecard of one (model, version, route): its newest health window and newest
    quality window. `auc`/`f1` are None until labelled predictions were measured."""

    model: str
    version: str
    route: str
    window_end_ms: int
    requests: int
    error_rate: float
    p95_ms: float
    p99_ms: float
    freshness_s: float
    gpu_utilization: float | None
    auc: float | None
    f1: float | None
    labelled: int


class MonitorClient:
    """Query helpers over the monitor's tables (see the module docstring)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @classmethod
    def from_settings(cls, settings: SluiceSettings, timeout_s: float = 30.0) -> MonitorClient:
        """A client on the ClickHouse named by the shared `clickhouse_*` settings."""
        return cls(Store.from_settings(settings, timeout_s))

    def error_rate(
        self,
        model: str,
        version: str,
        *,
        since_ms: int,
        until_ms: int,
        route: str | None = None,
    ) -> Evidence:
        """Share of error predictions of a version (on one route, or all) in the range."""
        requests, errors, _ = self._traffic(model, version, since_ms, until_ms, route, 0.5)
        return Evidence(errors / requests if requests else None, requests)

    def latency(
        self,
        model: str,
        version: str,
        *,
        since_ms: int,
        until_ms: int,
        quantile: float = 0.99,
        route: str | None = None,
    ) -> Evidence:
        """End-to-end latency quantile in ms (ClickHouse `quantileExact`: the value at rank
        floor(q·n) of the sorted latencies), over every prediction of the version."""
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        requests, _, latency = self._traffic(model, version, since_ms, until_ms, route, quantile)
        return Evidence(float(latency) if requests else None, requests)

    def prediction_drift_vs_champion(
        self, model: str, version: str, *, since_ms: int, until_ms: int
    ) -> Evidence:
        """Jensen-Shannon distance between the candidate's scores (canary and shadow routes) and
        the champion route's.

        Bins: ten equal-width bins over [0, 1] when the champion's scores are probabilities
        (every decile inside [0, 1]), else the champion's score deciles. Deciles of a
        probability score collapse where the champion ties (a tree model on rare positives puts
        most rows on one leaf) and split the region near 0 so finely that two models that agree
        on every decision still look far apart; equal-width bins compare what the scores mean.
        """
        params = {**_range(since_ms, until_ms), "model": model, "version": version}
        deciles, champion_rows = self.store.query(sql.CHAMPION_DECILES, params)[0]
        if champion_rows == 0:
            return Evidence(None, 0)
        if all(0.0 <= float(edge) <= 1.0 for edge in deciles):
            edges = [round(0.1 * i, 1) for i in range(1, 10)]
        else:
            edges = sorted(set(float(edge) for edge in deciles))
        counts = np.zeros((2, len(edges) + 1))
        rows = self.store.query(
            sql.scores_versus_champion(len(edges)), {**params, **sql.edge_params(edges)}
        )
        for champion, bin_index, n in rows:
            counts[int(champion), int(bin_index)] += n
        candidate_rows, champion_rows = int(counts[0].sum()), int(counts[1].sum())
        if candidate_rows == 0:
            return Evidence(None, 0, champion_rows)
        return Evidence(stats.jensen_shannon(counts[1], counts[0]), candidate_rows, champion_rows)

    def shadow_agreement(
        self,
        model: str,
        version: str,
        *,
        since_ms: int,
        until_ms: int,
        threshold: float = 0.5,
    ) -> Agreement:
        """How a shadow version agrees with the live prediction of the same requests, both
        sides deciding `score >= threshold`."""
        params = {
            **_range(since_ms, until_ms),
            "model": model,
            "version": version,
            "threshold": threshold,
        }
        pairs, agreeing, deltas = self.store.query(sql.RANGE_AGREEMENT, params)[0]
        if pairs == 0:
            return Agreement(Evidence(None, 0), None, None, None)
        p50, p95, p99 = (float(delta) for delta in deltas)
        return Agreement(Evidence(agreeing / pairs, pairs), p50, p95, p99)

    def quality_delta(
        self,
        model: str,
        version: str,
        champion_version: str,
        *,
        since_ms: int,
        until_ms: int,
        metric: str = "auc",
        threshold: float = 0.5,
    ) -> QualityDelta:
        """A quality metric (auc, log_loss, accuracy, precision, recall, f1) of the candidate
        and of the champion version on their labelled predictions in the range."""
        return QualityDelta(
            metric,
            self.quality(model, version, since_ms=since_ms, until_ms=until_ms, metric=metric,
                         threshold=threshold),
            self.quality(model, champion_version, since_ms=since_ms, until_ms=until_ms,
                         metric=metric, threshold=threshold),
        )  # fmt: skip

    def quality(
        self,
        model: str,
        version: str,
        *,
        since_ms: int,
        until_ms: int,
        metric: str = "auc",
        threshold: float = 0.5,
        route: str | None = None,
    ) -> Evidence:
        """One quality metric of a version on its labelled predictions in the range."""
        params = {
            **_range(since_ms, until_ms),
            **_route(route),
            "model": model,
            "version": version,
        }
        rows = self.store.query(sql.labelled_scores(sql.VERSION_RANGE), params)
        if not rows:
            return Evidence(None, 0)
        table = np.array([row[2:] for row in rows], dtype=np.float64)
        values = stats.quality_metrics(table[:, 1], table[:, 0], threshold, table[:, 2])
        if metric not in values:
            raise ValueError(f"unknown metric {metric!r}; one of {sorted(values)}")
        value = values[metric]
        return Evidence(None if np.isnan(value) else value, int(table[:, 2].sum()))

    def max_feature_drift(
        self,
        model: str,
        version: str,
        *,
        since_ms: int,
        until_ms: int,
        method: str = DriftMethod.psi,
        route: str | None = None,
    ) -> FeatureDrift | None:
        """The feature with the largest drift `method` value (a distance: psi, jensenshannon,
        wasserstein) over the analyzer windows that ended in the range; None if there were none.
        PSI is computed for every feature in every window, so it compares across features."""
        if DriftMethod(method) in P_VALUE_METHODS:
            raise ValueError(f"{method} is a p-value test; ask for a distance method")
        params = {
            **_range(since_ms, until_ms),
            **_route(route),
            "model": model,
            "version": version,
            "method": str(method),
        }
        rows = self.store.query(sql.FEATURE_DRIFT, params)
        if not rows:
            return None
        feature, value, threshold, drifted, windows, samples = rows[0]
        return FeatureDrift(
            feature, str(method), float(value), float(threshold), int(drifted), int(windows),
            int(samples),
        )  # fmt: skip

    def scorecard(
        self, model: str | None = None, *, now_ms: int, lookback_s: int = 3600
    ) -> list[ScorecardRow]:
        """Per (model, version, route) with a health window ending in the last `lookback_s`:
        its newest health figures and its newest quality (from the last 30 days)."""
        now_s = now_ms // 1000
        params = {
            "since_s": now_s - lookback_s,
            "quality_since_s": now_s - 30 * 86400,
            "any_model": int(model is None),
            "model": model or "",
        }
        return [
            ScorecardRow(
                model=row[0],
                version=row[1],
                route=row[2],
                window_end_ms=int(row[3]) * 1000,
                requests=int(row[4]),
                error_rate=float(row[5]),
                p95_ms=float(row[6]),
                p99_ms=float(row[7]),
                freshness_s=float(row[8]),
                gpu_utilization=None if row[9] is None else float(row[9]),
                auc=float(row[10]) if row[12] else None,
                f1=float(row[11]) if row[12] else None,
                labelled=int(row[12]),
            )  # fmt: skip
            for row in self.store.query(sql.SCORECARD, params)
        ]

    def _traffic(
        self,
        model: str,
        version: str,
        since_ms: int,
        until_ms: int,
        route: str | None,
        quantile: float,
    ) -> tuple[int, int, float]:
        params = {
            **_range(since_ms, until_ms),
            **_route(route),
            "model": model,
            "version": version,
            "quantile": quantile,
        }
        requests, errors, latency = self.store.query(sql.RANGE_TRAFFIC, params)[0]
        return int(requests), int(errors), float(latency)


def _range(since_ms: int, until_ms: int) -> dict[str, int]:
    if until_ms <= since_ms:
        raise ValueError(f"empty range [{since_ms}, {until_ms})")
    return {
        "since_ms": since_ms,
        "until_ms": until_ms,
        "since_s": since_ms // 1000,
        "until_s": until_ms // 1000,
    }


def _route(route: str | None) -> dict[str, object]:
    return {"any_route": int(route is None), "route": route or ""}
