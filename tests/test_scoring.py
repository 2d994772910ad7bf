"""`feature_matrix` (the column-at-a-time batch path) against `fill_row` (the one-row path):
for any mix of values, the same rows, the same defaults and the same errors."""

from __future__ import annotations

import math
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.messages import PredictionRequest, Route
from services.inference.manifest import FeatureSpec
from services.inference.scoring import FeaturePlan, Job, feature_matrix, fill_row

SPECS = [
    FeatureSpec(name="amount"),
    FeatureSpec(name="hour", default=0.5),
    FeatureSpec(name="ratio", allow_nan=True),
    FeatureSpec(name="card_count", source="online", entity="card", feature="count"),
    FeatureSpec(name="card_mean", source="online", entity="card", feature="mean", default=1.0),
    FeatureSpec(name="merchant_rate", source="online", entity="merchant", feature="rate"),
]
PLAN = FeaturePlan.of(SimpleNamespace(features=SPECS, feature_names=[s.name for s in SPECS]))

VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.integers(-3, 3),
    st.booleans(),
    st.text(max_size=2),
)
REQUEST_KEYS = st.sampled_from(["amount", "hour", "ratio", "card_count", "merchant_rate"])
"""Request features: the request columns and two online columns' names (which override)."""
FLOATS = st.floats(-1e6, 1e6)
"""Most batches are well-formed: plain finite floats everywhere."""
ANY_FLOATS = st.one_of(FLOATS, st.sampled_from([math.nan, math.inf, -math.inf]))
"""Floats, some of them NaN/inf: only `ratio` allows those."""


@st.composite
def batches(draw):
    values = draw(st.sampled_from([FLOATS, ANY_FLOATS, VALUES]))
    count = draw(st.integers(1, 12))
    requests = []
    for i in range(count):
        # every request column, and sometimes an online one, then perhaps some left out
        features = {k: draw(values) for k in ("amount", "hour", "ratio")}
        features |= draw(st.dictionaries(REQUEST_KEYS, values, max_size=2))
        for key in draw(st.lists(REQUEST_KEYS, max_size=1)):
            features.pop(key, None)
        if draw(st.booleans()):
            features["merchant_id"] = draw(st.sampled_from(["m0", "m1", "", 7]))
        requests.append(
            PredictionRequest(
                request_id=f"r{i}",
                model="m",
                entity_id=draw(st.sampled_from(["c0", "c1", "c2"])),
                features=features,
                created_at_ms=0,
            )
        )
    online = {}
    for key in [("card", "c0"), ("card", "c1"), ("merchant", "m0"), ("merchant", "c2")]:
        if draw(st.integers(0, 3)) > 0:  # most instances are in the store
            online[key] = {n: draw(values) for n in ("count", "mean", "rate")}
            for name in draw(st.lists(st.sampled_from(["count", "mean", "rate"]), max_size=1)):
                online[key].pop(name, None)
    store_unavailable = draw(st.booleans())
    return requests, ({} if store_unavailable else online), store_unavailable


def _jobs(requests):
    return [Job(i, r, "1", Route.champion) for i, r in enumerate(requests)]


def _same(a: list[float], b: list[float]) -> bool:
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b, strict=True))


@settings(max_examples=300, deadline=None)
@given(batches())
def test_the_batch_path_builds_what_the_one_row_path_builds(batch):
    requests, online, store_unavailable = batch
    one_by_one = _jobs(requests)
    for job in one_by_one:
        fill_row(job, PLAN, online, store_unavailable)
    batched = _jobs(requests)
    scored, matrix = feature_matrix(batched, PLAN, online, store_unavailable)

    assert [j.index for j in scored] == [j.index for j in one_by_one if j.error is None]
    assert matrix.shape == (len(scored), len(SPECS))
    for expected, got in zip(one_by_one, batched, strict=True):
        assert (got.error and got.error.model_dump()) == (
            expected.error and expected.error.model_dump()
        )
        assert got.defaulted == expected.defaulted
        if expected.error is None:
            assert _same(got.row, expected.row)
    for row, job in zip(matrix.tolist(), scored, strict=True):
        assert _same(row, job.row)


def test_a_request_value_overrides_the_store_in_the_batch_path():
    request = PredictionRequest(
        request_id="r",
        model="m",
        entity_id="c0",
        features={"amount": 1.0, "hour": 0.25, "ratio": 2.0, "card_count": 9.0},
        created_at_ms=0,
    )
    online = {("card", "c0"): {"count": 3.0, "mean": 4.0}, ("merchant", "c0"): {"rate": 5.0}}
    scored, matrix = feature_matrix(_jobs([request]), PLAN, online)
    assert matrix.tolist() == [[1.0, 0.25, 2.0, 9.0, 4.0, 5.0]]
    assert scored[0].defaulted == []
