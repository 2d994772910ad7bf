"""The features service's Redis writes: values, window state and applied-offset markers, committed
together by one Lua script so that a crash can never leave one without the others.

Keys (the full layout is specified in docs/features.md, "Redis key layout"):

- `sluice:fvs:{entity}:{id}` (string, public, read through `client.py`): the snapshot
  `[clock, {feature: value}]` the readers `MGET`. Expires with the hash.
- `sluice:fv:{entity}:{id}` (hash, private): `@ts` -> the entity's clock (epoch ms), and the
  window state: `~{event_type}\\x1f{event_id}` -> JSON `[ts, lateness_ms, {field: value}]` for
  each observation inside the entity's largest window. Expires at `clock + ttl` (PEXPIREAT).
  The values live in the snapshot only: a copy of them in the hash, one field per feature,
  cost Redis ~7 us of its ~25 us per demo event, and nothing read it.
- `sluice:fo:{app}:{partition}` (hash, private): per repartition partition, field
  `{topic}/{source partition}` -> `"{last applied source offset} {source watermark}"`, and
  `version` -> a counter bumped by every commit (a writer's fence).

The script first checks that every touched partition's `version` is still the one this process
read; if another process wrote meanwhile (a rebalance, a zombie), nothing is written and the
caller reloads. The whole batch travels as one JSON argument: serialising it is one C call here,
where redis-py would spend ~0.4 us of Python per argument. The script is not Redis Cluster safe
(it writes keys it was not given as KEYS); use one primary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson
from redis import Redis

from services.features.client import (
    KEY_PREFIX,
    TS_SUFFIX,
    encode_snapshot,
    feature_key,
    snapshot_key,
)
from services.features.windows import Observation

MARKER_PREFIX = "sluice:fo"
ENTITY_TS_FIELD = TS_SUFFIX
"""The hash field holding the entity's clock (`@ts`: the feature name left empty)."""
STATE_FIELD_PREFIX = "~"
"""Hash fields of the window state start with this (feature names never do)."""
VERSION_FIELD = "version"
_KEY_SEPARATOR = "\x1f"

_COMMIT_SCRIPT = """
local batch = cjson.decode(ARGV[1])
for _, fence in ipairs(batch[1]) do
  local current = redis.call('HGET', fence[1], 'version') or '0'
  if current ~= fence[2] then return {0, fence[1], current} end
end
for _, write in ipairs(batch[2]) do
  local key, expire, sets, deletes = write[1], write[2], write[3], write[4]
  for i = 1, #deletes, 7998 do
    redis.call('HDEL', key, unpack(deletes, i, math.min(i + 7997, #deletes)))
  end
  for i = 1, #sets, 7998 do
    redis.call('HSET', key, unpack(sets, i, math.min(i + 7997, #sets)))
  end
  if expire ~= '' then redis.call('PEXPIREAT', key, expire) end
  if write[5] ~= '' then
    if expire ~= '' then
      redis.call('SET', write[5], write[6], 'PXAT', expire)
    else
      redis.call('SET', write[5], write[6])
    end
  end
end
for _, fence in ipairs(batch[1]) do
  redis.call('HSET', fence[1], 'version', fence[3])
end
return {1}
"""
"""One JSON argument `[[fence...], [write...]]`: a fence is `[key, expected, new version]`, a
write `[key, expire_at_ms or "", [field, value, ...], [field to delete, ...], snapshot key or "",
snapshot]`. Deletes go first: a field can be in both when an event id comes again after its
first copy left every window. Lua's `unpack` takes at most a few thousand values, hence the
slices."""

_LOAD_SCRIPT = """
local prefix = ARGV[1]
local found = {}
for i, key in ipairs(KEYS) do
  local flat = redis.call('HGETALL', key)
  local state = {}
  for j = 1, #flat, 2 do
    if string.sub(flat[j], 1, #prefix) == prefix then
      state[#state + 1] = flat[j]
      state[#state + 1] = flat[j + 1]
    end
  end
  found[i] = state
end
return found
"""
"""The window state fields (those starting with ARGV[1], `STATE_FIELD_PREFIX`) of each hash in
KEYS, as flat `[field, value, ...]` arrays: one command for many keys instead of an HGETALL per
key, whose client-side cost (~4 us per command in redis-py) was most of the load's time; the
feature values stay in Redis."""

