"""The shared Kafka worker loop against the real local broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition

from schemas.messages import DeadLetter, Event
from schemas.topics import DLQ
from services.common.codec import decode, encode
from services.common.settings import SluiceSettings
from services.common.worker import FixedBatch, KafkaWorker, RecordError
from tests.helpers.relay_worker import relay_to
from tests.support import create_topic, produce_all, read_topic, unique

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def make_event(i: int, event_type: str = "transaction") -> Event:
    return Event(
        event_id=f"e{i}",
        event_type=event_type,
        ts_ms=1_700_000_000_000 + i,
        entities={"card": f"c{i % 97}"},
        fields={"amount": float(i)},
    )


def ids_of(messages) -> list[str]:
    return [orjson.loads(m.value())["event_id"] for m in messages]


def run_in_thread(worker: KafkaWorker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        committed = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in committed}


def make_relay_worker(
    bootstrap: str, source: str, sink: str, group: str, batch: int, wait_s: float = 0.2
) -> KafkaWorker:
    return KafkaWorker(
        SluiceSettings(kafka_bootstrap=bootstrap),
        service="test_relay",
        group_id=group,
        topics=[source],
        handler=relay_to(sink),
        decoders={source: Event},
        batch_policy=FixedBatch(max_messages=batch, max_wait_s=wait_s),
    )


def test_ten_thousand_messages_are_each_handled_once_and_committed(cluster):
    bootstrap = cluster.kafka_bootstrap
    source = create_topic(bootstrap, unique("test.in"), 4)
    sink = create_topic(bootstrap, unique("test.out"), 4)
    events = [make_event(i) for i in range(10_000)]
    ends = produce_all(bootstrap, source, ((e.entities["card"], encode(e)) for e in events))
    group = unique("group")
    worker = make_relay_worker(bootstrap, source, sink, group, batch=500, wait_s=0.02)
    thread = run_in_thread(worker)
    try:
        outputs = read_topic(bootstrap, sink, lambda ms: len(ms) >= 10_000, timeout_s=90)
        time.sleep(1.0)  # anything beyond 10,000 would be a duplicate; give it time to show
        outputs = read_topic(bootstrap, sink, lambda ms: len(ms) >= 10_000, timeout_s=30)
    finally:
        worker.stop()
        thread.join(30)
    assert not thread.is_alive()
    counts = Counter(ids_of(outputs))
    assert len(outputs) == 10_000
    assert set(counts) == {e.event_id for e in events}
    assert max(counts.values()) == 1
    assert committed_offsets(bootstrap, group, source, 4) == ends


def test_worker_killed_mid_stream_loses_nothing_after_restart(cluster):
    bootstrap = cluster.kafka_bootstrap
    source = create_topic(bootstrap, unique("test.in"), 4)
    sink = create_topic(bootstrap, unique("test.out"), 4)
    group = unique("group")
    total = 5_000
    produce_all(bootstrap, source, ((f"k{i}", encode(make_event(i))) for i in range(total)))
    command = [sys.executable, "-m", "tests.helpers.relay_worker", bootstrap, source, sink, group]

    first = subprocess.Popen([*command, "0.05"], cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        partial = read_topic(bootstrap, sink, lambda ms: len(ms) >= 1_000, timeout_s=60)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
    assert len(partial) < total, "the worker finished before it could be killed mid-stream"

    second = subprocess.Popen(command, cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        expected = {f"e{i}" for i in range(total)}
        outputs = read_topic(bootstrap, sink, lambda ms: set(ids_of(ms)) >= expected, timeout_s=90)
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0, "SIGTERM should drain, commit and exit cleanly"
    assert set(ids_of(outputs)) == expected


def test_bad_messages_go_to_the_dlq_and_the_partition_keeps_flowing(cluster):
    bootstrap = cluster.kafka_bootstrap
    source = create_topic(bootstrap, unique("test.in"), 1)
    sink = create_topic(bootstrap, unique("test.out"), 1)
    newer = {**encode_dict(make_event(3)), "schema_version": 99}
    payloads = [
        encode(make_event(1)),
        b"\xff\x00 this is not json",
        orjson.dumps({"event_id": "e2", "event_type": "transaction"}),  # no ts_ms, no entities
        orjson.dumps(newer),
        encode(make_event(4, event_type="poison")),
        encode(make_event(5)),
        encode(make_event(6)),
    ]
    produce_all(bootstrap, source, ((b"k", p) for p in payloads), partition=0)

    relay = relay_to(sink)

    def handler(records):
        for record in records:
            if record.value.event_type == "poison":
                raise RecordError("poison_event", "events of type poison are refused")
        return relay(records)

    worker = KafkaWorker(
        SluiceSettings(kafka_bootstrap=bootstrap),
        service="test_relay",
        group_id=unique("group"),
        topics=[source],
        handler=handler,
        decoders={source: Event},
    )
    thread = run_in_thread(worker)
    try:
        outputs = read_topic(bootstrap, sink, lambda ms: len(ms) >= 3, timeout_s=60)
        letters = [
            decode(DeadLetter, m.value())
            for m in read_topic(
                bootstrap,
                DLQ.name,
                lambda ms: (
                    sum(decode(DeadLetter, m.value()).source_topic == source for m in ms) >= 4
                ),
                timeout_s=30,
            )
        ]
    finally:
        worker.stop()
        thread.join(30)

    assert ids_of(outputs) == ["e1", "e5", "e6"]
    mine = sorted(
        (letter for letter in letters if letter.source_topic == source),
        key=lambda letter: letter.offset,
    )
    assert [(letter.offset, letter.error.code) for letter in mine] == [
        (1, "malformed_json"),
        (2, "schema_invalid"),
        (3, "unsupported_schema_version"),
        (4, "poison_event"),
    ]
    assert [letter.original for letter in mine] == payloads[1:5]
    assert {d["loc"] for d in mine[1].error.details} >= {"ts_ms", "entities"}
    assert "99" in mine[2].error.message
    assert all(letter.key == b"k" and letter.partition == 0 for letter in mine)


def encode_dict(event: Event) -> dict:
    return event.model_dump(mode="json")


def _poll_until_handled(worker: KafkaWorker, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handled := worker.poll_once():
            return handled
    raise TimeoutError("the worker consumed nothing")


def test_the_batch_left_in_flight_is_acknowledged_and_committed_on_close(cluster):
    """`poll_once` returns with its batch's outputs in flight (the next poll finishes them);
    closing right after must still deliver them and commit the batch."""
    bootstrap = cluster.kafka_bootstrap
    source = create_topic(bootstrap, unique("test.in"), 1)
    sink = create_topic(bootstrap, unique("test.out"), 1)
    ends = produce_all(bootstrap, source, ((b"k", encode(make_event(i))) for i in range(50)))
    group = unique("group")
    worker = make_relay_worker(bootstrap, source, sink, group, batch=1000)
    handled = 0
    try:
        while handled < 50:
            handled += _poll_until_handled(worker)
    finally:
        worker.close()
    outputs = read_topic(bootstrap, sink, lambda ms: len(ms) >= 50, timeout_s=30)
    assert ids_of(outputs) == [f"e{i}" for i in range(50)]
    assert committed_offsets(bootstrap, group, source, 1) == ends


def test_a_rebalance_commits_the_batch_in_flight_before_its_partitions_move(cluster):
    """A member that loses partitions while a batch is in flight finishes and commits that
    batch first, so the partitions' new owner does not replay it."""
    bootstrap = cluster.kafka_bootstrap
    source = create_topic(bootstrap, unique("test.in"), 4)
    sink = create_topic(bootstrap, unique("test.out"), 4)
    total = 400
    produce_all(bootstrap, source, ((f"k{i}", encode(make_event(i))) for i in range(total)))
    group = unique("group")
    first = make_relay_worker(bootstrap, source, sink, group, batch=total)
    second = None
    try:
        handled = 0
        while handled < total:  # everything consumed; the last batch is left in flight
            handled += _poll_until_handled(first)
        second = make_relay_worker(bootstrap, source, sink, group, batch=total)
        thread = threading.Thread(target=second.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not (first.assigned and second.assigned) and time.monotonic() < deadline:
            # Only the consumer's poll (which serves the rebalance callbacks), so that nothing
            # but the revocation can settle the batch in flight before the second member
            # reads the committed offsets.
            replayed = first.consumer.poll(0.1)
            assert replayed is None, "a partition came back uncommitted: its batch is replayed"
        assert first.assigned and second.assigned, "the group did not rebalance"
        time.sleep(2.0)  # the second member had time to replay anything left uncommitted
        outputs = read_topic(bootstrap, sink, lambda ms: len(ms) >= total, timeout_s=30)
    finally:
        if second is not None:
            second.stop()
        first.close()
    counts = Counter(ids_of(outputs))
    assert set(counts) == {f"e{i}" for i in range(total)}
    assert max(counts.values()) == 1
