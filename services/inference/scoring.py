"""The pure core of scoring a batch: who serves each request, which online features the batch
needs, the feature matrix per version, and the prediction each row becomes. No I/O here.

Entity ids: an online feature of entity `e` is read for the id in the request's feature
`e_id` when the request carries one (e.g. `merchant_id`), else for the request's `entity_id`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import ErrorBody, PredictionRequest, Route, RoutingTable
from services.common.routing import route_for, shadows_for
from services.inference.manifest import FeatureSpec, Manifest


@dataclass(slots=True)
class Job:
    """One request to be scored by one version (a request with shadows makes several jobs)."""

    index: int
    request: PredictionRequest
    version: str | None
    route: Route
    error: ErrorBody | None = None
    row: list[float] | None = None
    defaulted: list[str] = field(default_factory=list)


def plan_jobs(
    requests: Sequence[PredictionRequest],
    tables: Mapping[str, RoutingTable],
    loaded: Mapping[str, Mapping[str, object]],
    *,
    max_request_features: int,
    shadows: bool = True,
) -> list[Job]:
    """Route every request: its live job first, then one job per sampled shadow version.

    `loaded` maps model -> version -> anything (what is loaded). A model without a routing table
    is served by its highest loaded version. Errors (unknown model or version, oversized
    request) become jobs with `error` set and no version run.
    """
    jobs: list[Job] = []
    newest: dict[str, str] = {}
    for index, request in enumerate(requests):
        versions = loaded.get(request.model)
        if len(request.features) > max_request_features:
            error = ErrorBody(
                code="oversized_request",
                message=f"{len(request.features)} request features; at most "
                f"{max_request_features} are accepted",
            )
            jobs.append(Job(index, request, request.version, Route.champion, error))
            continue
        if not versions:
            error = ErrorBody(code="unknown_model", message=f"no model named {request.model!r}")
            jobs.append(Job(index, request, request.version, Route.champion, error))
            continue
        table = tables.get(request.model)
        if request.version is not None:
            version, route = request.version, Route.pinned
        elif table is not None:
            version, route = route_for(request.entity_id, table)
        else:
            if request.model not in newest:
                newest[request.model] = max(versions, key=_version_order)
            version, route = newest[request.model], Route.champion
        error = None
        if version not in versions:
            error = ErrorBody(
                code="unknown_version",
                message=f"model {request.model!r} has no loaded version {version!r}",
                details={"loaded": sorted(versions, key=_version_order)},
            )
        jobs.append(Job(index, request, version, route, error))
        if shadows and table is not None and request.version is None:
            for shadow in shadows_for(request.request_id, table):
                if shadow in versions and shadow != version:
                    jobs.append(Job(index, request, shadow, Route.shadow))
    return jobs


def _version_order(version: str) -> tuple[int, int, str]:
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


_NO_VALUES: Mapping[str, float | None] = {}


@dataclass(frozen=True)
class FeaturePlan:
    """A manifest's features compiled for the batch path: where each column comes from."""

    names: tuple[str, ...]
    columns: tuple[tuple[str | None, str, FeatureSpec], ...]
    """Per column: (entity, or None for a request feature; the key to look up; the spec)."""
    online: dict[str, tuple[str, ...]]
    """Per entity: the store feature names the model reads."""
    overrides: frozenset[str]
    """Column names of the online features: a request that carries one overrides the store."""

    @classmethod
    def of(cls, manifest: Manifest) -> FeaturePlan:
        columns = []
        online: dict[str, list[str]] = {}
        for spec in manifest.features:
            if spec.source == "request":
                columns.append((None, spec.field or spec.name, spec))
            else:
                store_name = spec.feature or spec.name
                columns.append((spec.entity, store_name, spec))
                online.setdefault(spec.entity, []).append(store_name)
        return cls(
            names=tuple(manifest.feature_names),
            columns=tuple(columns),
            online={entity: tuple(names) for entity, names in online.items()},
            overrides=frozenset(
                spec.name for spec in manifest.features if spec.source != "request"
            ),
        )


