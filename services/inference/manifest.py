"""The manifest of one model version (`<root>/<model>/<version>/manifest.json`) and its profile.

A manifest says how to build the model's input matrix (which feature goes in which column, where
it comes from, its default), which output is the score, the sha256 of `model.onnx`, the training
metrics and the reference profile that the monitor measures drift against.

Surprises:
- The served matrix is always float32, whatever a feature's `dtype`; `dtype` describes the
  value's type before that cast (and makes `bool` features profile as categorical).
- The manifest forbids unknown fields: it is written by people, and a typo such as `defualt`
  must fail loudly instead of silently serving without a default.
- Binning rule shared with the monitor: a value `x` falls into bin
  `searchsorted(bin_edges[1:-1], x, side="right")`, i.e. the first edge acts as -inf and the
  last as +inf, so live values outside the reference range land in the outer bins
  (`bin_index`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

QUANTILES: tuple[str, ...] = ("0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99")
"""The quantile levels every numeric profile records, as their JSON keys."""

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
"""A model name: safe as one path segment and as a Kafka key part."""

VersionName = Annotated[str, Field(pattern=r"^[0-9]{1,18}$")]
"""A version: digits only, like Triton; versions sort numerically."""

_FRACTION_SUM_TOLERANCE = 1e-6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSpec(_Strict):
    """One column of the model's input matrix and where its value comes from.

    Request features are read from the request's `features[field]`; online features from the
    online store under entity `entity` and feature name `feature`. `field` and `feature` default
    to `name`. A feature without a `default` is required: a request missing it is answered with
    an error instead of a score.
    """

    name: str = Field(min_length=1, description="The model's input column name.")
    source: Literal["request", "online"] = "request"
    entity: str | None = Field(None, description="Online only: entity name, e.g. `card`.")
    feature: str | None = Field(None, description="Online only: name in the online store.")
    field: str | None = Field(None, description="Request only: the request's feature key.")
    dtype: Literal["float32", "float64", "int64", "int32", "bool"] = "float32"
    default: float | None = Field(None, description="Value when missing; None = required.")
    allow_nan: bool = Field(False, description="Whether NaN may be served to the model.")

    @model_validator(mode="after")
    def _check_source(self) -> FeatureSpec:
        if self.source == "online":
            if not self.entity:
                raise ValueError(f"online feature {self.name!r} needs an `entity`")
            if self.field is not None:
                raise ValueError(f"online feature {self.name!r} cannot have a request `field`")
            self.feature = self.feature or self.name
        else:
            if self.entity is not None or self.feature is not None:
                raise ValueError(
                    f"request feature {self.name!r} cannot have `entity`/`feature` "
                    "(those are for source='online')"
                )
            self.field = self.field or self.name
        return self


class OutputSpec(_Strict):
    """One ONNX output; `None` in `shape` is a symbolic dimension (usually the batch)."""

    name: str = Field(min_length=1)
    meaning: str = ""
    shape: list[int | None] = Field(default_factory=list)


class NumericProfile(_Strict):
    """Distribution of one numeric column in the reference sample.

    `count` is the number of non-missing values; statistics are over those. A column with no
    non-missing value has `None` statistics and no bins. `bin_fractions[i]` is the share of
    non-missing values in bin `i` under the rule of `bin_index`.
    """

    kind: Literal["numeric"] = "numeric"
    count: int = Field(ge=0)
    missing_rate: float = Field(ge=0.0, le=1.0)
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    max: float | None = None
    quantiles: dict[str, float] = Field(default_factory=dict)
    bin_edges: list[float] = Field(default_factory=list)
    bin_fractions: list[float] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_bins(self) -> NumericProfile:
        edges, fractions = self.bin_edges, self.bin_fractions
        if not edges and not fractions:
            return self
        if len(edges) < 2 or len(fractions) != len(edges) - 1:
            raise ValueError(
                f"{len(edges)} bin edges need {max(len(edges) - 1, 1)} fractions, "
                f"got {len(fractions)}"
            )
        if any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
            raise ValueError("bin_edges must be strictly increasing")
        if abs(math.fsum(fractions) - 1.0) > _FRACTION_SUM_TOLERANCE:
            raise ValueError(f"bin_fractions sum to {math.fsum(fractions)}, not 1")
        return self


class CategoricalProfile(_Strict):
    """Distribution of one categorical column: share of each value among non-missing rows."""

    kind: Literal["categorical"] = "categorical"
    count: int = Field(ge=0)
    missing_rate: float = Field(ge=0.0, le=1.0)
    frequencies: dict[str, float] = Field(default_factory=dict)


ColumnProfile = Annotated[NumericProfile | CategoricalProfile, Field(discriminator="kind")]


class ReferenceProfile(_Strict):
    """The reference the monitor compares live traffic with: one profile per feature, the score."""

    features: dict[str, ColumnProfile]
    prediction: NumericProfile
    rows: int = Field(ge=0)


class Manifest(_Strict):
    """Everything Sluiceway needs to serve and watch one model version besides `model.onnx`.

    `features` is ordered: feature `i` is column `i` of the single float32 input `input_name`.
    The score of a row is `outputs[score_output][row, score_index]` (or `[row]` for a rank-1
    output). `sha256` may be empty in a hand-written manifest; `register` fills it.
    """

    model: ModelName
    version: VersionName
    framework: str = Field("onnx", description="sklearn, lightgbm, xgboost, pytorch, onnx …")
    input_name: str = Field(min_length=1)
    features: list[FeatureSpec] = Field(min_length=1)
    outputs: list[OutputSpec] = Field(min_length=1)
    score_output: str
    score_index: int = Field(0, ge=0)
    decision_threshold: float = 0.5
    sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    metrics: dict[str, float] = Field(default_factory=dict)
    reference: ReferenceProfile | None = None
    created_at_ms: int = Field(ge=0)
    description: str = ""

    @model_validator(mode="after")
    def _check_consistency(self) -> Manifest:
        names = [feature.name for feature in self.features]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate feature names: {duplicates}")
        outputs = [output.name for output in self.outputs]
        if self.score_output not in outputs:
            raise ValueError(f"score_output {self.score_output!r} is not among outputs {outputs}")
        if self.reference is not None and set(self.reference.features) != set(names):
            raise ValueError(
                "reference profile features differ from features: "
                f"missing {sorted(set(names) - set(self.reference.features))}, "
                f"extra {sorted(set(self.reference.features) - set(names))}"
            )
        return self

    @property
    def feature_names(self) -> list[str]:
        """Input column names, in matrix order."""
        return [feature.name for feature in self.features]

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read and validate a manifest file; raises pydantic's `ValidationError` if invalid."""
        return cls.model_validate_json(Path(path).read_bytes())

    def save(self, path: str | Path) -> Path:
        """Write the manifest as indented JSON (fields with defaults included) and return path."""
        target = Path(path)
        target.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return target


