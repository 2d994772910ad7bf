"""One pydantic v2 model per Kafka message, versioned by ``schema_version``.

Timestamps are integers in epoch milliseconds (UTC) and their field names end in ``_ms``: cheap
to encode, unambiguous across languages, and what Kafka itself uses for record timestamps.
Every model forbids nothing extra on purpose: producers in other languages may add fields, and
consumers ignore what they do not know (forward compatibility). A consumer refuses a message whose
``schema_version`` is newer than the one it was built for.
"""

from __future__ import annotations

import base64
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

Scalar = float | int | str | bool | None
"""A feature or field value as it travels in JSON."""

Identifier = Annotated[str, Field(min_length=1, max_length=256)]


def _from_base64(value: object) -> object:
    return base64.b64decode(value, validate=True) if isinstance(value, str) else value


Base64Bytes = Annotated[
    bytes,
    BeforeValidator(_from_base64),
    PlainSerializer(lambda raw: base64.b64encode(raw).decode("ascii"), when_used="json"),
    Field(json_schema_extra={"contentEncoding": "base64"}),
]
"""Raw bytes; standard base64 (RFC 4648, with padding) in JSON."""


class Message(BaseModel):
    """Base for every topic message: a version and lenient handling of unknown fields."""

    model_config = ConfigDict(extra="ignore")

    schema_version: int = Field(1, ge=1, description="Version of this message's schema.")


class ErrorBody(BaseModel):
    """The one error shape, shared by HTTP responses, error predictions and dead letters."""

    code: str = Field(description="Stable machine-readable code, e.g. `unknown_model`.")
    message: str = Field(description="Human-readable explanation.")
    details: dict | list | None = Field(None, description="Structured context, e.g. field paths.")


class PredictionRequest(Message):
    """A request to score one entity with one model (topic `sluice.requests`, key = entity id).

    Transport concerns travel in headers, not here: `request_id`, `deadline_ms` (absolute epoch
    ms) and `reply_partition` (set only by the gateway for synchronous requests).
    """

    request_id: Identifier
    model: Identifier
    entity_id: Identifier
    features: dict[str, Scalar] = Field(
        default_factory=dict, description="Request-time features, by name."
    )
    version: str | None = Field(None, description="Pin a version; routing table used if absent.")
    created_at_ms: int = Field(ge=0, description="When the client issued the request.")


class Route(StrEnum):
    """How a prediction was routed."""

    champion = "champion"
    canary = "canary"
    shadow = "shadow"
    pinned = "pinned"


class LatencyBreakdown(BaseModel):
    """Where the time of one prediction went, in milliseconds."""

    queue_ms: float = 0.0
    features_ms: float = 0.0
    model_ms: float = 0.0
    total_ms: float = 0.0


class Prediction(Message):
    """The outcome of one request for one version (topic `sluice.predictions`, key = entity id).

    Exactly one of `score`/`outputs` and `error` is meaningful: an error prediction carries the
    error and no scores. Shadow predictions carry `route=shadow` and never reach a client.
    """

    request_id: Identifier
    model: Identifier
    version: str
    route: Route
    entity_id: Identifier
    score: float | None = Field(None, description="Primary output, e.g. P(positive class).")
    outputs: dict[str, list[float]] = Field(
        default_factory=dict, description="Every model output, flattened, by output name."
    )
    features: dict[str, float] = Field(
        default_factory=dict, description="The feature vector actually served to the model."
    )
    defaulted: list[str] = Field(
        default_factory=list, description="Features that fell back to their declared default."
    )
    latency: LatencyBreakdown = Field(default_factory=LatencyBreakdown)
    batch_size: int = Field(0, ge=0, description="Rows in the ONNX run that scored this request.")
    error: ErrorBody | None = None
    created_at_ms: int = Field(ge=0, description="Request time, copied from the request.")
    scored_at_ms: int = Field(ge=0, description="When the prediction was produced.")


class Event(Message):
    """A business event (topic `sluice.events`, key = primary entity id), e.g. a transaction."""

    event_id: Identifier
    event_type: Identifier
    ts_ms: int = Field(ge=0, description="Event time.")
    entities: dict[str, str] = Field(
        description="Entity ids by entity name, e.g. {'card': 'c1', 'merchant': 'm9'}.",
        min_length=1,
    )
    fields: dict[str, Scalar] = Field(default_factory=dict)


class Label(Message):
    """Ground truth for an earlier prediction (topic `sluice.labels`, key = entity id).

    Joined to predictions on `request_id`; labels usually arrive long after the prediction.
    """

    request_id: Identifier
    model: Identifier | None = Field(None, description="Model the label is for; any if absent.")
    entity_id: Identifier
    value: float = Field(description="The true outcome, e.g. 1.0 for fraud.")
    ts_ms: int = Field(ge=0, description="When the outcome became known.")


class RouteRole(StrEnum):
    """The part a version plays in a routing table."""

    champion = "champion"
    canary = "canary"
    shadow = "shadow"


class RoutingEntry(BaseModel):
    """One version's share of a model's traffic."""

    version: str
    role: RouteRole
    weight: float = Field(ge=0.0, le=1.0, description="Share of live traffic (canary/champion).")
    shadow_sample_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of requests copied to this shadow version."
    )


class RoutingTable(Message):
    """Who serves a model's traffic (compacted topic `sluice.routing`, key = model).

    Live weights are assigned by a sticky hash of the entity key: canaries take the lowest hash
    buckets, so a key on a canary at 10% stays on it at 30% (monotone as weights grow).
    """

    model: Identifier
    entries: list[RoutingEntry] = Field(min_length=1)
    revision: int = Field(ge=0, description="Increases with every change; older ones are ignored.")
    rollout_id: str | None = None
    updated_at_ms: int = Field(ge=0)


class ModelRegistered(Message):
    """A version was added to or removed from the registry (topic `sluice.models`, key = model)."""

    model: Identifier
    version: Identifier
    action: Literal["registered", "removed"] = "registered"
    path: str = Field(description="Path of the version folder in the model repository.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[str] = Field(default_factory=list, description="Ordered input feature names.")
    registered_at_ms: int = Field(ge=0)


class AlertState(StrEnum):
    firing = "firing"
    resolved = "resolved"


class Alert(Message):
    """A threshold breach or its recovery (topic `sluice.alerts`, key = model)."""

    alert_id: Identifier
    model: Identifier
    version: str
    route: str = ""
    kind: Identifier = Field(description="drift | prediction_drift | quality | latency | errors …")
    metric: str = Field(description="The statistic, e.g. psi, p99_ms, error_rate, auc.")
    feature: str = ""
    value: float
    threshold: float
    state: AlertState
    severity: Literal["info", "warning", "critical"] = "warning"
    window_start_ms: int = Field(ge=0)
    window_end_ms: int = Field(ge=0)
    ts_ms: int = Field(ge=0)


class DeadLetter(Message):
    """A message that could not be decoded, validated or handled (topic `sluice.dlq`)."""

    source_topic: str
    partition: int
    offset: int
    key: Base64Bytes | None = None
    original: Base64Bytes = Field(description="The message value exactly as consumed.")
    error: ErrorBody
    consumer_group: str = ""
    failed_at_ms: int = Field(ge=0)


MESSAGE_MODELS: dict[str, type[Message]] = {
    model.__name__: model
    for model in (
        PredictionRequest,
        Prediction,
        Event,
        Label,
        RoutingTable,
        ModelRegistered,
        Alert,
        DeadLetter,
    )
}
"""Every message model by name: the set `make schemas` exports."""
