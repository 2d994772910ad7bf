"""Settings of the monitor (env `SLUICE_MONITOR_*` plus the shared ones)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import SluiceSettings
from services.monitor.policy import DEFAULT_DRIFT_THRESHOLDS, DriftMethod, ModelPolicy

SinkTable = Literal["predictions", "labels", "events"]


class MonitorSettings(SluiceSettings):
    """Where the monitor reads and writes, how it batches, windows and alerts."""

    monitor_group_id: str = Field(
        "sluice-monitor", description="Consumer group prefix; each sink uses `<prefix>.<table>`."
    )
    monitor_sinks: list[SinkTable] = Field(
        default_factory=lambda: ["predictions", "labels", "events"],
        description="Tables this process fills from their topics (JSON list; [] = none).",
    )
    monitor_sink_batch_size: int = Field(
        5000, ge=1, le=100_000, description="Most messages per ClickHouse insert (size flush)."
    )
    monitor_sink_max_wait_ms: float = Field(
        500.0, ge=0, description="Longest wait after a batch's first message (time flush)."
    )
    monitor_analyzer: bool = Field(
        True, description="Compute windows and alerts here; run it in one replica only."
    )
    monitor_models: list[str] = Field(
        default_factory=list,
        description="Models this analyzer handles (JSON list; [] = all): shard by model.",
    )
    monitor_interval_s: int = Field(
        60, ge=1, description="Step of the rolling windows: one window ends every interval."
    )
    monitor_window_s: int = Field(
        300, ge=1, description="Length of a drift/health window (>= interval: sliding windows)."
    )
    monitor_lateness_s: int = Field(
        15, ge=0, description="How long after its end a window waits for late rows."
    )
    monitor_max_catchup_windows: int = Field(
        10, ge=1, description="Most missed windows computed after a pause or restart."
    )
    monitor_quality_window_s: int = Field(
        3600, ge=1, description="Length of a quality window (tumbling, by prediction time)."
    )
    monitor_quality_refresh_s: int = Field(
        300, ge=1, description="How often windows with newly arrived labels are recomputed."
    )
    monitor_label_horizon_s: int = Field(
        7 * 86400, ge=1, description="Labels for predictions older than this are not joined."
    )
    monitor_freshness_lookback_s: int = Field(
        3600, ge=1, description="Series seen within this span get a data-age gauge and check."
    )
    monitor_min_samples: int = Field(
        100, ge=1, description="Fewest values a column needs in a window to be tested."
    )
    monitor_min_labels: int = Field(
        100, ge=1, description="Fewest labelled predictions before quality alerts are checked."
    )
    monitor_small_sample_max: int = Field(
        1000, ge=0, description="Reference size up to which p-value tests (KS, chi²) are chosen."
    )
    monitor_drift_thresholds: dict[DriftMethod, float] = Field(
        default_factory=lambda: dict(DEFAULT_DRIFT_THRESHOLDS),
        description="Threshold per method (p-value for ks/chisquare, distance otherwise).",
    )
    monitor_psi_critical: float = Field(
        0.25, gt=0, description="PSI at or above which a drift alert is critical."
    )
    monitor_max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Error rate above which an `errors` alert fires."
    )
    monitor_min_requests: int = Field(
        20, ge=1, description="Fewest requests in a window before error/latency are checked."
    )
    monitor_max_p99_ms: float = Field(
        500.0, gt=0, description="p99 latency (ms) above which a `latency` alert fires."
    )
    monitor_max_freshness_s: float = Field(
        300.0, gt=0, description="Data age (s) above which a `freshness` alert fires."
    )
    monitor_min_auc: float | None = Field(
        None, ge=0, le=1, description="AUC below which a `quality` alert fires (None = none)."
    )
    monitor_max_auc_drop: float = Field(
        0.05, ge=0, description="Else: alert when AUC < the manifest's `metrics.auc` minus this."
    )
    monitor_min_agreement: float = Field(
        0.9, ge=0, le=1, description="Shadow/live agreement below which an alert fires."
    )
    monitor_hysteresis_band: float = Field(
        0.2,
        ge=0,
        lt=1,
        description="An alert resolves only once the value is this far back inside the "
        "threshold (share of threshold, or of the way to 1 for lower-is-worse metrics).",
    )
    monitor_fire_after: int = Field(
        1, ge=1, description="Consecutive breached windows before an alert fires."
    )
    monitor_clear_after: int = Field(
        2, ge=1, description="Consecutive recovered windows before an alert resolves."
    )
    monitor_overrides: dict[str, ModelPolicy] = Field(
        default_factory=dict, description="Per-model thresholds and methods (JSON by model)."
    )
    metrics_port: int = Field(9102, ge=0, le=65535, description="Port of /metrics, /readyz.")

    def policy(self, model: str) -> ModelPolicy | None:
        """The overrides of `model`, if any."""
        return self.monitor_overrides.get(model)

    def scope(self) -> dict[str, object]:
        """The `all_models`/`models` parameters of sql.SCOPE for `monitor_models`."""
        return {
            "all_models": 0 if self.monitor_models else 1,
            "models": tuple(self.monitor_models) or ("",),
        }
