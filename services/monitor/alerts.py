"""Threshold alerts with hysteresis: a pure state machine per checked series, no I/O.

A series is one (model, version, route, kind, metric, feature). Each window it gets one value:

- **ok -> firing** after `fire_after` consecutive windows beyond the threshold (`value >
  threshold` for higher-is-worse metrics, `value < threshold` for lower-is-worse ones; a drift
  check uses its method's own rule, see `Check.breached`).
- **firing -> ok** ("resolved") only after `clear_after` consecutive windows back past the
  *clear* level, which lies inside the threshold by the hysteresis band: `threshold · (1 −
  band)` when higher is worse, `threshold + band · (1 − threshold)` when lower is worse (these
  metrics — AUC, agreement, p-values — live in [0, 1]). A value between the two levels keeps
  the current state, so a metric hovering at the threshold cannot flap.
- A `nan` value (no evidence in the window) changes nothing.

Alert ids are derived from the series, the window and the new state, so recomputing a window
after a restart produces the same id and consumers can drop the repeat.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from schemas.messages import Alert, AlertState

Direction = Literal["above", "below"]
Severity = Literal["info", "warning", "critical"]


@dataclass(frozen=True)
class SeriesKey:
    """What one alert is about; also the label set of its Prometheus gauge."""

    model: str
    version: str
    route: str
    kind: str
    metric: str
    feature: str = ""

    @classmethod
    def of(cls, alert: Alert) -> SeriesKey:
        """The series an alert message belongs to."""
        return cls(alert.model, alert.version, alert.route, alert.kind, alert.metric, alert.feature)


@dataclass(frozen=True)
class Check:
    """One value checked against one threshold in one window.

    `breached` overrides the plain comparison when the caller decided it already (drift checks:
    `>=` for distances, as Evidently). `critical_at`, if set, makes a firing alert critical when
    the value is at or beyond it (PSI's 0.25 band).
    """

    key: SeriesKey
    value: float
    threshold: float
    direction: Direction
    window_start_ms: int
    window_end_ms: int
    breached: bool | None = None
    critical_at: float | None = None

    def is_breached(self) -> bool:
        """Beyond the threshold on the bad side."""
        if self.breached is not None:
            return self.breached
        if self.direction == "above":
            return self.value > self.threshold
        return self.value < self.threshold

    def is_cleared(self, band: float) -> bool:
        """Back inside the threshold by the hysteresis band."""
        if self.direction == "above":
            return self.value <= self.threshold * (1 - band)
        return self.value >= self.threshold + band * (1 - self.threshold)

    def severity(self) -> Severity:
        """critical at or beyond `critical_at`, else warning."""
        if self.critical_at is None:
            return "warning"
        beyond = (
            self.value >= self.critical_at
            if self.direction == "above"
            else self.value <= self.critical_at
        )
        return "critical" if beyond else "warning"


@dataclass
class SeriesState:
    """Where one series stands: firing or not, and the current run of windows toward a change."""

    firing: bool = False
    streak: int = 0


@dataclass(frozen=True)
class Hysteresis:
    """The state machine's parameters (see the module docstring)."""

    band: float = 0.2
    fire_after: int = 1
    clear_after: int = 2

    def step(self, state: SeriesState, check: Check) -> AlertState | None:
        """Advance `state` by one window's `check`; returns the transition, if any."""
        if math.isnan(check.value):
            return None
        if not state.firing:
            state.streak = state.streak + 1 if check.is_breached() else 0
            if state.streak >= self.fire_after:
                state.firing, state.streak = True, 0
                return AlertState.firing
            return None
        state.streak = state.streak + 1 if check.is_cleared(self.band) else 0
        if state.streak >= self.clear_after:
            state.firing, state.streak = False, 0
            return AlertState.resolved
        return None


def alert_id(key: SeriesKey, window_start_ms: int, state: AlertState) -> str:
    """A stable id: the same series, window and transition always give the same id."""
    text = "|".join(
        [
            key.model,
            key.version,
            key.route,
            key.kind,
            key.metric,
            key.feature,
            str(window_start_ms),
            state.value,
        ]
    )
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


@dataclass
class AlertBook:
    """Every series' state; turns checks into `Alert` messages. Not thread-safe."""

    hysteresis: Hysteresis = field(default_factory=Hysteresis)
    states: dict[SeriesKey, SeriesState] = field(default_factory=dict)

    def observe(self, check: Check, now_ms: int) -> Alert | None:
        """Feed one window's check; returns the alert to publish when the state changed."""
        state = self.states.setdefault(check.key, SeriesState())
        transition = self.hysteresis.step(state, check)
        if transition is None:
            return None
        key = check.key
        return Alert(
            alert_id=alert_id(key, check.window_start_ms, transition),
            model=key.model,
            version=key.version,
            route=key.route,
            kind=key.kind,
            metric=key.metric,
            feature=key.feature,
            value=check.value,
            threshold=check.threshold,
            state=transition,
            severity=check.severity() if transition is AlertState.firing else "info",
            window_start_ms=check.window_start_ms,
            window_end_ms=check.window_end_ms,
            ts_ms=now_ms,
        )

    def restore(self, alerts: Iterable[Alert]) -> int:
        """Rebuild firing states from published alerts (oldest first; the last per series wins).

        Run at start-up over `sluice.alerts`, so a restarted monitor neither fires an alert that
        is already firing again nor forgets to resolve it. Returns how many series are firing.
        """
        for alert in alerts:
            self.states[SeriesKey.of(alert)] = SeriesState(firing=alert.state is AlertState.firing)
        return sum(state.firing for state in self.states.values())
