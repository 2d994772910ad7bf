"""Every SQL statement the monitor runs, in one place, written for ClickHouse 18.16 and current
ClickHouse alike.

Rules that keep them portable (INFRA-FACTS has the 18.16 gaps):
- Parameters are clickhouse-driver's client-side `%(name)s`, never server-side `{x:Type}`;
  `{db}` is the database, filled in by `Store.query`.
- Joins always name their strictness (`ALL INNER`, `ALL LEFT`) and join subqueries that are
  already unique per key, because `ANY` joins and a bare `JOIN` mean different things in 18.16
  and in current versions. Joined subqueries carry an alias (current versions require one) and
  their columns distinct names, so no table qualifier is needed.
- No window functions, CTEs, `toStartOfInterval`, Map or JSON functions.
- A lambda never captures a column (18.16 loses captured columns in grouped queries): columns
  go in as lambda arguments, or edges are compared one by one (`bin_of`).
- Windows are whole seconds `[start_s, end_s)` on the DateTime columns, which are the `_ms`
  fields floored to the second, so `created_at` alone selects a window exactly.

Dedup: health, agreement and quality read one row per message identity (`FINAL`, or
`argMax(..., scored_at_ms)` per request id), so a replayed batch is never counted twice. Drift
binning reads without `FINAL`: duplicates not merged yet may add to `sample_size`, but not to a
distribution's shape, and skipping `FINAL` halves the cost of the biggest query.
"""

from __future__ import annotations

WINDOW = "created_at >= toDateTime(%(start_s)s) AND created_at < toDateTime(%(end_s)s)"
"""Rows of `predictions` created in the window."""

SCOPE = "(%(all_models)s OR model IN %(models)s)"
"""The models one analyzer handles: `all_models` 1 for every model, else the tuple `models`."""

MISSING_KEY = "inf"
"""Bin key of a missing (NaN/±inf) value in `drift_bins`; bins and categories are finite."""

HEALTH = f"""
SELECT model, version, route, count() AS requests, countIf(error_code != '') AS errors,
       quantilesExact(0.5, 0.95, 0.99)(total_ms) AS latency_ms, max(created_at_ms) AS newest_ms
FROM {{db}}.predictions FINAL
WHERE {WINDOW} AND {SCOPE}
GROUP BY model, version, route
"""
"""Traffic, errors, latency quantiles (ClickHouse quantileExact: the value at rank
floor(q·n) of the sorted window) and the newest request time, per series."""

ERROR_CODES = f"""
SELECT model, version, route, error_code, count() AS errors
FROM {{db}}.predictions FINAL
WHERE {WINDOW} AND {SCOPE} AND error_code != ''
GROUP BY model, version, route, error_code
"""


def drift_bins(edge_arrays: int) -> str:
    """Per route, the count of each bin key at each position of `[score, *features]`.

    One pass over the version's rows in the window: the served vector is prefixed with the
    score, and every value becomes a key — for a numeric position the number of its interior
    edges at or below it (`searchsorted(..., side="right")`, `bin_index`'s rule), for a
    categorical position the value itself, `inf` when missing. Parameters: `model`, `version`,
    `names` (the manifest's feature order; rows in another order are not binned), `categorical`
    (1 per categorical position), `e0`..`e{edge_arrays-1}` (edge `j` of every position, padded
    with +inf), `start_s`, `end_s`.
    """
    args = ", ".join(f"e{j}" for j in range(edge_arrays))
    arrays = ", ".join(f"%(e{j})s" for j in range(edge_arrays))
    bins = " + ".join(f"(v >= e{j})" for j in range(edge_arrays))
    return f"""
SELECT route, position, key, count() AS n
FROM (
    SELECT route,
           arrayMap((v, categorical, {args}) ->
                        if(isFinite(v), if(categorical, v, toFloat64({bins})), {MISSING_KEY}),
                    arrayPushFront(feature_values, ifNull(score, nan)), %(categorical)s,
                    {arrays}) AS keys
    FROM {{db}}.predictions
    WHERE model = %(model)s AND version = %(version)s AND {WINDOW} AND error_code = ''
      AND feature_names = %(names)s
)
ARRAY JOIN keys AS key, arrayEnumerate(keys) AS position
GROUP BY route, position, key
"""


def bin_of(value: str, edges: int) -> str:
    """SQL for `searchsorted(edges, value, side="right")`: how many of the scalar parameters
    `%(edge0)s`..`%(edge{edges-1})s` are <= `value` (see `edge_params`)."""
    terms = [f"({value} >= %(edge{j})s)" for j in range(edges)]
    return f"toFloat64({' + '.join(terms) or '0'})"


