"""Drift of one column in one window: the reference profile's bins, the current counts in them,
and the statistics that compare the two. Pure: the counts come from ClickHouse (`sql.py` bins
values there with the same rule as `bin_index`), the verdicts go to the `drift` table.

Bins of a numeric column are the profile's: value `x` falls in `searchsorted(interior_edges, x,
side="right")`, the outer bins reaching to ±infinity. Bins of a categorical column are its
reference categories in profile order plus a last "unseen" bin (reference share 0). Missing
values (NaN, ±inf) are counted apart and never binned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from services.inference.client import (
    CategoricalProfile,
    NumericProfile,
)
from services.monitor import stats
from services.monitor.policy import (
    P_VALUE_METHODS,
    ColumnKind,
    DriftMethod,
    FeaturePolicy,
    choose_method,
)


@dataclass(frozen=True)
class ReferenceBins:
    """A reference column ready for comparison.

    `fractions[i]` is the reference share of bin `i`. Numeric: `interior_edges` (len bins − 1),
    `points` each bin's representative value (Wasserstein's support, see `bin_medians`) and
    `scale` the reference std. Categorical:
    `categories` are the category values as floats, one bin each, plus the unseen bin.
    """

    kind: ColumnKind
    fractions: np.ndarray
    size: int
    missing_rate: float
    interior_edges: np.ndarray
    categories: np.ndarray
    points: np.ndarray
    scale: float

    @property
    def bins(self) -> int:
        """Number of bins, the unseen-category bin included."""
        return int(self.fractions.size)

    @property
    def reference_counts(self) -> np.ndarray:
        """Reference counts per bin, `round(fraction · size)` (what the profile was built from)."""
        return np.round(self.fractions * self.size)


def reference_bins(profile: NumericProfile | CategoricalProfile) -> ReferenceBins | None:
    """The bins of a profile; None when the reference had no non-missing value."""
    if profile.count == 0:
        return None
    if isinstance(profile, CategoricalProfile):
        if not profile.frequencies:
            return None
        return ReferenceBins(
            kind="categorical",
            fractions=np.append(np.array(list(profile.frequencies.values()), np.float64), 0.0),
            size=profile.count,
            missing_rate=profile.missing_rate,
            interior_edges=np.empty(0),
            categories=np.array([float(label) for label in profile.frequencies], np.float64),
            points=np.empty(0),
            scale=0.0,
        )
    if len(profile.bin_edges) < 2:
        return None
    edges = np.asarray(profile.bin_edges, dtype=np.float64)
    return ReferenceBins(
        kind="numeric",
        fractions=np.asarray(profile.bin_fractions, dtype=np.float64),
        size=profile.count,
        missing_rate=profile.missing_rate,
        interior_edges=edges[1:-1],
        categories=np.empty(0),
        points=bin_medians(profile),
        scale=float(profile.std or 0.0),
    )


def bin_medians(profile: NumericProfile) -> np.ndarray:
    """Each bin's median in the reference: its representative point for Wasserstein.

    The reference CDF is known at the bin edges (cumulative fractions) and at the profile's
    stored quantiles; the bin median is that CDF's inverse, linearly interpolated, at the bin's
    middle probability. Bin centres would put the outer bins' mass halfway to the extreme
    values and make the statistic noisy on skewed or long-tailed columns.
    """
    edges = np.asarray(profile.bin_edges, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(profile.bin_fractions)])
    cumulative[-1] = 1.0
    levels = np.array([float(level) for level in profile.quantiles], dtype=np.float64)
    probabilities = np.concatenate([cumulative, levels])
    values = np.concatenate([edges, np.array(list(profile.quantiles.values()), np.float64)])
    order = np.lexsort((values, probabilities))
    middles = (cumulative[:-1] + cumulative[1:]) / 2
    return np.maximum.accumulate(np.interp(middles, probabilities[order], values[order]))


@dataclass(frozen=True)
class DriftVerdict:
    """One statistic of one column in one window, as a `drift` row holds it.

    `value` is the statistic (KS D, chi² X², or a distance); p-value methods also carry
    `p_value`, and their threshold applies to it. `drifted` is `p_value < threshold` for
    p-value methods, `value >= threshold` otherwise.
    """

    method: str
    value: float
    p_value: float | None
    threshold: float
    drifted: bool

    @property
    def checked_value(self) -> float:
        """The number compared with the threshold (the p-value for p-value methods)."""
        return self.p_value if self.p_value is not None else self.value

    @property
    def direction(self) -> Literal["above", "below"]:
        """Which side of the threshold is bad."""
        return "below" if self.p_value is not None else "above"


ORDER_FREE = {
    DriftMethod.ks: DriftMethod.chisquare,
    DriftMethod.wasserstein: DriftMethod.jensenshannon,
}
"""Categories have no order, so KS and Wasserstein asked of a categorical column become their
order-free counterparts of the same kind (a p-value test, a distance)."""


def evaluate(
    method: DriftMethod, reference: ReferenceBins, counts: np.ndarray, threshold: float
) -> DriftVerdict:
    """One drift statistic of current `counts` (per bin) against `reference`.

    For a categorical column, KS and Wasserstein are replaced per `ORDER_FREE`.
    """
    if reference.kind == "categorical":
        method = ORDER_FREE.get(method, method)
    if method in P_VALUE_METHODS:
        test = stats.ks_binned if method is DriftMethod.ks else stats.chi_squared
        value, p_value = test(reference.reference_counts, counts)
        return DriftVerdict(method.value, value, p_value, threshold, p_value < threshold)
    if method is DriftMethod.psi:
        value = stats.psi(reference.fractions, counts)
    elif method is DriftMethod.jensenshannon:
        value = stats.jensen_shannon(reference.fractions, counts)
    else:
        value = stats.wasserstein_normed(
            reference.fractions, counts, reference.points, reference.scale
        )
    return DriftVerdict(method.value, value, None, threshold, value >= threshold)


def verdicts(
    reference: ReferenceBins,
    counts: np.ndarray,
    policy: FeaturePolicy,
    thresholds: dict[DriftMethod, float],
    small_sample_max: int,
) -> list[DriftVerdict]:
    """The chosen method's verdict (first) and PSI's, for one column in one window.

    The method is the policy's or `choose_method`'s; its threshold the policy's or the
    default for that method. PSI is added unless it is the chosen method already.
    """
    method = policy.method or choose_method(reference.kind, reference.size, small_sample_max)
    chosen = evaluate(method, reference, counts, policy.threshold or thresholds[method])
    if method is DriftMethod.psi:
        return [chosen]
    return [chosen, evaluate(DriftMethod.psi, reference, counts, thresholds[DriftMethod.psi])]