def entity_id_for(entity: str, request: PredictionRequest) -> str:
    """The id whose online features a request uses for `entity`."""
    return entity_ids(entity, [request])[0]


def online_keys(
    jobs: Sequence[Job], plans: Mapping[tuple[str, str], FeaturePlan]
) -> list[tuple[str, str]]:
    """Every (entity, entity id) whose online features the batch needs, once, for one read."""
    by_entity: dict[str, list[PredictionRequest]] = {}
    for job in jobs:
        if job.error is None:
            for entity in plans[(job.request.model, job.version)].online:
                by_entity.setdefault(entity, []).append(job.request)
    keys: dict[tuple[str, str], None] = {}
    for entity, requests in by_entity.items():
        keys.update(dict.fromkeys((entity, i) for i in entity_ids(entity, requests)))
    return list(keys)


def fill_row(
    job: Job,
    plan: FeaturePlan,
    online: Mapping[tuple[str, str], Mapping[str, float | None]],
    store_unavailable: bool = False,
) -> None:
    """Set `job.row` (or `job.error`) from request-time and online values, per the plan.

    An online feature supplied in the request under its column name uses the request's value
    (Open Inference Protocol calls send every column). Missing values take the feature's
    declared default (and are listed in `job.defaulted`); a
    feature without a default is required. Strings where numbers are expected, and NaN/inf
    where the feature does not allow them, are errors that name the feature.

    `store_unavailable` says the online store could not be read (`online` is then empty): the
    request is scored degraded when every online feature it lacks has a default, and otherwise
    fails with `online_store_unavailable` (not `missing_feature`: the value may well exist).
    """
    request = job.request
    request_values = request.features
    entity_values = {
        entity: online.get((entity, entity_id_for(entity, request)), _NO_VALUES)
        for entity in plan.online
    }
    row: list[float] = []
    for entity, key, spec in plan.columns:
        if entity is None:
            raw = request_values.get(key)
        else:  # a request-time value of the same name takes precedence over the store
            raw = request_values.get(spec.name)
            if raw is None:
                raw = entity_values[entity].get(key)
        if type(raw) is float and (raw == raw and raw not in _INFINITIES or spec.allow_nan):
            row.append(raw)
            continue
        value = _checked_value(job, spec, raw, store_unavailable and entity is not None)
        if value is None:
            return
        row.append(value)
    job.row = row


_INFINITIES = (math.inf, -math.inf)


def entity_ids(entity: str, requests: Sequence[PredictionRequest]) -> list[str]:
    """The id whose online features each request uses for `entity`: its feature `{entity}_id`
    when that is a non-empty string, else its `entity_id`."""
    field = f"{entity}_id"
    return [o if type(o := r.features.get(field)) is str and o else r.entity_id for r in requests]