def edge_params(edges: list[float]) -> dict[str, float]:
    """The `%(edgeN)s` parameters of `bin_of` for sorted `edges`."""
    return {f"edge{j}": float(edge) for j, edge in enumerate(edges)}


def champion_score_bins(edges: int) -> str:
    """The champion route's scores in the window, binned on `edges` interior edges
    (parameters `edge_params`), missing scores keyed `inf`."""
    return f"""
SELECT key, count() AS n
FROM (
    SELECT if(isFinite(s), {bin_of("s", edges)}, {MISSING_KEY}) AS key
    FROM (
        SELECT ifNull(score, nan) AS s
        FROM {{db}}.predictions
        WHERE model = %(model)s AND route = 'champion' AND {WINDOW} AND error_code = ''
    )
)
GROUP BY key
"""


SHADOW_AGREEMENT = f"""
SELECT version, count() AS pairs,
       sum((score >= threshold) = (live_score >= live_threshold)) AS agreeing,
       quantilesExact(0.5, 0.95, 0.99)(abs(score - live_score)) AS delta
FROM (
    SELECT request_id, version, argMax(assumeNotNull(score), scored_at_ms) AS score,
           transform(version, %(versions)s, %(thresholds)s, 0.5) AS threshold
    FROM {{db}}.predictions
    WHERE model = %(model)s AND route = 'shadow' AND {WINDOW} AND error_code = ''
    GROUP BY request_id, version
) AS l
ALL INNER JOIN (
    SELECT request_id, argMax(assumeNotNull(score), scored_at_ms) AS live_score,
           transform(argMax(version, scored_at_ms), %(versions)s, %(thresholds)s, 0.5)
               AS live_threshold
    FROM {{db}}.predictions
    WHERE model = %(model)s AND route != 'shadow' AND {WINDOW} AND error_code = ''
    GROUP BY request_id
) AS r USING request_id
GROUP BY version
"""
"""Per shadow version: pairs joined with the live prediction of the same request, how many agree
at each side's decision threshold (`score >= threshold`), and |score delta| quantiles."""


def labelled(predictions: str) -> str:
    """Predictions matching `predictions` (a condition on `predictions` rows; `%(model)s` is
    required) joined with their latest label; columns version, route, score, y, delay_s.

    A label applies when its `model` is the prediction's or `''`; the newest (by `ts_ms`) wins;
    positive means `value >= 0.5`. Each (request, version, route) counts once.
    """
    return f"""
SELECT version, route, score, y, (label_ms - created_ms) / 1000 AS delay_s
FROM (
    SELECT request_id, version, route, argMax(assumeNotNull(score), scored_at_ms) AS score,
           any(created_at_ms) AS created_ms
    FROM {{db}}.predictions
    WHERE model = %(model)s AND {predictions} AND error_code = ''
    GROUP BY request_id, version, route
) AS l
ALL INNER JOIN (
    SELECT request_id, argMax(value, ts_ms) >= 0.5 AS y, max(ts_ms) AS label_ms
    FROM {{db}}.labels
    WHERE model IN (%(model)s, '') AND request_id IN (
        SELECT request_id FROM {{db}}.predictions WHERE model = %(model)s AND {predictions}
    )
    GROUP BY request_id
) AS r USING request_id
"""


def labelled_scores(predictions: str) -> str:
    """(score, label) -> count per version and route: what AUC, log-loss and F1 need."""
    return f"""
SELECT version, route, score, y, count() AS n
FROM ({labelled(predictions)})
GROUP BY version, route, score, y
"""


def label_delay(predictions: str) -> str:
    """Median label delay (seconds from request to label) and labelled count per series."""
    return f"""
SELECT version, route, quantileExact(0.5)(delay_s) AS delay_p50_s, count() AS labelled
FROM ({labelled(predictions)})
GROUP BY version, route
"""


LABELLED_WINDOWS = f"""
SELECT DISTINCT model, intDiv(created_at_ms, %(window_ms)s) * %(window_ms)s AS start_ms
FROM {{db}}.predictions
WHERE created_at >= toDateTime(%(horizon_s)s) AND {SCOPE} AND error_code = ''
  AND request_id IN (
      SELECT request_id FROM {{db}}.labels WHERE inserted_at >= toDateTime(%(since_s)s)
  )
"""
"""Quality windows (start, ms) holding predictions whose labels arrived since `since_s`."""

NEWEST_PREDICTION = f"""
SELECT model, version, route, max(created_at_ms) AS newest_ms
FROM {{db}}.predictions
WHERE created_at >= toDateTime(%(since_s)s) AND {SCOPE}
GROUP BY model, version, route
"""

LAST_WINDOW_END = f"SELECT toUInt32(max(window_end)) FROM {{db}}.health WHERE {SCOPE}"

# -- client.py: evidence over arbitrary time ranges ---------------------------------------------