def bin_index(edges: Sequence[float] | np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bin of each value under a profile's edges: the first/last edge act as -inf/+inf.

    Values equal to an interior edge belong to the bin on its right. NaN lands in the last bin,
    so callers drop missing values first.
    """
    return np.searchsorted(np.asarray(edges, dtype=np.float64)[1:-1], values, side="right")


def _numeric_edges(column: np.ndarray, bins: int) -> np.ndarray:
    """Deduplicated quantile edges of a non-empty column; a constant `c` gets three bins.

    The three bins of a constant column (below, exactly, above `c`) keep a later change in
    either direction visible to drift statistics, which one all-covering bin would hide.
    """
    edges = np.unique(np.quantile(column, np.linspace(0.0, 1.0, bins + 1)))
    if edges.size >= 2:
        return edges
    c = float(edges[0])
    above = np.nextafter(c, math.inf)
    return np.array([np.nextafter(c, -math.inf), c, above, np.nextafter(above, math.inf)])


def _numeric_profile(column: np.ndarray, rows: int, bins: int) -> NumericProfile:
    present = column[np.isfinite(column)]
    missing_rate = 1.0 - present.size / rows if rows else 0.0
    if present.size == 0:
        return NumericProfile(count=0, missing_rate=missing_rate)
    levels = np.array([float(level) for level in QUANTILES])
    edges = _numeric_edges(present, bins)
    counts = np.bincount(bin_index(edges, present), minlength=edges.size - 1)
    return NumericProfile(
        count=int(present.size),
        missing_rate=missing_rate,
        mean=float(present.mean()),
        std=float(present.std()),
        min=float(present.min()),
        max=float(present.max()),
        quantiles=dict(zip(QUANTILES, np.quantile(present, levels).tolist(), strict=True)),
        bin_edges=edges.tolist(),
        bin_fractions=(counts / present.size).tolist(),
    )


def _category_label(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


def _categorical_profile(column: np.ndarray, rows: int) -> CategoricalProfile:
    present = column[np.isfinite(column)]
    values, counts = np.unique(present, return_counts=True)
    return CategoricalProfile(
        count=int(present.size),
        missing_rate=1.0 - present.size / rows if rows else 0.0,
        frequencies={
            _category_label(float(value)): float(count / present.size)
            for value, count in zip(values, counts, strict=True)
        },
    )


def build_profile(
    matrix: np.ndarray,
    feature_names: Sequence[str],
    scores: np.ndarray,
    bins: int = 10,
    *,
    categorical: Collection[str] = (),
) -> ReferenceProfile:
    """Profile a reference sample: each column of `matrix` (rows x features) and the scores.

    Numeric columns get `bins` quantile bins (fewer when quantiles tie; see `_numeric_edges`),
    categorical columns (named in `categorical`) value frequencies. NaN and +-inf count as
    missing and are left out of every statistic but `missing_rate`. Computed in float64.
    """
    data = np.asarray(matrix, dtype=np.float64)
    if data.ndim != 2 or data.shape[1] != len(feature_names):
        raise ValueError(
            f"matrix of shape {data.shape} does not match {len(feature_names)} feature names"
        )
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    rows = data.shape[0]
    profiles: dict[str, NumericProfile | CategoricalProfile] = {
        name: (
            _categorical_profile(data[:, i], rows)
            if name in categorical
            else _numeric_profile(data[:, i], rows, bins)
        )
        for i, name in enumerate(feature_names)
    }
    prediction = np.asarray(scores, dtype=np.float64).reshape(-1)
    if prediction.size != rows:
        raise ValueError(f"{prediction.size} scores for {rows} rows")
    return ReferenceProfile(
        features=profiles, prediction=_numeric_profile(prediction, rows, bins), rows=rows
    )
