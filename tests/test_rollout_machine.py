"""The rollout state machine and its routing, without servers: every transition, every gate."""

from __future__ import annotations

import numpy as np
import pytest

from schemas.messages import Route, RouteRole
from services.common.routing import route_for
from services.rollout.machine import (
    Action,
    Command,
    Evidence,
    FiringAlert,
    GateStatus,
    Measurement,
    Phase,
    RolloutState,
    TransitionError,
    command,
    decide,
    new_rollout,
    quality_drop,
)
from services.rollout.plan import parse_plan
from services.rollout.traffic import routing_entries, routing_table, step_route

T0 = 1_800_000_000_000
S = 1000  # one second in ms

PLAN = parse_plan(
    """
model: fraud
candidate: "2"
steps:
  - {kind: shadow, sample_rate: 0.25, min_duration_s: 10, min_samples: 100}
  - {kind: canary, weight: 0.1, min_duration_s: 10, min_samples: 100}
  - {kind: canary, weight: 0.3, min_duration_s: 10, min_samples: 100}
  - {kind: canary, weight: 1.0, min_duration_s: 10, min_samples: 100}
gates:
  max_error_rate: 0.01
  max_p99_latency_ms: 100
  max_prediction_drift: 0.1
  min_shadow_agreement: 0.9
  min_samples: 50
failure_threshold: 2
"""
)


def plan_with(**changes) -> object:
    return PLAN.model_copy(update=changes)


def good(requests: int = 500, **overrides) -> Evidence:
    """Evidence every gate of PLAN passes, with enough samples."""
    fields = {
        "since_ms": T0,
        "until_ms": T0 + 60 * S,
        "requests": requests,
        "error_rate": Measurement(0.0, requests),
        "p99_latency_ms": Measurement(20.0, requests),
        "prediction_drift": Measurement(0.02, requests),
        "shadow_agreement": Measurement(0.97, requests),
    }
    fields.update(overrides)
    return Evidence(**fields)


def started(plan=PLAN) -> RolloutState:
    state = new_rollout(plan, "r1", "1", T0)
    decision = decide(plan, state, Evidence(T0, T0), T0)
    assert decision.action is Action.start
    return decision.after


def at_step(index: int, plan=PLAN, now_ms: int = T0) -> RolloutState:
    phase = Phase(plan.steps[index].kind)
    return started(plan).model_copy(
        update={"phase": phase, "step_index": index, "step_started_ms": now_ms}
    )


# -- start and advance ----------------------------------------------------------------------


def test_a_new_rollout_is_pending_and_starts_in_its_first_step():
    state = new_rollout(PLAN, "r1", "1", T0)
    assert state.phase is Phase.pending and state.step_index == -1

    decision = decide(PLAN, state, Evidence(T0, T0), T0 + 5)

    assert decision.action is Action.start and decision.transition
    assert (decision.after.phase, decision.after.step_index) == (Phase.shadow, 0)
    assert decision.after.step_started_ms == T0 + 5
    assert decision.after.label() == "shadow[0]"


def test_a_good_candidate_walks_every_step_then_is_promoted():
    state = started()
    now = T0
    phases = []
    for _ in range(len(PLAN.steps)):
        now += 11 * S
        decision = decide(PLAN, state, good(), now)
        phases.append((decision.action, decision.after.label()))
        state = decision.after
    assert phases == [
        (Action.advance, "canary[1]"),
        (Action.advance, "canary[2]"),
        (Action.advance, "canary[3]"),
        (Action.promote, "promoted"),
    ]
    assert state.finished
    with pytest.raises(TransitionError) as caught:
        decide(PLAN, state, good(), now + S)
    assert caught.value.code == "rollout_finished"


def test_advancing_restarts_the_step_clock_and_clears_failures():
    state = at_step(1).model_copy(update={"consecutive_failures": 1})
    decision = decide(PLAN, state, good(), T0 + 20 * S)
    assert decision.action is Action.advance
    assert decision.after.step_started_ms == T0 + 20 * S
    assert decision.after.consecutive_failures == 0


# -- waiting: never pass on too little evidence ---------------------------------------------


def test_waits_until_the_minimum_duration_has_passed():
    decision = decide(PLAN, at_step(1), good(), T0 + 9 * S)
    assert decision.action is Action.wait and not decision.transition
    assert "9.0s of 10s" in decision.reason