LOAD_KEYS_PER_CALL = 200
"""Keys per load script call. A script runs atomically, so slices (pipelined) let other clients'
reads in between while a process loads many large windows."""


def marker_key(app_id: str, partition: int) -> str:
    """The Redis key of the applied-offset markers of one repartition partition."""
    return f"{MARKER_PREFIX}:{app_id}:{partition}"


def marker_field(topic: str, partition: int) -> str:
    """The marker hash field of one source partition (`/` never occurs in a topic name)."""
    return f"{topic}/{partition}"


def observation_field(event_type: str, event_id: str) -> str:
    """The hash field holding the observation `(event_type, event_id)`."""
    return f"{STATE_FIELD_PREFIX}{event_type}{_KEY_SEPARATOR}{event_id}"


def encode_observation(observation: Observation) -> str:
    """The stored form of an observation (its identity is the field name)."""
    return orjson.dumps([observation.ts, observation.lateness_ms, observation.values]).decode()


def decode_observation(name: str, raw: bytes) -> Observation:
    """The observation stored under field `name` (which starts with `~`)."""
    event_type, _, event_id = name[len(STATE_FIELD_PREFIX) :].partition(_KEY_SEPARATOR)
    ts, lateness, values = orjson.loads(raw)
    return Observation(ts, event_type, event_id, lateness, values)


@dataclass
class PartitionMarkers:
    """What one repartition partition has applied: per source partition, the last source offset
    and the source watermark at it (the greatest event time up to that offset)."""

    version: int = 0
    applied: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)


class CommitConflict(Exception):
    """Another writer committed to a partition since this process read its version."""

    def __init__(self, key: str, version: str) -> None:
        super().__init__(f"{key} moved to version {version}")
        self.key = key


class CommitBatch:
    """Writes that must land together: version fences, then hash writes, then new versions."""

    __slots__ = ("fences", "writes")

    def __init__(self) -> None:
        self.fences: list[tuple[str, str, str]] = []
        self.writes: list[tuple[str, str, list[str], list[str], str, str]] = []

    def fence(self, key: str, expected_version: int) -> None:
        """Write nothing unless `key`'s version is `expected_version`; then bump it."""
        self.fences.append((key, str(expected_version), str(expected_version + 1)))

    def write(
        self,
        key: str,
        sets: list[str],
        deletes: list[str] | None = None,
        expire_at_ms: int | None = None,
        snapshot: tuple[str, str] | None = None,
    ) -> None:
        """HDEL `deletes`, HSET the flat field/value pairs `sets`, then PEXPIREAT if given;
        `snapshot` is a `(key, value)` string to SET with the same expiry."""
        expire = "" if expire_at_ms is None else str(expire_at_ms)
        snapshot_key, snapshot_value = snapshot or ("", "")
        self.writes.append((key, expire, sets, deletes or [], snapshot_key, snapshot_value))

    def payload(self) -> bytes:
        """The script's argument."""
        return orjson.dumps((self.fences, self.writes))


