"""Declarative feature definitions: Python objects with a YAML/JSON form, one file per deployment.

A definitions file has three sections::

    entities:                    # what features describe; TTL is per entity (one Redis hash)
      card: {ttl: 7d, description: a payment card}
    features:                    # one sliding-window aggregation each
      - name: card_txn_count_10m
        entity: card
        source: sluice.events    # topic (and ClickHouse `events` offline)
        event_types: [transaction]
        aggregation: count       # count|sum|mean|min|max|last|distinct_count
        field: amount            # event field; `entities.<name>` reads an entity id
        where: [{field: channel, op: eq, value: online}]
        window: 10m              # 250ms, 30s, 10m, 1h, 24h, 7d or plain milliseconds
        allowed_lateness: 1m
        default: 0.0             # served when the store has no (fresh) value
    views:                       # the features a model reads, by name
      fraud: {features: [card_txn_count_10m]}

The same objects drive the stream (`services.features.stream`), the offline point-in-time
computation (`services.features.offline`) and the read path (`client.read_online`), which is what
keeps training and serving consistent. Feature names are unique across entities, so a model can
name a feature without its entity.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    model_validator,
)

from services.features.windows import (
    NUMERIC_AGGREGATIONS,
    Aggregation,
    Condition,
    Op,
    Value,
    WindowPlan,
    WindowSpec,
    canonical,
)

ENTITY_FIELD_PREFIX = "entities."
"""A field reference starting with this reads an entity id of the event (`entities.merchant`)."""

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)\s*$")
_NAME = r"^[a-z][a-z0-9_]{0,127}$"


class DefinitionError(ValueError):
    """A definitions file that cannot be loaded or is inconsistent; the message says where."""


def parse_duration(value: object) -> int:
    """Milliseconds from `10m`, `1h`, `24h`, `7d`, `30s`, `250ms` or a plain integer (ms)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return int(match.group(1)) * _UNITS_MS[match.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 30s, 10m, 1h, 7d)")


def format_duration(ms: int) -> str:
    """The shortest exact spelling of `ms` (`600000` -> `10m`)."""
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNITS_MS[unit] == 0:
            return f"{ms // _UNITS_MS[unit]}{unit}"
    return f"{ms}ms"


Duration = Annotated[
    int, BeforeValidator(parse_duration), PlainSerializer(format_duration, return_type=str)
]
"""A span of time, held in milliseconds, written as `10m`/`1h`/... in YAML and JSON."""

