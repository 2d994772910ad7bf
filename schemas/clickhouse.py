"""ClickHouse tables: the storage contract users query (see docs/storage.md).

Written for ClickHouse 18.16 (Debian's server, used locally and in CI) and current ClickHouse
alike: no Map/JSON types, no TTL, no DateTime64, no LowCardinality. Key/value data (served
feature vectors, event fields) is stored as parallel arrays: `names[i]` goes with `values[i]`.

Tables written at least once use ReplacingMergeTree keyed on the message identity, partitioned by
a date derived from the message itself, so duplicates from a replay land in the same partition.
The dedup form for exact counts is `SELECT ... FROM <table> FINAL` (or `uniqExact(id)`).
"""

from __future__ import annotations

TABLES: dict[str, str] = {
    "events": """
CREATE TABLE IF NOT EXISTS {db}.events (
    event_id String,
    event_type String,
    ts DateTime,
    ts_ms UInt64,
    entity_names Array(String),
    entity_ids Array(String),
    num_names Array(String),
    num_values Array(Float64),
    str_names Array(String),
    str_values Array(String),
    kafka_partition UInt16,
    kafka_offset UInt64,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(kafka_offset)
PARTITION BY toYYYYMMDD(ts)
ORDER BY (event_type, event_id)
""",
    "predictions": """
CREATE TABLE IF NOT EXISTS {db}.predictions (
    request_id String,
    model String,
    version String,
    route String,
    entity_id String,
    score Nullable(Float64),
    output_names Array(String),
    output_values Array(Float64),
    feature_names Array(String),
    feature_values Array(Float64),
    defaulted Array(String),
    error_code String,
    error_message String,
    queue_ms Float32,
    features_ms Float32,
    model_ms Float32,
    total_ms Float32,
    batch_size UInt32,
    created_at DateTime,
    created_at_ms UInt64,
    scored_at_ms UInt64,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(scored_at_ms)
PARTITION BY toYYYYMMDD(created_at)
ORDER BY (model, version, route, request_id)
""",
    "labels": """
CREATE TABLE IF NOT EXISTS {db}.labels (
    request_id String,
    model String,
    entity_id String,
    value Float64,
    ts DateTime,
    ts_ms UInt64,
    inserted_at DateTime DEFAULT now()
) ENGINE = ReplacingMergeTree(ts_ms)
PARTITION BY toYYYYMMDD(ts)
ORDER BY (model, request_id)
""",
    "drift": """
CREATE TABLE IF NOT EXISTS {db}.drift (
    window_start DateTime,
    window_end DateTime,
    model String,
    version String,
    route String,
    feature String,
    kind String,
    method String,
    value Float64,
    p_value Nullable(Float64),
    threshold Float64,
    drifted UInt8,
    sample_size UInt64,
    reference_size UInt64,
    computed_at DateTime
) ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMMDD(window_start)
ORDER BY (model, version, route, kind, feature, method, window_start)
""",
    "quality": """
CREATE TABLE IF NOT EXISTS {db}.quality (
    window_start DateTime,
    window_end DateTime,
    model String,
    version String,
    route String,
    metric String,
    value Float64,
    sample_size UInt64,
    label_delay_p50_s Float64,
    computed_at DateTime
) ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMMDD(window_start)
ORDER BY (model, version, route, metric, window_start)
""",
    "health": """
CREATE TABLE IF NOT EXISTS {db}.health (
    window_start DateTime,
    window_end DateTime,
    model String,
    version String,
    route String,
    requests UInt64,
    errors UInt64,
    error_rate Float64,
    error_codes Array(String),
    error_counts Array(UInt64),
    p50_ms Float64,
    p95_ms Float64,
    p99_ms Float64,
    freshness_s Float64,
    gpu_utilization Nullable(Float64),
    computed_at DateTime
) ENGINE = ReplacingMergeTree(computed_at)
PARTITION BY toYYYYMMDD(window_start)
ORDER BY (model, version, route, window_start)
""",
    "rollout_decisions": """
CREATE TABLE IF NOT EXISTS {db}.rollout_decisions (
    rollout_id String,
    model String,
    candidate String,
    step_index Int32,
    state_before String,
    state_after String,
    action String,
    reason String,
    actor String,
    evidence_names Array(String),
    evidence_values Array(Float64),
    thresholds Array(Float64),
    passed Array(UInt8),
    weight_versions Array(String),
    weights Array(Float64),
    decided_at DateTime,
    decided_at_ms UInt64,
    seq UInt32,
    revision UInt64,
    evidence_samples Array(UInt64),
    gate_status Array(String),
    plan_json String,
    state_json String
) ENGINE = MergeTree
PARTITION BY toYYYYMMDD(decided_at)
ORDER BY (model, rollout_id, decided_at_ms)
""",
    "retrains": """
CREATE TABLE IF NOT EXISTS {db}.retrains (
    run_id String,
    model String,
    seq UInt32,
    step String,
    status String,
    alert_id String,
    alert_kind String,
    alert_metric String,
    feature String,
    version String,
    rollout_id String,
    detail String,
    at DateTime,
    at_ms UInt64
) ENGINE = MergeTree
PARTITION BY toYYYYMMDD(at)
ORDER BY (model, run_id, seq)
""",
}
"""DDL of every table, by name; `{db}` is the database."""


def create_statements(database: str) -> list[str]:
    """The statements that create the database and every table, idempotently, in order."""
    return [f"CREATE DATABASE IF NOT EXISTS {database}"] + [
        ddl.format(db=database).strip() for ddl in TABLES.values()
    ]
