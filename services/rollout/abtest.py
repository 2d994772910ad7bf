"""A/B statistics for `ab` steps: pure, vectorised functions, no I/O.

Two tests, both two-sided at level `alpha`, both reported with a confidence interval at
`1 - alpha`:

- **Two-proportion z-test** for binary outcomes (`label_rate`, `correct_rate`). With successes
  `x_a/n_a` (champion) and `x_b/n_b` (candidate), pooled `p = (x_a + x_b) / (n_a + n_b)`:
  `z = (p_b - p_a) / sqrt(p (1 - p) (1/n_a + 1/n_b))`, `p_value = 2 * (1 - Phi(|z|))`. The
  interval of `p_b - p_a` is Wald's, unpooled: `± z_(1-alpha/2) sqrt(p_a q_a / n_a + p_b q_b /
  n_b)` (Newcombe 1998 discusses its small-sample weaknesses; we require large samples).
  `z²` equals the Pearson chi-squared statistic of the 2x2 table without Yates' correction.
- **Mann-Whitney U** for continuous outcomes (`label_value`, `abs_error`), the normal
  approximation with tie correction and continuity correction, as `scipy.stats.mannwhitneyu(...,
  method="asymptotic")`. Its effect size is the probability of superiority `theta = U_b / (n_a
  n_b) = P(B > A) + P(B = A) / 2` (0.5: no difference), with DeLong's variance from placement
  values (DeLong, DeLong & Clarke-Pearson 1988). The mean difference is reported too, with a
  Welch (normal) interval, because operators read "0.8 points more revenue" more easily.

The recommendation: `promote` when the difference is significant and favours the candidate,
`keep_champion` when significant and favouring the champion, otherwise `inconclusive`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import ndtr, ndtri

from services.rollout.plan import RATE_OUTCOMES, AbConfig, AbOutcome

Recommendation = Literal["promote", "keep_champion", "inconclusive"]


@dataclass(frozen=True)
class Comparison:
    """The outcome of one two-sample test; arm A is the champion, arm B the candidate."""

    test: Literal["two_proportion_z", "mann_whitney_u"]
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    difference: float
    """mean_b - mean_a (a rate difference for the z-test)."""
    ci_low: float
    ci_high: float
    statistic: float
    """z for the z-test; U of arm B for Mann-Whitney."""
    p_value: float
    effect: float | None = None
    """Mann-Whitney only: P(B > A) + P(B = A) / 2."""
    effect_ci_low: float | None = None
    effect_ci_high: float | None = None

    def favours_candidate(self) -> bool:
        """Whether arm B's outcomes are larger (by theta for Mann-Whitney, else the means)."""
        if self.effect is not None:
            return self.effect > 0.5
        return self.difference > 0


def _z_quantile(alpha: float) -> float:
    return float(ndtri(1.0 - alpha / 2.0))


def _two_sided_p(z: float) -> float:
    return float(min(1.0, 2.0 * ndtr(-abs(z))))


def two_proportion_ztest(
    successes_a: int, n_a: int, successes_b: int, n_b: int, alpha: float = 0.05
) -> Comparison:
    """Two-proportion z-test of B versus A (see the module docstring)."""
    if n_a <= 0 or n_b <= 0:
        raise ValueError(f"both arms need samples, got n_a={n_a}, n_b={n_b}")
    if not (0 <= successes_a <= n_a and 0 <= successes_b <= n_b):
        raise ValueError("successes must lie in [0, n]")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    difference = p_b - p_a
    z = difference / se_pooled if se_pooled > 0 else 0.0
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    half = _z_quantile(alpha) * se
    return Comparison(
        test="two_proportion_z",
        n_a=n_a,
        n_b=n_b,
        mean_a=p_a,
        mean_b=p_b,
        difference=difference,
        ci_low=difference - half,
        ci_high=difference + half,
        statistic=z,
        p_value=_two_sided_p(z),
    )


