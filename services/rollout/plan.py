"""Rollout plans: what an operator writes (YAML or JSON) to move a candidate version to traffic.

A plan names the model, the candidate version and (optionally) the champion it replaces, then a
list of steps the controller walks through in order:

- `shadow` — the candidate scores a sampled copy of live requests off the reply path;
- `canary` — the candidate answers a share (`weight`) of live traffic; weights must grow from one
  canary step to the next, so the sticky routing hash only ever adds keys to the candidate;
- `ab` — a fixed split held until `min_samples` labelled outcomes per arm, then a significance
  test (see `abtest.py`) decides or recommends.

Blue/green is a plan with a single `canary` step of weight 1.0.

Every step has a minimum duration and a minimum sample count; the step's gates (error rate, p99
latency, prediction drift and agreement versus the champion, quality drop when labels exist,
feature drift, monitor alerts) are evaluated on every interval. `failure_threshold` consecutive
failed evaluations trigger `on_failure` (rollback, or pause and hold the traffic split).

Surprises:
- Unknown keys are errors (a plan is written by hand: `max_eror_rate` must not be ignored).
- Durations accept seconds (`90`) or a number with a unit (`"90s"`, `"5m"`, `"1h"`).
- A gate left out is not checked; only `max_error_rate` has a default (1%).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from services.common.codec import validation_details

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _seconds(value: object) -> object:
    """`"5m"` -> 300.0; numbers pass through (pydantic checks them)."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use seconds, or e.g. '90s', '5m', '1h')")
        return float(match.group(1)) * _UNIT_S[match.group(2)]
    return value


Seconds = Annotated[float, BeforeValidator(_seconds), Field(ge=0)]
"""A duration in seconds; YAML may say `90`, `"90s"`, `"5m"` or `"1h"`."""

Version = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) else v),
                    Field(pattern=r"^[0-9]{1,18}$")]  # fmt: skip
"""A model version: digits only (the registry's rule); YAML's `2` is read as `"2"`."""

ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Step(_Strict):
    min_duration_s: Seconds = Field(
        0.0, description="The step lasts at least this long, however good the evidence."
    )
    min_samples: int = Field(
        0, ge=0, description="Candidate predictions on the step's route before it may pass."
    )


class ShadowStep(_Step):
    """The candidate scores a copy of `sample_rate` of live requests; clients never see it."""

    kind: Literal["shadow"]
    sample_rate: float = Field(gt=0.0, le=1.0)


class CanaryStep(_Step):
    """The candidate answers `weight` of live traffic (lowest hash buckets, sticky)."""

    kind: Literal["canary"]
    weight: float = Field(gt=0.0, le=1.0)


class AbStep(_Step):
    """A fixed split: the candidate answers `weight` of traffic until both arms have
    `min_samples` labelled outcomes; then the A/B test decides (see `AbConfig`)."""

    kind: Literal["ab"]
    weight: float = Field(0.5, gt=0.0, lt=1.0)
    min_samples: int = Field(
        1000, ge=1, description="Labelled outcomes per arm (champion and candidate)."
    )


Step = Annotated[ShadowStep | CanaryStep | AbStep, Field(discriminator="kind")]

QualityMetric = Literal["auc", "accuracy", "precision", "recall", "f1", "log_loss"]
LOWER_IS_BETTER_METRICS = frozenset({"log_loss"})


class Gates(_Strict):
    """Thresholds evaluated at every step; `None` switches a gate off."""

    max_error_rate: float | None = Field(
        0.01, ge=0, le=1, description="Share of the candidate's predictions that are errors."
    )
    max_p99_latency_ms: float | None = Field(
        None, gt=0, description="p99 of the candidate's end-to-end latency, milliseconds."
    )
    max_p99_latency_ratio: float | None = Field(
        None,
        gt=0,
        description="p99 of the candidate's latency over the champion's in the same step "
        "(1.5 = half again as slow): holds when the path both share slows down.",
    )
    max_prediction_drift: float | None = Field(
        None, ge=0, le=1, description="Jensen-Shannon distance of candidate vs champion scores."
    )
    min_shadow_agreement: float | None = Field(
        None, ge=0, le=1, description="Share of shadowed requests decided as the live version did."
    )
    max_quality_drop: float | None = Field(
        None, ge=0, description="How much worse `quality_metric` may be than the champion's."
    )
    quality_metric: QualityMetric = "auc"
    require_labels: bool = Field(
        False,
        description="Without enough labels the quality gate waits (true) or is skipped (false).",
    )
    max_feature_drift: float | None = Field(
        None, ge=0, description="Largest per-feature drift (`feature_drift_method`) allowed."
    )
    feature_drift_method: Literal["psi", "jensenshannon", "wasserstein"] = "psi"
    decision_threshold: float = Field(
        0.5, ge=0, le=1, description="Score at which a prediction counts as positive."
    )
    min_samples: int = Field(
        50, ge=1, description="Samples a gate's value needs before it can pass or fail."
    )
    min_label_samples: int = Field(
        200, ge=1, description="Labelled predictions per version before quality is compared."
    )
    fail_on_alerts: Literal["none", "warning", "critical"] = Field(
        "critical", description="A firing monitor alert on the candidate this severe fails."
    )


