"""Settings of the inference service (env `SLUICE_INFERENCE_*` plus the shared ones)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import SluiceSettings


class InferenceSettings(SluiceSettings):
    """How the inference consumers batch, where they find models and what they run on."""

    inference_requests_topic: str = Field(
        "sluice.requests", description="Topic of prediction requests (isolate tenants or runs)."
    )
    inference_predictions_topic: str = Field(
        "sluice.predictions", description="Topic predictions are written to."
    )
    inference_partition_slice_ms: int = Field(
        20,
        ge=1,
        description="Predictions that answer no gateway (asynchronous requests, shadow copies) "
        "go to one partition of the predictions topic per time slice of this length, "
        "partitions taking turns, as the gateway places synchronous requests: one record batch "
        "per produce instead of one per partition. Their key stays the entity id.",
    )
    inference_group_id: str = Field(
        "sluice-inference", description="Consumer group of the request consumers."
    )
    inference_max_batch_size: int = Field(
        256, ge=1, le=8192, description="Most requests scored in one batch."
    )
    inference_max_delay_ms: float = Field(
        2.0, ge=0, description="Longest wait after a batch's first request for it to fill."
    )
    inference_adaptive: bool = Field(
        False, description="Tune the wait to `inference_target_p99_ms` instead of fixing it."
    )
    inference_target_p99_ms: float = Field(
        20.0, gt=0, description="p99 latency target of the adaptive batch policy."
    )
    inference_provider: Literal["auto", "cuda", "tensorrt", "cpu"] = Field(
        "auto", description="ONNX Runtime provider; auto = CUDA when a GPU is usable, else CPU."
    )
    inference_intra_op_threads: int = Field(
        1, ge=0, description="ONNX Runtime intra-op threads per session (0 = ORT default)."
    )
    inference_max_request_features: int = Field(
        1024, ge=1, description="Requests carrying more request-time features are refused."
    )
    inference_shadow_enabled: bool = Field(True, description="Score sampled shadow copies.")
    metrics_port: int = Field(9101, ge=0, le=65535, description="Port of /metrics, /readyz.")
