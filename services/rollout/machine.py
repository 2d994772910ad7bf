"""The rollout state machine: `decide(plan, state, evidence, now_ms) -> Decision`, pure, no I/O.

Phases and transitions (`step i` is `plan.steps[i]`; its kind names the phase):

    pending --start--> step 0 (shadow | canary | ab)
    step i  --advance--> step i+1          all gates pass, min duration and samples reached
    last    --promote--> promoted          the candidate becomes the champion
    step i  --hold-->    step i            a gate failed, fewer than `failure_threshold` in a row
    step i  --rollback-> rolled_back       `failure_threshold` failures, on_failure = rollback
    step i  --pause-->   paused            same with on_failure = pause; or an A/B result
                                           awaiting an operator (`ab.decide: manual`)
    any live phase --pause/resume/promote/abort--> (operator, `command`)

Rules the tests pin down:
- **Insufficient evidence waits, never passes.** A gate with fewer samples than its minimum is
  `insufficient`; the step cannot pass while one is, nor before its minimum duration and sample
  count. Waiting does not count as a failure.
- **Failures need evidence too**, with one exception: the error-rate gate fails early when the
  errors seen already exceed the allowed share of the minimum sample (`errors > max_error_rate x
  max(samples, min_samples)`), because no number of good answers still to come can save it.
- **Consecutive** means consecutive evaluations: any evaluation without a failed gate resets the
  count. Evidence covers the whole current step (from `step_started_ms`), so a real breach keeps
  failing until the threshold is reached.
- A new step (and a resume) restarts the step clock and the failure count.
- Comparisons with the champion (prediction drift, quality) are skipped in a step that gives the
  champion no traffic (canary at 1.0, blue/green): nothing to compare with, so waiting would
  never end. Shadow agreement exists only in shadow steps.

`RolloutState` is a plain value; the service persists it with every decision and resumes from
the newest one. Revisions of the routing table are the service's business (see `service.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict

from services.rollout import abtest
from services.rollout.plan import LOWER_IS_BETTER_METRICS, AbStep, RolloutPlan, ShadowStep


class Phase(StrEnum):
    """Where a rollout stands."""

    pending = "pending"
    shadow = "shadow"
    canary = "canary"
    ab = "ab"
    paused = "paused"
    promoted = "promoted"
    rolled_back = "rolled_back"
    aborted = "aborted"


TERMINAL = frozenset({Phase.promoted, Phase.rolled_back, Phase.aborted})
"""Phases a rollout never leaves."""

LIVE_STEP_PHASES = frozenset({Phase.shadow, Phase.canary, Phase.ab})


class Action(StrEnum):
    """What a decision did (the `action` column of `rollout_decisions`)."""

    start = "start"
    wait = "wait"
    hold = "hold"
    advance = "advance"
    promote = "promote"
    rollback = "rollback"
    pause = "pause"
    resume = "resume"
    abort = "abort"


class Command(StrEnum):
    """Operator overrides."""

    pause = "pause"
    resume = "resume"
    promote = "promote"
    abort = "abort"


class RolloutState(BaseModel):
    """Everything the controller knows about one rollout; serialised into every decision row."""

    model_config = ConfigDict(frozen=True)

    rollout_id: str
    model: str
    candidate: str
    champion: str
    phase: Phase = Phase.pending
    step_index: int = -1
    """Index into `plan.steps`; -1 before the first step. Kept while paused (traffic held)."""
    started_ms: int
    step_started_ms: int
    updated_ms: int
    consecutive_failures: int = 0
    revision: int = 0
    """Revision of the routing table this state was published with (0: none yet)."""
    seq: int = 0
    """Number of decisions recorded for this rollout."""
    reason: str = ""

    @property
    def finished(self) -> bool:
        return self.phase in TERMINAL

    def label(self) -> str:
        """`canary[2]`-style name of the phase, for logs and the decision log."""
        if self.phase in LIVE_STEP_PHASES or (self.phase is Phase.paused and self.step_index >= 0):
            return f"{self.phase.value}[{self.step_index}]"
        return self.phase.value


class GateStatus(StrEnum):
    passed = "pass"
    failed = "fail"
    insufficient = "insufficient"
    skipped = "skipped"


@dataclass(frozen=True)
class Measurement:
    """A measured value and the samples behind it; `value` None when nothing was measured."""

    value: float | None = None
    samples: int = 0
    subject: str = ""
    """What the value is about, e.g. the most drifted feature's name."""


