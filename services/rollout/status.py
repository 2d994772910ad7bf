"""The status page's data: what one model's traffic, latency, drift and rollouts looked like over
a recent time range, read from ClickHouse. Plain functions returning plain dataclasses; the API
serialises them as JSON and `static/status.js` draws them.

- traffic: `predictions FINAL`, requests per (time bucket, version, route) and each series'
  share of live traffic;
- latency: `health FINAL`, the monitor's windows, p50/p99 per (window end, version, route);
- drift: `drift FINAL`, PSI per (version, route, feature, window), flagged where the feature's
  chosen test crossed its threshold (what raises the monitor's drift alert);

latency and drift fold the monitor's windows into at most `MAX_COLUMNS` columns per range
(the worst window of each), so a long range stays a small answer;
- timeline: `rollout_decisions` (decisions with their evidence) and `retrains` (alert-triggered
  retrain runs, step by step).

Time is epoch seconds, ranges are `[since_s, until_s)`. `predictions`, `health` and `drift` are
ReplacingMergeTrees written at least once, so they are read with `FINAL` (docs/storage.md);
`rollout_decisions` and `retrains` are append-only logs, read as they are. Every statement runs
on ClickHouse 18.16 (no window functions, no `toStartOfInterval`: buckets are
`intDiv(toUInt32(t), bucket) * bucket`) and takes its values as driver parameters, never inlined.
A table that does not exist yet (a monitor that never ran, a release before `retrains`) reads as
empty. ClickHouse failures raise `store.StoreUnavailable`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from services.rollout.store import ClickHouse, EvidenceItem

BUCKETS_S = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
"""Bucket lengths the traffic chart picks from."""
MAX_BUCKETS = 60
"""The traffic chart cuts a range into at most this many buckets (one a minute over an hour)."""
MAX_COLUMNS = 120
"""Latency and drift fold the monitor's windows into at most this many columns per range."""
MAX_DECISIONS = 500
"""Newest decisions of a range that the timeline shows."""
MAX_RETRAIN_ROWS = 2000
"""Newest retrain steps of a range that the timeline shows."""
SOURCES = ("predictions", "health", "drift", "rollout_decisions", "retrains")
"""The tables the page reads."""


def bucket_for(since_s: int, until_s: int, most: int = MAX_BUCKETS) -> int:
    """The shortest length of `BUCKETS_S` that cuts `[since_s, until_s)` into at most `most`
    buckets (the longest one for longer ranges)."""
    span = max(1, until_s - since_s)
    return next((b for b in BUCKETS_S if span / b <= most), BUCKETS_S[-1])


