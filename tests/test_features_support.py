"""Helpers shared by the features tests (this module holds no tests).

The brute-force reference here is written from the documented semantics only (docs/features.md),
without the incremental `EntityWindow`, so the stream and the offline computation are both
checked against something independent.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import orjson
from clickhouse_driver import Client
from redis import Redis

from deploy.demo.generator import DemoItem
from deploy.demo.publish import publish
from schemas.clickhouse import create_statements
from schemas.messages import Event
from services.common.kafka import make_producer
from services.common.settings import SluiceSettings
from services.features.client import TS_SUFFIX, feature_key, snapshot_key
from services.features.definitions import FeatureRegistry
from services.features.store import marker_field, marker_key
from services.features.windows import Aggregation, Observation, lateness_ms

REPO = Path(__file__).resolve().parent.parent
DEMO_DEFINITIONS = REPO / "deploy" / "demo" / "features.yaml"


@dataclass(frozen=True)
class Positioned:
    """An event and where the broker stored it."""

    event: Event
    partition: int
    offset: int


def publish_items(bootstrap: str, topic: str, items: Iterable[DemoItem]) -> list[Positioned]:
    """Produce demo events (no labels) and return each with its partition and offset."""
    placed: list[Positioned] = []
    producer = make_producer(SluiceSettings(kafka_bootstrap=bootstrap), **{"linger.ms": 5})
    publish(
        producer,
        items,
        events_topic=topic,
        labels_topic=None,
        on_delivered=lambda event, partition, offset: placed.append(
            Positioned(event, partition, offset)
        ),
    )
    return placed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FeaturesProcess:
    """`python -m services.features` as a child process with its own settings."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> FeaturesProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.features"],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to commit, flush or leave the group."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def features_env(
    cluster_env: Mapping[str, str],
    *,
    topic: str,
    app_id: str,
    tmp: Path,
    definitions: Path = DEMO_DEFINITIONS,
    runtime: str = "faust",
    http_port: int = 0,
) -> dict[str, str]:
    """Settings that point a features process at `topic` with private names."""
    return {
        **cluster_env,
        "SLUICE_FEATURES_DEFINITIONS": str(definitions),
        "SLUICE_FEATURES_SOURCE_TOPIC": topic,
        "SLUICE_FEATURES_APP_ID": app_id,
        "SLUICE_FEATURES_REPARTITION_TOPIC": f"{app_id}.repartition",
        "SLUICE_FEATURES_RUNTIME": runtime,
        "SLUICE_FEATURES_DATA_DIR": str(tmp / f"{app_id}-data"),
        "SLUICE_FEATURES_HTTP_PORT": str(http_port),
        "SLUICE_FEATURES_HTTP_HOST": "127.0.0.1",
        "SLUICE_FEATURES_BROKER_SESSION_TIMEOUT_S": "4",
        "SLUICE_FEATURES_BROKER_REBALANCE_TIMEOUT_S": "4",
        "SLUICE_LOG_FORMAT": "text",
    }


def applied_fraction(
    redis: Redis, app_id: str, topic: str, placed: Sequence[Positioned], partitions: int = 8
) -> float:
    """How far the markers of every (repartition, source) partition pair are, from 0 to 1."""
    last: dict[int, int] = {}
    for item in placed:
        last[item.partition] = max(last.get(item.partition, -1), item.offset)
    pipe = redis.pipeline(transaction=False)
    for q in range(partitions):
        pipe.hgetall(marker_key(app_id, q))
    done = total = 0
    for markers in pipe.execute():
        for source, offset in last.items():
            total += offset + 1
            raw = markers.get(marker_field(topic, source).encode())
            if raw is not None:
                done += min(int(raw.split()[0]), offset) + 1
    return done / total if total else 1.0


