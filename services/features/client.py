"""The online store's public face: how other services read (and tests seed) online features.

Layout (specified in docs/features.md, "Redis key layout"), per entity instance:

- a **snapshot** string, `sluice:fvs:{entity}:{entity_id}`: JSON `[clock, {feature: value}]`,
  every value of the instance and the event time (epoch ms) of the newest event behind them.
  This is what the readers read: one `MGET` fetches any number of instances in one round trip,
  with no server-side script (a script's per-key calls cost Redis ~12x more CPU than `MGET`).
- a **hash**, `sluice:fv:{entity}:{entity_id}`: the features service's private window state
  and `@ts` (the clock); no reader needs it.

Both expire with the entity's TTL. Two readers: `read_snapshots` returns what is stored (callers
apply defaults themselves); `read_online` applies the definitions: declared defaults for missing
or expired values, flagged as defaulted, and the freshness of what was served.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import NamedTuple

import orjson
from redis import Redis

from services.features.definitions import EntityPlan, FeatureRegistry

KEY_PREFIX = "sluice:fv"
SNAPSHOT_PREFIX = "sluice:fvs"
TS_SUFFIX = "@ts"


def feature_key(entity: str, entity_id: str) -> str:
    """The Redis key of one entity instance's feature hash."""
    return f"{KEY_PREFIX}:{entity}:{entity_id}"


def snapshot_key(entity: str, entity_id: str) -> str:
    """The Redis key of one entity instance's snapshot (what the readers read)."""
    return f"{SNAPSHOT_PREFIX}:{entity}:{entity_id}"


Snapshot = tuple[int, dict]
"""`(clock, {feature: value})` of one entity instance, as stored."""


def encode_snapshot(clock: int, values: Mapping[str, float]) -> bytes:
    """The snapshot value: JSON `[clock, {feature: value}]` (a NaN or inf is written as null,
    JSON having no spelling for it, and reads as missing)."""
    return orjson.dumps([clock, values])


def _snapshot(raw: bytes | None) -> Snapshot | None:
    """`(clock, values)` of a stored snapshot; None when absent or not a snapshot, so a bad
    write can never crash a reader."""
    if raw is None:
        return None
    try:
        clock, values = orjson.loads(raw)
    except (orjson.JSONDecodeError, TypeError, ValueError):
        return None
    if type(clock) is not int or type(values) is not dict:
        return None
    return clock, values


def read_snapshots(redis: Redis, keys: Sequence[tuple[str, str]]) -> list[Snapshot | None]:
    """The stored snapshot of each `(entity, entity_id)` in one round trip (one `MGET`); None
    for an instance without a (readable) snapshot. The raw read inference uses: values are as
    stored (the writers store floats; features without a value are absent) and nothing is
    defaulted or checked here (inference checks every value it scores, `scoring.fill_row`).

    The keys must live on one Redis node (true of a single Redis or a replicated one; on Redis
    Cluster give them a common hash tag).
    """
    if not keys:
        return []
    return [_snapshot(raw) for raw in redis.mget([snapshot_key(e, i) for e, i in keys])]


def _to_float(raw: object) -> float | None:
    if raw is None or isinstance(raw, bool):
        return None
    try:
        return float(raw)  # type: ignore[arg-type]
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
    """Seed one entity instance (tests, benchmarks, backfills): its snapshot is replaced by
    `values` as of the newest of `event_ms`. The features service's window state is left alone
    (its next event for the instance writes the snapshot from its own windows)."""
    values = {name: float(value) for name, value in values.items()}
    clock = max((int(ms) for ms in event_ms.values()), default=0)
    redis.set(snapshot_key(entity, entity_id), encode_snapshot(clock, values), ex=ttl_s or None)


class UnknownFeature(KeyError):
    """A read named an entity or feature that the definitions do not have."""


class OnlineVector(NamedTuple):
    """Served values of one entity instance: defaults applied where the store had none. A named
    tuple: a read of 100 instances makes 100, and a frozen dataclass's `__init__` cost ~1.8 us
    each (a tenth of the read)."""

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


def read_online(
    redis: Redis,
    registry: FeatureRegistry,
    wanted: Sequence[tuple[str, str, Sequence[str]]],
    now_ms: int,
) -> list[OnlineVector]:
    """Read `(entity, entity_id, feature names)` per item in one round trip (one `MGET`).

    A feature with no stored value, or whose entity's values are past the entity TTL at
    `now_ms` (event time, so it agrees with the offline computation), gets its declared default
    and is listed in `defaulted`. Raises `UnknownFeature` before any I/O for names the
    definitions lack.
    """
    known = registry.plans
    items = []
    picks: dict[tuple[str, ...], Callable[[dict], tuple]] = {}
    checked: set[tuple[str, tuple[str, ...]]] = set()
    for entity, entity_id, asked in wanted:
        plan = known.get(entity)
        if plan is None:
            raise UnknownFeature(f"no features are defined for entity {entity!r}")
        names = tuple(asked)
        if (entity, names) not in checked:
            unknown = [name for name in names if name not in plan.defaults]
            if unknown:
                raise UnknownFeature(f"entity {entity!r} has no features {unknown}")
            checked.add((entity, names))
            if names not in picks:
                picks[names] = (
                    itemgetter(*names) if len(names) > 1 else lambda d, n=names[0]: (d[n],)
                )
        items.append((entity, entity_id, names, picks[names], plan))
    snapshots = read_snapshots(redis, [(entity, entity_id) for entity, entity_id, _ in wanted])
    return [
        _vector(entity, entity_id, names, pick, snapshot, plan, now_ms)
        for (entity, entity_id, names, pick, plan), snapshot in zip(items, snapshots, strict=True)
    ]


def _vector(
    entity: str,
    entity_id: str,
    names: tuple[str, ...],
    pick: Callable[[dict], tuple],
    snapshot: Snapshot | None,
    plan: EntityPlan,
    now_ms: int,
) -> OnlineVector:
    """One instance's served values from its snapshot; `pick` takes the named values out of
    the stored dict at C speed (KeyError if one is missing)."""
    defaults = plan.defaults
    if snapshot is None or now_ms - snapshot[0] >= plan.ttl_ms:
        return OnlineVector(entity, entity_id, {n: defaults[n] for n in names}, names, None)
    clock, stored = snapshot
    try:
        picked = pick(stored)
    except KeyError:
        picked = None
    if picked is not None and None not in picked:
        # Every name asked is stored; asked for all of them (the usual read), the freshly
        # parsed dict is the answer as it is.
        values = stored if len(stored) == len(names) else dict(zip(names, picked, strict=True))
        return OnlineVector(entity, entity_id, values, (), clock)
    found = {name: _to_float(stored.get(name)) for name in names}
    defaulted = tuple(name for name, value in found.items() if value is None)
    values = {name: defaults[name] if value is None else value for name, value in found.items()}
    served_clock = None if len(defaulted) == len(names) else clock
    return OnlineVector(entity, entity_id, values, defaulted, served_clock)
