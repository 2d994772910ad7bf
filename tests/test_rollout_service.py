"""The rollout controller around the state machine, with in-memory stand-ins for ClickHouse,
the broker and the monitor: what it does when publishing routing fails."""

from __future__ import annotations

import pytest

from schemas.messages import RouteRole, RoutingEntry, RoutingTable
from services.rollout.machine import Command, Phase
from services.rollout.plan import parse_plan
from services.rollout.publisher import PublishError
from services.rollout.service import RolloutService
from services.rollout.settings import RolloutSettings

PLAN = parse_plan(
    """
model: fraud
candidate: "2"
steps:
  - {kind: canary, weight: 0.1, min_duration_s: 10, min_samples: 100}
"""
)


class Decisions:
    def __init__(self) -> None:
        self.rows: list = []

    def record(self, row) -> None:
        self.rows.append(row)

    def max_revision(self, _model: str) -> int:
        return 0


class Publisher:
    """Acks tables while `up`; raises `PublishError` like a broker that does not ack."""

    def __init__(self) -> None:
        self.up = True
        self.published: list[RoutingTable] = []

    def publish(self, table: RoutingTable) -> None:
        if not self.up:
            raise PublishError("no ack within 5s")
        self.published.append(table)

    def stored(self, _model: str) -> RoutingTable | None:
        return self.published[-1] if self.published else None


class Follower:
    def table(self, model: str) -> RoutingTable:
        entry = RoutingEntry(version="1", role=RouteRole.champion, weight=1.0)
        return RoutingTable(model=model, entries=[entry], revision=1, updated_at_ms=1)


class NoEvidence:
    def gather(self, *_args):
        pytest.fail("a finished rollout gathers no evidence")


@pytest.fixture
def controller() -> tuple[RolloutService, Publisher]:
    publisher = Publisher()
    service = RolloutService(RolloutSettings(), Decisions(), NoEvidence(), publisher, Follower())
    return service, publisher


def test_routing_of_a_finished_rollout_that_was_not_acked_is_published_on_a_later_round(
    controller,
):
    service, publisher = controller
    service.start(PLAN)
    assert [e.weight for e in publisher.published[-1].entries] == [0.9, 0.1]
    publisher.up = False
    service.command("fraud", Command.abort)  # everyone back to the champion: not acked
    rollout = service.rollouts["fraud"]
    assert rollout.state.phase is Phase.aborted and rollout.unpublished is not None
    assert service.due() == ["fraud"], "an unpublished table keeps the model in the rounds"

    publisher.up = True
    assert service.evaluate("fraud") is None  # finished: nothing to decide, only to publish
    assert rollout.unpublished is None
    last = publisher.published[-1]
    assert [(e.version, e.weight) for e in last.entries] == [("1", 1.0)]
    assert last.revision > publisher.published[0].revision
    assert service.due() == []
