"""The online store's public face: how other services read (and tests seed) online features.

Layout (specified in docs/features.md, "Redis key layout"): one hash per entity instance,
`sluice:fv:{entity}:{entity_id}`, holding for each feature `{feature}` -> the value as a decimal
string, and the event time (epoch ms) of the newest event behind it either per feature
(`{feature}@ts`, as `write_features` seeds it) or once for the whole hash (`@ts`, as the features
service writes it: every feature of an entity is computed as of the same clock). The service also
writes all values as one JSON object (`@values`) for `read_online`'s one-field-per-entity
reads. The entity's TTL is the key's expiry. Reads of many entities x many features take one
pipelined round trip.

Two readers: `read_features` returns what is stored (callers apply defaults themselves);
`read_online` applies the definitions: declared defaults for missing or expired values, flagged
as defaulted, and the freshness of what was served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from operator import itemgetter

import orjson
from redis import Redis

from services.features.definitions import EntityPlan, FeatureRegistry

KEY_PREFIX = "sluice:fv"
TS_SUFFIX = "@ts"


def feature_key(entity: str, entity_id: str) -> str:
    """The Redis key of one entity instance's feature hash."""
    return f"{KEY_PREFIX}:{entity}:{entity_id}"


@dataclass(frozen=True, slots=True)
class FeatureRead:
    """Online values of one entity instance; `None` where the store holds no value."""

    values: dict[str, float | None]
    newest_event_ms: int | None

    def freshness_s(self, now_ms: int) -> float | None:
        """Age of the newest contributing event, in seconds (None when nothing was found)."""
        if self.newest_event_ms is None:
            return None
        return max(0.0, (now_ms - self.newest_event_ms) / 1000)


def read_features(
    redis: Redis, wanted: Sequence[tuple[str, str, Sequence[str]]]
) -> list[FeatureRead]:
    """Read `(entity, entity_id, feature names)` for each item in one round trip.

    Items asking for the same feature names share one server-side script call (HMGET per key
    inside Redis), so a batch of hundreds of entities costs one command per distinct feature
    list instead of one per entity. The keys of one call must live on one Redis node (true of a
    single Redis or a replicated one; on Redis Cluster give the keys a common hash tag).

    Results come back in the order asked. Unparseable stored values read as `None`, like missing
    ones, so a bad write can never crash a reader; callers apply declared defaults. A stored NaN
    or inf is returned as is: whether the model may see it is the caller's decision.
    """
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, (_entity, _id, names) in enumerate(wanted):
        groups.setdefault(tuple(names), []).append(index)
    script = redis.register_script(_ONLINE_SCRIPT)
    pipe = redis.pipeline(transaction=False)
    for names, indexes in groups.items():
        keys = [feature_key(wanted[i][0], wanted[i][1]) for i in indexes]
        script(keys=keys, args=[*names, *(name + TS_SUFFIX for name in names)], client=pipe)
    replies = pipe.execute()
    reads: list[FeatureRead | None] = [None] * len(wanted)
    for (names, indexes), reply in zip(groups.items(), replies, strict=True):
        count = len(names)
        for index, row in zip(indexes, reply, strict=True):
            reads[index] = _stored_read(names, count, row)
    return reads  # type: ignore[return-value]


def _stored_read(names: tuple[str, ...], count: int, row: list) -> FeatureRead:
    """A `FeatureRead` from one reply row `[@values, @ts, *named values, *named @ts]`: the
    service's one-field JSON when present (one parse per entity), else the named fields."""
    packed, clock = row[0], row[1]
    if packed is not None:
        stored = orjson.loads(packed)
        values = {name: _to_float(stored.get(name)) for name in names}
        stamps = [clock]
    else:
        values = {name: _to_float(raw) for name, raw in zip(names, row[2:], strict=False)}
        stamps = [clock, *row[2 + count :]]
    newest = [int(raw) for raw in stamps if isinstance(raw, bytes | str) and raw.isdigit()]
    return FeatureRead(values, max(newest) if newest else None)


