"""Settings of the features service (env `SLUICE_FEATURES_*` plus the shared ones)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.common.settings import SluiceSettings


class FeaturesSettings(SluiceSettings):
    """Where the definitions are, how the stream is laid out, batched and served."""

    features_definitions: Path = Field(
        Path("deploy/demo/features.yaml"), description="Feature definitions file (YAML or JSON)."
    )
    features_source_topic: str | None = Field(
        None,
        description="Read every definition's events from this topic instead of its own "
        "`source` (run the same definitions against a copy of the stream).",
    )
    features_app_id: str = Field(
        "sluice-features",
        description="Consumer group of the stream and namespace of its offset markers in Redis.",
    )
    features_runtime: Literal["faust", "worker"] = Field(
        "faust",
        description="What drives the stream: the faust-streaming app, or the shared "
        "confluent-kafka worker loop (`services.common.worker`), 3-4x faster per process.",
    )
    features_repartition_topic: str = Field(
        "sluice.features.repartition",
        description="Internal topic that re-keys observations by entity (created if missing).",
    )
    features_repartition_partitions: int = Field(
        8,
        ge=1,
        description="Partitions of the repartition topic; fixed for the life of its state.",
    )
    features_batch_size: int = Field(
        8000,
        ge=1,
        description="Most source events routed, or repartition messages applied, at once "
        "(a live stream's batches close after the wait; a backlog's fill up: ~1.6x faster "
        "than 2,000 with the worker runtime here).",
    )
    features_batch_wait_ms: float = Field(
        50.0, ge=0, description="Longest wait after a batch's first message for the batch to fill."
    )
    features_commit_observations: int = Field(
        5000, ge=1, description="Observations per Redis commit when a backlog is applied."
    )
    features_cache_entities: int = Field(
        100_000, ge=0, description="Entity windows kept in memory (others are reloaded from Redis)."
    )
    features_broker_session_timeout_s: float = Field(
        10.0,
        gt=0,
        description="faust consumer session timeout: how soon a dead member's partitions move.",
    )
    features_broker_rebalance_timeout_s: float = Field(
        10.0, gt=0, description="faust consumer rebalance timeout."
    )
    features_data_dir: Path = Field(
        Path(".sluice/features"), description="faust's data directory (it keeps no tables here)."
    )
    features_http_host: str = Field("0.0.0.0", description="Interface of the HTTP API.")
    features_http_port: int = Field(
        8102,
        ge=0,
        le=65535,
        description="Port of /v1/features, /healthz, /readyz and /metrics; 0 = no HTTP server.",
    )
    features_api_keys: str = Field(
        "",
        description="API keys of the HTTP API, comma-separated `name:sha256-of-key:role+role` "
        "(the gateway's format); reading an entity's features needs `admin`. Empty = no keys "
        "required (local dev).",
    )