def test_waits_until_the_candidate_has_the_minimum_sample():
    decision = decide(PLAN, at_step(1), good(requests=99), T0 + 60 * S)
    assert decision.action is Action.wait
    assert "99 of 100 candidate predictions" in decision.reason


def test_a_gate_with_too_few_samples_waits_instead_of_passing():
    evidence = good(p99_latency_ms=Measurement(10.0, 49))
    decision = decide(PLAN, at_step(1), evidence, T0 + 60 * S)

    assert decision.action is Action.wait
    statuses = {g.name: g.status for g in decision.gates}
    assert statuses["p99_latency_ms"] is GateStatus.insufficient
    assert "p99_latency_ms has 49 samples" in decision.reason


def test_a_gate_with_no_measurement_at_all_waits():
    evidence = good(prediction_drift=Measurement())
    decision = decide(PLAN, at_step(2), evidence, T0 + 60 * S)
    assert decision.action is Action.wait


def test_a_breach_on_too_few_samples_waits_rather_than_fails():
    evidence = good(p99_latency_ms=Measurement(900.0, 10))
    decision = decide(PLAN, at_step(1), evidence, T0 + 60 * S)
    assert decision.action is Action.wait and decision.after.consecutive_failures == 0


def test_error_rate_fails_early_when_errors_already_exceed_the_minimum_samples_share():
    # 5 errors in 10 requests: even 40 good answers to come would leave 10% > 1%.
    evidence = good(requests=10, error_rate=Measurement(0.5, 10))
    decision = decide(plan_with(failure_threshold=1), at_step(1), evidence, T0 + S)

    assert decision.action is Action.rollback
    gate = next(g for g in decision.gates if g.name == "error_rate")
    assert gate.status is GateStatus.failed and gate.samples == 10


def test_latency_ratio_to_the_champion_fails_a_slow_candidate_and_spares_a_slow_path():
    plan = plan_with(
        gates=PLAN.gates.model_copy(
            update={"max_p99_latency_ms": None, "max_p99_latency_ratio": 1.5}
        ),
        failure_threshold=1,
    )

    def ratio_gate(ratio: float, step: int = 1):
        evidence = good(p99_latency_ratio=Measurement(ratio, 500))
        decision = decide(plan, at_step(step), evidence, T0 + 60 * S)
        return decision, next(g for g in decision.gates if g.name == "p99_latency_ratio")

    # both versions at 900 ms p99 behind a slow broker: ratio 1.0, the candidate is fine
    decision, gate = ratio_gate(1.0)
    assert gate.status is GateStatus.passed and decision.action is Action.advance
    decision, gate = ratio_gate(2.0)
    assert gate.status is GateStatus.failed and decision.action is Action.rollback
    _, gate = ratio_gate(2.0, step=3)  # canary at weight 1.0: no champion traffic to compare
    assert gate.status is GateStatus.skipped


def test_latency_ratio_has_no_value_without_champion_latency():
    from services.monitor.client import Evidence as Measured
    from services.rollout.evidence import latency_ratio

    assert latency_ratio(Measured(300.0, 400), Measured(200.0, 250)) == Measurement(1.5, 250)
    assert latency_ratio(Measured(300.0, 400), Measured(None, 0)) == Measurement(None, 0)
    assert latency_ratio(Measured(None, 0), Measured(200.0, 250)).value is None


def test_shadow_agreement_is_only_a_gate_in_shadow_steps():
    evidence = good(shadow_agreement=Measurement())
    in_canary = decide(PLAN, at_step(1), evidence, T0 + 60 * S)
    assert in_canary.action is Action.advance
    assert {g.name: g.status for g in in_canary.gates}["shadow_agreement"] is GateStatus.skipped

    in_shadow = decide(PLAN, at_step(0), evidence, T0 + 60 * S)
    assert in_shadow.action is Action.wait


def test_comparisons_with_the_champion_are_skipped_when_the_step_leaves_it_no_traffic():
    evidence = good(prediction_drift=Measurement(None, 0))
    decision = decide(PLAN, at_step(3), evidence, T0 + 60 * S)  # canary at weight 1.0
    assert decision.action is Action.promote
    gate = {g.name: g for g in decision.gates}["prediction_drift"]
    assert gate.status is GateStatus.skipped and gate.note == "the champion serves no traffic"


