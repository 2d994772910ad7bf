"""The controller's Kafka and Redis edges: publishing routing tables, following the control topics.

**Publishing** a routing table writes it to Redis first, then produces it to the compacted
`sluice.routing` (key = model) and waits for the broker's ack. Redis key layout (docs/rollouts.md):
one hash per model, `sluice:routing:{model}`, with fields `revision` (decimal) and `table` (the
`RoutingTable` JSON, byte for byte the Kafka message). The write is a script that only replaces a
lower revision, so a late retry can never roll the table back.

**Following**: one consumer reads `sluice.routing` and `sluice.alerts` from their beginning by
partition assignment (no group: every controller replica sees everything), keeping the newest
routing table per model (for the champion in force and the revision to exceed) and the alerts
firing per series. `caught_up` is set once both topics were read to their end. A message of
either topic that cannot be decoded goes to `sluice.dlq` and the follower keeps going.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from confluent_kafka import Consumer, KafkaError
from redis import Redis
from redis.exceptions import RedisError

from schemas.messages import Alert, AlertState, RoutingTable
from schemas.topics import ALERTS, ROUTING
from services.common.codec import DecodeError, decode, encode
from services.common.kafka import (
    DeadLetters,
    assign_from_beginning,
    consumer_config,
    follow,
    make_producer,
)
from services.rollout.machine import FiringAlert
from services.rollout.settings import RolloutSettings

log = logging.getLogger(__name__)

ROUTING_KEY_PREFIX = "sluice:routing"
FOLLOWER_GROUP = "sluice-rollout-follower"
"""Group id of the follower's consumer; it never joins or commits (partition assignment), so
it only names the consumer in dead letters."""

_SET_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'revision')
if current and tonumber(current) >= tonumber(ARGV[1]) then
    return 0
end
redis.call('HSET', KEYS[1], 'revision', ARGV[1], 'table', ARGV[2])
return 1
"""


def routing_key(model: str) -> str:
    """The Redis key of a model's routing table."""
    return f"{ROUTING_KEY_PREFIX}:{model}"


class PublishError(Exception):
    """The routing table did not reach Redis or the broker; publishing it again is safe."""


class RoutingPublisher:
    """Writes routing tables to Redis and `sluice.routing`."""

    def __init__(self, settings: RolloutSettings, redis: Redis) -> None:
        self.redis = redis
        self.timeout_s = settings.rollout_publish_timeout_s
        self.producer = make_producer(settings, **{"linger.ms": 0})
        self._set_if_newer = redis.register_script(_SET_IF_NEWER)

    def publish(self, table: RoutingTable) -> None:
        """Write `table` to Redis, then to the broker; returns once the broker acked it."""
        payload = encode(table)
        try:
            self._set_if_newer(keys=[routing_key(table.model)], args=[table.revision, payload])
        except RedisError as exc:
            raise PublishError(f"redis: {exc}") from exc
        failures: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                failures.append(error)

        self.producer.produce(ROUTING.name, payload, key=table.model, on_delivery=on_delivery)
        if self.producer.flush(self.timeout_s) > 0 or failures:
            reason = str(failures[0]) if failures else f"no ack within {self.timeout_s}s"
            raise PublishError(f"{ROUTING.name}: {reason}")

    def stored(self, model: str) -> RoutingTable | None:
        """The table Redis holds for `model` (None if none or unreadable)."""
        raw = self.redis.hget(routing_key(model), "table")
        if raw is None:
            return None
        try:
            return decode(RoutingTable, raw)
        except DecodeError:
            return None

    def close(self) -> None:
        self.producer.flush(self.timeout_s)


SeriesKey = tuple[str, str, str, str, str, str]
"""(model, version, route, kind, metric, feature) of an alert."""


class ControlFollower:
    """Follows `sluice.routing` and `sluice.alerts` in a thread (see the module docstring).

    `on_alert(alert)` is called from the follower thread for every alert read after catching
    up, so the controller can evaluate at once.
    """

    def __init__(
        self, settings: RolloutSettings, on_alert: Callable[[Alert], None] | None = None
    ) -> None:
        self.on_alert = on_alert
        self.caught_up = threading.Event()
        self.tables: dict[str, RoutingTable] = {}
        self._firing: dict[SeriesKey, Alert] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.max_message_bytes = settings.kafka_max_message_bytes
        self.consumer = Consumer(
            consumer_config(settings, FOLLOWER_GROUP, **{"enable.partition.eof": True})
        )
        self.dead_letters = DeadLetters(settings, FOLLOWER_GROUP)
        self._pending_eof: set[tuple[str, int]] = set()
        self._thread = threading.Thread(target=self._loop, name="rollout-follower", daemon=True)

    def start(self) -> None:
        """Assign both topics from their beginning and follow them."""
        self._pending_eof = assign_from_beginning(self.consumer, [ROUTING.name, ALERTS.name])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        self.consumer.close()
        self.dead_letters.close()

    def table(self, model: str) -> RoutingTable | None:
        """The newest routing table seen for `model`."""
        with self._lock:
            return self.tables.get(model)

    def firing(self, model: str, version: str, since_ms: int) -> tuple[FiringAlert, ...]:
        """Alerts firing for `model`/`version` that fired at or after `since_ms`."""
        with self._lock:
            alerts = [
                a for a in self._firing.values()
                if a.model == model and a.version == version and a.ts_ms >= since_ms
            ]  # fmt: skip
        return tuple(
            FiringAlert(a.kind, a.metric, a.feature, a.severity, a.value, a.threshold)
            for a in sorted(alerts, key=lambda a: (a.kind, a.metric, a.feature))
        )

    def _loop(self) -> None:
        follow(
            self.consumer,
            self._pending_eof,
            self.caught_up,
            self._stop,
            self.apply,
            self.dead_letters,
        )

    def apply(self, topic: str, value: bytes | None) -> None:
        """Take in one message of either topic (exposed for tests); a tombstone is ignored.

        Raises `DecodeError` for a message that does not decode (the follow loop dead-letters
        it).
        """
        if value is None:
            return
        if topic == ROUTING.name:
            table = decode(RoutingTable, value, self.max_message_bytes)
            with self._lock:
                current = self.tables.get(table.model)
                if current is None or table.revision > current.revision:
                    self.tables[table.model] = table
            return
        alert = decode(Alert, value, self.max_message_bytes)
        key = (alert.model, alert.version, alert.route, alert.kind, alert.metric, alert.feature)
        with self._lock:
            if alert.state is AlertState.firing:
                self._firing[key] = alert
            else:
                self._firing.pop(key, None)
        if self.on_alert is not None and self.caught_up.is_set():
            self.on_alert(alert)