def wait_applied(
    redis: Redis,
    app_id: str,
    topic: str,
    placed: Sequence[Positioned],
    process: FeaturesProcess,
    timeout_s: float = 60,
) -> None:
    deadline = time.monotonic() + timeout_s
    while applied_fraction(redis, app_id, topic, placed) < 1.0:
        assert process.process is not None and process.process.poll() is None, process.log_tail()
        assert time.monotonic() < deadline, f"not applied in time\n{process.log_tail()}"
        time.sleep(0.1)


# -- the reference ------------------------------------------------------------------------------


def reference_observations(
    registry: FeatureRegistry, placed: Sequence[Positioned], until_ms: int | None = None
) -> dict[tuple[str, str], list[tuple[Observation, int, int]]]:
    """Observations per entity with lateness from each partition's offset order."""
    by_partition: dict[int, list[Positioned]] = defaultdict(list)
    for item in placed:
        by_partition[item.partition].append(item)
    result: dict[tuple[str, str], list[tuple[Observation, int, int]]] = defaultdict(list)
    for items in by_partition.values():
        watermark = None
        for item in sorted(items, key=lambda i: i.offset):
            event = item.event
            late = lateness_ms(watermark, event.ts_ms)
            watermark = event.ts_ms if watermark is None else max(watermark, event.ts_ms)
            if until_ms is not None and event.ts_ms > until_ms:
                continue
            for entity, entity_id in event.entities.items():
                if entity not in registry.plans:
                    continue
                plan = registry.plan(entity)
                if event.event_type not in plan.event_types:
                    continue
                values = plan.extract(event.fields, event.entities)
                observation = Observation(
                    event.ts_ms, event.event_type, event.event_id, late, values
                )
                result[(entity, entity_id)].append((observation, item.partition, item.offset))
    return result


def reference_values(
    registry: FeatureRegistry, entity: str, observations: Sequence[Observation]
) -> tuple[int | None, dict[str, float | None]]:
    """(clock, values) by brute force: filter, window, aggregate from scratch."""
    plan = registry.plan(entity)
    unique: dict[tuple[str, str], Observation] = {}
    for observation in observations:
        unique.setdefault(observation.key, observation)
    accepted = {s.name: [o for o in unique.values() if s.accepts(o)] for s in plan.specs}
    stamps = [o.ts for group in accepted.values() for o in group]
    if not stamps:
        return None, dict.fromkeys(plan.names)
    clock = max(stamps)
    values: dict[str, float | None] = {}
    for spec in plan.specs:
        inside = [o for o in accepted[spec.name] if clock - spec.window_ms < o.ts <= clock]
        picked = [o.values[spec.field] for o in inside] if spec.field else []
        match spec.aggregation:
            case Aggregation.count:
                values[spec.name] = float(len(inside))
            case Aggregation.sum:
                values[spec.name] = math.fsum(picked)
            case Aggregation.mean:
                values[spec.name] = math.fsum(picked) / len(picked) if picked else None
            case Aggregation.min:
                values[spec.name] = min(picked, default=None)
            case Aggregation.max:
                values[spec.name] = max(picked, default=None)
            case Aggregation.distinct_count:
                values[spec.name] = float(len(set(picked)))
            case Aggregation.last:
                newest = max(inside, key=lambda o: (o.ts, o.event_type, o.event_id), default=None)
                values[spec.name] = newest.values[spec.field] if newest else None
    return clock, values


def reference_store(
    registry: FeatureRegistry, placed: Sequence[Positioned]
) -> dict[tuple[str, str], tuple[int, dict[str, float | None]]]:
    """What Redis must hold after the stream applied `placed`: (clock, values) per entity."""
    expected = {}
    for key, logged in reference_observations(registry, placed).items():
        clock, values = reference_values(registry, key[0], [o for o, _, _ in logged])
        if clock is not None:
            expected[key] = (clock, values)
    return expected


