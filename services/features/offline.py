"""The same definitions, offline: point-in-time feature values from the ClickHouse events log.

`EventLog` reads the `events` table (one row per event; entities and fields as parallel arrays)
and rebuilds what the stream saw:

- **lateness**: the watermark of a source partition before a record is the greatest event time
  of the rows before it in `(kafka_partition, kafka_offset)` order, over *every* row of the table
  (so the table must hold every event of the source topic, as the monitor's sink writes it);
- **observations**: for each wanted `(entity, id)`, the events naming it, with the canonical
  field values (`num_*` as float, `str_*` as str: the online `canonical` form).

`values_as_of` then folds observations into the very `EntityWindow` the stream uses, in event
time order, and reads values at each requested time `T`: only events with `ts <= T` count (no
future leakage), and values past the entity's TTL at `T` are missing. Missing values become the
declared defaults in training sets, exactly as `client.read_online` serves them.

SQL runs on ClickHouse 18.16: no window functions, no CTEs; the wanted ids travel as an external
table, never inline.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from clickhouse_driver import Client

from services.common.clickhouse import clickhouse_client
from services.common.settings import SluiceSettings
from services.features.definitions import FeatureRegistry
from services.features.windows import EntityWindow, Observation, is_expired, lateness_ms

_OFFSET_BITS = 40
"""Source offsets stay below 2**40 (a trillion records per partition)."""


class OfflineError(ValueError):
    """Inputs the offline computation cannot use; the message says which and why."""


@dataclass(frozen=True, slots=True)
class LoggedObservation:
    """An observation as read back from the log, with where the stream read it."""

    observation: Observation
    partition: int
    offset: int


def connect_clickhouse(settings: SluiceSettings) -> Client:
    """A ClickHouse client from the shared settings."""
    return clickhouse_client(settings)


class Watermarks:
    """Per source partition, the watermark just before each offset (from the whole log)."""

    def __init__(self, partitions: np.ndarray, offsets: np.ndarray, times: np.ndarray) -> None:
        keys = (partitions.astype(np.int64) << _OFFSET_BITS) | offsets.astype(np.int64)
        keys, first = np.unique(keys, return_index=True)
        times = times.astype(np.int64)[first]
        parts = keys >> _OFFSET_BITS
        before = np.full(len(keys), -1, dtype=np.int64)
        if len(keys):
            starts = np.flatnonzero(np.r_[True, parts[1:] != parts[:-1]])
            for start, stop in zip(starts, [*starts[1:], len(keys)], strict=True):
                running = np.maximum.accumulate(times[start:stop])
                before[start + 1 : stop] = running[:-1]
        self._keys = keys
        self._before = before

    def before(self, partition: int, offset: int) -> int | None:
        """The watermark just before `(partition, offset)`; None at a partition's start."""
        key = (partition << _OFFSET_BITS) | offset
        index = int(np.searchsorted(self._keys, key))
        if index >= len(self._keys) or self._keys[index] != key:
            raise OfflineError(f"partition {partition} offset {offset} is not in the events log")
        value = int(self._before[index])
        return None if value < 0 else value


