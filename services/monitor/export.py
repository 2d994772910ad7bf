"""The monitor's Prometheus series: the latest window's figures per model, version and route,
and which alerts are firing. Names follow `sluice_monitor_<thing>_<unit>`; labels are model,
version, route, feature, method, metric — bounded by the model repository, never per request.

A gauge holds the value of the most recent window computed for its series; the data-age gauge is
refreshed every cycle, so it keeps growing while a series receives no traffic.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import metric

SERIES = ("model", "version", "route")


class AnalyzerMetrics:
    """Every series the analyzer exports."""

    def __init__(self) -> None:
        self.requests = metric(
            Gauge, "sluice_monitor_window_requests", "Predictions in the latest window", SERIES
        )
        self.error_ratio = metric(
            Gauge, "sluice_monitor_error_ratio", "Share of error predictions, latest window",
            SERIES,
        )  # fmt: skip
        self.latency = metric(
            Gauge,
            "sluice_monitor_latency_seconds",
            "End-to-end prediction latency quantiles, latest window",
            [*SERIES, "quantile"],
        )
        self.data_age = metric(
            Gauge,
            "sluice_monitor_data_age_seconds",
            "Seconds since the newest prediction of the series (request time)",
            SERIES,
        )
        self.gpu = metric(
            Gauge, "sluice_monitor_gpu_utilization_ratio", "GPU utilisation of the monitor host"
        )
        self.drift = metric(
            Gauge,
            "sluice_monitor_drift",
            "Drift statistic, latest window (kind: feature, prediction, champion)",
            [*SERIES, "kind", "feature", "method"],
        )
        self.quality = metric(
            Gauge,
            "sluice_monitor_quality",
            "Label-based quality metric, latest refreshed window",
            [*SERIES, "metric"],
        )
        self.label_delay = metric(
            Gauge,
            "sluice_monitor_label_delay_seconds",
            "Median delay from prediction to label, latest refreshed window",
            SERIES,
        )
        self.alert_active = metric(
            Gauge,
            "sluice_monitor_alert_active",
            "1 while the monitor's alert for the series is firing (after hysteresis)",
            [*SERIES, "kind", "metric", "feature"],
        )
        self.alerts = metric(
            Counter, "sluice_monitor_alerts_total", "Alert transitions published",
            ["kind", "state"],
        )  # fmt: skip
        self.last_window_end = metric(
            Gauge,
            "sluice_monitor_last_window_end_timestamp_seconds",
            "End of the newest window computed (epoch seconds)",
        )
        self.cycle_seconds = metric(
            Histogram,
            "sluice_monitor_cycle_seconds",
            "Duration of one analyzer cycle",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
