"""The topic catalog: the single source for topic names, partition counts and policies.

`sluice dev up`, the docker-compose init job and the tests create topics from this list and
nothing else. Partition counts are explicit because a broker gives auto-created topics its
`num.partitions` default, and faust refuses a table whose changelog partition count differs from
its source topic's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.messages import (
    Alert,
    DeadLetter,
    Event,
    Label,
    Message,
    ModelRegistered,
    Prediction,
    PredictionRequest,
    RoutingTable,
)

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    """How one topic is laid out and what travels on it."""

    name: str
    partitions: int
    key: str
    schema: type[Message] | None
    cleanup_policy: str = "delete"
    retention_ms: int = 7 * DAY_MS
    extra_config: dict[str, str] = field(default_factory=dict)

    def config(self) -> dict[str, str]:
        """Broker-side topic configuration, as strings the admin API takes."""
        config = {"cleanup.policy": self.cleanup_policy, **self.extra_config}
        if self.cleanup_policy == "delete":
            config["retention.ms"] = str(self.retention_ms)
        return config


REQUESTS = TopicSpec("sluice.requests", 8, "entity id", PredictionRequest, retention_ms=DAY_MS)
PREDICTIONS = TopicSpec("sluice.predictions", 8, "entity id", Prediction)
EVENTS = TopicSpec("sluice.events", 8, "primary entity id", Event)
LABELS = TopicSpec("sluice.labels", 4, "entity id", Label, retention_ms=30 * DAY_MS)
ROUTING = TopicSpec("sluice.routing", 1, "model", RoutingTable, cleanup_policy="compact")
MODELS = TopicSpec("sluice.models", 1, "model/version", ModelRegistered, cleanup_policy="compact")
ALERTS = TopicSpec("sluice.alerts", 1, "model", Alert)
DLQ = TopicSpec("sluice.dlq", 4, "source key", DeadLetter, retention_ms=30 * DAY_MS)
FEATURES_REPARTITION = TopicSpec(
    "sluice.features.repartition", EVENTS.partitions, "entity", None, retention_ms=DAY_MS
)
"""Entity observations re-keyed by the features service so each entity has one writer."""

CATALOG: tuple[TopicSpec, ...] = (
    REQUESTS,
    PREDICTIONS,
    EVENTS,
    LABELS,
    ROUTING,
    MODELS,
    ALERTS,
    DLQ,
    FEATURES_REPARTITION,
)
"""Every topic Sluiceway owns."""

BY_NAME: dict[str, TopicSpec] = {spec.name: spec for spec in CATALOG}
