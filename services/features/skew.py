"""The skew check: were the feature values inference served the values the definitions give?

For every logged prediction (ClickHouse `predictions`: `feature_names`/`feature_values`,
`defaulted`, `entity_id`, `created_at_ms`), each served feature that the definitions know is
recomputed offline as of the request time `T` and classified:

- **match**: equal (within tolerance) to the point-in-time value as of `T` (a default served
  where offline has no value also matches);
- **stale**: not the value as of `T`, but the value of an earlier state of the entity: the
  observations in arrival order (source partition offset order; event time for entities fed by
  several partitions) up to some prefix that holds nothing after `T` and lacks nothing older than
  `T - max_lag`. This is the documented lateness case: the online store had not applied yet
  (processing lag) or had not received yet (late arrival) some events older than `T`;
- **mismatch**: anything else: training/serving skew, to be fixed.

Features of another entity than the prediction's (`entity`) are skipped: predictions log only
their own entity id.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from clickhouse_driver import Client

from services.features.definitions import FeatureRegistry
from services.features.offline import EventLog, LoggedObservation, OfflineError, values_as_of
from services.features.windows import EntityWindow, is_expired


@dataclass(frozen=True)
class ServedPrediction:
    """What one prediction was served."""

    request_id: str
    entity_id: str
    at_ms: int
    features: dict[str, float]
    defaulted: frozenset[str]


@dataclass(frozen=True)
class SkewExample:
    """One mismatch, for the report."""

    request_id: str
    entity_id: str
    at_ms: int
    served: float
    expected: float


@dataclass
class FeatureSkew:
    """Outcome counts of one feature."""

    feature: str
    checked: int = 0
    matched: int = 0
    stale: int = 0
    mismatched: int = 0
    examples: list[SkewExample] = field(default_factory=list)


@dataclass
class SkewReport:
    """Per-feature outcomes, plus served features that could not be checked."""

    predictions: int
    features: dict[str, FeatureSkew]
    skipped: dict[str, str]

    @property
    def mismatched(self) -> int:
        """Mismatches over every feature."""
        return sum(f.mismatched for f in self.features.values())


def load_served(
    client: Client,
    database: str,
    model: str,
    since_ms: int = 0,
    until_ms: int | None = None,
    limit: int = 100_000,
) -> list[ServedPrediction]:
    """Served vectors of `model` (live and shadow routes, successful predictions only)."""
    rows = client.execute(
        f"""
        SELECT request_id, entity_id, created_at_ms, feature_names, feature_values, defaulted
        FROM {database}.predictions FINAL
        WHERE model = %(model)s AND error_code = ''
          AND created_at_ms >= %(since)s AND created_at_ms <= %(until)s
        ORDER BY created_at_ms, request_id
        LIMIT %(limit)s
        """,
        {"model": model, "since": since_ms, "until": until_ms or 2**63 - 1, "limit": limit},
    )
    return [
        ServedPrediction(
            request_id,
            entity_id,
            created_at_ms,
            dict(zip(names, values, strict=True)),
            frozenset(defaulted),
        )
        for request_id, entity_id, created_at_ms, names, values, defaulted in rows
    ]


def check_skew(
    registry: FeatureRegistry,
    log: EventLog,
    served: Sequence[ServedPrediction],
    entity: str,
    *,
    max_lag_ms: int = 300_000,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
    max_examples: int = 5,
) -> SkewReport:
    """Recompute every served feature of `entity` offline and classify it (module docstring)."""
    if entity not in registry.plans:
        raise OfflineError(f"no features are defined for entity {entity!r}")
    plan = registry.plan(entity)
    names = sorted({n for p in served for n in p.features})
    checked = [n for n in names if registry.has_feature(n) and registry.feature(n).entity == entity]
    skipped = {
        n: (
            "not a defined feature (request feature?)"
            if not registry.has_feature(n)
            else f"entity {registry.feature(n).entity!r}: predictions log only the {entity} id"
        )
        for n in names
        if n not in checked
    }
    report = SkewReport(len(served), {n: FeatureSkew(n) for n in checked}, skipped)
    if not checked:
        return report
    by_id: dict[str, list[ServedPrediction]] = defaultdict(list)
    for prediction in served:
        by_id[prediction.entity_id].append(prediction)
    until = max(p.at_ms for p in served)
    logged = log.observations(registry, [(entity, i) for i in by_id], until)

    def close(a: float, b: float) -> bool:
        return a == b or math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)

    for entity_id, predictions in by_id.items():
        observations = logged[(entity, entity_id)]
        expected = values_as_of(
            registry, entity, [o.observation for o in observations], [p.at_ms for p in predictions]
        )
        history: _History | None = None
        for prediction, (_clock, values) in zip(predictions, expected, strict=True):
            for name in checked:
                if name not in prediction.features:
                    continue
                outcome = report.features[name]
                outcome.checked += 1
                served_value = prediction.features[name]
                offline = values.get(name)
                want = plan.defaults[name] if offline is None else offline
                if close(served_value, want):
                    outcome.matched += 1
                    continue
                history = history or _History(registry, entity, observations)
                if any(
                    close(served_value, v)
                    for v in history.candidates(name, prediction.at_ms, max_lag_ms)
                ):
                    outcome.stale += 1
                    continue
                outcome.mismatched += 1
                if len(outcome.examples) < max_examples:
                    outcome.examples.append(
                        SkewExample(
                            prediction.request_id, entity_id, prediction.at_ms, served_value, want
                        )
                    )
    return report


class _History:
    """The successive states of one entity in arrival order, for the `stale` class."""

    def __init__(
        self, registry: FeatureRegistry, entity: str, logged: Sequence[LoggedObservation]
    ) -> None:
        self.plan = registry.plan(entity)
        single_partition = len({o.partition for o in logged}) <= 1
        ordered = sorted(logged, key=lambda o: o.offset) if single_partition else list(logged)
        window = EntityWindow(self.plan.windows)
        self.states: list[tuple[int, int | None, dict[str, float | None]]] = [
            (-1, None, dict.fromkeys(self.plan.names))
        ]
        newest = -1
        for item in ordered:
            window.apply(item.observation)
            newest = max(newest, item.observation.ts)
            self.states.append((newest, window.clock, window.values()))
        self.pending_from: list[int | None] = [None] * (len(ordered) + 1)
        for k in range(len(ordered) - 1, -1, -1):
            later = self.pending_from[k + 1]
            ts = ordered[k].observation.ts
            self.pending_from[k] = ts if later is None else min(ts, later)

    def candidates(self, name: str, at_ms: int, max_lag_ms: int) -> list[float]:
        """Values of `name` in states that a server at `at_ms` lagging by at most `max_lag_ms`
        could have read (declared default where a state has none)."""
        default = self.plan.defaults[name]
        found = []
        for k, (newest, clock, values) in enumerate(self.states):
            oldest_pending = self.pending_from[k]
            if newest > at_ms or (
                oldest_pending is not None and oldest_pending <= at_ms - max_lag_ms
            ):
                continue
            value = None if is_expired(clock, at_ms, self.plan.ttl_ms) else values[name]
            found.append(default if value is None else value)
        return found
