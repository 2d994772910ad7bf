"""The streaming computation, independent of the Kafka client that drives it: two stages.

Why two stages: `sluice.events` is keyed by one entity (the card), but features also describe
other entities of the same event (the merchant), whose events are spread over every partition.
Each entity instance must have exactly one writer, so stage 1 (`Router`) re-keys every
`(entity, id)` observation onto the repartition topic, partition `partition_for(entity, id)`, and
stage 2 (`Applier`) owns the windows of the entities of its repartition partitions.

Stage 1 is stateless: for each source batch it sends every repartition partition one message
(possibly without observations) that carries, per source partition, the batch's first and last
offsets, its greatest event time, and for each observation its source offset and the greatest
event time before it within the batch. That is enough for stage 2 to rebuild the source
partition's watermark exactly, whatever batches a replay produces.

Stage 2 keeps, per repartition partition and source partition, the last applied source offset
and the watermark at it (`PartitionMarkers`). An observation at or below the marker is a replay
and is skipped; a later one gets `lateness = max(0, watermark_before - ts)`. Window state, values
and markers are committed by one Lua script (`StateStore.commit`), so a crash at any point leaves
Redis as of some whole batch, and replaying from the committed Kafka offsets converges to the
same values as a run without the crash.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import NamedTuple

import orjson
from prometheus_client import Counter, Histogram

from schemas.messages import Event
from services.common.metrics import metric
from services.features.client import encode_snapshot, feature_key, snapshot_key
from services.features.definitions import EntityPlan, FeatureRegistry
from services.features.store import (
    ENTITY_TS_FIELD,
    CommitBatch,
    CommitConflict,
    PartitionMarkers,
    StateStore,
    encode_observation,
    marker_field,
    marker_key,
    observation_field,
)
from services.features.windows import EntityWindow, Observation, lateness_ms

log = logging.getLogger(__name__)

WIRE_VERSION = 1
"""Version of the repartition message format (field `v`)."""

_NO_TIME = -1
"""Stands for "no event time yet" on the wire (event times are never negative)."""


def partition_for(entity: str, entity_id: str, partitions: int) -> int:
    """The repartition partition that owns `(entity, id)`: CRC-32 of `entity␟id` mod count."""
    return zlib.crc32(f"{entity}\x1f{entity_id}".encode()) % partitions


class SourceRecord(NamedTuple):
    """One decoded source event and where it was read (a named tuple: one is made per event,
    and a frozen dataclass's `__init__` costs several times as much)."""

    topic: str
    partition: int
    offset: int
    event: Event


@dataclass(frozen=True)
class _Metrics:
    events: Counter
    observations: Counter
    replayed: Counter
    late: Counter
    entities_written: Counter
    conflicts: Counter
    commit_seconds: Histogram

    @classmethod
    def create(cls) -> _Metrics:
        return cls(
            events=metric(
                Counter, "sluice_features_events_total", "Source events routed", ["topic"]
            ),
            observations=metric(
                Counter,
                "sluice_features_observations_total",
                "Entity observations that changed a window",
                ["entity"],
            ),
            replayed=metric(
                Counter,
                "sluice_features_replayed_total",
                "Observations skipped because their source offset was already applied",
            ),
            late=metric(
                Counter,
                "sluice_features_late_events_total",
                "Events a feature dropped for arriving later than its allowed lateness",
                ["feature"],
            ),
            entities_written=metric(
                Counter,
                "sluice_features_entities_written_total",
                "Entity instances whose values were written to Redis",
            ),
            conflicts=metric(
                Counter,
                "sluice_features_commit_conflicts_total",
                "Commits refused because another writer moved a partition (state reloaded)",
            ),
            commit_seconds=metric(
                Histogram,
                "sluice_features_commit_seconds",
                "Time to compute and commit one repartition batch",
            ),
        )


class Router:
    """Stage 1: source events -> repartition messages, `partitions` per slice of the batch."""

    def __init__(
        self, registry: FeatureRegistry, partitions: int, records_per_message: int = 1000
    ) -> None:
        self.plans: dict[str, EntityPlan] = dict(registry.plans)
        self.partitions = partitions
        self.records_per_message = records_per_message
        self.metrics = _Metrics.create()

    def route(self, records: Sequence[SourceRecord]) -> list[tuple[int, bytes]]:
        """`(repartition partition, message)` pairs, to produce in this order.

        Records of each source partition must come in offset order (they may interleave with
        other partitions'). The batch is cut into slices of `records_per_message` records, each
        sent to every partition, which keeps messages far below the broker's 1 MB limit while
        every message still describes a whole range of source offsets.
        """
        step = self.records_per_message
        return [
            (partition, payload)
            for start in range(0, len(records), step)
            for partition, payload in enumerate(self._route_slice(records[start : start + step]))
        ]

    def _route_slice(self, records: Sequence[SourceRecord]) -> list[bytes]:
        """Message `i` is for repartition partition `i`."""
        sections: dict[tuple[str, int], list] = {}
        updates_by_target: list[dict[tuple[str, int], list]] = [{} for _ in range(self.partitions)]
        plans, partitions = self.plans, self.partitions
        counts: dict[str, int] = {}
        for topic, source_partition, offset, event in records:
            source = (topic, source_partition)
            section = sections.get(source)
            if section is None:
                section = sections[source] = [offset, offset, _NO_TIME]
            before = section[2]
            section[1] = offset
            ts = event.ts_ms
            if ts > before:
                section[2] = ts
            counts[topic] = counts.get(topic, 0) + 1
            event_type = event.event_type
            for entity, entity_id in event.entities.items():
                plan = plans.get(entity)
                if plan is None or event_type not in plan.event_types or topic not in plan.sources:
                    continue
                update = [
                    offset,
                    before,
                    ts,
                    entity,
                    entity_id,
                    event_type,
                    event.event_id,
                    plan.extract(event.fields, event.entities),
                ]
                target = updates_by_target[partition_for(entity, entity_id, partitions)]
                target.setdefault(source, []).append(update)
        for topic, count in counts.items():
            self.metrics.events.labels(topic).inc(count)
        return [
            orjson.dumps(
                {
                    "v": WIRE_VERSION,
                    "s": [
                        [topic, part, first, last, high, target.get((topic, part), [])]
                        for (topic, part), (first, last, high) in sections.items()
                    ],
                }
            )
            for target in updates_by_target
        ]


class Applier:
    """Stage 2: repartition messages -> windows -> values, state and markers in Redis."""

    def __init__(
        self,
        registry: FeatureRegistry,
        store: StateStore,
        partitions: int,
        cache_entities: int = 100_000,
        max_commit_observations: int = 5_000,
        max_attempts: int = 5,
    ) -> None:
        self.plans: dict[str, EntityPlan] = dict(registry.plans)
        self.store = store
        self.partitions = partitions
        self.cache_entities = cache_entities
        self.max_commit_observations = max_commit_observations
        self.max_attempts = max_attempts
        self.metrics = _Metrics.create()
        self._windows: OrderedDict[tuple[str, str], EntityWindow] = OrderedDict()
        self._markers: dict[int, PartitionMarkers] = {}
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-commit")

    def apply(self, messages: Sequence[tuple[int, bytes]]) -> int:
        """Apply `(repartition partition, message value)` pairs, in consumption order.

        Commits every `max_commit_observations` observations or so (at message boundaries), so
        a backlog never becomes one huge Redis script, and computes the next chunk while Redis
        runs the previous commit. Returns the observations that changed a window. Raises
        `redis.RedisError` when Redis is unreachable: retry the same messages later (what was
        not committed is reloaded, what was is skipped as a replay).
        """
        chunks: list[list[tuple[int, dict]]] = [[]]
        size = 0
        for partition, value in messages:
            body = orjson.loads(value)
            if body.get("v") != WIRE_VERSION:
                raise ValueError(f"repartition message version {body.get('v')} is not supported")
            chunks[-1].append((partition, body))
            size += sum(len(section[5]) for section in body["s"])
            if size >= self.max_commit_observations:
                chunks.append([])
                size = 0
        chunks = [chunk for chunk in chunks if chunk]
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._apply_chunks(chunks)
            except CommitConflict as conflict:
                self.metrics.conflicts.inc()
                log.warning("commit fenced, reloading", extra={"key": conflict.key})
                if attempt == self.max_attempts:
                    raise
        raise AssertionError("unreachable")

    def forget(self, partitions: Sequence[int]) -> None:
        """Drop the cached markers and windows of `partitions`: they are reloaded from Redis
        when next needed."""
        gone = set(partitions)
        for partition in gone:
            self._markers.pop(partition, None)
        for key in [k for k in self._windows if partition_for(*k, self.partitions) in gone]:
            del self._windows[key]

    # -- one attempt --------------------------------------------------------------------------

    def _apply_chunks(self, chunks: list[list[tuple[int, dict]]]) -> int:
        """Prepare each chunk (windows and cached markers advance optimistically), commit it in
        the background while the next one is prepared; any failure forgets every partition the
        attempt touched, so the cache never holds what Redis does not."""
        touched_partitions = {partition for chunk in chunks for partition, _ in chunk}
        in_flight: Future | None = None
        changed = 0
        try:
            self._load(touched_partitions, chunks)
            for chunk in chunks:
                started = time.perf_counter()
                batch, count = self._prepare(chunk)
                changed += count
                if in_flight is not None:
                    in_flight.result()
                in_flight = self._committer.submit(self._commit, batch, started)
            if in_flight is not None:
                in_flight.result()
        except BaseException:
            if in_flight is not None:
                wait([in_flight])
            self.forget(sorted(touched_partitions))
            raise
        while len(self._windows) > self.cache_entities:
            self._windows.popitem(last=False)
        return changed

    def _load(self, partitions: set[int], chunks: list[list[tuple[int, dict]]]) -> None:
        """Load the markers and windows the chunks need that are not cached, all before the
        first commit is sent: Redis runs one command at a time, so a load sent while a commit
        runs waits for it (measured: ~13% of the worker's time on a backlog of new cards)."""
        wanted = sorted(p for p in partitions if p not in self._markers)
        if wanted:
            self._markers.update(self.store.load_markers(wanted))
        windows = self._windows
        missing = sorted(
            {
                (update[3], update[4])  # (entity, entity id): see `Router._route_slice`
                for chunk in chunks
                for _partition, body in chunk
                for section in body["s"]
                for update in section[5]
            }.difference(windows)
        )
        for key, stored in zip(missing, self.store.load_observations(missing), strict=True):
            window = EntityWindow(self.plans[key[0]].windows)
            for observation in stored:
                window.apply(observation)
            window.clear_changes()
            windows[key] = window

    def _commit(self, batch: CommitBatch, started: float) -> None:
        self.store.commit(batch)
        self.metrics.commit_seconds.observe(time.perf_counter() - started)

    def _prepare(self, decoded: list[tuple[int, dict]]) -> tuple[CommitBatch, int]:
        """Fold one chunk into the windows (`_load` cached them) and build its commit; the
        cached markers move on as if the commit succeeded (`_apply_chunks` forgets them if it
        does not). The cache's order is least recently changed first."""
        markers = {p: dict(self._markers[p].applied) for p, _ in decoded}
        windows = self._windows
        touched: dict[tuple[str, str], EntityWindow] = {}
        counts: dict[str, int] = {}
        late = self.metrics.late
        replayed = 0
        for partition, body in decoded:
            applied = markers[partition]
            for topic, source, _first, last, high, updates in body["s"]:
                offset_mark, watermark = applied.get((topic, source), (-1, _NO_TIME))
                for offset, before, ts, entity, entity_id, event_type, event_id, values in updates:
                    if offset <= offset_mark:
                        replayed += 1
                        continue
                    # _NO_TIME (-1) is below every event time: lateness 0, as with no watermark
                    lateness = lateness_ms(watermark if watermark > before else before, ts)
                    observation = Observation(ts, event_type, event_id, lateness, values)
                    key = (entity, entity_id)
                    window = windows[key]
                    if window.apply(observation):
                        touched[key] = window
                        counts[entity] = counts.get(entity, 0) + 1
                    if lateness:
                        for spec in window.plan.specs:
                            if spec.rejects_as_late(observation):
                                late.labels(spec.name).inc()
                if last > offset_mark:
                    applied[(topic, source)] = (last, max(watermark, high))
        for key in touched:
            windows.move_to_end(key)
        batch = self._commit_batch(touched, markers)
        for partition, applied in markers.items():
            self._markers[partition].applied = applied
            self._markers[partition].version += 1
        for window in touched.values():
            window.clear_changes()
        for entity, count in counts.items():
            self.metrics.observations.labels(entity).inc(count)
        self.metrics.replayed.inc(replayed)
        self.metrics.entities_written.inc(len(touched))
        return batch, sum(counts.values())

    def _commit_batch(
        self,
        touched: dict[tuple[str, str], EntityWindow],
        markers: dict[int, dict[tuple[str, int], tuple[int, int]]],
    ) -> CommitBatch:
        batch = CommitBatch()
        for partition, applied in markers.items():
            current = self._markers[partition]
            key = marker_key(self.store.app_id, partition)
            batch.fence(key, current.version)
            changed: list[str] = []
            for (topic, source), (offset, watermark) in applied.items():
                if current.applied.get((topic, source)) != (offset, watermark):
                    changed += [marker_field(topic, source), f"{offset} {watermark}"]
            if changed:
                batch.write(key, changed)
        ttls = {entity: plan.ttl_ms for entity, plan in self.plans.items()}
        for (entity, entity_id), window in touched.items():
            clock = window.clock
            assert clock is not None
            values = window.values()
            if None in values.values():
                values = {name: value for name, value in values.items() if value is not None}
            sets = [ENTITY_TS_FIELD, str(clock)]
            for observation in window.added.values():
                sets += (
                    observation_field(observation.event_type, observation.event_id),
                    encode_observation(observation),
                )
            removed = window.removed
            batch.write(
                feature_key(entity, entity_id),
                sets,
                [observation_field(t, i) for t, i in removed] if removed else None,
                clock + ttls[entity],
                (snapshot_key(entity, entity_id), encode_snapshot(clock, values).decode()),
            )
        return batch
