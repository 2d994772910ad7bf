"""Settings of the rollout controller (env `SLUICE_ROLLOUT_*` plus the shared ones)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from services.common.settings import SluiceSettings


class RolloutSettings(SluiceSettings):
    """Where the controller listens, how often it evaluates, who may operate it."""

    rollout_http_host: str = Field("0.0.0.0", description="Interface of the operator API.")
    rollout_http_port: int = Field(
        8082, ge=0, le=65535, description="Port of the operator API, /metrics, /healthz, /readyz."
    )
    rollout_eval_interval_s: float = Field(
        10.0,
        ge=0.2,
        description="Seconds between gate evaluations of each active rollout; an alert on "
        "`sluice.alerts` for a candidate triggers one at once.",
    )
    rollout_record_wait_every_s: float = Field(
        60.0,
        ge=0,
        description="An evaluation that only waits, like the one before it, is recorded at most "
        "this often (0 = record every one); transitions and failures are always recorded.",
    )
    rollout_admin_keys: list[SecretStr] = Field(
        default_factory=list,
        description="API keys of the admin role (JSON list). With any key configured, changing "
        "a rollout needs an admin key and reading one needs any key.",
    )
    rollout_viewer_keys: list[SecretStr] = Field(
        default_factory=list, description="API keys that may only read status and history."
    )
    rollout_clickhouse_timeout_s: float = Field(
        10.0, gt=0, description="Timeout of one ClickHouse statement (evidence, decision log)."
    )
    rollout_publish_timeout_s: float = Field(
        10.0, gt=0, description="How long a routing table may wait for the broker's ack."
    )
    rollout_retrain_hook: str = Field(
        "",
        description="Command run (no shell) when a champion's alert calls for a retrain; it "
        "registers a new version and prints JSON with its `version` last (see "
        "docs/rollouts.md). Empty = no automatic retraining.",
    )
    rollout_retrain_plan: Path | None = Field(
        None,
        description="Rollout plan template (YAML) for a retrained version; its `candidate` is "
        "replaced by the new version. Required with a hook.",
    )
    rollout_retrain_on: list[str] = Field(
        default_factory=lambda: ["drift", "prediction_drift", "quality"],
        description="Alert kinds on a champion that trigger a retrain (JSON list).",
    )
    rollout_retrain_cooldown_s: float = Field(
        1800.0, ge=0, description="Least seconds between two retrain runs of one model."
    )
    rollout_retrain_timeout_s: float = Field(
        1800.0, gt=0, description="A retrain hook running longer is killed (the run fails)."
    )
    rollout_retrain_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower than the controller's the hook's CPU priority is (Unix "
        "niceness added, capped at 19), so training on a machine that also serves yields "
        "the CPU to serving; 0 = the same priority.",
    )
