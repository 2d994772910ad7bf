"""Window math of the features service as pure functions: sliding windows, lateness, TTL."""

from __future__ import annotations

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from services.features.windows import (
    Aggregation,
    Condition,
    EntityWindow,
    Observation,
    Op,
    WindowPlan,
    WindowSpec,
    canonical,
    fixed_point,
    from_fixed_point,
    is_expired,
    lateness_ms,
    watermarks_before,
)

MIN = 60_000


def spec(name: str, aggregation: Aggregation, window_ms: int, **kwargs) -> WindowSpec:
    field = kwargs.pop("field", None if aggregation is Aggregation.count else "amount")
    return WindowSpec(
        name=name,
        aggregation=aggregation,
        window_ms=window_ms,
        field=field,
        event_types=frozenset(kwargs.pop("event_types", {"tx"})),
        **kwargs,
    )


def obs(ts: int, amount: object = 1.0, *, event_id: str | None = None, late: int = 0, **values):
    fields = {"amount": canonical(amount), **{k: canonical(v) for k, v in values.items()}}
    fields = {k: v for k, v in fields.items() if v is not None}
    return Observation(ts, "tx", event_id or f"e{ts}-{amount}", late, fields)


def window_of(specs, observations) -> EntityWindow:
    window = EntityWindow(WindowPlan(specs))
    for observation in observations:
        window.apply(observation)
    return window


def reference_values(specs, observations) -> dict[str, float | None]:
    """Brute force: the documented semantics, written as directly as possible."""
    unique = {}
    for observation in observations:
        unique.setdefault(observation.key, observation)
    accepted = {s.name: [o for o in unique.values() if s.accepts(o)] for s in specs}
    every = [o for group in accepted.values() for o in group]
    if not every:
        return {}
    clock = max(o.ts for o in every)
    values: dict[str, float | None] = {}
    for s in specs:
        inside = [o for o in accepted[s.name] if clock - s.window_ms < o.ts <= clock]
        picked = [o.values.get(s.field) for o in inside] if s.field else []
        if s.aggregation is Aggregation.count:
            values[s.name] = float(len(inside))
        elif s.aggregation is Aggregation.sum:
            values[s.name] = math.fsum(picked)
        elif s.aggregation is Aggregation.mean:
            values[s.name] = math.fsum(picked) / len(picked) if picked else None
        elif s.aggregation is Aggregation.min:
            values[s.name] = min(picked) if picked else None
        elif s.aggregation is Aggregation.max:
            values[s.name] = max(picked) if picked else None
        elif s.aggregation is Aggregation.distinct_count:
            values[s.name] = float(len(set(picked)))
        else:
            newest = max(inside, key=lambda o: (o.ts, o.event_type, o.event_id), default=None)
            values[s.name] = newest.values[s.field] if newest else None
    return values


ALL_SPECS = [
    spec("n_10m", Aggregation.count, 10 * MIN),
    spec("sum_1h", Aggregation.sum, 60 * MIN),
    spec("mean_1h", Aggregation.mean, 60 * MIN, lateness_ms=MIN),
    spec("min_30m", Aggregation.min, 30 * MIN),
    spec("max_30m", Aggregation.max, 30 * MIN),
    spec("last_20m", Aggregation.last, 20 * MIN),
    spec("distinct_1h", Aggregation.distinct_count, 60 * MIN, field="country"),
    spec(
        "online_5m",
        Aggregation.count,
        5 * MIN,
        conditions=(Condition("channel", Op.eq, "online"),),
    ),
]


def test_count_window_is_open_at_its_start_and_closed_at_its_end():
    specs = [spec("n", Aggregation.count, 10 * MIN)]
    at_start = window_of(specs, [obs(0), obs(10 * MIN)])
    just_inside = window_of(specs, [obs(1), obs(10 * MIN)])
    assert at_start.values() == {"n": 1.0}
    assert just_inside.values() == {"n": 2.0}


