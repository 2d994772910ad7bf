"""Alerting with hysteresis and the window grid: pure logic, no servers."""

from __future__ import annotations

import math

from schemas.messages import AlertState
from services.monitor.alerts import AlertBook, Check, Hysteresis, SeriesKey, alert_id
from services.monitor.windows import Window, due_windows

ERRORS = SeriesKey("fraud", "2", "canary", "errors", "error_rate")
AUC = SeriesKey("fraud", "2", "canary", "quality", "auc")


def feed(book: AlertBook, key: SeriesKey, values, threshold, direction="above"):
    """Feed one value per window; returns the transitions as (window index, state)."""
    transitions = []
    for i, value in enumerate(values):
        alert = book.observe(
            Check(key, value, threshold, direction, i * 60_000, (i + 1) * 60_000), now_ms=i
        )
        if alert is not None:
            transitions.append((i, alert.state))
    return transitions


def test_alert_fires_in_the_first_breached_window_and_resolves_after_two_clear_ones():
    book = AlertBook(Hysteresis(band=0.2, fire_after=1, clear_after=2))
    values = [0.01, 0.08, 0.09, 0.02, 0.01, 0.01]
    assert feed(book, ERRORS, values, 0.05) == [(1, AlertState.firing), (4, AlertState.resolved)]


def test_a_value_hovering_around_the_threshold_does_not_flap():
    """Between the clear level (0.04) and the threshold (0.05) the alert keeps its state."""
    book = AlertBook(Hysteresis(band=0.2, fire_after=1, clear_after=2))
    values = [0.051, 0.049, 0.052, 0.045, 0.051, 0.048, 0.05, 0.046]
    assert feed(book, ERRORS, values, 0.05) == [(0, AlertState.firing)]


def test_fire_after_requires_consecutive_breaches():
    book = AlertBook(Hysteresis(fire_after=2))
    assert feed(book, ERRORS, [0.1, 0.0, 0.1, 0.1], 0.05) == [(3, AlertState.firing)]


def test_lower_is_worse_metrics_clear_above_a_band_toward_one():
    """AUC floor 0.8, band 0.2: fires below 0.8, clears only at >= 0.84."""
    book = AlertBook(Hysteresis(band=0.2, fire_after=1, clear_after=1))
    values = [0.85, 0.78, 0.82, 0.835, 0.845]
    assert feed(book, AUC, values, 0.8, "below") == [
        (1, AlertState.firing),
        (4, AlertState.resolved),
    ]


def test_a_window_without_evidence_changes_nothing():
    book = AlertBook(Hysteresis(clear_after=1))
    values = [0.1, math.nan, math.nan, 0.0]
    assert feed(book, ERRORS, values, 0.05) == [(0, AlertState.firing), (3, AlertState.resolved)]


def test_alert_message_carries_the_series_window_and_severity():
    book = AlertBook()
    key = SeriesKey("fraud", "2", "champion", "drift", "psi", "amount")
    check = Check(key, 0.3, 0.1, "above", 60_000, 120_000, breached=True, critical_at=0.25)
    alert = book.observe(check, now_ms=130_000)
    assert alert is not None
    assert (alert.model, alert.version, alert.route, alert.kind, alert.metric, alert.feature) == (
        "fraud", "2", "champion", "drift", "psi", "amount"
    )  # fmt: skip
    assert (alert.value, alert.threshold, alert.severity) == (0.3, 0.1, "critical")
    assert (alert.window_start_ms, alert.window_end_ms, alert.ts_ms) == (60_000, 120_000, 130_000)
    assert alert.alert_id == alert_id(key, 60_000, AlertState.firing)


def test_restored_states_neither_refire_nor_forget_to_resolve():
    first = AlertBook(Hysteresis(clear_after=1))
    fired = first.observe(Check(ERRORS, 0.2, 0.05, "above", 0, 60_000), now_ms=1)
    assert fired is not None
    restarted = AlertBook(Hysteresis(clear_after=1))
    assert restarted.restore([fired]) == 1
    assert restarted.states[ERRORS].firing
    assert restarted.observe(Check(ERRORS, 0.2, 0.05, "above", 60_000, 120_000), now_ms=2) is None
    resolved = restarted.observe(Check(ERRORS, 0.0, 0.05, "above", 120_000, 180_000), now_ms=3)
    assert resolved is not None and resolved.state is AlertState.resolved


def test_windows_are_epoch_aligned_and_wait_for_lateness():
    # now 1_000_130 s, lateness 15 s: the newest end on the 60 s grid is 1_000_080.
    windows = due_windows(
        None, 1_000_130.0, interval_s=60, window_s=300, lateness_s=15, max_catchup=3
    )
    assert windows == [
        Window(999_660, 999_960),
        Window(999_720, 1_000_020),
        Window(999_780, 1_000_080),
    ]


def test_due_windows_follow_the_grid_after_the_last_computed_one():
    grid = dict(interval_s=60, window_s=300, lateness_s=15, max_catchup=10)
    assert due_windows(999_840, 1_000_000.0, **grid) == [
        Window(999_600, 999_900),
        Window(999_660, 999_960),
    ]
    assert due_windows(999_960, 1_000_000.0, **grid) == []
    # The window ending at 999_960 is due 15 s after its end, not a second earlier.
    assert due_windows(999_900, 999_975.0, **grid) == [Window(999_660, 999_960)]
    assert due_windows(999_900, 999_974.0, **grid) == []


def test_catch_up_after_a_long_pause_keeps_only_the_newest_windows():
    grid = dict(interval_s=60, window_s=60, lateness_s=0, max_catchup=3)
    windows = due_windows(0, 600_000.0, **grid)
    assert [w.end_s for w in windows] == [599_880, 599_940, 600_000]
    assert all(w.end_s - w.start_s == 60 for w in windows)
