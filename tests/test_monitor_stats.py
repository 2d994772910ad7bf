"""The monitor's statistics agree with scipy and sklearn to 1e-9, on random and edge-case data,
and never raise or return an infinity on empty bins, constant columns or empty windows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from sklearn import metrics

from services.inference.manifest import bin_index, build_profile
from services.monitor import stats
from services.monitor.drift import ReferenceBins, evaluate, reference_bins, verdicts
from services.monitor.policy import (
    DEFAULT_DRIFT_THRESHOLDS,
    DriftMethod,
    FeaturePolicy,
    choose_method,
)

TOL = 1e-9
SEEDS = range(8)


def random_counts(rng: np.random.Generator, bins: int, zeros: int = 0) -> np.ndarray:
    counts = rng.integers(0, 500, size=bins).astype(float)
    counts[rng.choice(bins, size=zeros, replace=False)] = 0
    if counts.sum() == 0:
        counts[0] = 1
    return counts


def expand(counts: np.ndarray) -> np.ndarray:
    """A sample whose values are bin indices, `counts[i]` times bin `i`."""
    return np.repeat(np.arange(counts.size), counts.astype(int))


# -- drift statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_psi_is_symmetrised_kl_divergence_of_smoothed_fractions(seed):
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 15))
    r, c = random_counts(rng, bins, zeros=seed % 3), random_counts(rng, bins, zeros=seed % 2)
    rf = np.where(r > 0, r / r.sum(), stats.PSI_EMPTY_BIN)
    cf = np.where(c > 0, c / c.sum(), stats.PSI_EMPTY_BIN)
    expected = np.sum(rel_entr(cf, rf) + rel_entr(rf, cf))
    assert stats.psi(r, c) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_jensen_shannon_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 15))
    r, c = random_counts(rng, bins, zeros=seed % 3), random_counts(rng, bins, zeros=seed % 4)
    assert stats.jensen_shannon(r, c) == pytest.approx(jensenshannon(r, c), abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_ks_on_bins_matches_scipy_ks_2samp_on_bin_indices(seed):
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 12))
    r, c = random_counts(rng, bins, zeros=seed % 3), random_counts(rng, bins)
    expected = scipy_stats.ks_2samp(expand(r), expand(c), method="asymp")
    d, p = stats.ks_binned(r, c)
    assert d == pytest.approx(expected.statistic, abs=TOL)
    assert p == pytest.approx(expected.pvalue, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_chi_squared_matches_scipy_contingency_test(seed):
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 12))
    r, c = random_counts(rng, bins, zeros=seed % 3), random_counts(rng, bins, zeros=seed % 2)
    table = np.vstack([r, c])
    table = table[:, table.sum(axis=0) > 0]
    expected = scipy_stats.chi2_contingency(table, correction=False)
    statistic, p = stats.chi_squared(r, c)
    assert statistic == pytest.approx(expected.statistic, abs=TOL)
    assert p == pytest.approx(expected.pvalue, abs=TOL)


@pytest.mark.parametrize("seed", SEEDS)
def test_normed_wasserstein_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    bins = int(rng.integers(2, 12))
    points = np.sort(rng.normal(size=bins)) + np.arange(bins)  # strictly increasing
    r, c = random_counts(rng, bins, zeros=seed % 3), random_counts(rng, bins)
    scale = float(rng.uniform(0.5, 3))
    expected = scipy_stats.wasserstein_distance(points, points, r, c) / scale
    assert stats.wasserstein_normed(r, c, points, scale) == pytest.approx(expected, abs=TOL)


def test_unseen_category_keeps_chi_squared_and_psi_finite():
    reference = np.array([50.0, 50.0, 0.0])  # last bin: categories the reference never saw
    current = np.array([30.0, 30.0, 40.0])
    statistic, p = stats.chi_squared(reference, current)
    assert math.isfinite(statistic) and 0 <= p < 1e-6
    assert math.isfinite(stats.psi(reference, current))
    assert math.isfinite(stats.jensen_shannon(reference, current))


def test_identical_one_bin_distributions_show_no_drift():
    one = np.array([0.0, 100.0, 0.0])
    assert stats.psi(one, one) == 0.0
    assert stats.jensen_shannon(one, one) == 0.0
    assert stats.ks_binned(one, one) == (0.0, 1.0)
    assert stats.chi_squared(one, one) == (0.0, 1.0)
    assert stats.wasserstein_normed(one, one, np.array([0.0, 1.0, 2.0]), 0.0) == 0.0


def test_constant_reference_floors_the_wasserstein_scale():
    """A constant column has std 0; the distance is normalised by 0.001 instead of divided by 0."""
    moved = stats.wasserstein_normed(
        np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 2.0]), 0.0
    )
    assert moved == pytest.approx(1.0 / stats.WASSERSTEIN_MIN_SCALE)


@pytest.mark.parametrize(
    "function",
    [
        stats.psi,
        stats.jensen_shannon,
        lambda r, c: stats.wasserstein_normed(r, c, np.arange(3.0), 1.0),
        lambda r, c: stats.ks_binned(r, c)[0],
        lambda r, c: stats.chi_squared(r, c)[1],
    ],
)
def test_an_empty_or_all_missing_window_gives_nan_not_an_error(function):
    reference = np.array([10.0, 20.0, 30.0])
    assert math.isnan(function(reference, np.zeros(3)))
    assert math.isnan(function(np.zeros(3), reference))


# -- quality metrics ---------------------------------------------------------------------------


def labelled_data(seed: int, rows: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < 0.3).astype(float)
    scores = np.clip(0.3 * labels + rng.normal(0.35, 0.2, rows), 0, 1)
    scores = np.round(scores, 2 if seed % 2 else 12)  # even seeds: ties on purpose
    weights = rng.integers(1, 4, rows).astype(float)
    return labels, scores, weights


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_quality_metrics_match_sklearn(seed, weighted):
    labels, scores, weights = labelled_data(seed)
    w = weights if weighted else None
    predicted = (scores >= 0.5).astype(float)
    found = stats.quality_metrics(labels, scores, 0.5, w)
    expected = {
        "auc": metrics.roc_auc_score(labels, scores, sample_weight=w),
        "log_loss": metrics.log_loss(labels, scores, sample_weight=w),
        "accuracy": metrics.accuracy_score(labels, predicted, sample_weight=w),
        "precision": metrics.precision_score(labels, predicted, sample_weight=w, zero_division=0),
        "recall": metrics.recall_score(labels, predicted, sample_weight=w, zero_division=0),
        "f1": metrics.f1_score(labels, predicted, sample_weight=w, zero_division=0),
    }
    for name, value in expected.items():
        assert found[name] == pytest.approx(value, abs=TOL), name


def test_weighted_rows_equal_expanded_rows():
    """(score, label, count) aggregates, as the monitor reads them, give the row-level metrics."""
    labels, scores, weights = labelled_data(3)
    aggregated = stats.quality_metrics(labels, scores, 0.4, weights)
    rows = np.repeat(np.arange(labels.size), weights.astype(int))
    expanded = stats.quality_metrics(labels[rows], scores[rows], 0.4)
    for name in aggregated:
        assert aggregated[name] == pytest.approx(expanded[name], abs=TOL), name


def test_confident_mistakes_cost_a_finite_log_loss():
    loss = stats.log_loss(np.array([1.0, 0.0]), np.array([0.0, 1.0]))
    assert math.isfinite(loss)
    assert loss == pytest.approx(metrics.log_loss([1, 0], [0.0, 1.0]), abs=TOL)


def test_one_class_and_no_positive_predictions_are_handled():
    labels = np.zeros(5)
    scores = np.linspace(0.1, 0.4, 5)
    found = stats.quality_metrics(labels, scores)
    assert math.isnan(found["auc"])
    assert found["precision"] == found["recall"] == found["f1"] == 0.0
    assert found["accuracy"] == 1.0
    assert math.isnan(stats.log_loss(np.array([]), np.array([])))


# -- drift decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "size", "method"),
    [
        ("numeric", 1000, DriftMethod.ks),
        ("numeric", 1001, DriftMethod.wasserstein),
        ("categorical", 50, DriftMethod.chisquare),
        ("categorical", 5000, DriftMethod.jensenshannon),
    ],
)
def test_method_is_chosen_by_column_type_and_sample_size(kind, size, method):
    assert choose_method(kind, size, small_sample_max=1000) is method


def profile_bins(values: np.ndarray, categorical: bool = False) -> ReferenceBins:
    names = {"x"} if categorical else set()
    profile = build_profile(values.reshape(-1, 1), ["x"], np.zeros(values.size), categorical=names)
    bins = reference_bins(profile.features["x"])
    assert bins is not None
    return bins


def test_reference_bins_reproduce_the_profiles_counts_under_the_shared_bin_rule():
    values = np.random.default_rng(1).normal(size=5000)
    bins = profile_bins(values)
    counts = np.bincount(bin_index(np.r_[values.min(), bins.interior_edges, values.max()], values))
    assert np.array_equal(bins.reference_counts, counts)


def test_a_shifted_sample_drifts_and_a_fresh_sample_does_not():
    rng = np.random.default_rng(2)
    bins = profile_bins(rng.normal(size=20_000))
    edges = np.r_[-np.inf, bins.interior_edges, np.inf]

    def counts(values: np.ndarray) -> np.ndarray:
        return np.bincount(bin_index(edges, values), minlength=bins.bins).astype(float)

    thresholds = DEFAULT_DRIFT_THRESHOLDS
    same = verdicts(bins, counts(rng.normal(size=2000)), FeaturePolicy(), thresholds, 1000)
    moved = verdicts(bins, counts(rng.normal(0.5, 1, 2000)), FeaturePolicy(), thresholds, 1000)
    assert [v.method for v in same] == ["wasserstein", "psi"]
    assert not any(v.drifted for v in same)
    assert all(v.drifted for v in moved)


def test_a_policy_forces_method_and_threshold():
    bins = profile_bins(np.random.default_rng(3).normal(size=3000))
    current = bins.reference_counts * 2
    forced = verdicts(
        bins, current, FeaturePolicy(method=DriftMethod.ks, threshold=0.01),
        DEFAULT_DRIFT_THRESHOLDS, 1000,
    )  # fmt: skip
    assert forced[0].method == "ks" and forced[0].threshold == 0.01
    assert forced[0].p_value == pytest.approx(1.0) and not forced[0].drifted


def test_categorical_columns_get_order_free_methods_and_an_unseen_bin():
    bins = profile_bins(np.repeat([1.0, 2.0, 3.0], [500, 300, 200]), categorical=True)
    assert bins.kind == "categorical" and bins.bins == 4
    current = np.array([500.0, 300.0, 100.0, 100.0])  # 100 values of a new category
    wasserstein = evaluate(DriftMethod.wasserstein, bins, current, 0.1)
    ks = evaluate(DriftMethod.ks, bins, current, 0.05)
    assert wasserstein.method == "jensenshannon" and wasserstein.drifted
    assert ks.method == "chisquare" and ks.drifted and ks.p_value < 1e-6


def test_a_column_without_reference_values_has_no_bins():
    profile = build_profile(np.full((10, 1), np.nan), ["x"], np.zeros(10))
    assert reference_bins(profile.features["x"]) is None
