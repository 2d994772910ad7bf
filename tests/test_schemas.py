"""Message schemas: committed JSON Schemas stay in step and never break their readers."""

from __future__ import annotations

import copy

import orjson
import pytest

from schemas.export import (
    SCHEMA_DIR,
    incompatible_changes,
    json_schema,
    render,
    schema_path,
)
from schemas.messages import MESSAGE_MODELS
from schemas.topics import CATALOG, EVENTS, FEATURES_REPARTITION


@pytest.mark.parametrize("name", sorted(MESSAGE_MODELS))
def test_committed_schema_is_compatible_with_the_model(name):
    model = MESSAGE_MODELS[name]
    committed = orjson.loads(schema_path(model).read_bytes())
    assert incompatible_changes(committed, json_schema(model)) == []


@pytest.mark.parametrize("name", sorted(MESSAGE_MODELS))
def test_committed_schema_is_up_to_date(name):
    model = MESSAGE_MODELS[name]
    assert schema_path(model).read_bytes() == render(json_schema(model)), (
        f"run `make schemas` and commit {schema_path(model).relative_to(SCHEMA_DIR.parent)}"
    )


def test_removing_a_required_field_is_incompatible():
    old = json_schema(MESSAGE_MODELS["Event"])
    new = copy.deepcopy(old)
    del new["properties"]["ts_ms"]
    new["required"].remove("ts_ms")
    assert incompatible_changes(old, new) == ["required field 'ts_ms' was removed"]


def test_retyping_a_required_field_is_incompatible():
    old = json_schema(MESSAGE_MODELS["Label"])
    new = copy.deepcopy(old)
    new["properties"]["value"] = {"type": "string"}
    problems = incompatible_changes(old, new)
    assert len(problems) == 1 and "'value' changed type" in problems[0]


def test_retyping_a_nested_required_field_is_incompatible():
    old = json_schema(MESSAGE_MODELS["DeadLetter"])
    new = copy.deepcopy(old)
    new["$defs"]["ErrorBody"]["properties"]["code"] = {"type": "integer"}
    problems = incompatible_changes(old, new)
    assert len(problems) == 1 and "'error.code' changed type" in problems[0]


def test_adding_an_optional_field_is_compatible():
    old = json_schema(MESSAGE_MODELS["Alert"])
    new = copy.deepcopy(old)
    new["properties"]["runbook_url"] = {"type": "string"}
    assert incompatible_changes(old, new) == []


def test_catalog_names_are_unique_and_partition_counts_explicit():
    names = [spec.name for spec in CATALOG]
    assert len(names) == len(set(names))
    assert all(spec.partitions >= 1 for spec in CATALOG)
    assert FEATURES_REPARTITION.partitions == EVENTS.partitions


def test_compacted_topics_carry_no_retention():
    for spec in CATALOG:
        config = spec.config()
        assert config["cleanup.policy"] == spec.cleanup_policy
        assert ("retention.ms" in config) == (spec.cleanup_policy == "delete")