# -- failures -----------------------------------------------------------------------------------


def test_one_failed_evaluation_below_the_threshold_holds_and_counts():
    evidence = good(error_rate=Measurement(0.05, 500))
    decision = decide(PLAN, at_step(2), evidence, T0 + 60 * S)

    assert decision.action is Action.hold and not decision.transition
    assert decision.after.consecutive_failures == 1
    assert "gate failed (1 of 2)" in decision.reason and "error_rate" in decision.reason


def test_canary_rolls_back_when_error_rate_fails_threshold_times_in_a_row():
    evidence = good(error_rate=Measurement(0.05, 500))
    first = decide(PLAN, at_step(2), evidence, T0 + 60 * S)
    second = decide(PLAN, first.after, evidence, T0 + 61 * S)

    assert second.action is Action.rollback
    assert second.after.phase is Phase.rolled_back and second.after.finished
    assert "2 consecutive failed evaluations" in second.reason
    failed = [g for g in second.gates if g.status is GateStatus.failed]
    assert [(g.name, g.value, g.threshold, g.samples) for g in failed] == [
        ("error_rate", 0.05, 0.01, 500)
    ]


def test_an_evaluation_without_failures_resets_the_consecutive_count():
    bad = good(error_rate=Measurement(0.05, 500))
    first = decide(PLAN, at_step(2), bad, T0 + 5 * S)
    recovered = decide(PLAN, first.after, good(), T0 + 6 * S)  # waits (min duration)
    assert recovered.action is Action.wait and recovered.after.consecutive_failures == 0
    again = decide(PLAN, recovered.after, bad, T0 + 7 * S)
    assert again.action is Action.hold and again.after.consecutive_failures == 1


@pytest.mark.parametrize(
    ("gate", "measurement"),
    [
        ("p99_latency_ms", Measurement(250.0, 500)),
        ("prediction_drift", Measurement(0.4, 500)),
        ("shadow_agreement", Measurement(0.6, 500)),
    ],
)
def test_each_gate_can_fail_a_shadow_step(gate, measurement):
    plan = plan_with(failure_threshold=1)
    decision = decide(plan, at_step(0, plan), good(**{gate: measurement}), T0 + 60 * S)
    assert decision.action is Action.rollback
    assert {g.name for g in decision.gates if g.status is GateStatus.failed} == {gate}


def test_on_failure_pause_holds_the_traffic_of_the_failing_step():
    plan = plan_with(on_failure="pause", failure_threshold=1)
    state = at_step(2, plan)
    decision = decide(plan, state, good(p99_latency_ms=Measurement(500.0, 500)), T0 + S)

    assert decision.action is Action.pause and decision.after.phase is Phase.paused
    assert decision.after.step_index == 2
    assert routing_entries(plan, decision.after) == routing_entries(plan, state)
    waiting = decide(plan, decision.after, good(), T0 + 100 * S)
    assert waiting.action is Action.wait and waiting.after == decision.after


def test_quality_gate_is_skipped_without_labels_unless_labels_are_required():
    gates = PLAN.gates.model_copy(update={"max_quality_drop": 0.02, "min_label_samples": 100})
    plan = plan_with(gates=gates)
    no_labels = good(quality_drop=Measurement(None, 0))

    decision = decide(plan, at_step(1, plan), no_labels, T0 + 60 * S)
    assert decision.action is Action.advance
    assert {g.name: g.status for g in decision.gates}["quality_drop_auc"] is GateStatus.skipped

    strict = plan_with(gates=gates.model_copy(update={"require_labels": True}))
    assert decide(strict, at_step(1, strict), no_labels, T0 + 60 * S).action is Action.wait


def test_quality_gate_fails_when_the_candidate_is_worse_than_the_champion_by_more_than_allowed():
    gates = PLAN.gates.model_copy(update={"max_quality_drop": 0.02, "min_label_samples": 100})
    plan = plan_with(gates=gates, failure_threshold=1)
    evidence = good(quality_drop=Measurement(quality_drop("auc", 0.80, 0.86), 300))
    decision = decide(plan, at_step(1, plan), evidence, T0 + 60 * S)
    assert decision.action is Action.rollback
    assert quality_drop("log_loss", 0.5, 0.4) == pytest.approx(0.1)