def test_windows_slide_with_the_entity_clock_and_forget_old_events():
    specs = [spec("sum", Aggregation.sum, 10 * MIN), spec("max", Aggregation.max, 10 * MIN)]
    window = window_of(specs, [obs(0, 5.0), obs(MIN, 7.0), obs(5 * MIN, 1.0)])
    assert window.values() == {"sum": 13.0, "max": 7.0}
    window.apply(obs(11 * MIN + 30_000, 2.0))
    assert window.clock == 11 * MIN + 30_000
    assert window.values() == {"sum": 3.0, "max": 2.0}


def test_empty_windows_have_zero_counts_and_no_mean_min_max_or_last():
    specs = [
        spec("n_1m", Aggregation.count, MIN),
        spec("sum_1m", Aggregation.sum, MIN),
        spec("mean_1m", Aggregation.mean, MIN),
        spec("last_1m", Aggregation.last, MIN),
        spec("n_1h", Aggregation.count, 60 * MIN),
    ]
    window = window_of(specs, [obs(0), obs(30 * MIN, event_id="x", amount="n/a")])
    assert window.values() == {
        "n_1m": 1.0,
        "sum_1m": 0.0,
        "mean_1m": None,
        "last_1m": None,
        "n_1h": 2.0,
    }


def test_out_of_order_events_inside_the_window_count_and_older_ones_do_not():
    specs = [spec("n", Aggregation.count, 10 * MIN), spec("last", Aggregation.last, 10 * MIN)]
    window = window_of(specs, [obs(20 * MIN, 1.0)])
    assert window.apply(obs(15 * MIN, 2.0))
    assert not window.apply(obs(5 * MIN, 3.0))
    assert window.values() == {"n": 2.0, "last": 1.0}


def test_events_later_than_the_allowed_lateness_are_not_mixed_in():
    specs = [spec("n", Aggregation.count, 60 * MIN, lateness_ms=MIN)]
    window = window_of(specs, [obs(30 * MIN)])
    assert window.apply(obs(20 * MIN, late=MIN))
    too_late = obs(21 * MIN, late=MIN + 1)
    assert not window.apply(too_late)
    assert specs[0].rejects_as_late(too_late)
    assert window.values() == {"n": 2.0}


def test_a_copy_of_an_event_already_in_the_window_is_ignored():
    specs = [spec("sum", Aggregation.sum, 60 * MIN)]
    window = window_of(specs, [obs(0, 4.0, event_id="a")])
    assert not window.apply(obs(0, 4.0, event_id="a"))
    assert window.values() == {"sum": 4.0}


def test_last_breaks_ties_in_time_by_event_type_then_id():
    specs = [spec("last", Aggregation.last, MIN)]
    window = window_of(specs, [obs(5, 2.0, event_id="b"), obs(5, 1.0, event_id="a")])
    assert window.values() == {"last": 2.0}


def test_where_conditions_filter_by_field_value():
    specs = [
        spec("online", Aggregation.count, MIN, conditions=(Condition("channel", Op.eq, "online"),)),
        spec("small", Aggregation.count, MIN, conditions=(Condition("amount", Op.lt, 5.0),)),
        spec(
            "eu", Aggregation.count, MIN, conditions=(Condition("country", Op.in_, ("FR", "DE")),)
        ),
    ]
    window = window_of(
        specs,
        [
            obs(1, 2.0, channel="online", country="FR"),
            obs(2, 50.0, channel="in_store", country="US"),
            obs(3, 4.99, country="DE"),
        ],
    )
    assert window.values() == {"online": 1.0, "small": 2.0, "eu": 2.0}


def test_numeric_aggregations_skip_missing_text_and_non_finite_values():
    specs = [spec("mean", Aggregation.mean, MIN), spec("n", Aggregation.count, MIN)]
    window = window_of(
        specs,
        [obs(1, 2.0), obs(2, "12"), obs(3, float("nan")), obs(4, None, event_id="x"), obs(5, 4)],
    )
    assert window.values() == {"mean": 3.0, "n": 5.0}


def test_booleans_and_integers_are_numbers_as_in_clickhouse():
    assert canonical(True) == 1.0
    assert canonical(3) == 3.0
    assert canonical("3") == "3"
    assert canonical(None) is None
    assert canonical([1]) is None