RANGE = (
    "created_at >= toDateTime(%(since_s)s) AND created_at <= toDateTime(%(until_s)s)"
    " AND created_at_ms >= %(since_ms)s AND created_at_ms < %(until_ms)s"
)
"""Rows of `predictions` created in `[since_ms, until_ms)` (the DateTime bounds prune parts)."""

VERSION_RANGE = f"version = %(version)s AND (%(any_route)s OR route = %(route)s) AND {RANGE}"
"""One version's rows in the range, on one route or (any_route = 1) all routes."""

RANGE_TRAFFIC = f"""
SELECT count() AS requests, countIf(error_code != '') AS errors,
       quantileExact(%(quantile)s)(total_ms) AS latency_ms
FROM {{db}}.predictions FINAL
WHERE model = %(model)s AND {VERSION_RANGE}
"""

CHAMPION_DECILES = f"""
SELECT quantilesExact(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)(assumeNotNull(score)),
       count()
FROM {{db}}.predictions FINAL
WHERE model = %(model)s AND route = 'champion' AND {RANGE} AND error_code = ''
"""


def scores_versus_champion(edges: int) -> str:
    """Champion-route scores and the candidate's canary/shadow scores in the range, binned on
    `edges` interior edges (parameters `edge_params`)."""
    return f"""
SELECT champion, bin, count() AS n
FROM (
    SELECT route = 'champion' AS champion, {bin_of("assumeNotNull(score)", edges)} AS bin
    FROM {{db}}.predictions FINAL
    WHERE model = %(model)s AND {RANGE} AND error_code = ''
      AND (route = 'champion' OR (version = %(version)s AND route IN ('canary', 'shadow')))
)
GROUP BY champion, bin
"""


RANGE_AGREEMENT = f"""
SELECT count() AS pairs, sum((score >= %(threshold)s) = (live_score >= %(threshold)s)),
       quantilesExact(0.5, 0.95, 0.99)(abs(score - live_score))
FROM (
    SELECT request_id, argMax(assumeNotNull(score), scored_at_ms) AS score
    FROM {{db}}.predictions
    WHERE model = %(model)s AND version = %(version)s AND route = 'shadow' AND {RANGE}
      AND error_code = ''
    GROUP BY request_id
) AS l
ALL INNER JOIN (
    SELECT request_id, argMax(assumeNotNull(score), scored_at_ms) AS live_score
    FROM {{db}}.predictions
    WHERE model = %(model)s AND route != 'shadow' AND {RANGE} AND error_code = ''
    GROUP BY request_id
) AS r USING request_id
"""

FEATURE_DRIFT = """
SELECT feature, max(value) AS worst, max(threshold), countIf(drifted = 1), count(),
       sum(sample_size)
FROM {db}.drift FINAL
WHERE model = %(model)s AND version = %(version)s AND kind = 'feature' AND method = %(method)s
  AND (%(any_route)s OR route = %(route)s)
  AND window_end > toDateTime(%(since_s)s) AND window_end <= toDateTime(%(until_s)s)
GROUP BY feature
ORDER BY worst DESC, feature
LIMIT 1
"""
"""The feature with the largest value of a distance `method` over the windows that ended in the
range, with how many of them drifted and the samples they rest on."""

SCORECARD = """
SELECT model, version, route, toUInt32(newest_end) AS window_end_s, requests, error_rate,
       p95_ms, p99_ms, freshness_s, gpu_utilization, auc, f1, labelled
FROM (
    SELECT model, version, route, max(window_end) AS newest_end,
           argMax(requests, window_end) AS requests,
           argMax(error_rate, window_end) AS error_rate,
           argMax(p95_ms, window_end) AS p95_ms,
           argMax(p99_ms, window_end) AS p99_ms,
           argMax(freshness_s, window_end) AS freshness_s,
           argMax(gpu_utilization, window_end) AS gpu_utilization
    FROM {db}.health FINAL
    WHERE window_end >= toDateTime(%(since_s)s) AND (%(any_model)s OR model = %(model)s)
    GROUP BY model, version, route
) AS l
ALL LEFT JOIN (
    SELECT model, version, route,
           argMaxIf(value, window_start, metric = 'auc') AS auc,
           argMaxIf(value, window_start, metric = 'f1') AS f1,
           argMaxIf(sample_size, window_start, metric = 'auc') AS labelled
    FROM {db}.quality FINAL
    WHERE window_start >= toDateTime(%(quality_since_s)s) AND (%(any_model)s OR model = %(model)s)
    GROUP BY model, version, route
) AS r USING model, version, route
ORDER BY model, version, route
"""
"""The health scorecard: per series, its newest health window and newest quality window
(labelled = 0 when no quality window exists: auc and f1 are then 0, not measured)."""