def read_store(
    redis: Redis, registry: FeatureRegistry, keys: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int | None, dict[str, float | None]]]:
    """(clock, values) per entity as stored in Redis: the snapshot the readers read; asserts
    that the hash's clock (`@ts`) is the snapshot's."""
    keys = list(keys)
    pipe = redis.pipeline(transaction=False)
    for entity, entity_id in keys:
        pipe.hgetall(feature_key(entity, entity_id))
        pipe.get(snapshot_key(entity, entity_id))
    replies = pipe.execute()
    stored = {}
    for (entity, entity_id), raw, snapshot in zip(keys, replies[::2], replies[1::2], strict=True):
        stamp = raw.get(TS_SUFFIX.encode())
        clock = int(stamp) if stamp is not None else None
        names = registry.plan(entity).names
        present: dict[str, float] = {}
        if clock is None:
            assert snapshot is None, (entity, entity_id)
        else:
            snapshot_clock, present = orjson.loads(snapshot)
            assert snapshot_clock == clock, (entity, entity_id)
            assert set(present) <= set(names), (entity, entity_id, "only its features")
        stored[(entity, entity_id)] = (clock, {name: present.get(name) for name in names})
    return stored


# -- ClickHouse ----------------------------------------------------------------------------------


def clickhouse(env: Mapping[str, str]) -> Client:
    return Client(env["SLUICE_CLICKHOUSE_HOST"], port=int(env["SLUICE_CLICKHOUSE_PORT"]))


def create_database(client: Client, name: str) -> str:
    for statement in create_statements(name):
        client.execute(statement)
    return name


def insert_events(client: Client, database: str, placed: Sequence[Positioned]) -> None:
    """Write events the way docs/storage.md lays the `events` table out (no sink involved)."""
    rows = []
    for item in placed:
        event = item.event
        numbers = {
            k: float(v)
            for k, v in event.fields.items()
            if isinstance(v, int | float) and not isinstance(v, str)
        }
        texts = {k: v for k, v in event.fields.items() if isinstance(v, str)}
        rows.append(
            {
                "event_id": event.event_id,
                "event_type": event.event_type,
                "ts": datetime.fromtimestamp(event.ts_ms / 1000, UTC).replace(tzinfo=None),
                "ts_ms": event.ts_ms,
                "entity_names": list(event.entities),
                "entity_ids": list(event.entities.values()),
                "num_names": list(numbers),
                "num_values": list(numbers.values()),
                "str_names": list(texts),
                "str_values": list(texts.values()),
                "kafka_partition": item.partition,
                "kafka_offset": item.offset,
            }
        )
    client.execute(
        f"INSERT INTO {database}.events (event_id, event_type, ts, ts_ms, entity_names, "
        "entity_ids, num_names, num_values, str_names, str_values, kafka_partition, "
        "kafka_offset) VALUES",
        rows,
    )


def insert_predictions(client: Client, database: str, rows: Sequence[dict]) -> None:
    """Logged predictions: request_id, entity_id, created_at_ms, features, defaulted."""
    client.execute(
        f"INSERT INTO {database}.predictions (request_id, model, version, route, entity_id, "
        "score, output_names, output_values, feature_names, feature_values, defaulted, "
        "error_code, error_message, queue_ms, features_ms, model_ms, total_ms, batch_size, "
        "created_at, created_at_ms, scored_at_ms) VALUES",
        [
            {
                "request_id": row["request_id"],
                "model": row["model"],
                "version": "1",
                "route": "champion",
                "entity_id": row["entity_id"],
                "score": 0.5,
                "output_names": [],
                "output_values": [],
                "feature_names": list(row["features"]),
                "feature_values": list(row["features"].values()),
                "defaulted": list(row["defaulted"]),
                "error_code": "",
                "error_message": "",
                "queue_ms": 0.0,
                "features_ms": 0.0,
                "model_ms": 0.0,
                "total_ms": 0.0,
                "batch_size": 1,
                "created_at": datetime.fromtimestamp(row["created_at_ms"] / 1000, UTC).replace(
                    tzinfo=None
                ),
                "created_at_ms": row["created_at_ms"],
                "scored_at_ms": row["created_at_ms"],
            }
            for row in rows
        ],
    )