class EventLog:
    """The ClickHouse `events` table, read the way the stream consumed `sluice.events`."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.database = database
        self._watermarks: Watermarks | None = None

    def watermarks(self) -> Watermarks:
        """The watermarks of every partition (read once per `EventLog`)."""
        if self._watermarks is None:
            partitions, offsets, times = self.client.execute(
                f"SELECT kafka_partition, kafka_offset, ts_ms FROM {self.database}.events",
                columnar=True,
            ) or ([], [], [])
            self._watermarks = Watermarks(
                np.asarray(partitions, dtype=np.int64),
                np.asarray(offsets, dtype=np.int64),
                np.asarray(times, dtype=np.int64),
            )
        return self._watermarks

    def observations(
        self,
        registry: FeatureRegistry,
        wanted: Iterable[tuple[str, str]],
        until_ms: int,
    ) -> dict[tuple[str, str], list[LoggedObservation]]:
        """Observations of each wanted `(entity, id)` with `ts <= until_ms`, in event time order
        (ties by partition and offset)."""
        wanted = sorted(set(wanted))
        result: dict[tuple[str, str], list[LoggedObservation]] = {key: [] for key in wanted}
        types = sorted({t for entity, _ in wanted for t in registry.plan(entity).event_types})
        if not wanted or not types:
            return result
        watermarks = self.watermarks()
        rows = self.client.execute(
            f"""
            SELECT DISTINCT en, eid, event_type, event_id, ts_ms, kafka_partition, kafka_offset,
                   entity_names, entity_ids, num_names, num_values, str_names, str_values
            FROM {self.database}.events
            ARRAY JOIN entity_names AS en, entity_ids AS eid
            WHERE ts_ms <= %(until)s
              AND event_type IN %(types)s
              AND (en, eid) IN (SELECT entity, id FROM wanted)
            """,
            {"until": until_ms, "types": tuple(types)},
            external_tables=[
                {
                    "name": "wanted",
                    "structure": [("entity", "String"), ("id", "String")],
                    "data": [{"entity": e, "id": i} for e, i in wanted],
                }
            ],
        )
        for (
            entity,
            entity_id,
            event_type,
            event_id,
            ts,
            partition,
            offset,
            entity_names,
            entity_ids,
            num_names,
            num_values,
            str_names,
            str_values,
        ) in rows:
            fields: dict[str, float | str] = dict(zip(num_names, num_values, strict=True))
            fields.update(zip(str_names, str_values, strict=True))
            entities = dict(zip(entity_names, entity_ids, strict=True))
            values = registry.plan(entity).extract(fields, entities)
            late = lateness_ms(watermarks.before(partition, offset), ts)
            observation = Observation(ts, event_type, event_id, late, values)
            result[(entity, entity_id)].append(LoggedObservation(observation, partition, offset))
        for logged in result.values():
            logged.sort(key=lambda o: (o.observation.ts, o.partition, o.offset))
        return result


def values_as_of(
    registry: FeatureRegistry,
    entity: str,
    observations: Sequence[Observation],
    times: Sequence[int],
) -> list[tuple[int | None, dict[str, float | None]]]:
    """The entity's `(clock, values)` as of each time in `times` (any order), from its
    observations sorted by event time. Expired or never-seen entities have all values None."""
    plan = registry.plan(entity)
    window = EntityWindow(plan.windows)
    order = sorted(range(len(times)), key=times.__getitem__)
    results: list[tuple[int | None, dict[str, float | None]]] = [(None, {})] * len(times)
    position = 0
    for index in order:
        at = times[index]
        while position < len(observations) and observations[position].ts <= at:
            window.apply(observations[position])
            position += 1
        if is_expired(window.clock, at, plan.ttl_ms):
            results[index] = (None, dict.fromkeys(plan.names))
        else:
            results[index] = (window.clock, window.values())
    return results


# -- training sets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SpineRow:
    """One row of a training set to be: entity ids by entity name, a time, columns to keep."""

    ids: Mapping[str, str]
    at_ms: int
    passthrough: Mapping[str, str]


def read_spine_csv(path: Path, ts_column: str = "ts_ms") -> tuple[list[str], list[SpineRow]]:
    """Spine rows from a CSV with a header: `ts_column` (epoch ms), and one column per entity
    named like the entity (`card`, `merchant`). Every column is passed through to the output."""
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = list(reader.fieldnames or [])
        if ts_column not in columns:
            raise OfflineError(f"{path}: no `{ts_column}` column (epoch milliseconds)")
        rows = []
        for number, record in enumerate(reader, start=2):
            try:
                at_ms = int(record[ts_column])
            except ValueError:
                raise OfflineError(f"{path}:{number}: `{ts_column}` is not an integer") from None
            rows.append(SpineRow(record, at_ms, record))
    return columns, rows


def spine_from_predictions(
    client: Client, database: str, model: str, entity: str, since_ms: int = 0
) -> tuple[list[str], list[SpineRow]]:
    """One spine row per scored request of `model` (live routes), as of its request time,
    with its label where one arrived (empty otherwise)."""
    rows = client.execute(
        f"""
        SELECT request_id, entity_id, created_at_ms, version, has_label, label
        FROM (
            SELECT request_id, entity_id, created_at_ms, version
            FROM {database}.predictions FINAL
            WHERE model = %(model)s AND route != 'shadow' AND error_code = ''
              AND created_at_ms >= %(since)s
        )
        ANY LEFT JOIN (
            SELECT request_id, 1 AS has_label, value AS label
            FROM {database}.labels FINAL
            WHERE model = %(model)s OR model = ''
        ) USING request_id
        ORDER BY created_at_ms, request_id
        """,
        {"model": model, "since": since_ms},
    )
    columns = ["request_id", entity, "ts_ms", "version", "label"]
    spine = []
    for request_id, entity_id, created_at_ms, version, has_label, label in rows:
        record = {
            "request_id": request_id,
            entity: entity_id,
            "ts_ms": str(created_at_ms),
            "version": version,
            "label": repr(float(label)) if has_label else "",
        }
        spine.append(SpineRow({entity: entity_id}, created_at_ms, record))
    return columns, spine


def build_training_set(
    registry: FeatureRegistry, log: EventLog, spine: Sequence[SpineRow], features: Sequence[str]
) -> Iterator[dict[str, float]]:
    """Feature values (declared defaults where missing) for each spine row, in spine order."""
    by_entity: dict[str, list[str]] = defaultdict(list)
    for name in features:
        if not registry.has_feature(name):
            raise OfflineError(f"unknown feature {name!r}")
        by_entity[registry.feature(name).entity].append(name)
    for entity in by_entity:
        missing = [i for i, row in enumerate(spine) if not row.ids.get(entity)]
        if missing:
            raise OfflineError(
                f"features of entity {entity!r} need a `{entity}` id; spine row {missing[0] + 1} "
                "has none"
            )
    until = max((row.at_ms for row in spine), default=0)
    wanted = {(entity, row.ids[entity]) for entity in by_entity for row in spine}
    logged = log.observations(registry, wanted, until)
    columns: dict[str, list[float]] = {}
    for entity, names in by_entity.items():
        defaults = registry.plan(entity).defaults
        rows_of: dict[str, list[int]] = defaultdict(list)
        for index, row in enumerate(spine):
            rows_of[row.ids[entity]].append(index)
        for name in names:
            columns[name] = [defaults[name]] * len(spine)
        for entity_id, indices in rows_of.items():
            observations = [o.observation for o in logged[(entity, entity_id)]]
            times = [spine[i].at_ms for i in indices]
            for index, (_clock, values) in zip(
                indices, values_as_of(registry, entity, observations, times), strict=True
            ):
                for name in names:
                    value = values.get(name)
                    if value is not None:
                        columns[name][index] = value
    for index in range(len(spine)):
        yield {name: columns[name][index] for name in features}


def write_training_set(
    path: Path,
    spine_columns: Sequence[str],
    spine: Sequence[SpineRow],
    features: Sequence[str],
    values: Iterable[dict[str, float]],
) -> int:
    """Write spine columns then feature columns, as CSV or Parquet by the file's suffix
    (`.csv`, `.parquet`); returns the rows written. Raises `OfflineError` for another suffix.

    In Parquet, feature columns are float64 and each spine column gets the narrowest type that
    holds all its values: int64 when all are integers, float64 when all are numbers or empty
    (empty = null), string otherwise."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise OfflineError(f"{path}: write .csv or .parquet")
    records = [[row.passthrough.get(c, "") for c in spine_columns] for row in spine]
    matrix = [[row_values[name] for name in features] for row_values in values]
    if len(matrix) != len(records):
        raise OfflineError(f"{len(matrix)} feature rows for {len(records)} spine rows")
    if suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*spine_columns, *features])
            for record, row_values in zip(records, matrix, strict=True):
                writer.writerow(record + [repr(value) for value in row_values])
        return len(records)
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        name: _typed_column([record[j] for record in records])
        for j, name in enumerate(spine_columns)
    }
    for j, name in enumerate(features):
        columns[name] = pa.array([row[j] for row in matrix], type=pa.float64())
    pq.write_table(pa.table(columns), path)
    return len(records)


def _typed_column(cells: list[str]):
    """A pyarrow array of `cells` (strings from a spine) in the narrowest fitting type."""
    import pyarrow as pa

    try:
        return pa.array([int(c) for c in cells], type=pa.int64())
    except ValueError:
        pass
    try:
        return pa.array([float(c) if c != "" else None for c in cells], type=pa.float64())
    except ValueError:
        return pa.array(cells, type=pa.string())