Name = Annotated[str, Field(pattern=_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EntityDefinition(_Strict):
    """Something features describe (a card, a merchant); its instances are keyed by id."""

    description: str = ""
    ttl: Duration = Field(
        description="Values expire this long after the entity's newest event (event time)."
    )


class WhereCondition(_Strict):
    """Keep only events whose field compares true (`field op value`)."""

    field: str = Field(min_length=1)
    op: Op = Op.eq
    value: float | str | bool | list[float | str | bool]

    @model_validator(mode="after")
    def _check_value(self) -> WhereCondition:
        listed = isinstance(self.value, list)
        if self.op in (Op.in_, Op.not_in) and not listed:
            raise ValueError(f"`{self.op.value}` needs a list value")
        if self.op not in (Op.in_, Op.not_in) and listed:
            raise ValueError(f"`{self.op.value}` needs a single value, not a list")
        if self.op in (Op.lt, Op.le, Op.gt, Op.ge) and not isinstance(canonical(self.value), float):
            raise ValueError(f"`{self.op.value}` compares numbers only")
        return self

    def compile(self) -> Condition:
        """The pure condition, with canonical values."""
        if isinstance(self.value, list):
            expected: Value | tuple[Value, ...] = tuple(canonical(v) for v in self.value)  # type: ignore[misc]
        else:
            expected = canonical(self.value)  # type: ignore[assignment]
        return Condition(self.field, self.op, expected)


class FeatureDefinition(_Strict):
    """One online/offline feature: an aggregation over a sliding event-time window."""

    name: Name
    entity: Name
    description: str = ""
    source: str = Field("sluice.events", min_length=1, description="Topic the events come from.")
    event_types: list[str] = Field(min_length=1, description="Event types the feature counts.")
    aggregation: Aggregation
    field: str | None = Field(None, description="Event field (or `entities.<name>`).")
    where: list[WhereCondition] = Field(default_factory=list)
    window: Duration
    allowed_lateness: Duration = 0
    default: float = Field(0.0, description="Served when the store holds no fresh value.")

    @model_validator(mode="after")
    def _check(self) -> FeatureDefinition:
        if self.window <= 0:
            raise ValueError("window must be positive")
        if self.allowed_lateness < 0:
            raise ValueError("allowed_lateness must not be negative")
        if self.aggregation is Aggregation.count and self.field is not None:
            raise ValueError("count takes no field (filter with `where` instead)")
        if self.aggregation is not Aggregation.count and not self.field:
            raise ValueError(f"{self.aggregation.value} needs a field")
        if (
            self.aggregation in NUMERIC_AGGREGATIONS
            and self.field
            and self.field.startswith(ENTITY_FIELD_PREFIX)
        ):
            raise ValueError(f"{self.aggregation.value} needs a numeric field, not an entity id")
        return self

    def compile(self) -> WindowSpec:
        """The pure window specification of this feature."""
        return WindowSpec(
            name=self.name,
            aggregation=self.aggregation,
            window_ms=self.window,
            lateness_ms=self.allowed_lateness,
            field=self.field,
            event_types=frozenset(self.event_types),
            conditions=tuple(condition.compile() for condition in self.where),
        )

    def field_refs(self) -> set[str]:
        """Every event field (or entity reference) this feature reads."""
        refs = {condition.field for condition in self.where}
        if self.field:
            refs.add(self.field)
        return refs


class FeatureView(_Strict):
    """The features a model needs, by name (they may span several entities)."""

    description: str = ""
    features: list[str] = Field(min_length=1)


@dataclass(frozen=True)
class EntityPlan:
    """Everything the stream and offline need for one entity, compiled once."""

    entity: str
    ttl_ms: int
    specs: tuple[WindowSpec, ...]
    windows: WindowPlan
    defaults: Mapping[str, float]
    field_refs: tuple[str, ...]
    event_types: frozenset[str]
    sources: frozenset[str]
    plain_fields: tuple[str, ...] = ()
    entity_fields: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        """The entity's feature names, in definition order."""
        return [spec.name for spec in self.specs]

    def extract(self, fields: Mapping[str, Any], entities: Mapping[str, str]) -> dict[str, Value]:
        """The canonical values of the fields this entity's features read (absent ones left
        out)."""
        values: dict[str, Value] = {}
        for name in self.plain_fields:
            raw = fields.get(name)
            if raw is None:
                continue
            if raw.__class__ is float or raw.__class__ is str:
                values[name] = raw
            else:
                value = canonical(raw)
                if value is not None:
                    values[name] = value
        for ref, entity in self.entity_fields:
            entity_id = entities.get(entity)
            if entity_id is not None:
                values[ref] = entity_id
        return values


class FeatureRegistry(_Strict):
    """A whole definitions file: entities, features and views, checked for consistency."""

    entities: dict[Name, EntityDefinition]
    features: list[FeatureDefinition] = Field(min_length=1)
    views: dict[Name, FeatureView] = Field(default_factory=dict)

    _by_name: dict[str, FeatureDefinition] = PrivateAttr(default_factory=dict)
    _plans: dict[str, EntityPlan] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> FeatureRegistry:
        seen: set[str] = set()
        for feature in self.features:
            if feature.name in seen:
                raise ValueError(f"feature {feature.name!r} is defined twice")
            seen.add(feature.name)
            if feature.entity not in self.entities:
                raise ValueError(
                    f"feature {feature.name!r} names unknown entity {feature.entity!r}"
                )
        for name, entity in self.entities.items():
            windows = [f.window for f in self.features if f.entity == name]
            sources = {f.source for f in self.features if f.entity == name}
            if len(sources) > 1:
                raise ValueError(
                    f"entity {name!r}: features read several topics {sorted(sources)}; "
                    "an entity's features read one topic"
                )
            if windows and entity.ttl < max(windows):
                raise ValueError(
                    f"entity {name!r}: ttl {format_duration(entity.ttl)} is shorter than its "
                    f"largest window {format_duration(max(windows))}"
                )
        for name, view in self.views.items():
            unknown = [f for f in view.features if f not in seen]
            if unknown:
                raise ValueError(f"view {name!r} names unknown features {unknown}")
        return self

    def model_post_init(self, _context: Any) -> None:
        self._by_name = {feature.name: feature for feature in self.features}
        for entity, definition in self.entities.items():
            features = [f for f in self.features if f.entity == entity]
            if not features:
                continue
            specs = tuple(f.compile() for f in features)
            refs = tuple(sorted(set().union(*(f.field_refs() for f in features))))
            self._plans[entity] = EntityPlan(
                entity=entity,
                ttl_ms=definition.ttl,
                specs=specs,
                windows=WindowPlan(specs),
                defaults={f.name: f.default for f in features},
                field_refs=refs,
                event_types=frozenset(t for f in features for t in f.event_types),
                sources=frozenset(f.source for f in features),
                plain_fields=tuple(r for r in refs if not r.startswith(ENTITY_FIELD_PREFIX)),
                entity_fields=tuple(
                    (r, r[len(ENTITY_FIELD_PREFIX) :])
                    for r in refs
                    if r.startswith(ENTITY_FIELD_PREFIX)
                ),
            )

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes, source: str = "<definitions>") -> FeatureRegistry:
        """Definitions from YAML or JSON text (JSON is YAML); errors name `source`."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise DefinitionError(f"{source}: not valid YAML/JSON: {exc}") from None
        try:
            return cls.model_validate(data)
        except ValueError as exc:
            raise DefinitionError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: Path | str) -> FeatureRegistry:
        """Definitions from a `.yaml`/`.yml`/`.json` file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise DefinitionError(f"cannot read definitions {path}: {exc}") from None
        return cls.parse(text, str(path))

    def to_yaml(self) -> str:
        """The YAML form (durations written back as `10m`, `1h`, ...)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)

    def fingerprint(self) -> str:
        """A short hash of the definitions' meaning (order of keys does not matter)."""
        canonical_json = orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(canonical_json).hexdigest()[:16]

    def with_source(self, topic: str) -> FeatureRegistry:
        """A copy whose every feature reads `topic` (run the same definitions on another topic)."""
        features = [f.model_copy(update={"source": topic}) for f in self.features]
        return FeatureRegistry(entities=self.entities, features=features, views=self.views)

    # -- lookups -----------------------------------------------------------------------------

    def feature(self, name: str) -> FeatureDefinition:
        """The feature called `name`; KeyError if there is none."""
        return self._by_name[name]

    def has_feature(self, name: str) -> bool:
        """Whether a feature called `name` is defined."""
        return name in self._by_name

    def plan(self, entity: str) -> EntityPlan:
        """The compiled plan of `entity`; KeyError for an entity without features."""
        return self._plans[entity]

    @property
    def plans(self) -> Mapping[str, EntityPlan]:
        """Plans of every entity that has features."""
        return self._plans

    def view(self, name: str) -> FeatureView:
        """The view called `name`; KeyError if there is none."""
        return self.views[name]

    def sources(self) -> list[str]:
        """The topics the stream must consume, sorted."""
        return sorted({feature.source for feature in self.features})