def feature_matrix(
    jobs: Sequence[Job],
    plan: FeaturePlan,
    online: Mapping[tuple[str, str], Mapping[str, float | None]],
    store_unavailable: bool = False,
) -> tuple[list[Job], np.ndarray]:
    """The jobs of one version that can be scored and their rows (float64, column order of the
    plan), built a column at a time; sets `job.row` on those and `job.error` on the others.

    A value is taken as it is when it is a float (finite, or the feature allows NaN/inf): that
    is every value of a well-formed request and store. A row holding anything else (a missing
    value, an int, a bool, a string, a NaN) is built by `fill_row`, so defaults, conversions and
    errors are exactly those of the one-row path.
    """
    count = len(jobs)
    requests = [job.request for job in jobs]
    values = [r.features for r in requests]
    snapshots = {
        entity: [online.get((entity, i), _NO_VALUES) for i in entity_ids(entity, requests)]
        for entity in plan.online
    }
    overridden = any(not plan.overrides.isdisjoint(v) for v in values)
    columns: list[np.ndarray] = []
    slow: set[int] = set()
    for entity, key, spec in plan.columns:
        if entity is None:
            column = [v.get(key) for v in values]
        elif overridden:  # a request-time value of the same name takes precedence
            name = spec.name
            column = [
                raw if (raw := v.get(name)) is not None else s.get(key)
                for v, s in zip(values, snapshots[entity], strict=True)
            ]
        else:
            column = [s.get(key) for s in snapshots[entity]]
        if set(map(type, column)) <= _FLOAT:
            array = np.array(column, dtype=np.float64)
        else:
            slow.update(i for i, raw in enumerate(column) if type(raw) is not float)
            array = np.fromiter(
                (raw if type(raw) is float else 0.0 for raw in column), np.float64, count
            )
        if not spec.allow_nan:
            finite = np.isfinite(array)
            if not finite.all():
                slow.update(np.flatnonzero(~finite).tolist())
        columns.append(array)
    matrix = np.column_stack(columns) if columns else np.empty((count, 0))
    if not slow:
        for job, row in zip(jobs, matrix.tolist(), strict=True):
            job.row = row
        return list(jobs), matrix
    keep: list[int] = []
    for i, (job, row) in enumerate(zip(jobs, matrix.tolist(), strict=True)):
        if i in slow:
            fill_row(job, plan, online, store_unavailable)
            if job.error is not None:
                continue
            matrix[i] = job.row
        else:
            job.row = row
        keep.append(i)
    return [jobs[i] for i in keep], matrix[keep]


_FLOAT = {float}


def _checked_value(
    job: Job, spec: FeatureSpec, raw: object, store_unavailable: bool = False
) -> float | None:
    """The slow path of `fill_row`: defaults, conversions and errors (set on the job)."""
    if raw is None:
        if spec.default is None and store_unavailable:
            job.error = ErrorBody(
                code="online_store_unavailable",
                message=f"the online store is unavailable and required feature {spec.name!r} "
                "has no default",
                details={"feature": spec.name, "source": spec.source},
            )
            return None
        if spec.default is None:
            job.error = ErrorBody(
                code="missing_feature",
                message=f"required feature {spec.name!r} ({spec.source}) has no value",
                details={"feature": spec.name, "source": spec.source},
            )
            return None
        job.defaulted.append(spec.name)
        raw = spec.default
    if isinstance(raw, bool):
        value = 1.0 if raw else 0.0
    elif isinstance(raw, int | float):
        value = float(raw)
    else:
        job.error = ErrorBody(
            code="wrong_dtype",
            message=f"feature {spec.name!r} must be a number, got {type(raw).__name__}",
            details={"feature": spec.name, "expected": spec.dtype},
        )
        return None
    if not math.isfinite(value) and not spec.allow_nan:
        job.error = ErrorBody(
            code="invalid_value",
            message=f"feature {spec.name!r} is {value}; NaN/inf are not allowed for it",
            details={"feature": spec.name},
        )
        return None
    return value


def score_column(outputs: Mapping[str, np.ndarray], manifest: Manifest) -> np.ndarray:
    """The primary score of every row: `score_output[:, score_index]` (or the 1-D output)."""
    scores = np.asarray(outputs[manifest.score_output])
    if scores.ndim == 1:
        return scores.astype(np.float64)
    return scores[:, manifest.score_index].astype(np.float64)


def output_rows(outputs: Mapping[str, np.ndarray]) -> list[dict[str, list[float]]]:
    """Each row's outputs, flattened to float lists, by output name."""
    per_output = {
        name: np.asarray(values, dtype=np.float64).reshape(len(values), -1).tolist()
        for name, values in outputs.items()
    }
    rows = len(next(iter(per_output.values()))) if per_output else 0
    return [{name: values[i] for name, values in per_output.items()} for i in range(rows)]
