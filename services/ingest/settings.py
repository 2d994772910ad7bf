"""Settings of the HTTP gateway (env `SLUICE_INGEST_*` plus the shared ones)."""

from __future__ import annotations

from pydantic import Field

from services.common.settings import SluiceSettings


class IngestSettings(SluiceSettings):
    """Where the gateway listens, how long it waits, and what it protects itself with."""

    ingest_host: str = Field("127.0.0.1", description="Address the HTTP server binds to.")
    ingest_port: int = Field(8080, ge=1, le=65535, description="HTTP port.")
    ingest_grpc_port: int = Field(
        8081,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service (GRPCInferenceService), "
        "on the same address as HTTP; 0 = no gRPC. Opened with SO_REUSEPORT so that the worker "
        "processes share it: give two gateways on one host different ports.",
    )
    ingest_default_timeout_ms: int = Field(
        1000, ge=1, description="Deadline of a synchronous prediction when the caller sets none."
    )
    ingest_max_timeout_ms: int = Field(
        30_000, ge=1, description="Longest deadline a caller may ask for."
    )
    ingest_max_in_flight: int = Field(
        4096, ge=1, description="Synchronous predictions waiting at once; more get 429."
    )
    ingest_max_loop_lag_ms: float = Field(
        0.0,
        ge=0,
        description="Synchronous predictions get 429 while the gateway's event loop runs this "
        "far behind (requests wait that long before their handler starts); 0 = never (the "
        "default until the suite and the soak have run with it on; 250 is the candidate).",
    )
    ingest_max_body_bytes: int = Field(
        8 * 1024 * 1024, ge=1024, description="Largest request body; larger ones get 413."
    )
    ingest_max_batch_items: int = Field(
        10_000, ge=1, description="Most entities in predict:batch, rows in infer, lines posted."
    )
    ingest_partition_slice_ms: int = Field(
        20,
        ge=1,
        description="Synchronous requests, and their replies, go to one partition per time slice "
        "of this length, partitions taking turns (sticky partitioning, as Kafka's KIP-480 does "
        "for keyless records), so requests sent together share produce batches. The request's "
        "key stays the entity id.",
    )
    ingest_linger_ms: float = Field(
        5.0,
        ge=0,
        description="librdkafka `linger.ms` of the gateway's producer: how long a request waits "
        "for others to share its produce batch. Fewer, fuller batches cost the broker less per "
        "request. Lower it for the last few milliseconds of latency at low load.",
    )
    ingest_reply_group: str = Field(
        "sluice-gateway",
        description="Consumer group of the gateways on sluice.predictions: each instance is "
        "assigned its own reply partitions.",
    )
    ingest_api_keys: str = Field(
        "",
        description="API keys, comma-separated `name:sha256-of-key:role+role` (roles predict, "
        "ingest, admin). Empty = no keys required (local dev). `sluice gateway hash-key` "
        "prints an entry.",
    )
    ingest_idempotency_ttl_s: float = Field(
        300.0, ge=0, description="How long a finished request id is remembered (idempotency)."
    )
    ingest_workers: int = Field(1, ge=1, description="HTTP worker processes.")
