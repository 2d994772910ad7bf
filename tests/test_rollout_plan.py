"""Rollout plans: YAML in, a validated plan or an error naming every problem out."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.rollout.plan import (
    AbStep,
    CanaryStep,
    PlanError,
    ShadowStep,
    load_plan,
    parse_plan,
)

REPO = Path(__file__).resolve().parent.parent

GOOD = """
model: fraud
candidate: 2
steps:
  - {kind: shadow, sample_rate: 0.5, min_duration_s: 5m, min_samples: 500}
  - {kind: canary, weight: 0.01, min_duration_s: 90s}
  - {kind: canary, weight: 0.1, min_duration_s: 60}
  - {kind: canary, weight: 1.0}
gates:
  max_error_rate: 0.02
  max_p99_latency_ms: 150
  min_shadow_agreement: 0.9
on_failure: pause
failure_threshold: 3
"""


def test_a_yaml_plan_parses_into_typed_steps_with_durations_in_seconds():
    plan = parse_plan(GOOD)

    assert plan.model == "fraud" and plan.candidate == "2" and plan.champion is None
    assert [type(s) for s in plan.steps] == [ShadowStep, CanaryStep, CanaryStep, CanaryStep]
    assert plan.steps[0].min_duration_s == 300.0
    assert plan.steps[1].min_duration_s == 90.0
    assert plan.steps[2].min_duration_s == 60.0
    assert plan.gates.max_p99_latency_ms == 150
    assert plan.gates.max_prediction_drift is None
    assert (plan.on_failure, plan.failure_threshold) == ("pause", 3)


def test_every_problem_is_reported_with_its_path():
    text = """
model: fraud
candidate: two
steps:
  - {kind: canary, weight: 1.5}
  - {kind: ramp, weight: 0.5}
gates: {max_eror_rate: 0.1}
"""
    with pytest.raises(PlanError) as caught:
        parse_plan(text, "bad.yaml")

    locations = {problem["loc"] for problem in caught.value.problems}
    assert "candidate" in locations
    assert "steps.0.canary.weight" in locations
    assert any(loc.startswith("steps.1") for loc in locations)
    assert "gates.max_eror_rate" in locations
    assert str(caught.value).startswith("bad.yaml: invalid rollout plan")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("[{kind: canary, weight: 0.3}, {kind: canary, weight: 0.1}]", "weights must grow"),
        ("[{kind: canary, weight: 0.1}, {kind: shadow, sample_rate: 1}]", "cannot follow"),
        ("[{kind: ab, weight: 0.5}, {kind: canary, weight: 1.0}]", "must be the last step"),
        ("[]", "at least 1"),
    ],
)
def test_step_sequences_that_would_break_monotone_routing_are_refused(steps, message):
    with pytest.raises(PlanError, match=message):
        parse_plan(f"model: m\ncandidate: '2'\nsteps: {steps}\n")


def test_champion_equal_to_candidate_is_refused():
    with pytest.raises(PlanError, match="must be different"):
        parse_plan("model: m\ncandidate: 2\nchampion: 2\nsteps: [{kind: canary, weight: 1}]")


def test_not_yaml_or_not_a_mapping_gives_a_plan_error():
    with pytest.raises(PlanError, match="not valid YAML"):
        parse_plan("model: [unclosed")
    with pytest.raises(PlanError, match="expected a mapping"):
        parse_plan("- just\n- a list\n")
    with pytest.raises(PlanError, match="not a duration"):
        parse_plan("model: m\ncandidate: 2\nsteps: [{kind: canary, weight: 1, "
                   "min_duration_s: soon}]")  # fmt: skip


def test_blue_green_is_a_single_full_weight_step():
    plan = parse_plan("model: m\ncandidate: 3\nsteps: [{kind: canary, weight: 1.0}]")
    assert plan.steps == [CanaryStep(kind="canary", weight=1.0)]


def test_ab_step_defaults_to_an_even_split_and_a_manual_decision():
    plan = parse_plan("model: m\ncandidate: 3\nsteps: [{kind: ab}]\nab: {outcome: abs_error}")
    step = plan.steps[0]
    assert isinstance(step, AbStep) and step.weight == 0.5 and step.min_samples == 1000
    assert plan.ab.decide == "manual"
    assert plan.ab.better_is_higher is False


def test_every_example_plan_in_deploy_plans_is_valid():
    examples = sorted((REPO / "deploy" / "plans").glob("*.yaml"))
    assert examples, "deploy/plans/ has no example plans"
    for path in examples:
        load_plan(path)


def test_a_missing_file_is_a_plan_error(tmp_path):
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "nope.yaml")
