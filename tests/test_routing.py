"""Routing: weights are honoured, assignment is sticky and monotone, shadows stay off the reply
path."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from schemas.messages import Route, RouteRole, RoutingEntry, RoutingTable
from services.common.routing import bucket, route_for, shadows_for

KEYS = [f"card-{i}" for i in range(100_000)]


def table(canary_weight: float, shadow_rate: float = 0.0) -> RoutingTable:
    entries = [
        RoutingEntry(version="1", role=RouteRole.champion, weight=1.0 - canary_weight),
        RoutingEntry(version="2", role=RouteRole.canary, weight=canary_weight),
    ]
    if shadow_rate:
        entries.append(
            RoutingEntry(
                version="3", role=RouteRole.shadow, weight=0.0, shadow_sample_rate=shadow_rate
            )
        )
    return RoutingTable(model="fraud", entries=entries, revision=1, updated_at_ms=0)


def canary_keys(weight: float) -> set[str]:
    routing = table(weight)
    return {key for key in KEYS if route_for(key, routing)[1] is Route.canary}


def test_weight_w_routes_w_plus_minus_one_percent_of_100k_keys():
    for weight in (0.01, 0.1, 0.3, 0.5):
        share = len(canary_keys(weight)) / len(KEYS)
        assert abs(share - weight) <= 0.01, (weight, share)


def test_assignment_is_monotone_as_the_canary_weight_grows():
    at_1, at_10, at_30, at_100 = (canary_keys(w) for w in (0.01, 0.1, 0.3, 1.0))
    assert at_1 <= at_10 <= at_30 <= at_100
    assert at_100 == set(KEYS)


def test_assignment_is_sticky():
    routing = table(0.3)
    assert [route_for(k, routing) for k in KEYS[:1000]] == [
        route_for(k, routing) for k in KEYS[:1000]
    ]


def test_zero_weight_sends_everyone_to_the_champion():
    assert canary_keys(0.0) == set()


def test_shadow_sampling_rate_and_it_never_replaces_the_live_version():
    routing = table(0.1, shadow_rate=0.25)
    sampled = sum(bool(shadows_for(f"req-{i}", routing)) for i in range(40_000))
    assert abs(sampled / 40_000 - 0.25) < 0.01
    for key in KEYS[:5000]:
        version, route = route_for(key, routing)
        assert version in {"1", "2"} and route is not Route.shadow


@given(st.text(max_size=64))
def test_bucket_is_in_unit_interval_and_deterministic(key):
    assert 0.0 <= bucket(key) < 1.0
    assert bucket(key) == bucket(key)