class StateStore:
    """Reads and atomic commits of the stream's Redis state, for one features app."""

    def __init__(self, redis: Redis, app_id: str) -> None:
        self.redis = redis
        self.app_id = app_id
        self._commit = redis.register_script(_COMMIT_SCRIPT)
        self._load = redis.register_script(_LOAD_SCRIPT)

    def load_markers(self, partitions: Sequence[int]) -> dict[int, PartitionMarkers]:
        """The markers of each repartition partition, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for partition in partitions:
            pipe.hgetall(marker_key(self.app_id, partition))
        result = {}
        for partition, raw in zip(partitions, pipe.execute(), strict=True):
            markers = PartitionMarkers()
            for name, value in raw.items():
                name = name.decode()
                if name == VERSION_FIELD:
                    markers.version = int(value)
                    continue
                topic, _, source_partition = name.rpartition("/")
                offset, watermark = value.split()
                markers.applied[(topic, int(source_partition))] = (int(offset), int(watermark))
            result[partition] = markers
        return result

    def load_observations(self, entities: Sequence[tuple[str, str]]) -> list[list[Observation]]:
        """The stored observations of each `(entity, id)`, in one round trip."""
        if not entities:
            return []
        keys = [feature_key(entity, entity_id) for entity, entity_id in entities]
        pipe = self.redis.pipeline(transaction=False)
        for start in range(0, len(keys), LOAD_KEYS_PER_CALL):
            chunk = keys[start : start + LOAD_KEYS_PER_CALL]
            self._load(keys=chunk, args=[STATE_FIELD_PREFIX], client=pipe)
        return [
            [decode_observation(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]
            for reply in pipe.execute()
            for flat in reply
        ]

    def commit(self, batch: CommitBatch) -> None:
        """Apply `batch` atomically; raises `CommitConflict` (nothing written) on a fence."""
        reply = self._commit(args=[batch.payload()])
        if int(reply[0]) != 1:
            key = reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1])
            version = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
            raise CommitConflict(key, version)


LEGACY_VALUES_FIELD = "@values"
"""Where builds before the snapshot key kept an instance's values as one JSON object."""


def migrate_snapshots(redis: Redis, page: int = 500) -> int:
    """Write the snapshot of every feature hash that has none (an online store written before
    the snapshot key existed); returns how many were written.

    Values come from the hash's `@values` JSON (what the features service wrote) or else its
    `{feature}` fields (what `write_features` seeded then), the clock from `@ts` or else the newest
    `{feature}@ts`; the snapshot expires with the hash. `SET NX`: a snapshot the running service
    wrote meanwhile is never replaced, so this is safe to run while it runs, and idempotent.
    """
    written = 0
    for keys in _pages(redis, f"{KEY_PREFIX}:*", page):
        pipe = redis.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(key, LEGACY_VALUES_FIELD, ENTITY_TS_FIELD)
            pipe.pttl(key)
        replies = pipe.execute()
        seeded = [key for key, (packed, _) in zip(keys, replies[::2], strict=True) if not packed]
        hashes = dict(zip(seeded, _hgetall_all(redis, seeded), strict=True))
        pipe = redis.pipeline(transaction=False)
        for key, (packed, clock), ttl_ms in zip(keys, replies[::2], replies[1::2], strict=True):
            snapshot = _legacy_snapshot(packed, clock, hashes.get(key, {}))
            if snapshot is None or ttl_ms == -2:
                continue
            _, entity, entity_id = key.decode().split(":", 3)[1:]
            pipe.set(
                snapshot_key(entity, entity_id),
                encode_snapshot(*snapshot),
                px=ttl_ms if ttl_ms > 0 else None,
                nx=True,
            )
        written += sum(1 for ok in pipe.execute() if ok)
    return written


def _pages(redis: Redis, pattern: str, page: int):
    cursor = 0
    while True:
        cursor, keys = redis.scan(cursor, match=pattern, count=page, _type="hash")
        if keys:
            yield keys
        if cursor == 0:
            return


def _hgetall_all(redis: Redis, keys: Sequence[str | bytes]) -> list[dict]:
    """Every field of each hash of `keys`, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return pipe.execute() if keys else []


def _legacy_snapshot(
    packed: bytes | None, clock: bytes | None, fields: dict[bytes, bytes]
) -> tuple[int, dict[str, float]] | None:
    """`(clock, values)` of an old-layout hash; None when it holds no clock."""
    if packed:
        try:
            values = orjson.loads(packed)
        except orjson.JSONDecodeError:
            return None
        return (int(clock), values) if clock and clock.isdigit() else None
    values, stamps = {}, [int(clock)] if clock and clock.isdigit() else []
    for name, raw in fields.items():
        text = name.decode()
        if text.startswith(STATE_FIELD_PREFIX) or text.startswith("@"):
            continue
        if text.endswith(TS_SUFFIX):
            if raw.isdigit():
                stamps.append(int(raw))
            continue
        try:
            values[text] = float(raw)
        except ValueError:
            continue
    return (max(stamps), values) if stamps else None
