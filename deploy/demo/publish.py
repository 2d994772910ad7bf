"""Send the demo stream to Kafka: events to `sluice.events`, labels to `sluice.labels`.

Labels are sent once the stream's event time passes their `ts_ms`, so a consumer sees each label
after the transactions that happened before it was known. With `speed` set, event time is paced
against the wall clock (`speed=60` plays one minute of event time per second); without it,
everything is sent as fast as the broker takes it.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterable

from confluent_kafka import KafkaError, Message, Producer

from deploy.demo.generator import DemoItem
from schemas.messages import Event, Label
from schemas.topics import EVENTS, LABELS
from services.common.codec import encode

Delivered = Callable[[Event, int, int], None]
"""Called with each event and the partition and offset it was written at."""


class PublishError(RuntimeError):
    """The broker refused or lost messages."""


def publish(
    producer: Producer,
    items: Iterable[DemoItem],
    *,
    events_topic: str = EVENTS.name,
    labels_topic: str | None = LABELS.name,
    speed: float | None = None,
    on_delivered: Delivered | None = None,
) -> int:
    """Produce `items` (and their labels unless `labels_topic` is None); returns the number of
    events sent once the broker acknowledged every message."""
    errors: list[KafkaError] = []
    pending_labels: list[tuple[int, int, Label]] = []
    started_wall = time.monotonic()
    first_event_ms: int | None = None
    sent = 0

    def produce(topic: str, key: str, value: bytes, callback) -> None:
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=callback)
                return
            except BufferError:
                producer.poll(0.05)

    def event_callback(event: Event):
        def delivered(error: KafkaError | None, message: Message) -> None:
            if error is not None:
                errors.append(error)
            elif on_delivered is not None:
                on_delivered(event, message.partition(), message.offset())

        return delivered

    def label_callback(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            errors.append(error)

    def send_labels_until(ts_ms: int) -> None:
        while pending_labels and pending_labels[0][0] <= ts_ms:
            label = heapq.heappop(pending_labels)[2]
            produce(labels_topic, label.entity_id, encode(label), label_callback)  # type: ignore[arg-type]

    for item in items:
        event = item.event
        if first_event_ms is None:
            first_event_ms = event.ts_ms
        if speed:
            due = started_wall + (event.ts_ms - first_event_ms) / 1000 / speed
            delay = due - time.monotonic()
            if delay > 0:
                producer.poll(0)
                time.sleep(delay)
        if labels_topic is not None:
            send_labels_until(event.ts_ms)
            heapq.heappush(pending_labels, (item.label.ts_ms, sent, item.label))
        produce(events_topic, event.entities["card"], encode(event), event_callback(event))
        producer.poll(0)
        sent += 1
    if labels_topic is not None:
        send_labels_until(2**63)
    if producer.flush(60) > 0:
        raise PublishError("the broker did not acknowledge every message within 60 s")
    if errors:
        raise PublishError(f"{len(errors)} messages failed, first: {errors[0]}")
    return sent