NOT_MEASURED = Measurement()


@dataclass(frozen=True)
class FiringAlert:
    """A monitor alert firing for the candidate version."""

    kind: str
    metric: str
    feature: str
    severity: str
    value: float
    threshold: float


@dataclass(frozen=True)
class Evidence:
    """What the monitor says about the candidate over the current step, `[since_ms, until_ms)`.

    `requests` counts the candidate's predictions on the step's route (shadow or canary).
    `quality_drop` is champion minus candidate (positive = the candidate is worse) for
    higher-is-better metrics and the reverse for log-loss; its samples are the smaller arm's.
    `ab_champion`/`ab_candidate` hold one outcome per labelled request of each arm.
    """

    since_ms: int
    until_ms: int
    requests: int = 0
    error_rate: Measurement = NOT_MEASURED
    p99_latency_ms: Measurement = NOT_MEASURED
    p99_latency_ratio: Measurement = NOT_MEASURED
    prediction_drift: Measurement = NOT_MEASURED
    shadow_agreement: Measurement = NOT_MEASURED
    quality_drop: Measurement = NOT_MEASURED
    feature_drift: Measurement = NOT_MEASURED
    alerts: tuple[FiringAlert, ...] = ()
    ab_champion: np.ndarray | None = field(default=None, compare=False)
    ab_candidate: np.ndarray | None = field(default=None, compare=False)


@dataclass(frozen=True)
class GateResult:
    """One gate in one evaluation."""

    name: str
    value: float | None
    threshold: float | None
    samples: int
    status: GateStatus
    subject: str = ""
    """What the value is about (a feature name), part of the evidence name when set."""
    note: str = ""
    """Why the status is what it is, where that is not obvious."""

    @property
    def label(self) -> str:
        """`feature_drift_psi[amount]`: the name with its subject."""
        return f"{self.name}[{self.subject}]" if self.subject else self.name

    def describe(self) -> str:
        """`error_rate 0.31 breaches 0.01 (n=420)`-style summary."""
        value = "n/a" if self.value is None else f"{self.value:.4g}"
        comparison = {"pass": "ok vs", "fail": "breaches", "insufficient": "(waiting) vs"}.get(
            self.status.value, "vs"
        )
        threshold = "" if self.threshold is None else f" {comparison} {self.threshold:.4g}"
        note = f", {self.note}" if self.note else ""
        return f"{self.label} {value}{threshold} (n={self.samples}{note})"


@dataclass(frozen=True)
class Decision:
    """The outcome of one evaluation or command: the state before and after, and why."""

    action: Action
    before: RolloutState
    after: RolloutState
    reason: str
    gates: tuple[GateResult, ...] = ()
    ab: abtest.Comparison | None = None
    actor: str = "controller"

    @property
    def transition(self) -> bool:
        """Whether the phase or step changed."""
        return (self.before.phase, self.before.step_index) != (
            self.after.phase,
            self.after.step_index,
        )


