"""The rollout controller service: holds one rollout per model, evaluates it on an interval (and at
once when the monitor alerts on its candidate), records every decision and publishes routing.

Every change goes through `_commit`, in this order:

1. the decision row (with the state after it) is written to `rollout_decisions`; if ClickHouse
   refuses, nothing changes and the evaluation or command fails — no unrecorded change;
2. the state in memory moves on;
3. if the traffic split changed, the routing table is published with the next revision (Redis,
   then `sluice.routing`, acked). A failed publish is retried on every tick until it succeeds,
   also after the rollout finished (its last table moves everyone back to, or onto, the new
   champion), and on restart the newest recorded revision is published again if the topic
   lacks it.

Revisions exceed everything known for the model: the follower's newest table on the topic, the
table in Redis, and (at start) every revision this model's decisions were ever published with.
Evidence is gathered outside the lock; a decision is only applied if no command changed the
rollout in the meantime. Evaluations that only wait, like the one recorded before them, are
recorded at most every `rollout_record_wait_every_s` (their numbers stay visible in `status`).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from schemas.messages import Alert, RoutingTable
from services.common.metrics import metric
from services.common.routing import champion_of
from services.rollout.evidence import EvidenceUnavailable
from services.rollout.machine import (
    Action,
    Command,
    Decision,
    Evidence,
    Phase,
    RolloutState,
    command,
    decide,
    new_rollout,
)
from services.rollout.plan import RolloutPlan
from services.rollout.publisher import ControlFollower, PublishError, RoutingPublisher
from services.rollout.settings import RolloutSettings
from services.rollout.store import DecisionLog, DecisionRecord, StoreUnavailable, decision_row
from services.rollout.traffic import routing_entries, routing_table

log = logging.getLogger(__name__)


class EvidenceSource(Protocol):
    """Where evaluations get their numbers (`evidence.MonitorEvidence` in production)."""

    def gather(self, plan: RolloutPlan, state: RolloutState, now_ms: int) -> Evidence:
        """Evidence over the current step; raises `EvidenceUnavailable` when it cannot."""


class RolloutError(Exception):
    """A request the controller refuses; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Rollout:
    """The newest rollout of one model, as the controller holds it."""

    plan: RolloutPlan
    state: RolloutState
    last: Decision | None = None
    """The latest decision, recorded or not (status shows its gate values)."""
    recorded_signature: tuple | None = None
    recorded_ms: int = 0
    unpublished: RoutingTable | None = None
    """A routing table recorded but not acknowledged by the broker yet."""


