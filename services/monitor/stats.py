"""Drift and quality statistics: pure, vectorised functions, each with its formula.

Drift statistics compare a reference distribution `r` with a current one `c` over the same bins
(numeric features: the reference profile's bins; categorical ones: its categories plus one bin
for unseen values). Both come in as counts or fractions; each function normalises what it needs.

Conventions, so a window can never crash the monitor or write an infinity:
- A distribution with no mass (an empty or all-missing window) gives `nan` ("no evidence");
  callers skip it.
- Empty bins are smoothed only where a formula would otherwise divide by zero or take log(0):
  PSI replaces empty fractions by `PSI_EMPTY_BIN` (Evidently's choice); Jensen-Shannon, KS,
  chi-squared and Wasserstein need no smoothing.
- A constant column is a one-point distribution: every statistic stays finite; Wasserstein's
  normaliser is floored at `WASSERSTEIN_MIN_SCALE` (as Evidently does).

Quality metrics take `weights` so that rows aggregated as (score, label, count) give exactly what
sklearn gives on the expanded rows. A label is positive when it is >= 0.5 and a score predicts
the positive class when it is >= the decision threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

PSI_EMPTY_BIN = 1e-4
"""Fraction used in place of an empty bin's 0 in PSI (Evidently uses 0.0001)."""

WASSERSTEIN_MIN_SCALE = 1e-3
"""Floor of the normalised Wasserstein distance's divisor (Evidently: max(std, 0.001))."""

_NAN = float("nan")


def _distribution(values: np.ndarray | list[float]) -> np.ndarray | None:
    """Counts or fractions as float64 fractions summing to 1; None when there is no mass."""
    array = np.asarray(values, dtype=np.float64)
    total = array.sum()
    if not np.isfinite(total) or total <= 0:
        return None
    return array / total


def psi(reference: np.ndarray, current: np.ndarray, empty_bin: float = PSI_EMPTY_BIN) -> float:
    """Population stability index: `Σ_i (c_i − r_i) · ln(c_i / r_i)` over bin fractions.

    Empty fractions (in either distribution) are replaced by `empty_bin` first, without
    renormalising, as Evidently does. Bands in common use: < 0.1 stable, 0.1–0.25 moderate
    shift, > 0.25 significant shift. `nan` if either side has no mass.
    """
    r, c = _distribution(reference), _distribution(current)
    if r is None or c is None:
        return _NAN
    r = np.where(r > 0, r, empty_bin)
    c = np.where(c > 0, c, empty_bin)
    return float(np.sum((c - r) * np.log(c / r)))


def jensen_shannon(reference: np.ndarray, current: np.ndarray) -> float:
    """Jensen-Shannon distance: `sqrt((KL(r‖m) + KL(c‖m)) / 2)`, `m = (r + c) / 2`, natural log.

    The square root of the JS divergence (scipy's `jensenshannon`), in [0, sqrt(ln 2)];
    `0·ln 0 = 0`, so empty bins need no smoothing. `nan` if either side has no mass.
    """
    r, c = _distribution(reference), _distribution(current)
    if r is None or c is None:
        return _NAN
    m = (r + c) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_r = np.sum(np.where(r > 0, r * np.log(r / m), 0.0))
        kl_c = np.sum(np.where(c > 0, c * np.log(c / m), 0.0))
    return float(math.sqrt(max(0.0, (kl_r + kl_c) / 2)))


