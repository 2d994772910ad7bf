"""Turns the monitor's answers into the state machine's `Evidence`: the one module of the rollout
controller that knows the monitor's client (`services/monitor/client.py`).

Everything is measured over the current step, `[step_started_ms, now)` of request time, for the
candidate on the step's route (shadow or canary): error rate and request count, p99 latency (and
its ratio to the champion route's p99 over the same step), prediction drift (Jensen-Shannon
distance of the candidate's scores against the champion route's), shadow agreement (shadow steps
only), quality versus the champion on labelled predictions, and the most drifted feature over the
monitor's analysis windows that ended in the step. Gates the plan leaves out are not queried.
Firing alerts come from the control follower.

A/B outcomes need each labelled request's score and label value, which the monitor client does
not return yet; until it does (see `MonitorClient.labelled_outcomes` in the report of this
change), `ab_outcomes` reads them from the documented `predictions` and `labels` tables itself,
with the monitor's dedup rules (one row per request identity, newest label wins).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from schemas.messages import Route
from services.monitor.client import Evidence as Measured
from services.monitor.client import MonitorClient, MonitorUnavailable
from services.rollout import abtest
from services.rollout.machine import Evidence, FiringAlert, Measurement, RolloutState, quality_drop
from services.rollout.plan import AbStep, RolloutPlan
from services.rollout.store import ClickHouse, StoreUnavailable
from services.rollout.traffic import step_route

Firing = Callable[[str, str, int], tuple[FiringAlert, ...]]
"""(model, version, since_ms) -> alerts firing for that version."""


class EvidenceUnavailable(Exception):
    """The monitor's store could not answer; evaluate again later."""


LABELLED_OUTCOMES = """
SELECT score, label
FROM (
    SELECT request_id, argMax(assumeNotNull(score), scored_at_ms) AS score
    FROM {db}.predictions
    WHERE model = %(model)s AND version = %(version)s AND route = %(route)s
      AND created_at >= toDateTime(%(since_s)s) AND created_at <= toDateTime(%(until_s)s)
      AND created_at_ms >= %(since_ms)s AND created_at_ms < %(until_ms)s AND error_code = ''
    GROUP BY request_id
)
ALL INNER JOIN (
    SELECT request_id, argMax(value, ts_ms) AS label
    FROM {db}.labels
    WHERE model IN (%(model)s, '') AND request_id IN (
        SELECT request_id FROM {db}.predictions
        WHERE model = %(model)s AND version = %(version)s AND route = %(route)s
          AND created_at >= toDateTime(%(since_s)s) AND created_at <= toDateTime(%(until_s)s)
    )
    GROUP BY request_id
) USING request_id
"""
"""Score and newest label value of each labelled, error-free prediction of one version on one
route in `[since_ms, until_ms)`."""


def latency_ratio(candidate: Measured, champion: Measured) -> Measurement:
    """The candidate's latency over the champion's; the samples are the smaller side's, and
    there is no value while either side has none (or the champion's is 0)."""
    samples = min(candidate.samples, champion.samples)
    if candidate.value is None or not champion.value:
        return Measurement(None, samples)
    return Measurement(candidate.value / champion.value, samples)


class MonitorEvidence:
    """Gathers `Evidence` for a rollout from the monitor's client and the alert follower."""

    def __init__(self, client: MonitorClient, clickhouse: ClickHouse, firing: Firing) -> None:
        self.client = client
        self.ch = clickhouse
        self.firing = firing

    def gather(self, plan: RolloutPlan, state: RolloutState, now_ms: int) -> Evidence:
        """Evidence over the current step; raises `EvidenceUnavailable` if ClickHouse fails."""
        try:
            return self._gather(plan, state, now_ms)
        except (MonitorUnavailable, StoreUnavailable) as exc:
            raise EvidenceUnavailable(str(exc)) from exc

    def _gather(self, plan: RolloutPlan, state: RolloutState, now_ms: int) -> Evidence:
        gates = plan.gates
        model, candidate = state.model, state.candidate
        since, until = state.step_started_ms, max(now_ms, state.step_started_ms + 1)
        window = {"since_ms": since, "until_ms": until}
        route = step_route(plan, state)
        errors = self.client.error_rate(model, candidate, route=route, **window)
        fields: dict[str, object] = {
            "requests": errors.samples,
            "error_rate": Measurement(errors.value, errors.samples),
            "alerts": self.firing(model, candidate, state.started_ms),
        }
        if gates.max_p99_latency_ms is not None or gates.max_p99_latency_ratio is not None:
            latency = self.client.latency(model, candidate, quantile=0.99, route=route, **window)
            fields["p99_latency_ms"] = Measurement(latency.value, latency.samples)
            if gates.max_p99_latency_ratio is not None:
                champion = self.client.latency(
                    model, state.champion, quantile=0.99, route=Route.champion, **window
                )
                fields["p99_latency_ratio"] = latency_ratio(latency, champion)
        if gates.max_prediction_drift is not None:
            drift = self.client.prediction_drift_vs_champion(model, candidate, **window)
            fields["prediction_drift"] = Measurement(
                drift.value, min(drift.samples, drift.reference_samples)
            )
        if gates.min_shadow_agreement is not None and route is Route.shadow:
            agreement = self.client.shadow_agreement(
                model, candidate, threshold=gates.decision_threshold, **window
            )
            fields["shadow_agreement"] = Measurement(agreement.rate.value, agreement.rate.samples)
        if gates.max_quality_drop is not None:
            quality = self.client.quality_delta(
                model, candidate, state.champion, metric=gates.quality_metric,
                threshold=gates.decision_threshold, **window,
            )  # fmt: skip
            samples = min(quality.candidate.samples, quality.champion.samples)
            value = None
            if quality.candidate.value is not None and quality.champion.value is not None:
                value = quality_drop(
                    gates.quality_metric, quality.candidate.value, quality.champion.value
                )
            fields["quality_drop"] = Measurement(value, samples)
        if gates.max_feature_drift is not None:
            worst = self.client.max_feature_drift(
                model, candidate, method=gates.feature_drift_method, route=route, **window
            )
            if worst is not None:
                fields["feature_drift"] = Measurement(
                    worst.value, worst.samples, subject=worst.feature
                )
        step = plan.steps[state.step_index] if state.step_index >= 0 else None
        if isinstance(step, AbStep):
            fields["ab_champion"] = self.ab_outcomes(
                plan, model, state.champion, Route.champion, since, until
            )
            fields["ab_candidate"] = self.ab_outcomes(
                plan, model, candidate, Route.canary, since, until
            )
        return Evidence(since_ms=since, until_ms=until, **fields)

    def ab_outcomes(
        self, plan: RolloutPlan, model: str, version: str, route: Route, since: int, until: int
    ) -> np.ndarray:
        """One A/B outcome per labelled prediction of `version` on `route` in the range."""
        rows = self.ch.execute(
            LABELLED_OUTCOMES,
            {
                "model": model,
                "version": version,
                "route": route.value,
                "since_ms": since,
                "until_ms": until,
                "since_s": since // 1000,
                "until_s": until // 1000,
            },
        )
        if not rows:
            return np.empty(0)
        table = np.array(rows, dtype=np.float64)
        return abtest.outcome_values(
            plan.ab.outcome, table[:, 0], table[:, 1], plan.gates.decision_threshold
        )