class _Metrics:
    def __init__(self) -> None:
        self.decisions = metric(
            Counter, "sluice_rollout_decisions_total", "Decisions taken, by action", ["action"]
        )
        self.evaluation_seconds = metric(
            Histogram,
            "sluice_rollout_evaluation_seconds",
            "Duration of one evaluation: evidence, decision, record, publish",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.candidate_weight = metric(
            Gauge, "sluice_rollout_candidate_weight", "Live weight of the candidate", ["model"]
        )
        self.active = metric(Gauge, "sluice_rollout_active", "Rollouts not finished")
        self.publish_failures = metric(
            Counter, "sluice_rollout_publish_failures_total", "Routing tables not acked in time"
        )


class RolloutService:
    """The controller (see the module docstring). Thread-safe."""

    def __init__(
        self,
        settings: RolloutSettings,
        decisions: DecisionLog,
        evidence: EvidenceSource,
        publisher: RoutingPublisher,
        follower: ControlFollower,
    ) -> None:
        self.settings = settings
        self.decisions = decisions
        self.evidence = evidence
        self.publisher = publisher
        self.follower = follower
        self.rollouts: dict[str, Rollout] = {}
        self.metrics = _Metrics()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._woken: set[str] = set()
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def restore(self) -> int:
        """Load the newest recorded rollout of every model and republish routing the topic
        lacks; returns how many rollouts are active. Call after the follower caught up."""
        with self._lock:
            for recorded in self.decisions.latest():
                state = recorded.state
                rollout = Rollout(recorded.plan, state, recorded_ms=state.updated_ms)
                self.rollouts[state.model] = rollout
                known = self._known_revision(state.model)
                if known < state.revision or (not state.finished and known > state.revision):
                    revision = max(known + 1, state.revision)
                    rollout.state = state.model_copy(update={"revision": revision})
                    entries = routing_entries(recorded.plan, state)
                    rollout.unpublished = routing_table(rollout.state, entries, revision, _now_ms())
                    self._publish(rollout)
                log.info(
                    "rollout restored",
                    extra={"model": state.model, "state": state.label(),
                           "revision": rollout.state.revision},
                )  # fmt: skip
            self._update_gauges()
            return sum(not r.state.finished for r in self.rollouts.values())

    def run(self) -> None:
        """Evaluate every active rollout each interval, and woken models at once, until
        `stop()`."""
        interval = self.settings.rollout_eval_interval_s
        next_round = time.monotonic()
        while not self._stopping.is_set():
            if time.monotonic() >= next_round:
                next_round = time.monotonic() + interval
                with self._lock:
                    self._woken.clear()
                    models = self.due()
            else:
                with self._lock:
                    models, self._woken = sorted(self._woken), set()
            for model in models:
                self.evaluate(model)
            self._wake.wait(max(0.0, next_round - time.monotonic()))
            self._wake.clear()

    def due(self) -> list[str]:
        """Models each round evaluates: active rollouts, and finished ones whose last routing
        table the broker has not acknowledged yet (publishing it is retried every round)."""
        with self._lock:
            return [
                model
                for model, rollout in self.rollouts.items()
                if not rollout.state.finished or rollout.unpublished is not None
            ]

    def stop(self) -> None:
        """Make `run` return after the evaluation in hand."""
        self._stopping.set()
        self._wake.set()

    def wake(self, model: str) -> None:
        """Evaluate `model` now (its candidate got an alert)."""
        with self._lock:
            self._woken.add(model)
        self._wake.set()

    def on_alert(self, alert: Alert) -> None:
        """Follower callback: an alert on an active rollout's candidate wakes it."""
        rollout = self.rollouts.get(alert.model)
        if (
            rollout is not None
            and not rollout.state.finished
            and alert.version == rollout.state.candidate
        ):
            self.wake(alert.model)

    # -- operations -----------------------------------------------------------------------------

    def start(self, plan: RolloutPlan, actor: str = "operator") -> Decision:
        """Start `plan`: its first step's routing is in force when this returns."""
        with self._lock:
            existing = self.rollouts.get(plan.model)
            if existing is not None and not existing.state.finished:
                raise RolloutError(
                    409,
                    "rollout_active",
                    f"{plan.model} already has rollout {existing.state.rollout_id} "
                    f"({existing.state.label()}); pause, promote or abort it first",
                )
            table = self._current_table(plan.model)
            champion = plan.champion or (champion_of(table) if table is not None else None)
            if champion is None:
                raise RolloutError(
                    409,
                    "no_champion",
                    f"{plan.model} has no routing table yet; name the `champion` in the plan",
                )
            if champion == plan.candidate:
                raise RolloutError(
                    409, "candidate_is_champion", f"version {champion} already is the champion"
                )
            now = _now_ms()
            revision = max(
                self._known_revision(plan.model), self.decisions.max_revision(plan.model)
            )
            state = new_rollout(plan, uuid.uuid4().hex[:12], champion, now).model_copy(
                update={"revision": revision}
            )
            rollout = Rollout(plan, state)
            decision = replace(decide(plan, state, Evidence(now, now), now), actor=actor)
            committed = self._commit(rollout, decision)
            self.rollouts[plan.model] = rollout
            self._update_gauges()
        self.wake(plan.model)
        return committed

    def command(
        self, model: str, order: Command, actor: str = "operator", note: str = ""
    ) -> Decision:
        """Apply an operator override to `model`'s rollout."""
        with self._lock:
            rollout = self._rollout(model)
            decision = command(rollout.plan, rollout.state, order, _now_ms(), actor, note)
            committed = self._commit(rollout, decision)
            self._update_gauges()
        self.wake(model)
        return committed

    def get(self, model: str) -> Rollout:
        """The newest rollout of `model` (a snapshot)."""
        with self._lock:
            return replace(self._rollout(model))

    def overview(self) -> list[Rollout]:
        """The newest rollout of every model, active ones first."""
        with self._lock:
            rollouts = [replace(r) for r in self.rollouts.values()]
        return sorted(rollouts, key=lambda r: (r.state.finished, r.state.model))

    def history(
        self, model: str, rollout_id: str | None = None, limit: int = 50
    ) -> list[DecisionRecord]:
        """Recorded decisions of `model`, newest first."""
        return self.decisions.history(model, rollout_id, limit)

    def evaluate(self, model: str) -> Decision | None:
        """Publish routing not acknowledged yet, then gather evidence and decide once; None when
        nothing was evaluated (finished, paused, evidence unavailable, or changed by an
        operator meanwhile)."""
        started = time.perf_counter()
        with self._lock:
            rollout = self.rollouts.get(model)
            if rollout is None:
                return None
            if rollout.unpublished is not None:
                self._publish(rollout)
            if rollout.state.finished or rollout.state.phase is Phase.paused:
                return None
            plan, state = rollout.plan, rollout.state
        now = _now_ms()
        try:
            if state.phase is Phase.pending:
                evidence = Evidence(now, now)
            else:
                evidence = self.evidence.gather(plan, state, now)
        except EvidenceUnavailable as exc:
            log.warning("evaluation postponed", extra={"model": model, "error": str(exc)})
            return None
        with self._lock:
            if self.rollouts.get(model) is not rollout or rollout.state is not state:
                return None
            try:
                committed = self._commit(rollout, decide(plan, state, evidence, now))
            except StoreUnavailable as exc:
                log.warning("decision not recorded", extra={"model": model, "error": str(exc)})
                return None
            self._update_gauges()
        self.metrics.evaluation_seconds.observe(time.perf_counter() - started)
        return committed

    # -- internals ------------------------------------------------------------------------------

    def _rollout(self, model: str) -> Rollout:
        rollout = self.rollouts.get(model)
        if rollout is None:
            raise RolloutError(404, "no_rollout", f"no rollout of model {model!r} is known")
        return rollout

    def _current_table(self, model: str) -> RoutingTable | None:
        tables = [self.follower.table(model), self.publisher.stored(model)]
        known = [t for t in tables if t is not None]
        return max(known, key=lambda t: t.revision) if known else None

    def _known_revision(self, model: str) -> int:
        table = self._current_table(model)
        return table.revision if table is not None else 0

    def _commit(self, rollout: Rollout, decision: Decision) -> Decision:
        """Record, then apply, then publish (see the module docstring)."""
        plan = rollout.plan
        entries = routing_entries(plan, decision.after)
        changed = entries != routing_entries(plan, decision.before)
        revision = decision.after.revision
        if changed:
            revision = max(revision, self._known_revision(decision.after.model)) + 1
        signature = (
            decision.action,
            decision.after.phase,
            decision.after.step_index,
            tuple(g.status for g in decision.gates),
        )
        now = decision.after.updated_ms
        coalesce = (
            decision.action is Action.wait
            and signature == rollout.recorded_signature
            and now - rollout.recorded_ms < self.settings.rollout_record_wait_every_s * 1000
        )
        seq = decision.before.seq + (0 if coalesce else 1)
        decision = replace(
            decision, after=decision.after.model_copy(update={"revision": revision, "seq": seq})
        )
        if not coalesce:
            self.decisions.record(decision_row(plan, decision, entries))
            rollout.recorded_signature, rollout.recorded_ms = signature, now
        rollout.state = decision.after
        rollout.last = decision
        self.metrics.decisions.labels(decision.action.value).inc()
        if decision.transition or decision.action is not Action.wait:
            log.info(
                "rollout decision",
                extra={"model": decision.after.model, "action": decision.action.value,
                       "state": decision.after.label(), "reason": decision.reason,
                       "revision": revision},
            )  # fmt: skip
        if changed:
            rollout.unpublished = routing_table(decision.after, entries, revision, now)
            self._publish(rollout)
        return decision

    def _publish(self, rollout: Rollout) -> None:
        table = rollout.unpublished
        if table is None:
            return
        try:
            self.publisher.publish(table)
        except PublishError as exc:
            self.metrics.publish_failures.inc()
            log.warning("routing not published yet", extra={"error": str(exc)})
            return
        rollout.unpublished = None

    def _update_gauges(self) -> None:
        self.metrics.active.set(sum(not r.state.finished for r in self.rollouts.values()))
        for model, rollout in self.rollouts.items():
            weights = {e.version: e.weight for e in routing_entries(rollout.plan, rollout.state)}
            self.metrics.candidate_weight.labels(model).set(
                weights.get(rollout.state.candidate, 0.0)
            )


def _now_ms() -> int:
    return int(time.time() * 1000)
