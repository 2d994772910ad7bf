"""What the operator API returns and accepts: pydantic models, and the functions that build them
from the controller's values. The CLI parses responses into the same models.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_validator

from services.rollout.machine import Decision, GateResult
from services.rollout.service import Rollout
from services.rollout.store import DecisionRecord
from services.rollout.traffic import routing_entries


class GateView(BaseModel):
    """One gate (or A/B figure) of an evaluation: its value against its threshold."""

    name: str
    value: float | None
    threshold: float | None
    samples: int
    status: str = Field(description="pass | fail | insufficient | skipped | info")
    note: str = ""


class RolloutView(BaseModel):
    """A rollout's current step, traffic split and latest gate values."""

    rollout_id: str
    model: str
    candidate: str
    champion: str
    phase: str
    state: str = Field(description="Phase with its step, e.g. `canary[2]`.")
    step_index: int
    steps: int
    step: dict[str, Any] | None = Field(description="The current (or held) step of the plan.")
    started_ms: int
    step_started_ms: int
    updated_ms: int
    weights: dict[str, float] = Field(description="Live weight per version.")
    shadow_sample_rate: float
    revision: int
    routing_pending: bool = Field(description="The newest routing is not acked by Kafka yet.")
    consecutive_failures: int
    failure_threshold: int
    on_failure: str
    reason: str
    last_action: str | None
    gates: list[GateView]
    plan: dict[str, Any]


class DecisionView(BaseModel):
    """One recorded decision."""

    rollout_id: str
    seq: int
    decided_at_ms: int
    action: str
    state_before: str
    state_after: str
    step_index: int
    reason: str
    actor: str
    evidence: list[GateView]
    weights: dict[str, float]
    revision: int


class StartRequest(BaseModel):
    """Start a rollout from a plan given as YAML text or as a JSON object."""

    plan_yaml: str | None = None
    plan: dict[str, Any] | None = None
    source: str = Field("plan", description="Name of the plan in error messages (a file name).")
    actor: str = "operator"

    @model_validator(mode="after")
    def _one_plan(self) -> StartRequest:
        if (self.plan_yaml is None) == (self.plan is None):
            raise ValueError("give exactly one of `plan_yaml` and `plan`")
        return self


class CommandRequest(BaseModel):
    """Who issues an override and why (both recorded with the decision)."""

    actor: str = "operator"
    reason: str = ""


class CommandResult(BaseModel):
    """The decision an operation took and the rollout after it."""

    action: str
    reason: str
    rollout: RolloutView


def gate_view(gate: GateResult) -> GateView:
    return GateView(
        name=gate.label,
        value=gate.value,
        threshold=gate.threshold,
        samples=gate.samples,
        status=gate.status.value,
        note=gate.note,
    )


def rollout_view(rollout: Rollout) -> RolloutView:
    """The status of one rollout."""
    plan, state = rollout.plan, rollout.state
    entries = routing_entries(plan, state)
    step = plan.steps[state.step_index].model_dump() if state.step_index >= 0 else None
    return RolloutView(
        rollout_id=state.rollout_id,
        model=state.model,
        candidate=state.candidate,
        champion=state.champion,
        phase=state.phase.value,
        state=state.label(),
        step_index=state.step_index,
        steps=len(plan.steps),
        step=step,
        started_ms=state.started_ms,
        step_started_ms=state.step_started_ms,
        updated_ms=state.updated_ms,
        weights={e.version: e.weight for e in entries if e.role.value != "shadow"},
        shadow_sample_rate=max((e.shadow_sample_rate for e in entries), default=0.0),
        revision=state.revision,
        routing_pending=rollout.unpublished is not None,
        consecutive_failures=state.consecutive_failures,
        failure_threshold=plan.failure_threshold,
        on_failure=plan.on_failure,
        reason=state.reason,
        last_action=rollout.last.action.value if rollout.last is not None else None,
        gates=[gate_view(g) for g in rollout.last.gates] if rollout.last is not None else [],
        plan=plan.model_dump(),
    )


def command_result(decision: Decision, rollout: Rollout) -> CommandResult:
    return CommandResult(
        action=decision.action.value, reason=decision.reason, rollout=rollout_view(rollout)
    )


def decision_view(record: DecisionRecord) -> DecisionView:
    return DecisionView(
        rollout_id=record.rollout_id,
        seq=record.seq,
        decided_at_ms=record.decided_at_ms,
        action=record.action,
        state_before=record.state_before,
        state_after=record.state_after,
        step_index=record.step_index,
        reason=record.reason,
        actor=record.actor,
        evidence=[
            GateView(
                name=item.name,
                value=item.value,
                threshold=item.threshold,
                samples=item.samples,
                status=item.status,
            )
            for item in record.evidence
        ],
        weights=record.weights,
        revision=record.revision,
    )
