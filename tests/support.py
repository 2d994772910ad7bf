"""Small Kafka helpers for tests: topics, producing with known offsets, reading a topic back.

Reading uses `assign` from the beginning instead of a consumer group, so it costs no group join
(which takes about half the session timeout on the local broker).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def unique(prefix: str) -> str:
    """A fresh name, so tests sharing one cluster never see each other's data."""
    return f"{prefix}.{uuid.uuid4().hex[:10]}"


def create_topic(bootstrap: str, name: str, partitions: int) -> str:
    """Create `name` with an explicit partition count and wait until it is usable."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout=15)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        topic = admin.list_topics(name, timeout=5).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return name
        time.sleep(0.05)
    raise TimeoutError(f"topic {name} did not appear")


def produce_all(
    bootstrap: str,
    topic: str,
    items: Iterable[tuple[bytes | str | None, bytes]],
    partition: int | None = None,
) -> dict[int, int]:
    """Produce (key, value) pairs, wait for every ack, return the next offset per partition."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    ends: dict[int, int] = {}
    errors: list[str] = []

    def on_delivery(error, message: Message) -> None:
        if error is not None:
            errors.append(str(error))
        else:
            ends[message.partition()] = max(ends.get(message.partition(), 0), message.offset() + 1)

    for key, value in items:
        kwargs = {"partition": partition} if partition is not None else {}
        while True:
            try:
                producer.produce(topic, value, key=key, on_delivery=on_delivery, **kwargs)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(30) == 0, "producer did not drain"
    assert not errors, errors
    return ends


def read_topic(
    bootstrap: str,
    topic: str,
    until: Callable[[list[Message]], bool],
    timeout_s: float = 60.0,
    config: Mapping[str, object] | None = None,
) -> list[Message]:
    """Read `topic` from the beginning of every partition until `until(messages)` holds;
    `config` adds client settings (a secure listener's)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": unique("reader"),
            "enable.auto.commit": False,
            "fetch.wait.max.ms": 10,
            **(config or {}),
        }
    )
    metadata = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
    messages: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}: condition not met with {len(messages)} messages")
            batch = consumer.consume(10_000, 0.2)
            messages.extend(m for m in batch if m.error() is None)
    finally:
        consumer.close()
    return messages


def json_bodies(messages: list[Message]) -> list[dict]:
    """The JSON object values of `messages`, skipping anything else: shared catalog topics also
    carry the deliberately malformed messages of other tests (dead-letter tests)."""
    bodies = []
    for message in messages:
        try:
            body = orjson.loads(message.value())
        except (orjson.JSONDecodeError, TypeError):
            continue
        if isinstance(body, dict):
            bodies.append(body)
    return bodies


def body_of(message: Message) -> dict:
    """One message's JSON object, or {} for anything else (see `json_bodies`)."""
    bodies = json_bodies([message])
    return bodies[0] if bodies else {}