def _finite(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those read as missing."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _tables(ch: ClickHouse) -> set[str]:
    rows = ch.execute("SELECT name FROM system.tables WHERE database = %(db)s", {"db": ch.db})
    return {name for (name,) in rows}


# -- traffic --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrafficSeries:
    """Requests of one (version, route) per bucket.

    `share` is the series' part of the bucket's live requests (every route but shadow), so the
    live series' shares add up to 1 in every bucket with traffic; for the shadow route it is
    shadow copies per live request (the sampling rate in force). None where the bucket had no
    live requests.
    """

    version: str
    route: str
    requests: list[int]
    errors: list[int]
    share: list[float | None]


@dataclass(frozen=True)
class Traffic:
    """Traffic split over time: bucket starts (`times`), live requests per bucket, series."""

    bucket_s: int
    times: list[int]
    live: list[int]
    series: list[TrafficSeries]


TRAFFIC = """
SELECT intDiv(toUInt32(created_at), %(bucket_s)s) * %(bucket_s)s AS bucket, version, route,
       count() AS requests, countIf(error_code != '') AS errors
FROM {db}.predictions FINAL
WHERE model = %(model)s
  AND created_at >= toDateTime(%(since_s)s) AND created_at < toDateTime(%(until_s)s)
GROUP BY bucket, version, route
ORDER BY bucket, version, route
"""


def _route_order(route: str) -> int:
    return {"champion": 0, "canary": 1, "pinned": 2, "shadow": 3}.get(route, 4)


def traffic(ch: ClickHouse, model: str, since_s: int, until_s: int, bucket_s: int) -> Traffic:
    """Requests per bucket of `bucket_s` seconds (epoch-aligned; the first bucket starts at or
    before `since_s`), per version and route, with each series' share of live traffic."""
    first = since_s // bucket_s * bucket_s
    times = list(range(first, until_s, bucket_s))
    rows = ch.execute(
        TRAFFIC,
        {"model": model, "since_s": first, "until_s": until_s, "bucket_s": bucket_s},
    )
    return traffic_from_rows(rows, times, bucket_s)


def traffic_from_rows(
    rows: list[tuple[int, str, str, int, int]], times: list[int], bucket_s: int
) -> Traffic:
    """`Traffic` from (bucket, version, route, requests, errors) rows. Pure."""
    index = {t: i for i, t in enumerate(times)}
    counts: dict[tuple[str, str], list[int]] = {}
    errors: dict[tuple[str, str], list[int]] = {}
    live = [0] * len(times)
    for bucket, version, route, requests, failed in rows:
        i = index.get(int(bucket))
        if i is None:
            continue
        key = (version, route)
        counts.setdefault(key, [0] * len(times))[i] += int(requests)
        errors.setdefault(key, [0] * len(times))[i] += int(failed)
        if route != "shadow":
            live[i] += int(requests)
    series = [
        TrafficSeries(
            version=version,
            route=route,
            requests=counts[(version, route)],
            errors=errors[(version, route)],
            share=[
                n / total if total else None
                for n, total in zip(counts[(version, route)], live, strict=True)
            ],
        )  # fmt: skip
        for version, route in sorted(counts, key=lambda k: (_route_order(k[1]), k[0]))
    ]
    return Traffic(bucket_s=bucket_s, times=times, live=live, series=series)


# -- latency --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencySeries:
    """One (version, route), aligned on `Latency.times`: per column, the worst of the monitor's
    health windows that ended in it (the largest p50, p99, error rate and request count; with
    columns no longer than the analysis interval, one window each)."""

    version: str
    route: str
    requests: list[int | None]
    p50_ms: list[float | None]
    p99_ms: list[float | None]
    error_rate: list[float | None]


@dataclass(frozen=True)
class Latency:
    """End-to-end latency by version: column times (window ends, or the start of a column of
    `column_s` seconds holding several) and one series per version/route."""

    column_s: int
    times: list[int]
    series: list[LatencySeries]


LATENCY = """
SELECT intDiv(toUInt32(window_end), %(column_s)s) * %(column_s)s AS t, version, route,
       max(requests) AS requests, max(p50_ms) AS p50, max(p99_ms) AS p99,
       max(error_rate) AS worst_error_rate
FROM {db}.health FINAL
WHERE model = %(model)s
  AND window_end > toDateTime(%(since_s)s) AND window_end <= toDateTime(%(until_s)s)
GROUP BY t, version, route
ORDER BY t, version, route
"""


def latency(ch: ClickHouse, model: str, since_s: int, until_s: int, column_s: int) -> Latency:
    """p50/p99 latency per version and route, from the health windows that ended in the range,
    in columns of `column_s` seconds."""
    rows = ch.execute(
        LATENCY, {"model": model, "since_s": since_s, "until_s": until_s, "column_s": column_s}
    )
    times = sorted({int(row[0]) for row in rows})
    index = {t: i for i, t in enumerate(times)}
    columns: dict[tuple[str, str], tuple[list, list, list, list]] = {}
    for t, version, route, requests, p50, p99, error_rate in rows:
        series = columns.setdefault((version, route), tuple([None] * len(times) for _ in range(4)))
        i = index[int(t)]
        series[0][i] = int(requests)
        series[1][i] = _finite(p50)
        series[2][i] = _finite(p99)
        series[3][i] = _finite(error_rate)
    return Latency(
        column_s=column_s,
        times=times,
        series=[
            LatencySeries(version, route, *columns[(version, route)])
            for version, route in sorted(columns, key=lambda k: (k[0], _route_order(k[1])))
        ],
    )


# -- drift ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftCell:
    """One feature in one column: the analysis windows that started in it (one each while
    columns are no longer than the analysis interval).

    `value` is the largest PSI of those windows (comparable across features; the chosen test's
    value where PSI is missing) and `threshold` PSI's threshold. `alert` says whether the
    feature's chosen test (`method`: KS, chi², Wasserstein or Jensen-Shannon, or PSI itself)
    crossed its threshold in any of them — what raises the monitor's drift alert — in `alerts`
    of `windows` windows; `checked` is that test's worst number (the smallest p-value or the
    largest distance), `samples` the largest window's sample size.
    """

    value: float | None
    threshold: float | None
    alert: bool
    alerts: int
    windows: int
    method: str
    checked: float | None
    samples: int


@dataclass(frozen=True)
class DriftRow:
    """A feature (kind `feature`) or the model's score (kind `prediction`, feature `score`)."""

    feature: str
    kind: str
    cells: list[DriftCell | None]


@dataclass(frozen=True)
class DriftMap:
    """The heatmap of one (version, route): rows are features, cells `Drift.columns`."""

    version: str
    route: str
    rows: list[DriftRow]


@dataclass(frozen=True)
class Drift:
    """Drift by feature and window: column starts (`columns`, `column_s` apart at least), the
    analysis windows' length, one heatmap per version and route."""

    columns: list[int]
    column_s: int
    window_s: int
    maps: list[DriftMap]


DRIFT = """
SELECT version, route, kind, feature, intDiv(w_start, %(column_s)s) * %(column_s)s AS col,
       max(w_end - w_start) AS window_s, count() AS windows, max(has_psi) AS psi_rows,
       max(shown) AS worst, any(psi_threshold) AS threshold_psi, sum(alert) AS alerts,
       any(test) AS chosen, max(is_p) AS p_test, min(checked) AS checked_min,
       max(checked) AS checked_max, max(samples) AS largest
FROM (
    SELECT version, route, kind, feature, toUInt32(window_start) AS w_start,
           toUInt32(window_end) AS w_end,
           countIf(method = 'psi') > 0 AS has_psi,
           countIf(method != 'psi') > 0 AS has_test,
           anyIf(value, method = 'psi') AS psi,
           anyIf(threshold, method = 'psi') AS psi_threshold,
           if(has_psi, psi, anyIf(value, method != 'psi')) AS shown,
           if(has_test, anyIf(method, method != 'psi'), 'psi') AS test,
           countIf(method != 'psi' AND isNotNull(p_value)) > 0 AS is_p,
           if(has_test, anyIf(ifNull(p_value, value), method != 'psi'), psi) AS checked,
           if(has_test, maxIf(drifted, method != 'psi'), maxIf(drifted, method = 'psi')) AS alert,
           max(sample_size) AS samples
    FROM {db}.drift FINAL
    WHERE model = %(model)s AND kind IN ('feature', 'prediction')
      AND window_end > toDateTime(%(since_s)s) AND window_end <= toDateTime(%(until_s)s)
    GROUP BY version, route, kind, feature, w_start, w_end
)
GROUP BY version, route, kind, feature, col
ORDER BY version, route, kind, feature, col
"""


def drift(ch: ClickHouse, model: str, since_s: int, until_s: int, column_s: int) -> Drift:
    """Feature and prediction drift per version/route, feature and column of `column_s` seconds,
    from the analysis windows that ended in the range."""
    rows = ch.execute(
        DRIFT, {"model": model, "since_s": since_s, "until_s": until_s, "column_s": column_s}
    )
    columns = sorted({int(row[4]) for row in rows})
    index = {t: i for i, t in enumerate(columns)}
    maps: dict[tuple[str, str], dict[tuple[str, str], list[DriftCell | None]]] = defaultdict(dict)
    for row in rows:
        (version, route, kind, feature, column, _window_s, windows, psi_rows, worst,
         threshold, alerts, chosen, p_test, checked_min, checked_max, largest) = row  # fmt: skip
        name = feature if kind == "feature" else "score"
        cells = maps[(version, route)].setdefault((kind, name), [None] * len(columns))
        cells[index[int(column)]] = DriftCell(
            value=_finite(worst),
            threshold=_finite(threshold) if psi_rows else None,
            alert=int(alerts) > 0,
            alerts=int(alerts),
            windows=int(windows),
            method=chosen,
            checked=_finite(checked_min if p_test else checked_max),
            samples=int(largest),
        )
    return Drift(
        columns=columns,
        column_s=column_s,
        window_s=max((int(row[5]) for row in rows), default=0),
        maps=[
            DriftMap(
                version=version,
                route=route,
                rows=[
                    DriftRow(feature=name, kind=kind, cells=cells)
                    # the score first, then features by name
                    for (kind, name), cells in sorted(
                        maps[(version, route)].items(),
                        key=lambda item: (item[0][0] != "prediction", item[0][1]),
                    )
                ],
            )
            for version, route in sorted(maps, key=lambda k: (k[0], _route_order(k[1])))
        ],
    )


# -- timeline -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineDecision:
    """One recorded rollout decision with the evidence it was taken on."""

    rollout_id: str
    candidate: str
    seq: int
    at_ms: int
    action: str
    state_before: str
    state_after: str
    step_index: int
    reason: str
    actor: str
    weights: dict[str, float]
    revision: int
    evidence: list[EvidenceItem]


@dataclass(frozen=True)
class RetrainStep:
    """One row of `retrains`: a step of a run (`triggered`, `trained`, `registered`, ...)."""

    seq: int
    step: str
    status: str
    version: str
    rollout_id: str
    detail: str
    at_ms: int


@dataclass(frozen=True)
class RetrainRun:
    """An alert-triggered retrain run: the alert that started it and its steps, oldest first.

    `version` and `rollout_id` are the newest non-empty ones of its steps (the version it
    registered, the rollout it started); `status` is its newest step's.
    """

    run_id: str
    alert_id: str
    alert_kind: str
    alert_metric: str
    feature: str
    started_ms: int
    updated_ms: int
    status: str
    version: str
    rollout_id: str
    steps: list[RetrainStep]


@dataclass(frozen=True)
class Timeline:
    """Decisions (newest first, at most `MAX_DECISIONS`) and retrain runs (newest first)."""

    decisions: list[TimelineDecision]
    decisions_truncated: bool
    retrains: list[RetrainRun]


DECISIONS = """
SELECT rollout_id, candidate, seq, decided_at_ms, action, state_before, state_after,
       step_index, reason, actor, evidence_names, evidence_values, thresholds,
       evidence_samples, gate_status, weight_versions, weights, revision
FROM {db}.rollout_decisions
WHERE model = %(model)s
  AND decided_at >= toDateTime(%(since_s)s) AND decided_at < toDateTime(%(until_s)s)
ORDER BY decided_at_ms DESC, seq DESC
LIMIT %(limit)s
"""

RETRAINS = """
SELECT run_id, seq, step, status, alert_id, alert_kind, alert_metric, feature, version,
       rollout_id, detail, at_ms
FROM {db}.retrains
WHERE model = %(model)s AND run_id IN (
    SELECT run_id FROM {db}.retrains
    WHERE model = %(model)s
      AND at >= toDateTime(%(since_s)s) AND at < toDateTime(%(until_s)s)
)
ORDER BY at_ms DESC, seq DESC
LIMIT %(limit)s
"""


def decisions(
    ch: ClickHouse, model: str, since_s: int, until_s: int, limit: int = MAX_DECISIONS
) -> list[TimelineDecision]:
    """Decisions of `model` taken in the range, newest first (every rollout's)."""
    rows = ch.execute(
        DECISIONS, {"model": model, "since_s": since_s, "until_s": until_s, "limit": limit}
    )
    found = []
    for row in rows:
        (rollout_id, candidate, seq, at_ms, action, before, after, step_index, reason,
         actor, names, values, thresholds, samples, statuses, versions, weights,
         revision) = row  # fmt: skip
        evidence = [
            EvidenceItem(name, _finite(value), _finite(threshold), int(n), status)
            for name, value, threshold, n, status in zip(
                names, values, thresholds, samples, statuses, strict=False
            )
        ]
        found.append(
            TimelineDecision(
                rollout_id=rollout_id,
                candidate=candidate,
                seq=int(seq),
                at_ms=int(at_ms),
                action=action,
                state_before=before,
                state_after=after,
                step_index=int(step_index),
                reason=reason,
                actor=actor,
                weights={v: float(w) for v, w in zip(versions, weights, strict=False)},
                revision=int(revision),
                evidence=evidence,
            )
        )
    return found


def retrain_runs(
    ch: ClickHouse, model: str, since_s: int, until_s: int, limit: int = MAX_RETRAIN_ROWS
) -> list[RetrainRun]:
    """Retrain runs of `model` with a step in the range (all their steps), newest first."""
    rows = ch.execute(
        RETRAINS, {"model": model, "since_s": since_s, "until_s": until_s, "limit": limit}
    )
    return retrain_runs_from_rows(rows)


def retrain_runs_from_rows(rows: list[tuple]) -> list[RetrainRun]:
    """Group `retrains` rows (run_id, seq, step, status, alert_id, alert_kind, alert_metric,
    feature, version, rollout_id, detail, at_ms) into runs. Pure."""
    by_run: dict[str, list[tuple]] = defaultdict(list)
    for row in rows:
        by_run[row[0]].append(row)
    runs = []
    for run_id, run_rows in by_run.items():
        run_rows.sort(key=lambda r: (int(r[11]), int(r[1])))
        steps = [
            RetrainStep(int(seq), step, status, version, rollout_id, detail, int(at_ms))
            for (_, seq, step, status, _, _, _, _, version, rollout_id, detail, at_ms) in run_rows
        ]

        def newest(position: int, rows: list[tuple] = run_rows) -> str:
            return next((r[position] for r in reversed(rows) if r[position]), "")

        runs.append(
            RetrainRun(
                run_id=run_id,
                alert_id=newest(4),
                alert_kind=newest(5),
                alert_metric=newest(6),
                feature=newest(7),
                started_ms=steps[0].at_ms,
                updated_ms=steps[-1].at_ms,
                status=steps[-1].status,
                version=newest(8),
                rollout_id=newest(9),
                steps=steps,
            )
        )
    runs.sort(key=lambda run: run.updated_ms, reverse=True)
    return runs


# -- the page's two reads -------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStatus:
    """Everything the status page shows for one model over `[since_s, until_s)`."""

    model: str
    since_s: int
    until_s: int
    traffic: Traffic
    latency: Latency
    drift: Drift
    timeline: Timeline
    missing_tables: list[str] = field(default_factory=list)


def model_status(
    ch: ClickHouse, model: str, until_s: int, minutes: int, bucket_s: int | None = None
) -> ModelStatus:
    """The status of `model` over the `minutes` before `until_s`: traffic in buckets of
    `bucket_s` (default `bucket_for` the range), latency and drift in columns of at most
    `MAX_COLUMNS` per range. Sections whose table does not exist are empty (and named in
    `missing_tables`)."""
    since_s = until_s - minutes * 60
    bucket = bucket_s or bucket_for(since_s, until_s)
    column = bucket_for(since_s, until_s, MAX_COLUMNS)
    present = _tables(ch)
    missing = [name for name in SOURCES if name not in present]
    if "predictions" in present:
        split = traffic(ch, model, since_s, until_s, bucket)
    else:
        split = traffic_from_rows([], list(range(since_s // bucket * bucket, until_s, bucket)),
                                  bucket)  # fmt: skip
    taken = decisions(ch, model, since_s, until_s) if "rollout_decisions" in present else []
    return ModelStatus(
        model=model,
        since_s=since_s,
        until_s=until_s,
        traffic=split,
        latency=latency(ch, model, since_s, until_s, column)
        if "health" in present
        else Latency(column, [], []),
        drift=drift(ch, model, since_s, until_s, column)
        if "drift" in present
        else Drift([], column, 0, []),
        timeline=Timeline(
            decisions=taken,
            decisions_truncated=len(taken) >= MAX_DECISIONS,
            retrains=retrain_runs(ch, model, since_s, until_s) if "retrains" in present else [],
        ),
        missing_tables=missing,
    )


MODELS = """
SELECT model FROM {db}.predictions WHERE created_at >= toDateTime(%(since_s)s) GROUP BY model
"""


def models(ch: ClickHouse, since_s: int) -> list[str]:
    """Models with predictions since `since_s` or any recorded rollout, sorted."""
    present = _tables(ch)
    found: set[str] = set()
    if "predictions" in present:
        found |= {model for (model,) in ch.execute(MODELS, {"since_s": since_s})}
    if "rollout_decisions" in present:
        rows = ch.execute("SELECT DISTINCT model FROM {db}.rollout_decisions")
        found |= {model for (model,) in rows}
    return sorted(found)