class TransitionError(Exception):
    """A command that does not apply to the rollout's current phase; `code` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def new_rollout(plan: RolloutPlan, rollout_id: str, champion: str, now_ms: int) -> RolloutState:
    """A pending rollout of `plan.candidate` against `champion`; `decide` starts it."""
    return RolloutState(
        rollout_id=rollout_id,
        model=plan.model,
        candidate=plan.candidate,
        champion=champion,
        started_ms=now_ms,
        step_started_ms=now_ms,
        updated_ms=now_ms,
        reason="created",
    )


def step_phase(plan: RolloutPlan, step_index: int) -> Phase:
    """The phase that step `step_index` runs in."""
    return Phase(plan.steps[step_index].kind)


# -- gates ------------------------------------------------------------------------------------


def _bounded(
    name: str,
    measured: Measurement,
    threshold: float,
    min_samples: int,
    *,
    upper: bool,
) -> GateResult:
    if measured.value is None or measured.samples < min_samples:
        status = GateStatus.insufficient
    elif (measured.value > threshold) if upper else (measured.value < threshold):
        status = GateStatus.failed
    else:
        status = GateStatus.passed
    return GateResult(name, measured.value, threshold, measured.samples, status, measured.subject)


_SEVERITY_RANK = {"info": 0, "warning": 1, "critical": 2}


def evaluate_gates(
    plan: RolloutPlan, step_index: int, evidence: Evidence
) -> tuple[GateResult, ...]:
    """Every configured gate's verdict on `evidence` for step `step_index`.

    Comparisons with the champion's live traffic are skipped where the step leaves the champion
    none (a canary at weight 1.0): there is nothing to compare with, and waiting would wait
    forever. Shadow agreement exists only in shadow steps.
    """
    step = plan.steps[step_index]
    in_shadow = isinstance(step, ShadowStep)
    champion_idle = not in_shadow and step.weight >= 1.0
    gates = plan.gates
    minimum = gates.min_samples
    results: list[GateResult] = []
    if gates.max_error_rate is not None:
        result = _bounded(
            "error_rate", evidence.error_rate, gates.max_error_rate, minimum, upper=True
        )
        measured = evidence.error_rate
        if result.status is GateStatus.insufficient and measured.value is not None:
            errors = measured.value * measured.samples
            if errors > gates.max_error_rate * max(measured.samples, minimum):
                result = GateResult(
                    result.name, result.value, result.threshold, result.samples,
                    GateStatus.failed, note="errors exceed the allowed share of the minimum sample",
                )  # fmt: skip
        results.append(result)
    if gates.max_p99_latency_ms is not None:
        results.append(
            _bounded("p99_latency_ms", evidence.p99_latency_ms, gates.max_p99_latency_ms,
                     minimum, upper=True)
        )  # fmt: skip
    # comparisons with the champion's live traffic: (gate name, measurement, upper bound)
    versus_champion = (
        ("p99_latency_ratio", evidence.p99_latency_ratio, gates.max_p99_latency_ratio),
        ("prediction_drift", evidence.prediction_drift, gates.max_prediction_drift),
    )
    for name, measured, bound in versus_champion:
        if bound is None:
            continue
        if champion_idle:
            results.append(
                GateResult(name, None, bound, 0, GateStatus.skipped,
                           note="the champion serves no traffic")
            )  # fmt: skip
        else:
            results.append(_bounded(name, measured, bound, minimum, upper=True))
    if gates.min_shadow_agreement is not None:
        if in_shadow:
            results.append(
                _bounded("shadow_agreement", evidence.shadow_agreement,
                         gates.min_shadow_agreement, minimum, upper=False)
            )  # fmt: skip
        else:
            results.append(
                GateResult("shadow_agreement", None, gates.min_shadow_agreement, 0,
                           GateStatus.skipped, note="only measured in shadow steps")
            )  # fmt: skip
    if gates.max_quality_drop is not None:
        result = _bounded(
            f"quality_drop_{gates.quality_metric}",
            evidence.quality_drop,
            gates.max_quality_drop,
            gates.min_label_samples,
            upper=True,
        )
        if champion_idle and result.status is GateStatus.insufficient:
            result = GateResult(
                result.name, result.value, result.threshold, result.samples,
                GateStatus.skipped, note="the champion serves no traffic",
            )  # fmt: skip
        elif result.status is GateStatus.insufficient and not gates.require_labels:
            result = GateResult(
                result.name, result.value, result.threshold, result.samples,
                GateStatus.skipped, note="not enough labels yet",
            )  # fmt: skip
        results.append(result)
    if gates.max_feature_drift is not None:
        results.append(
            _bounded(f"feature_drift_{gates.feature_drift_method}", evidence.feature_drift,
                     gates.max_feature_drift, minimum, upper=True)
        )  # fmt: skip
    if gates.fail_on_alerts != "none":
        floor = _SEVERITY_RANK[gates.fail_on_alerts]
        for alert in evidence.alerts:
            if _SEVERITY_RANK.get(alert.severity, 0) >= floor:
                results.append(
                    GateResult(
                        f"alert_{alert.kind}_{alert.metric}", alert.value, alert.threshold, 0,
                        GateStatus.failed, alert.feature, f"{alert.severity} alert",
                    )
                )  # fmt: skip
    return tuple(results)


def quality_drop(metric: str, candidate: float, champion: float) -> float:
    """How much worse the candidate is than the champion on `metric` (negative = better)."""
    if metric in LOWER_IS_BETTER_METRICS:
        return candidate - champion
    return champion - candidate


# -- transitions --------------------------------------------------------------------------------


def _moved(state: RolloutState, now_ms: int, reason: str, **changes: object) -> RolloutState:
    return state.model_copy(update={"updated_ms": now_ms, "reason": reason, **changes})


def _enter_step(
    plan: RolloutPlan,
    state: RolloutState,
    index: int,
    now_ms: int,
    action: Action,
    reason: str,
    gates: tuple[GateResult, ...] = (),
) -> Decision:
    after = _moved(
        state,
        now_ms,
        reason,
        phase=step_phase(plan, index),
        step_index=index,
        step_started_ms=now_ms,
        consecutive_failures=0,
    )
    return Decision(action, state, after, reason, gates)


def _finish(
    state: RolloutState,
    phase: Phase,
    action: Action,
    now_ms: int,
    reason: str,
    gates: tuple[GateResult, ...] = (),
    ab: abtest.Comparison | None = None,
    actor: str = "controller",
    **changes: object,
) -> Decision:
    after = _moved(state, now_ms, reason, phase=phase, **changes)
    return Decision(action, state, after, reason, gates, ab, actor)


def _waiting_reasons(
    plan: RolloutPlan, state: RolloutState, evidence: Evidence, gates: tuple[GateResult, ...],
    now_ms: int,
) -> list[str]:  # fmt: skip
    step = plan.steps[state.step_index]
    reasons = []
    elapsed_s = (now_ms - state.step_started_ms) / 1000
    if elapsed_s < step.min_duration_s:
        reasons.append(f"step running {elapsed_s:.1f}s of {step.min_duration_s:g}s")
    if not isinstance(step, AbStep) and evidence.requests < step.min_samples:
        reasons.append(f"{evidence.requests} of {step.min_samples} candidate predictions")
    reasons += [
        f"{g.name} has {g.samples} samples" for g in gates if g.status is GateStatus.insufficient
    ]
    return reasons


def decide(plan: RolloutPlan, state: RolloutState, evidence: Evidence, now_ms: int) -> Decision:
    """The next decision for `state` given `evidence` measured over the current step.

    Raises `TransitionError` (code `rollout_finished`) for a finished rollout. A paused rollout
    waits without looking at the evidence.
    """
    if state.finished:
        raise TransitionError("rollout_finished", f"rollout is {state.phase.value}")
    if state.phase is Phase.pending:
        return _enter_step(plan, state, 0, now_ms, Action.start, "started")
    if state.phase is Phase.paused:
        return Decision(Action.wait, state, state, f"paused: {state.reason}")
    gates = evaluate_gates(plan, state.step_index, evidence)
    failed = [g for g in gates if g.status is GateStatus.failed]
    if failed:
        failures = state.consecutive_failures + 1
        summary = "; ".join(g.describe() for g in failed)
        if failures < plan.failure_threshold:
            reason = f"gate failed ({failures} of {plan.failure_threshold}): {summary}"
            after = _moved(state, now_ms, reason, consecutive_failures=failures)
            return Decision(Action.hold, state, after, reason, gates)
        reason = f"{failures} consecutive failed evaluations: {summary}"
        if plan.on_failure == "rollback":
            return _finish(state, Phase.rolled_back, Action.rollback, now_ms, reason, gates,
                           consecutive_failures=failures)  # fmt: skip
        return _finish(state, Phase.paused, Action.pause, now_ms, reason, gates,
                       consecutive_failures=failures)  # fmt: skip
    waiting = _waiting_reasons(plan, state, evidence, gates, now_ms)
    step = plan.steps[state.step_index]
    if isinstance(step, AbStep) and not waiting:
        return _conclude_ab(plan, state, step, evidence, gates, now_ms)
    if waiting:
        reason = "waiting: " + "; ".join(waiting)
        after = _moved(state, now_ms, reason, consecutive_failures=0)
        return Decision(Action.wait, state, after, reason, gates)
    passed = f"step {state.step_index} ({state.label()}) passed its gates"
    if state.step_index + 1 < len(plan.steps):
        return _enter_step(plan, state, state.step_index + 1, now_ms, Action.advance, passed,
                           gates)  # fmt: skip
    return _finish(state, Phase.promoted, Action.promote, now_ms, f"{passed}; last step", gates,
                   consecutive_failures=0)  # fmt: skip


def _conclude_ab(
    plan: RolloutPlan,
    state: RolloutState,
    step: AbStep,
    evidence: Evidence,
    gates: tuple[GateResult, ...],
    now_ms: int,
) -> Decision:
    """An `ab` step whose duration passed: wait for the sample size, then act or recommend."""
    champion = evidence.ab_champion if evidence.ab_champion is not None else np.empty(0)
    candidate = evidence.ab_candidate if evidence.ab_candidate is not None else np.empty(0)
    if min(champion.size, candidate.size) < step.min_samples:
        reason = (
            f"waiting: labelled outcomes {champion.size} champion / {candidate.size} candidate "
            f"of {step.min_samples} per arm"
        )
        after = _moved(state, now_ms, reason, consecutive_failures=0)
        return Decision(Action.wait, state, after, reason, gates)
    result = abtest.compare(plan.ab, champion, candidate)
    recommendation = abtest.recommend(plan.ab, result)
    reason = (
        f"A/B {result.test}: champion {result.mean_a:.4g} (n={result.n_a}) vs candidate "
        f"{result.mean_b:.4g} (n={result.n_b}), difference {result.difference:+.4g} "
        f"[{result.ci_low:+.4g}, {result.ci_high:+.4g}], p={result.p_value:.3g}: "
        f"recommend {recommendation}"
    )
    if plan.ab.decide == "manual":
        return _finish(state, Phase.paused, Action.pause, now_ms, reason, gates, result)
    outcome = {"promote": "promote", "keep_champion": "rollback"}.get(
        recommendation, plan.ab.on_inconclusive
    )
    if outcome == "promote":
        return _finish(state, Phase.promoted, Action.promote, now_ms, reason, gates, result)
    if outcome == "rollback":
        return _finish(state, Phase.rolled_back, Action.rollback, now_ms, reason, gates, result)
    return _finish(state, Phase.paused, Action.pause, now_ms, reason, gates, result)


def command(
    plan: RolloutPlan,
    state: RolloutState,
    order: Command,
    now_ms: int,
    actor: str = "operator",
    note: str = "",
) -> Decision:
    """Apply an operator override; raises `TransitionError` when it does not apply."""
    if state.finished:
        raise TransitionError(
            "rollout_finished", f"rollout {state.rollout_id} is already {state.phase.value}"
        )
    reason = f"{order.value} by {actor}" + (f": {note}" if note else "")
    if order is Command.pause:
        if state.phase is Phase.paused:
            raise TransitionError("already_paused", "rollout is already paused")
        return _finish(state, Phase.paused, Action.pause, now_ms, reason, actor=actor)
    if order is Command.resume:
        if state.phase is not Phase.paused:
            raise TransitionError("not_paused", f"rollout is {state.phase.value}, not paused")
        phase = Phase.pending if state.step_index < 0 else step_phase(plan, state.step_index)
        return _finish(state, phase, Action.resume, now_ms, reason, actor=actor,
                       step_started_ms=now_ms, consecutive_failures=0)  # fmt: skip
    if order is Command.promote:
        return _finish(state, Phase.promoted, Action.promote, now_ms, reason, actor=actor)
    return _finish(state, Phase.aborted, Action.abort, now_ms, reason, actor=actor)