def test_feature_drift_gate_fails_on_the_most_drifted_feature():
    gates = PLAN.gates.model_copy(update={"max_feature_drift": 0.25})
    plan = plan_with(gates=gates, failure_threshold=1)
    evidence = good(feature_drift=Measurement(0.4, 800, subject="amount"))
    decision = decide(plan, at_step(1, plan), evidence, T0 + 60 * S)
    assert decision.action is Action.rollback
    assert "feature_drift_psi[amount] 0.4" in decision.reason


def test_firing_alerts_fail_from_the_configured_severity_on():
    critical = FiringAlert("errors", "error_rate", "", "critical", 0.2, 0.05)
    warning = FiringAlert("drift", "psi", "amount", "warning", 0.15, 0.1)
    plan = plan_with(failure_threshold=1)

    decision = decide(plan, at_step(1, plan), good(alerts=(warning,)), T0 + S)
    assert decision.action is Action.wait
    decision = decide(plan, at_step(1, plan), good(alerts=(critical,)), T0 + S)
    assert decision.action is Action.rollback and "alert_errors_error_rate" in decision.reason

    strict = plan_with(
        gates=PLAN.gates.model_copy(update={"fail_on_alerts": "warning"}), failure_threshold=1
    )
    assert decide(strict, at_step(1, strict), good(alerts=(warning,)), T0 + S).action is (
        Action.rollback
    )
    off = plan_with(gates=PLAN.gates.model_copy(update={"fail_on_alerts": "none"}))
    assert decide(off, at_step(1, off), good(alerts=(critical,)), T0 + S).action is Action.wait


# -- operator overrides -------------------------------------------------------------------------


def test_pause_then_resume_restarts_the_step_clock():
    state = at_step(2).model_copy(update={"consecutive_failures": 1})
    paused = command(PLAN, state, Command.pause, T0 + 5 * S, actor="alice", note="incident")
    assert paused.action is Action.pause and paused.after.phase is Phase.paused
    assert paused.actor == "alice" and "pause by alice: incident" in paused.reason

    resumed = command(PLAN, paused.after, Command.resume, T0 + 50 * S)
    assert resumed.action is Action.resume
    assert (resumed.after.phase, resumed.after.step_index) == (Phase.canary, 2)
    assert resumed.after.step_started_ms == T0 + 50 * S
    assert resumed.after.consecutive_failures == 0


def test_resuming_a_rollout_paused_before_its_first_step_makes_it_pending_again():
    state = new_rollout(PLAN, "r1", "1", T0)
    paused = command(PLAN, state, Command.pause, T0)
    assert command(PLAN, paused.after, Command.resume, T0).after.phase is Phase.pending


@pytest.mark.parametrize(
    ("order", "phase"), [(Command.promote, Phase.promoted), (Command.abort, Phase.aborted)]
)
def test_promote_and_abort_apply_from_any_live_phase(order, phase):
    for state in (new_rollout(PLAN, "r1", "1", T0), at_step(0), at_step(3)):
        assert command(PLAN, state, order, T0).after.phase is phase
    paused = command(PLAN, at_step(1), Command.pause, T0).after
    assert command(PLAN, paused, order, T0).after.phase is phase


def test_commands_that_do_not_apply_are_refused_with_a_code():
    with pytest.raises(TransitionError) as caught:
        command(PLAN, at_step(1), Command.resume, T0)
    assert caught.value.code == "not_paused"
    paused = command(PLAN, at_step(1), Command.pause, T0).after
    with pytest.raises(TransitionError) as caught:
        command(PLAN, paused, Command.pause, T0)
    assert caught.value.code == "already_paused"
    aborted = command(PLAN, at_step(1), Command.abort, T0).after
    for order in Command:
        with pytest.raises(TransitionError) as caught:
            command(PLAN, aborted, order, T0)
        assert caught.value.code == "rollout_finished"


# -- A/B ------------------------------------------------------------------------------------


AB = parse_plan(
    """
model: shop
candidate: "5"
steps: [{kind: ab, weight: 0.5, min_duration_s: 10, min_samples: 400}]
gates: {max_error_rate: 0.05, min_samples: 10}
ab: {outcome: label_rate, decide: auto, on_inconclusive: pause}
"""
)


