"""librdkafka configuration built from settings: the one place client configs are assembled.

Security settings (SASL/TLS) are passed through here, so every producer and consumer of every
service gets them. Consumer defaults: a 6 s session (a dead member's partitions move within it)
and manual offset storage (we commit only after outputs are acked).

Consumers outside the worker loop (the control-topic followers, the gateway's reply listener,
the monitor's start-up read of alerts) dead-letter what they cannot decode with `DeadLetters`,
as the worker loop does, and keep going.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from schemas.messages import ErrorBody
from services.common.codec import DecodeError, encode
from services.common.settings import SluiceSettings

log = logging.getLogger(__name__)


def client_config(settings: SluiceSettings) -> dict[str, Any]:
    """Connection and security settings common to producers, consumers and admin clients."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_sasl_mechanism:
        config["sasl.mechanism"] = settings.kafka_sasl_mechanism
    if settings.kafka_sasl_username:
        config["sasl.username"] = settings.kafka_sasl_username
    if settings.kafka_sasl_password is not None:
        config["sasl.password"] = settings.kafka_sasl_password.get_secret_value()
    if settings.kafka_ssl_ca_location:
        config["ssl.ca.location"] = settings.kafka_ssl_ca_location
    return config


def producer_config(settings: SluiceSettings, **overrides: Any) -> dict[str, Any]:
    """An idempotent, acks=all producer that batches for at most a few milliseconds."""
    return {
        **client_config(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 2,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500_000,
        **overrides,
    }


def consumer_config(settings: SluiceSettings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A consumer-group member that never commits by itself."""
    return {
        **client_config(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": max(500, settings.kafka_session_timeout_ms // 6),
        "fetch.wait.max.ms": settings.kafka_fetch_wait_max_ms,
        **overrides,
    }


def topic_partitions(client: Producer, topic: str, timeout_s: float = 5.0) -> list[int]:
    """The partitions of `topic` from the broker's metadata, through any client's
    `list_topics`; [] when the broker does not answer in time or does not know the topic."""
    try:
        metadata = client.list_topics(topic, timeout=timeout_s).topics.get(topic)
    except KafkaException as exc:
        log.warning("topic metadata unavailable", extra={"topic": topic, "error": str(exc)})
        return []
    if metadata is None or metadata.error is not None:
        return []
    return sorted(metadata.partitions)


def replication_factor(brokers: int) -> int:
    """Replicas for a topic a service creates: one per broker, at most three (what the catalog's
    topics get from `sluice dev up`), so a topic outlives a broker wherever the cluster can."""
    return max(1, min(3, brokers))


def sticky_partition(partitions: Sequence[int], now_ms: int, slice_ms: int, salt: int = 0) -> int:
    """The partition for a message sent at `now_ms` when partitions take turns in time slices of
    `slice_ms`, starting at `salt` (random per producer, so producers do not move in step).

    Messages sent close together share a partition, hence a produce batch; spread over every
    partition they each became a batch of their own. Kafka's sticky partitioner (KIP-480) does
    this for keyless records; fewer, fuller batches cost the broker less per message.
    """
    return partitions[(now_ms // slice_ms + salt) % len(partitions)]


class ServiceProducer(Producer):
    """A `Producer` whose fatal errors always arrive as `KafkaException`.

    confluent-kafka 2.13+ on Python < 3.12 re-raises an error met inside `flush`/`poll`
    callbacks with the class of its value (`cfl_exception_restore`), so a fatal idempotence
    error (OUT_OF_ORDER_SEQUENCE_NUMBER after the broker lost its producer state) can surface
    as the bare `KafkaError` object. No `except` clause but a bare one matches that, so the
    services' handler for exactly this error (replace the producer) never ran and the process
    died. Each call here turns it back into the documented `KafkaException`.
    """

    def produce(self, *args: Any, **kwargs: Any) -> None:
        _documented(super().produce, *args, **kwargs)

    def poll(self, *args: Any, **kwargs: Any) -> int:
        return _documented(super().poll, *args, **kwargs)

    def flush(self, *args: Any, **kwargs: Any) -> int:
        return _documented(super().flush, *args, **kwargs)


def _documented(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(...)`, with a bare `KafkaError` it raises turned into `KafkaException`; any other
    exception (BufferError, KafkaException, ...) passes unchanged."""
    try:
        return call(*args, **kwargs)
    except:  # noqa: E722 - the bare KafkaError matches nothing narrower
        value = sys.exc_info()[1]
        if isinstance(value, KafkaError):
            raise KafkaException(value) from None
        raise


def make_producer(settings: SluiceSettings, **overrides: Any) -> ServiceProducer:
    """A producer with `producer_config`; call `flush()` before exit."""
    return ServiceProducer(producer_config(settings, **overrides))


class DeadLetters:
    """Sends `DeadLetter`s to `sluice.dlq` for a consumer that does not run the worker loop.

    `send` only queues (the producer delivers in the background) so the consumer never waits
    on the broker; `close` flushes. These consumers commit nothing, so a bad record is
    dead-lettered again each time a process reads it again (at-least-once: deduplicate on
    source_topic, partition, offset and consumer_group).
    """

    def __init__(self, settings: SluiceSettings, consumer_group: str) -> None:
        self.consumer_group = consumer_group
        self.producer = make_producer(settings)

    def send(self, message: Message, error: ErrorBody) -> None:
        """Queue the dead letter of `message` (the original cut as in the worker loop)."""
        from services.common.worker import dead_letter_of  # the worker imports this module

        letter = dead_letter_of(message, error, self.consumer_group)
        value = encode(letter.value)  # type: ignore[arg-type]
        while True:
            try:
                self.producer.produce(
                    letter.topic, value, letter.key, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self.producer.poll(0.05)
            except KafkaException as exc:
                log.error("dead letter not queued", extra={"error": str(exc)})
                break
        self.producer.poll(0)

    def _on_delivery(self, error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            log.error("dead letter not delivered", extra={"error": str(error)})

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (bounded by `timeout_s`)."""
        if self.producer.flush(timeout_s) > 0:
            log.error("dead letters not delivered before close")


def assign_from_beginning(consumer: Consumer, topics: Sequence[str]) -> set[tuple[str, int]]:
    """Assign every partition of `topics` from offset 0 (no consumer group: each process reads
    the whole topic, as control planes do with compacted topics); returns the partitions, which
    a consumer with `enable.partition.eof` reports one by one once it has caught up."""
    partitions = []
    for topic in topics:
        metadata = consumer.list_topics(topic, timeout=10).topics[topic]
        partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
    consumer.assign(partitions)
    return {(tp.topic, tp.partition) for tp in partitions}


def follow(
    consumer: Consumer,
    pending_eof: set[tuple[str, int]],
    caught_up: threading.Event,
    stop: threading.Event,
    apply: Callable[[str, bytes | None], None],
    dead_letters: DeadLetters,
    poll_s: float = 0.1,
) -> None:
    """Feed every message of an `assign_from_beginning` consumer to `apply(topic, value)` until
    `stop` is set; `caught_up` is set once each partition in `pending_eof` reported its end.

    One bad control message never stops the follower: a `DecodeError` from `apply` sends the
    message to `dead_letters`, any other exception is logged, and the next message follows.
    """
    while not stop.is_set():
        message = consumer.poll(poll_s)
        if message is None:
            continue
        error = message.error()
        if error is None:
            try:
                apply(message.topic(), message.value())
            except DecodeError as exc:
                dead_letters.send(message, exc.body)
            except Exception:  # noqa: BLE001 - a control message that fails must not stop us
                log.exception(
                    "control message not applied",
                    extra={"topic": message.topic(), "offset": message.offset()},
                )
        elif error.code() == KafkaError._PARTITION_EOF:
            pending_eof.discard((message.topic(), message.partition()))
            if not pending_eof:
                caught_up.set()
        else:
            log.warning("control topic error", extra={"error": str(error)})