AbOutcome = Literal["label_rate", "correct_rate", "label_value", "abs_error"]
RATE_OUTCOMES = frozenset({"label_rate", "correct_rate"})


class AbConfig(_Strict):
    """How an `ab` step's outcome is measured and what its result does.

    Outcomes per labelled request: `label_rate` (label >= 0.5, e.g. conversion), `correct_rate`
    (the decision at the threshold matches the label) — both compared with a two-proportion
    z-test; `label_value` (the label itself, e.g. revenue), `abs_error` (|score - label|) —
    compared with Mann-Whitney U.
    """

    outcome: AbOutcome = "correct_rate"
    higher_is_better: bool | None = Field(None, description="Default: true, except for abs_error.")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="Significance level (two-sided).")
    decide: Literal["auto", "manual"] = Field(
        "manual", description="auto: act on the result; manual: pause with a recommendation."
    )
    on_inconclusive: Literal["rollback", "promote", "pause"] = Field(
        "rollback", description="What `decide: auto` does when the difference is not significant."
    )

    @property
    def better_is_higher(self) -> bool:
        """Whether a larger outcome favours an arm."""
        if self.higher_is_better is not None:
            return self.higher_is_better
        return self.outcome != "abs_error"


class RolloutPlan(_Strict):
    """A whole rollout (see the module docstring)."""

    model: ModelName
    candidate: Version
    champion: Version | None = Field(
        None, description="The version replaced; default: the champion of the routing table."
    )
    description: str = ""
    steps: list[Step] = Field(min_length=1)
    gates: Gates = Gates()
    on_failure: Literal["rollback", "pause"] = "rollback"
    failure_threshold: int = Field(
        1, ge=1, description="Consecutive failed evaluations that trigger `on_failure`."
    )
    ab: AbConfig = AbConfig()

    @model_validator(mode="after")
    def _check_steps(self) -> RolloutPlan:
        if self.champion is not None and self.champion == self.candidate:
            raise ValueError("champion and candidate must be different versions")
        seen_live = False
        previous_weight = 0.0
        for index, step in enumerate(self.steps):
            if isinstance(step, ShadowStep):
                if seen_live:
                    raise ValueError(f"steps.{index}: a shadow step cannot follow a live step")
                continue
            if isinstance(step, AbStep) and index != len(self.steps) - 1:
                raise ValueError(f"steps.{index}: an ab step must be the last step")
            if step.weight <= previous_weight:
                raise ValueError(
                    f"steps.{index}: weights must grow ({step.weight} after {previous_weight}); "
                    "routing is monotone only while the candidate's share grows"
                )
            seen_live, previous_weight = True, step.weight
        return self


class PlanError(ValueError):
    """A plan that cannot be used; `problems` lists `{"loc": "steps.1.weight", "msg": ...}`."""

    def __init__(self, message: str, problems: list[dict[str, str]] | None = None) -> None:
        self.problems = problems or []
        lines = [message] + [f"  {p['loc'] or '(plan)'}: {p['msg']}" for p in self.problems]
        super().__init__("\n".join(lines))


def parse_plan(text: str, source: str = "plan") -> RolloutPlan:
    """Parse a YAML (or JSON, a subset of YAML) plan and validate it.

    Raises `PlanError` naming `source` and every problem with its path.
    """
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{source}: expected a mapping at the top, got {type(data).__name__}")
    return plan_from_dict(data, source)


def plan_from_dict(data: dict, source: str = "plan") -> RolloutPlan:
    """Validate an already parsed plan; raises `PlanError` with every problem."""
    try:
        return RolloutPlan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(
            f"{source}: invalid rollout plan ({exc.error_count()} problems)",
            validation_details(exc),
        ) from None


def load_plan(path: Path) -> RolloutPlan:
    """Read and validate a plan file."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror}") from None
    return parse_plan(text, str(path))