def ks_binned(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test on data discretised to shared, ordered bins.

    `D = max_i |R_i − C_i|`, with `R`, `C` the cumulative fractions up to bin `i`; the p-value is
    scipy's asymptotic one, `kstwo.sf(D, round(n·m / (n + m)))` for sample sizes `n`, `m`
    (the counts' sums). Equals `scipy.stats.ks_2samp(a, b, method="asymp")` where `a`, `b` hold
    each value's bin index. Only the reference CDF at the profile's bin edges is known, so this
    is KS evaluated there. Returns `(nan, nan)` if either side is empty.
    """
    r = np.asarray(reference_counts, dtype=np.float64)
    c = np.asarray(current_counts, dtype=np.float64)
    n, m = r.sum(), c.sum()
    if n <= 0 or m <= 0:
        return _NAN, _NAN
    d = float(np.max(np.abs(np.cumsum(r) / n - np.cumsum(c) / m)))
    large, small = max(n, m), min(n, m)
    effective = np.round(large * small / (large + small))
    return d, float(scipy_stats.kstwo.sf(d, effective))


def chi_squared(reference_counts: np.ndarray, current_counts: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-squared test of homogeneity on the 2 × k table `[reference; current]`.

    `X² = Σ (O − E)² / E` with `E` from the row and column totals, over the `k'` bins non-empty
    in at least one row; `p = chi2.sf(X², k' − 1)`. Equals `scipy.stats.chi2_contingency(table,
    correction=False)` on those bins. A bin empty in the reference (e.g. an unseen category) is
    fine: its expected count comes from the pooled total. `(0, 1)` when `k' <= 1` (nothing to
    compare), `(nan, nan)` if either side is empty.
    """
    table = np.vstack(
        [np.asarray(reference_counts, dtype=np.float64), np.asarray(current_counts, np.float64)]
    )
    rows = table.sum(axis=1)
    if rows[0] <= 0 or rows[1] <= 0:
        return _NAN, _NAN
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] <= 1:
        return 0.0, 1.0
    expected = np.outer(rows, table.sum(axis=0)) / rows.sum()
    statistic = float(np.sum((table - expected) ** 2 / expected))
    return statistic, float(scipy_stats.chi2.sf(statistic, table.shape[1] - 1))


def wasserstein_normed(
    reference: np.ndarray, current: np.ndarray, points: np.ndarray, scale: float
) -> float:
    """Wasserstein-1 distance between two distributions on the same sorted points, normalised.

    `W = Σ_i |R_i − C_i| · (x_{i+1} − x_i)` (area between the CDFs), divided by
    `max(scale, WASSERSTEIN_MIN_SCALE)`; `scale` is the reference standard deviation, so 0.1
    means "moved by a tenth of a standard deviation" (Evidently's normed Wasserstein). Equals
    `scipy.stats.wasserstein_distance(points, points, r, c) / scale`. With binned data the
    points are bin representatives (the profile's bin centres). `nan` if either side is empty.
    """
    r, c = _distribution(reference), _distribution(current)
    if r is None or c is None:
        return _NAN
    x = np.asarray(points, dtype=np.float64)
    distance = float(np.sum(np.abs(np.cumsum(r) - np.cumsum(c))[:-1] * np.diff(x)))
    return distance / max(float(scale), WASSERSTEIN_MIN_SCALE)


# -- quality ---------------------------------------------------------------------------------


def _weighted(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64) >= 0.5
    s = np.asarray(scores, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    if not (y.shape == s.shape == w.shape):
        raise ValueError(f"labels {y.shape}, scores {s.shape}, weights {w.shape} differ")
    return y, s, w


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve as the Mann-Whitney probability, ties counted half.

    `AUC = Σ_s w⁺(s) · (W⁻(< s) + ½ w⁻(s)) / (W⁺ · W⁻)` over distinct scores `s`, where
    `w±(s)` is the weight of positives/negatives scoring exactly `s` and `W⁻(< s)` that of
    negatives scoring below it. Equals sklearn's `roc_auc_score(..., sample_weight=weights)`.
    `nan` when only one class is present.
    """
    y, s, w = _weighted(labels, scores, weights)
    positives, negatives = w[y].sum(), w[~y].sum()
    if positives <= 0 or negatives <= 0:
        return _NAN
    distinct, inverse = np.unique(s, return_inverse=True)
    pos = np.bincount(inverse, weights=np.where(y, w, 0.0), minlength=distinct.size)
    neg = np.bincount(inverse, weights=np.where(y, 0.0, w), minlength=distinct.size)
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + neg / 2)) / (positives * negatives))


def log_loss(
    labels: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """Mean cross-entropy: `−Σ w·[y·ln p + (1 − y)·ln(1 − p)] / Σ w`.

    `p` is clipped to `[ε, 1 − ε]` with ε the float64 machine epsilon, as sklearn's `log_loss`
    does, so a confident wrong score costs ~36 instead of infinity. `nan` for no rows.
    """
    y, p, w = _weighted(labels, probabilities, weights)
    if w.sum() <= 0:
        return _NAN
    eps = np.finfo(np.float64).eps
    p = np.clip(p, eps, 1 - eps)
    losses = -np.where(y, np.log(p), np.log1p(-p))
    return float(np.sum(w * losses) / w.sum())


@dataclass(frozen=True)
class Confusion:
    """Weighted confusion counts at one decision threshold."""

    tp: float
    fp: float
    tn: float
    fn: float

    @property
    def accuracy(self) -> float:
        """`(TP + TN) / all`; `nan` for no rows."""
        total = self.tp + self.fp + self.tn + self.fn
        return (self.tp + self.tn) / total if total > 0 else _NAN

    @property
    def precision(self) -> float:
        """`TP / (TP + FP)`; 0 when nothing is predicted positive (sklearn's zero_division)."""
        predicted = self.tp + self.fp
        return self.tp / predicted if predicted > 0 else 0.0

    @property
    def recall(self) -> float:
        """`TP / (TP + FN)`; 0 when there is no positive label (sklearn's zero_division)."""
        actual = self.tp + self.fn
        return self.tp / actual if actual > 0 else 0.0

    @property
    def f1(self) -> float:
        """`2·TP / (2·TP + FP + FN)`, the harmonic mean of precision and recall; 0 if undefined."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator > 0 else 0.0


def confusion(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float = 0.5,
    weights: np.ndarray | None = None,
) -> Confusion:
    """Confusion counts when `score >= threshold` predicts the positive class."""
    y, s, w = _weighted(labels, scores, weights)
    predicted = s >= threshold
    return Confusion(
        tp=float(w[predicted & y].sum()),
        fp=float(w[predicted & ~y].sum()),
        tn=float(w[~predicted & ~y].sum()),
        fn=float(w[~predicted & y].sum()),
    )


def quality_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float = 0.5,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Every quality metric the monitor records, by the name used in the `quality` table:
    auc, log_loss, accuracy, precision, recall, f1 (`nan` entries where undefined)."""
    counts = confusion(labels, scores, threshold, weights)
    return {
        "auc": roc_auc(labels, scores, weights),
        "log_loss": log_loss(labels, scores, weights),
        "accuracy": counts.accuracy,
        "precision": counts.precision,
        "recall": counts.recall,
        "f1": counts.f1,
    }