def _placements(sorted_other: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each value: (# other < value + # other == value / 2) / len(other)."""
    below = np.searchsorted(sorted_other, values, side="left")
    at_or_below = np.searchsorted(sorted_other, values, side="right")
    return (below + at_or_below) / (2.0 * sorted_other.size)


def mann_whitney(a: np.ndarray, b: np.ndarray, alpha: float = 0.05) -> Comparison:
    """Mann-Whitney U of B versus A with effect size and intervals (see the module docstring).

    Equal to `scipy.stats.mannwhitneyu(b, a, method="asymptotic", use_continuity=True)` in U
    and p-value. When every value is tied the p-value is 1.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n_a, n_b = a.size, b.size
    if n_a < 2 or n_b < 2:
        raise ValueError(f"both arms need at least 2 samples, got n_a={n_a}, n_b={n_b}")
    sorted_a, sorted_b = np.sort(a), np.sort(b)
    placements_b = _placements(sorted_a, b)  # per B value: share of A below it (ties half)
    placements_a = _placements(sorted_b, a)  # per A value: share of B below it
    u_b = float(placements_b.sum() * n_a)
    theta = u_b / (n_a * n_b)
    n = n_a + n_b
    _, tie_counts = np.unique(np.concatenate([a, b]), return_counts=True)
    ties = float(((tie_counts.astype(np.float64) ** 3) - tie_counts).sum())
    sigma = math.sqrt(n_a * n_b / 12.0 * ((n + 1) - ties / (n * (n - 1))))
    mu = n_a * n_b / 2.0
    u_max = max(u_b, n_a * n_b - u_b)
    z = (u_max - mu - 0.5) / sigma if sigma > 0 else 0.0
    p_value = _two_sided_p(z) if sigma > 0 else 1.0
    quantile = _z_quantile(alpha)
    # DeLong: Var(theta) = Var(V_b) / n_b + Var(V_a) / n_a, with V_a = 1 - placements_a.
    theta_se = math.sqrt(placements_b.var(ddof=1) / n_b + placements_a.var(ddof=1) / n_a)
    difference = float(b.mean() - a.mean())
    mean_se = math.sqrt(a.var(ddof=1) / n_a + b.var(ddof=1) / n_b)
    return Comparison(
        test="mann_whitney_u",
        n_a=n_a,
        n_b=n_b,
        mean_a=float(a.mean()),
        mean_b=float(b.mean()),
        difference=difference,
        ci_low=difference - quantile * mean_se,
        ci_high=difference + quantile * mean_se,
        statistic=u_b,
        p_value=p_value,
        effect=theta,
        effect_ci_low=max(0.0, theta - quantile * theta_se),
        effect_ci_high=min(1.0, theta + quantile * theta_se),
    )


def outcome_values(
    outcome: AbOutcome, scores: np.ndarray, labels: np.ndarray, threshold: float
) -> np.ndarray:
    """One outcome per labelled prediction: 0/1 for the rate outcomes, a float otherwise."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if outcome == "label_rate":
        return (labels >= 0.5).astype(np.float64)
    if outcome == "correct_rate":
        return ((scores >= threshold) == (labels >= 0.5)).astype(np.float64)
    if outcome == "label_value":
        return labels
    return np.abs(scores - labels)


def compare(config: AbConfig, champion: np.ndarray, candidate: np.ndarray) -> Comparison:
    """The test the outcome calls for, on per-request outcomes of each arm."""
    champion = np.asarray(champion, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if config.outcome in RATE_OUTCOMES:
        return two_proportion_ztest(
            int(champion.sum()), champion.size, int(candidate.sum()), candidate.size, config.alpha
        )
    return mann_whitney(champion, candidate, config.alpha)


def recommend(config: AbConfig, result: Comparison) -> Recommendation:
    """promote / keep_champion when significant at `alpha`, else inconclusive."""
    if result.p_value >= config.alpha:
        return "inconclusive"
    return "promote" if result.favours_candidate() == config.better_is_higher else "keep_champion"
