"""What the monitor checks and against which thresholds: defaults like Evidently's, overridable
per model and per feature through `SLUICE_MONITOR_OVERRIDES` (JSON).

Drift test choice (`choose_method`), as Evidently does it, by column type and the size of the
reference sample:

| column | reference size | method | drifted when |
|---|---|---|---|
| numeric | <= `monitor_small_sample_max` (1000) | ks | p-value < 0.05 |
| categorical | <= 1000 | chisquare | p-value < 0.05 |
| numeric | > 1000 | wasserstein (normed) | value >= 0.1 |
| categorical | > 1000 | jensenshannon | value >= 0.1 |

A p-value test flags about 5% of windows of an unchanged column by design (that is what p < 0.05
means), so with a small reference expect occasional single-window alerts; raise
`monitor_fire_after` to require consecutive windows. With a large reference the distance
thresholds flag practically nothing by chance. Windows with fewer than `monitor_min_samples`
values are not tested at all. PSI (bands 0.1 / 0.25) is computed besides the chosen method for
every column, so drift can be compared across features and over time on one scale.

Overrides example (every key optional; `"*"` applies to all features of the model):

    {"fraud": {"features": {"*": {"method": "psi"}, "amount": {"threshold": 0.2}},
               "max_error_rate": 0.01, "min_auc": 0.8}}
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class DriftMethod(StrEnum):
    """A drift statistic, by the name stored in the `drift.method` column."""

    psi = "psi"
    jensenshannon = "jensenshannon"
    ks = "ks"
    chisquare = "chisquare"
    wasserstein = "wasserstein"


P_VALUE_METHODS = frozenset({DriftMethod.ks, DriftMethod.chisquare})
"""Methods whose threshold is a p-value (drift when p < threshold); the rest are distances
(drift when value >= threshold)."""

DEFAULT_DRIFT_THRESHOLDS: dict[DriftMethod, float] = {
    DriftMethod.ks: 0.05,
    DriftMethod.chisquare: 0.05,
    DriftMethod.wasserstein: 0.1,
    DriftMethod.jensenshannon: 0.1,
    DriftMethod.psi: 0.1,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeaturePolicy(_Strict):
    """How one feature (or the score) is checked; unset fields fall back to the defaults."""

    method: DriftMethod | None = Field(None, description="Force this method instead of auto.")
    threshold: float | None = Field(None, gt=0, description="Threshold of the chosen method.")
    enabled: bool = Field(True, description="False: compute nothing for this column.")


class ModelPolicy(_Strict):
    """Per-model overrides of the monitor's default thresholds (None = keep the default)."""

    features: dict[str, FeaturePolicy] = Field(
        default_factory=dict, description='By feature name; "*" for every feature.'
    )
    prediction: FeaturePolicy = Field(
        default_factory=FeaturePolicy, description="Drift check of the score."
    )
    max_error_rate: float | None = Field(None, ge=0, le=1)
    max_p99_ms: float | None = Field(None, gt=0)
    max_freshness_s: float | None = Field(None, gt=0)
    min_auc: float | None = Field(None, ge=0, le=1)
    min_agreement: float | None = Field(None, ge=0, le=1)


ColumnKind = Literal["numeric", "categorical"]


def choose_method(kind: ColumnKind, reference_size: int, small_sample_max: int) -> DriftMethod:
    """The automatic drift method for a column of `kind` (see the module's table)."""
    small = reference_size <= small_sample_max
    if kind == "categorical":
        return DriftMethod.chisquare if small else DriftMethod.jensenshannon
    return DriftMethod.ks if small else DriftMethod.wasserstein


def feature_policy(policy: ModelPolicy | None, feature: str) -> FeaturePolicy:
    """The policy of one feature: its own entry, else the model's `"*"`, else the default."""
    if policy is None:
        return FeaturePolicy()
    return policy.features.get(feature) or policy.features.get("*") or FeaturePolicy()