def _to_float(raw: bytes | str | float | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(raw)
    except (TypeError, ValueError):
        return None


def write_features(
    redis: Redis,
    entity: str,
    entity_id: str,
    values: Mapping[str, float],
    event_ms: Mapping[str, int],
    ttl_s: int | None = None,
) -> None:
    """Set features of one entity instance (values and their event times) in one round trip."""
    mapping: dict[str, str] = {name: repr(float(value)) for name, value in values.items()}
    mapping.update({name + TS_SUFFIX: str(int(ms)) for name, ms in event_ms.items()})
    pipe = redis.pipeline(transaction=True)
    pipe.hset(feature_key(entity, entity_id), mapping=mapping)
    if ttl_s:
        pipe.expire(feature_key(entity, entity_id), ttl_s)
    pipe.execute()


class UnknownFeature(KeyError):
    """A read named an entity or feature that the definitions do not have."""


@dataclass(frozen=True, slots=True)
class OnlineVector:
    """Served values of one entity instance: defaults applied where the store had none."""

    entity: str
    entity_id: str
    values: dict[str, float]
    defaulted: tuple[str, ...]
    as_of_ms: int | None

    def freshness_s(self, now_ms: int) -> float | None:
        """Age of the newest event behind these values, in seconds (None when all defaulted)."""
        if self.as_of_ms is None:
            return None
        return max(0.0, (now_ms - self.as_of_ms) / 1000)


VALUES_FIELD = "@values"
"""The features service also writes every value of an instance as one JSON object here, so the
online read path fetches one field per entity instead of one per feature."""

_ONLINE_SCRIPT = """
local out = {}
for i, key in ipairs(KEYS) do
  local row = redis.call('HMGET', key, '@values', '@ts')
  if not row[1] then
    local fields = redis.call('HMGET', key, unpack(ARGV))
    for j = 1, #fields do row[j + 2] = fields[j] end
  end
  out[i] = row
end
return out
"""


def read_online(
    redis: Redis,
    registry: FeatureRegistry,
    wanted: Sequence[tuple[str, str, Sequence[str]]],
    now_ms: int,
) -> list[OnlineVector]:
    """Read `(entity, entity_id, feature names)` per item in one pipelined round trip.

    A feature with no stored value, or whose entity's values are past the entity TTL at
    `now_ms` (event time, so it agrees with the offline computation), gets its declared default
    and is listed in `defaulted`. Raises `UnknownFeature` before any I/O for names the
    definitions lack. Items asking for the same names share one server-side call; per instance
    it reads `@values` and `@ts` (as the features service writes them), or the named fields
    (as `write_features` seeds them).
    """
    known = registry.plans
    plans = []
    checked: set[tuple[str, tuple[str, ...]]] = set()
    for entity, _entity_id, names in wanted:
        plan = known.get(entity)
        if plan is None:
            raise UnknownFeature(f"no features are defined for entity {entity!r}")
        if (entity, tuple(names)) not in checked:
            unknown = [name for name in names if name not in plan.defaults]
            if unknown:
                raise UnknownFeature(f"entity {entity!r} has no features {unknown}")
            checked.add((entity, tuple(names)))
        plans.append(plan)
    groups: dict[tuple[str, ...], list[int]] = {}
    for index, (_entity, _id, names) in enumerate(wanted):
        groups.setdefault(tuple(names), []).append(index)
    script = redis.register_script(_ONLINE_SCRIPT)
    pipe = redis.pipeline(transaction=False)
    for names, indexes in groups.items():
        keys = [feature_key(wanted[i][0], wanted[i][1]) for i in indexes]
        script(keys=keys, args=list(names), client=pipe)
    vectors: list[OnlineVector | None] = [None] * len(wanted)
    for (names, indexes), reply in zip(groups.items(), pipe.execute(), strict=True):
        pick = itemgetter(*names) if len(names) > 1 else lambda d, n=names[0]: (d[n],)
        for index, row in zip(indexes, reply, strict=True):
            entity, entity_id, _names = wanted[index]
            vectors[index] = _vector(entity, entity_id, names, pick, row, plans[index], now_ms)
    return vectors  # type: ignore[return-value]


def _vector(
    entity: str,
    entity_id: str,
    names: tuple[str, ...],
    pick: Callable[[dict], tuple],
    row: list,
    plan: EntityPlan,
    now_ms: int,
) -> OnlineVector:
    """One instance's served values from its reply: `[@values, @ts, *named fields]`;
    `pick` takes the named values out of a dict at C speed (KeyError if one is missing)."""
    packed, clock_raw = row[0], row[1]
    clock = int(clock_raw) if clock_raw is not None and clock_raw.isdigit() else None
    defaults = plan.defaults
    if clock is not None and now_ms - clock >= plan.ttl_ms:
        return OnlineVector(entity, entity_id, {n: defaults[n] for n in names}, names, None)
    if packed is not None:
        stored = orjson.loads(packed)
        try:
            values = dict(zip(names, pick(stored), strict=True))
            return OnlineVector(entity, entity_id, values, (), clock)
        except KeyError:
            found = {name: stored.get(name) for name in names}
    else:
        found = {name: _to_float(raw) for name, raw in zip(names, row[2:], strict=False)}
    defaulted = tuple(name for name, value in found.items() if value is None)
    if not defaulted:
        return OnlineVector(entity, entity_id, found, (), clock)
    values = {name: defaults[name] if value is None else value for name, value in found.items()}
    served_clock = None if len(defaulted) == len(names) else clock
    return OnlineVector(entity, entity_id, values, defaulted, served_clock)
