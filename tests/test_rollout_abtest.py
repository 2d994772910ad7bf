"""A/B statistics against scipy and against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from services.rollout.abtest import (
    compare,
    mann_whitney,
    outcome_values,
    recommend,
    two_proportion_ztest,
)
from services.rollout.plan import AbConfig


@pytest.mark.parametrize(
    ("x_a", "n_a", "x_b", "n_b"),
    [(120, 1000, 150, 1000), (30, 400, 22, 350), (5, 50, 5, 50), (990, 1000, 999, 1000)],
)
def test_z_squared_equals_pearson_chi_squared_and_the_p_values_agree(x_a, n_a, x_b, n_b):
    result = two_proportion_ztest(x_a, n_a, x_b, n_b)
    table = np.array([[x_a, n_a - x_a], [x_b, n_b - x_b]])
    chi2, p_value, _, _ = stats.chi2_contingency(table, correction=False)

    assert result.statistic**2 == pytest.approx(chi2, rel=1e-9)
    assert result.p_value == pytest.approx(p_value, rel=1e-9)
    assert result.difference == pytest.approx(x_b / n_b - x_a / n_a)


def test_the_rate_difference_interval_is_walds_and_covers_the_truth_at_its_level():
    result = two_proportion_ztest(100, 1000, 140, 1000, alpha=0.05)
    se = np.sqrt(0.1 * 0.9 / 1000 + 0.14 * 0.86 / 1000)
    assert result.ci_low == pytest.approx(0.04 - stats.norm.ppf(0.975) * se)
    assert result.ci_high == pytest.approx(0.04 + stats.norm.ppf(0.975) * se)

    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(2000):
        r = two_proportion_ztest(rng.binomial(2000, 0.2), 2000, rng.binomial(2000, 0.25), 2000)
        covered += r.ci_low <= 0.05 <= r.ci_high
    assert 0.93 < covered / 2000 < 0.97


def test_identical_arms_with_no_variance_give_p_one():
    result = two_proportion_ztest(0, 100, 0, 100)
    assert (result.statistic, result.p_value, result.difference) == (0.0, 1.0, 0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mann_whitney_u_and_p_value_match_scipy_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.0, 1.0, 300)
    b = rng.normal(0.2, 1.0, 250)
    tied_a, tied_b = np.round(a), np.round(b)  # heavy ties
    for x, y in ((a, b), (tied_a, tied_b)):
        ours = mann_whitney(x, y)
        theirs = stats.mannwhitneyu(y, x, alternative="two-sided", method="asymptotic")
        assert ours.statistic == pytest.approx(theirs.statistic, rel=1e-12)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


def test_mann_whitney_effect_is_the_probability_of_superiority_by_brute_force():
    rng = np.random.default_rng(5)
    a = np.round(rng.exponential(1.0, 80), 1)
    b = np.round(rng.exponential(1.3, 90), 1)
    result = mann_whitney(a, b)
    greater = (b[:, None] > a[None, :]).mean()
    ties = (b[:, None] == a[None, :]).mean()
    assert result.effect == pytest.approx(greater + ties / 2)
    assert result.effect_ci_low < result.effect < result.effect_ci_high


def test_mann_whitney_effect_interval_covers_the_true_effect_at_its_level():
    # B ~ N(0.3, 1), A ~ N(0, 1): P(B > A) = Phi(0.3 / sqrt(2)).
    truth = stats.norm.cdf(0.3 / np.sqrt(2))
    rng = np.random.default_rng(11)
    covered = 0
    trials = 600
    for _ in range(trials):
        r = mann_whitney(rng.normal(0, 1, 200), rng.normal(0.3, 1, 200))
        covered += r.effect_ci_low <= truth <= r.effect_ci_high
    assert 0.92 < covered / trials < 0.975


def test_all_ties_give_p_one():
    result = mann_whitney(np.ones(10), np.ones(12))
    assert result.p_value == 1.0 and result.effect == 0.5


def test_too_few_samples_is_an_error():
    with pytest.raises(ValueError, match="both arms"):
        two_proportion_ztest(0, 0, 1, 10)
    with pytest.raises(ValueError, match="at least 2"):
        mann_whitney(np.array([1.0]), np.array([1.0, 2.0]))


def test_outcomes_per_labelled_prediction():
    scores = np.array([0.9, 0.2, 0.7, 0.1])
    labels = np.array([1.0, 1.0, 0.0, 0.0])
    assert outcome_values("label_rate", scores, labels, 0.5).tolist() == [1, 1, 0, 0]
    assert outcome_values("correct_rate", scores, labels, 0.5).tolist() == [1, 0, 0, 1]
    assert outcome_values("label_value", scores, labels, 0.5).tolist() == [1, 1, 0, 0]
    assert outcome_values("abs_error", scores, labels, 0.5) == pytest.approx([0.1, 0.8, 0.7, 0.1])


def test_recommendation_follows_significance_and_direction():
    lower_error = AbConfig(outcome="abs_error")
    rng = np.random.default_rng(3)
    champion, better = rng.exponential(0.5, 800), rng.exponential(0.3, 800)
    result = compare(lower_error, champion, better)
    assert result.test == "mann_whitney_u"
    assert recommend(lower_error, result) == "promote"
    assert recommend(lower_error, compare(lower_error, better, champion)) == "keep_champion"
    same = compare(lower_error, champion, rng.exponential(0.5, 800))
    assert same.p_value > 0.05 and recommend(lower_error, same) == "inconclusive"

    rates = AbConfig(outcome="label_rate")
    result = compare(rates, np.r_[np.ones(100), np.zeros(900)], np.r_[np.ones(160), np.zeros(840)])
    assert result.test == "two_proportion_z" and recommend(rates, result) == "promote"