def test_fixed_point_sums_remove_values_without_rounding_drift():
    values = [1e16, 1.0, -1e16, 0.1, 0.2, 0.3, 1e-10, 5e-324, 1.7e308]
    total = sum(fixed_point(v) for v in values)
    assert from_fixed_point(total) == math.fsum(values)
    total -= fixed_point(1.7e308) + fixed_point(1e16)
    assert from_fixed_point(total) == math.fsum([1.0, -1e16, 0.1, 0.2, 0.3, 1e-10, 5e-324])
    for value in [1.0, -1e16, 0.1, 0.2, 0.3, 1e-10, 5e-324]:
        total -= fixed_point(value)
    assert total == 0


@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=30))
def test_fixed_point_sums_equal_fsum(values):
    try:
        expected = math.fsum(values)
    except OverflowError:
        return
    assert from_fixed_point(sum(fixed_point(v) for v in values)) == expected


def test_watermark_is_the_greatest_earlier_event_time_of_the_partition():
    times = [10, 30, 20, 40, 5]
    assert list(watermarks_before(times)) == [None, 10, 30, 30, 40]
    marks = list(watermarks_before(times))
    assert [lateness_ms(w, t) for w, t in zip(marks, times, strict=True)] == [0, 0, 10, 0, 35]


def test_values_expire_a_ttl_after_the_entity_clock():
    assert not is_expired(1_000, 1_999, ttl_ms=1_000)
    assert is_expired(1_000, 2_000, ttl_ms=1_000)
    assert is_expired(None, 0, ttl_ms=1_000)


def test_a_window_rebuilt_from_its_held_observations_has_the_same_values_and_clock():
    rng = random.Random(7)
    observations = [
        obs(rng.randrange(0, 3 * 60 * MIN), rng.uniform(0, 100), event_id=str(i), country="FR")
        for i in range(300)
    ]
    window = window_of(ALL_SPECS, observations)
    rebuilt = window_of(ALL_SPECS, reversed(window.observations()))
    assert rebuilt.values() == window.values()
    assert rebuilt.clock == window.clock


def test_a_window_that_accepted_nothing_has_no_values():
    window = window_of(ALL_SPECS, [obs(0, late=10 * MIN)])
    assert window.clock is None
    assert window.values() == dict.fromkeys(s.name for s in ALL_SPECS)


def test_added_and_removed_track_what_to_persist():
    specs = [spec("n", Aggregation.count, MIN)]
    window = window_of(specs, [obs(0, event_id="a")])
    window.clear_changes()
    window.apply(obs(2 * MIN, event_id="b"))
    assert set(window.added) == {("tx", "b")}
    assert window.removed == [("tx", "a")]
    window.apply(obs(2 * MIN + 1, event_id="a"))  # the id again, after its first copy left
    assert set(window.added) == {("tx", "b"), ("tx", "a")}
    assert window.removed == [("tx", "a")]  # the commit deletes the stored copy, then writes
    assert window.values() == {"n": 2.0}


observation_strategy = st.builds(
    lambda ts, amount, ident, late, country, channel: obs(
        ts, amount, event_id=str(ident), late=late, country=country, channel=channel
    ),
    ts=st.integers(0, 3 * 60 * MIN),
    amount=st.one_of(
        st.floats(-1e6, 1e6, allow_nan=False), st.integers(-5, 5), st.just(float("inf"))
    ),
    ident=st.integers(0, 10_000),
    late=st.sampled_from([0, 0, 0, 30_000, 90_000]),
    country=st.sampled_from(["FR", "DE", "US", None]),
    channel=st.sampled_from(["online", "in_store"]),
)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(observation_strategy, max_size=80, unique_by=lambda o: o.key),
    st.randoms(use_true_random=False),
)
def test_incremental_windows_equal_brute_force_in_any_arrival_order(observations, rng):
    shuffled = list(observations)
    rng.shuffle(shuffled)
    in_order = window_of(ALL_SPECS, sorted(observations, key=lambda o: o.ts))
    any_order = window_of(ALL_SPECS, shuffled)
    expected = reference_values(ALL_SPECS, sorted(observations, key=lambda o: o.ts))
    if not expected:
        assert any_order.clock is None
        return
    assert in_order.values() == expected
    assert any_order.values() == expected
    assert any_order.clock == in_order.clock
