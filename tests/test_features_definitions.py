"""Feature definitions: their YAML/JSON form, validation, and the demo's fraud features."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.settings import settings_table
from services.features.definitions import (
    DefinitionError,
    FeatureRegistry,
    format_duration,
    parse_duration,
)
from services.features.settings import FeaturesSettings
from services.features.windows import Aggregation, Observation, WindowPlan
from tests.test_features_support import DEMO_DEFINITIONS

MINIMAL = """
entities:
  card: {ttl: 1d}
features:
  - name: card_txn_count_10m
    entity: card
    event_types: [transaction]
    aggregation: count
    window: 10m
"""


def registry_with(**feature) -> FeatureRegistry:
    base = {
        "name": "f",
        "entity": "card",
        "event_types": ["transaction"],
        "aggregation": "count",
        "window": "10m",
    }
    return FeatureRegistry.parse(
        json.dumps({"entities": {"card": {"ttl": "1d"}}, "features": [{**base, **feature}]})
    )


def test_durations_read_like_people_write_them_and_round_trip():
    assert parse_duration("250ms") == 250
    assert parse_duration("10m") == 600_000
    assert parse_duration("24h") == parse_duration("1d") == 86_400_000
    assert parse_duration(1500) == 1500
    assert format_duration(600_000) == "10m"
    assert format_duration(1500) == "1500ms"
    with pytest.raises(ValueError):
        parse_duration("ten minutes")


def test_a_minimal_yaml_file_loads_with_defaults():
    registry = FeatureRegistry.parse(MINIMAL)
    feature = registry.feature("card_txn_count_10m")
    assert feature.source == "sluice.events"
    assert feature.allowed_lateness == 0
    assert feature.default == 0.0
    assert registry.plan("card").ttl_ms == 86_400_000
    assert registry.sources() == ["sluice.events"]


def test_the_yaml_form_round_trips_to_the_same_definitions():
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    again = FeatureRegistry.parse(registry.to_yaml())
    assert again.model_dump() == registry.model_dump()
    assert again.fingerprint() == registry.fingerprint()
    assert "window: 10m" in registry.to_yaml()


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"entity": "planet"}, "unknown entity"),
        ({"field": "amount"}, "count takes no field"),
        ({"aggregation": "sum"}, "needs a field"),
        ({"aggregation": "sum", "field": "entities.merchant"}, "numeric field"),
        ({"window": "0ms"}, "window must be positive"),
        ({"window": "2d"}, "shorter than its largest window"),
        ({"where": [{"field": "amount", "op": "lt", "value": "x"}]}, "compares numbers"),
        ({"where": [{"field": "country", "op": "in", "value": "FR"}]}, "needs a list"),
        ({"name": "Card Count"}, "pattern"),
        ({"windw": "1h"}, "Extra inputs"),
    ],
)
def test_inconsistent_definitions_are_refused_with_a_reason(change, complaint):
    with pytest.raises(DefinitionError, match=complaint):
        registry_with(**change)


def test_duplicate_names_unknown_view_features_and_mixed_sources_are_refused():
    twice = MINIMAL + MINIMAL.split("features:")[1]
    with pytest.raises(DefinitionError, match="defined twice"):
        FeatureRegistry.parse(twice)
    with pytest.raises(DefinitionError, match="unknown features"):
        FeatureRegistry.parse(MINIMAL + "views:\n  v: {features: [nope]}\n")
    registry = FeatureRegistry.parse(MINIMAL)
    other = registry.features[0].model_copy(update={"name": "other", "source": "elsewhere"})
    with pytest.raises(ValueError, match="one topic"):
        FeatureRegistry(entities=registry.entities, features=[registry.features[0], other])


def test_with_source_points_every_feature_at_another_topic():
    registry = FeatureRegistry.load(DEMO_DEFINITIONS).with_source("copy.of.events")
    assert registry.sources() == ["copy.of.events"]
    assert registry.plan("merchant").sources == frozenset({"copy.of.events"})


def test_the_demo_defines_about_a_dozen_fraud_features_over_cards_and_merchants():
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    view = registry.view("fraud").features
    entities = {registry.feature(name).entity for name in view}
    windows = {format_duration(registry.feature(name).window) for name in view}
    aggregations = {registry.feature(name).aggregation for name in view}
    assert 12 <= len(view) <= 16
    assert entities == {"card", "merchant"}
    assert {"10m", "1h", "1d"} <= windows
    assert aggregations == set(Aggregation)


def test_entity_plans_extract_fields_and_entity_ids_in_canonical_form():
    plan = FeatureRegistry.load(DEMO_DEFINITIONS).plan("card")
    values = plan.extract(
        {"amount": 12, "channel": "online", "country": "FR", "extra": [1]},
        {"card": "c1", "merchant": "m1"},
    )
    assert values == {
        "amount": 12.0,
        "channel": "online",
        "country": "FR",
        "entities.merchant": "m1",
    }


MASK_PLANS = [
    registry_with(
        aggregation="sum",
        field="amount",
        allowed_lateness="1m",
        where=[
            {"field": "channel", "op": "ne", "value": "in_store"},
            {"field": "country", "op": "not_in", "value": ["US"]},
            {"field": "amount", "op": "ge", "value": -5},
        ],
    ).plan("card"),
    *FeatureRegistry.load(DEMO_DEFINITIONS).plans.values(),
]

conditions = st.fixed_dictionaries(
    {
        "amount": st.one_of(
            st.none(), st.floats(-10, 10), st.just(float("nan")), st.text(max_size=2)
        ),
        "channel": st.sampled_from([None, "online", "in_store", 3.0]),
        "country": st.sampled_from([None, "FR", "DE", "US"]),
    }
)


@settings(max_examples=120, deadline=None)
@given(
    conditions,
    st.sampled_from(["transaction", "refund"]),
    st.integers(0, 200_000),
)
def test_the_compiled_mask_agrees_with_every_feature_definition(values, event_type, lateness):
    fields = {k: v for k, v in values.items() if v is not None}
    observation = Observation(0, event_type, "e", lateness, fields)
    for plan in MASK_PLANS:
        expected = sum(1 << i for i, spec in enumerate(plan.specs) if spec.accepts(observation))
        assert WindowPlan(plan.specs).mask(observation) == expected


def test_the_features_guide_lists_every_setting_and_the_key_layout():
    doc = (DEMO_DEFINITIONS.parents[2] / "docs" / "features.md").read_text()
    block = re.search(
        r"<!-- features-settings:start -->\n(.*?)\n<!-- features-settings:end -->", doc, re.S
    )
    rows = [row for row in settings_table(FeaturesSettings).splitlines() if "_FEATURES_" in row]
    assert block and block.group(1).splitlines()[2:] == rows, "regenerate the settings table"
    for fragment in ("sluice:fv:{entity}:{entity_id}", "sluice:fo:{app_id}:{partition}", "`@ts`"):
        assert fragment in doc
