"""Who serves a model's traffic in each rollout state: routing entries and tables, pure.

The routing semantics are inference's (`services/common/routing.py`): the candidate as a canary
owns the lowest hash buckets `[0, weight)`, so raising the weight only adds keys to it (monotone)
and a key never flips while weights hold (sticky). Per state:

| state                         | entries                                                   |
|-------------------------------|-----------------------------------------------------------|
| pending, rolled_back, aborted | champion 100%                                             |
| shadow step (or paused in it) | champion 100% + candidate as shadow at the step's rate    |
| canary / ab step (or paused)  | champion 1 - w + candidate as canary at w                 |
| promoted                      | candidate 100% as the new champion                        |

A paused rollout holds the traffic of the step it paused in.
"""

from __future__ import annotations

from schemas.messages import Route, RouteRole, RoutingEntry, RoutingTable
from services.rollout.machine import Phase, RolloutState
from services.rollout.plan import RolloutPlan, ShadowStep


def routing_entries(plan: RolloutPlan, state: RolloutState) -> list[RoutingEntry]:
    """The routing entries that `state` calls for (see the module docstring)."""
    if state.phase is Phase.promoted:
        return [RoutingEntry(version=state.candidate, role=RouteRole.champion, weight=1.0)]
    if state.phase in (Phase.pending, Phase.rolled_back, Phase.aborted) or state.step_index < 0:
        return [RoutingEntry(version=state.champion, role=RouteRole.champion, weight=1.0)]
    step = plan.steps[state.step_index]
    if isinstance(step, ShadowStep):
        return [
            RoutingEntry(version=state.champion, role=RouteRole.champion, weight=1.0),
            RoutingEntry(
                version=state.candidate,
                role=RouteRole.shadow,
                weight=0.0,
                shadow_sample_rate=step.sample_rate,
            ),
        ]
    return [
        RoutingEntry(version=state.champion, role=RouteRole.champion, weight=1.0 - step.weight),
        RoutingEntry(version=state.candidate, role=RouteRole.canary, weight=step.weight),
    ]


def step_route(plan: RolloutPlan, state: RolloutState) -> Route | None:
    """The route the candidate serves on in the current (or held) step; None outside steps."""
    if state.step_index < 0 or state.finished:
        return None
    if isinstance(plan.steps[state.step_index], ShadowStep):
        return Route.shadow
    return Route.canary


def routing_table(
    state: RolloutState, entries: list[RoutingEntry], revision: int, now_ms: int
) -> RoutingTable:
    """The `sluice.routing` message for `state`'s model at `revision`."""
    return RoutingTable(
        model=state.model,
        entries=entries,
        revision=revision,
        rollout_id=state.rollout_id,
        updated_at_ms=now_ms,
    )