def ab_evidence(champion_rate: float, candidate_rate: float, n: int = 2000) -> Evidence:
    rng = np.random.default_rng(1)
    return good(
        requests=n,
        ab_champion=(rng.random(n) < champion_rate).astype(float),
        ab_candidate=(rng.random(n) < candidate_rate).astype(float),
    )


def test_ab_holds_the_split_until_each_arm_has_the_sample_size():
    evidence = ab_evidence(0.1, 0.2, n=300)
    decision = decide(AB, at_step(0, AB), evidence, T0 + 60 * S)
    assert decision.action is Action.wait
    assert "300 champion / 300 candidate of 400 per arm" in decision.reason


@pytest.mark.parametrize(
    ("rates", "action", "phase", "recommendation"),
    [
        ((0.10, 0.20), Action.promote, Phase.promoted, "promote"),
        ((0.20, 0.10), Action.rollback, Phase.rolled_back, "keep_champion"),
        ((0.15, 0.15), Action.pause, Phase.paused, "inconclusive"),
    ],
)
def test_ab_in_auto_mode_acts_on_the_significance_test(rates, action, phase, recommendation):
    decision = decide(AB, at_step(0, AB), ab_evidence(*rates), T0 + 60 * S)
    assert (decision.action, decision.after.phase) == (action, phase)
    assert decision.ab is not None and decision.ab.test == "two_proportion_z"
    assert f"recommend {recommendation}" in decision.reason


def test_ab_in_manual_mode_pauses_with_a_recommendation_holding_the_split():
    plan = AB.model_copy(update={"ab": AB.ab.model_copy(update={"decide": "manual"})})
    state = at_step(0, plan)
    decision = decide(plan, state, ab_evidence(0.1, 0.2), T0 + 60 * S)
    assert decision.action is Action.pause and "recommend promote" in decision.reason
    assert routing_entries(plan, decision.after) == routing_entries(plan, state)


# -- routing per state ------------------------------------------------------------------------


def test_routing_entries_for_every_phase():
    def shape(state):
        return [(e.version, e.role, e.weight, e.shadow_sample_rate)
                for e in routing_entries(PLAN, state)]  # fmt: skip

    pending = new_rollout(PLAN, "r1", "1", T0)
    assert shape(pending) == [("1", RouteRole.champion, 1.0, 0.0)]
    assert shape(at_step(0)) == [
        ("1", RouteRole.champion, 1.0, 0.0),
        ("2", RouteRole.shadow, 0.0, 0.25),
    ]
    assert shape(at_step(2)) == [("1", RouteRole.champion, 0.7, 0.0),
                                 ("2", RouteRole.canary, 0.3, 0.0)]  # fmt: skip
    assert shape(at_step(3)) == [("1", RouteRole.champion, 0.0, 0.0),
                                 ("2", RouteRole.canary, 1.0, 0.0)]  # fmt: skip
    promoted = command(PLAN, at_step(1), Command.promote, T0).after
    assert shape(promoted) == [("2", RouteRole.champion, 1.0, 0.0)]
    for order in (Command.abort,):
        assert shape(command(PLAN, at_step(3), order, T0).after) == [
            ("1", RouteRole.champion, 1.0, 0.0)
        ]
    assert step_route(PLAN, at_step(0)) is Route.shadow
    assert step_route(PLAN, at_step(2)) is Route.canary
    assert step_route(PLAN, promoted) is None


def test_keys_only_move_to_the_candidate_as_weights_grow_and_all_return_after_rollback():
    keys = [f"card-{i}" for i in range(5000)]
    on_candidate = []
    for index in (1, 2, 3):
        table = routing_table(at_step(index), routing_entries(PLAN, at_step(index)), index, T0)
        on_candidate.append({k for k in keys if route_for(k, table)[0] == "2"})
    assert on_candidate[0] <= on_candidate[1] <= on_candidate[2] == set(keys)
    assert 0.07 < len(on_candidate[0]) / len(keys) < 0.13
    assert 0.26 < len(on_candidate[1]) / len(keys) < 0.34

    evidence = good(error_rate=Measurement(0.5, 500))
    rolled_back = decide(plan_with(failure_threshold=1), at_step(2), evidence, T0).after
    table = routing_table(rolled_back, routing_entries(PLAN, rolled_back), 9, T0)
    assert {route_for(k, table) for k in keys} == {("1", Route.champion)}
    assert table.rollout_id == "r1" and table.revision == 9
