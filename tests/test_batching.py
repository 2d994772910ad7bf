"""Size-or-time batch collection against the real broker (librdkafka's consume semantics)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from services.common.worker import collect_batch
from tests.support import create_topic, produce_all, unique

pytestmark = pytest.mark.integration


@pytest.fixture
def consumer_on(cluster):
    consumers = []

    def make(topic: str) -> Consumer:
        consumer = Consumer(
            {
                "bootstrap.servers": cluster.kafka_bootstrap,
                "group.id": unique("batch"),
                "fetch.wait.max.ms": 5,
                "enable.auto.commit": False,
            }
        )
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        consumers.append(consumer)
        return consumer

    yield make
    for consumer in consumers:
        consumer.close()


def test_batch_flushes_as_soon_as_it_is_full(cluster, consumer_on):
    topic = create_topic(cluster.kafka_bootstrap, unique("test.batch"), 1)
    produce_all(cluster.kafka_bootstrap, topic, ((None, b"%d" % i) for i in range(50)))
    consumer = consumer_on(topic)
    collect_batch(consumer.poll, consumer.consume, 1, 0.0, 5.0)  # fetch started, data local
    started = time.monotonic()
    batch = collect_batch(consumer.poll, consumer.consume, 20, 5.0, 5.0)
    assert len(batch) == 20
    assert time.monotonic() - started < 2.5, "a full batch must not wait for max_wait"


def test_batch_flushes_on_time_when_traffic_is_thin(cluster, consumer_on):
    topic = create_topic(cluster.kafka_bootstrap, unique("test.batch"), 1)
    produce_all(cluster.kafka_bootstrap, topic, ((None, b"%d" % i) for i in range(3)))
    consumer = consumer_on(topic)
    batch = collect_batch(consumer.poll, consumer.consume, 100, 0.3, 5.0)
    started = time.monotonic()
    while len(batch) < 3:
        batch += collect_batch(consumer.poll, consumer.consume, 100, 0.3, 5.0)
    assert [m.value() for m in batch] == [b"0", b"1", b"2"]
    assert time.monotonic() - started < 5.0


def test_idle_consumer_returns_an_empty_batch(cluster, consumer_on):
    topic = create_topic(cluster.kafka_bootstrap, unique("test.batch"), 1)
    consumer = consumer_on(topic)
    assert collect_batch(consumer.poll, consumer.consume, 100, 0.05, 0.2) == []
