"""The machine's floor: how fast one Python process moves our messages through the local broker
doing nothing else, measured in the same run as the services' benchmarks so their targets can
be read against it.

Each row drains a backlog produced first (not timed), with the services' own consumer and
producer settings (`consumer_config`, `producer_config`, batches taken the way `KafkaWorker`
takes them), and reads partitions by assignment (no group join in the clock):

- **relay**: consume a request, produce a prediction-sized message; no parsing at all.
- **inference floor**: the relay plus `orjson.loads` of the request and `orjson.dumps` of a
  prediction carrying the 20-feature vector. What the inference consumer cannot go below:
  no validation, no features, no model, no metrics.
- **sink floor**: consume predictions and `orjson.loads` each; what the monitor sink cannot go
  below before validating or inserting anything. Also with two processes, each reading half
  of the partitions, for a sink scaled out on this machine's two cores.
- **features floor**: what a features process does besides its windows and Redis: decode each
  demo event with the codec (the schema check that sends bad events to the DLQ), route it with
  the service's own stateless `Router` (per entity: its fields, its owner partition) and produce
  the repartition messages; then, as a second drain, consume those and `orjson.loads` each.
  Reported in source events/s over both drains' time, against the 20,000 events/s target.
- **latency floor**: the inference benchmark's latency measurement (its load generator placing
  requests as the gateway does, its reader in a process of its own) against a relay process
  that answers each request with a prediction-sized message and does nothing else, placed as
  inference places predictions. Request creation -> reply consumed, at a fixed 5,000/s (half
  of the inference consumer's peak has been 5,000-6,600/s on this machine).

Every row runs under the garbage-collector tuning the services apply at start-up
(`tune_garbage_collector`): without it, the collector's rescans of what the benchmark process
holds (the generated backlog) are counted as the floor's work, as they were before the eighth
session.

Messages are the shapes the inference and monitor benchmarks use (370-byte requests with 9
request features, 887-byte 20-feature predictions).
"""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from schemas.messages import Event
from services.common.codec import decode, encode
from services.common.kafka import consumer_config, producer_config, sticky_partition
from services.common.settings import SluiceSettings
from services.common.worker import collect_batch, tune_garbage_collector
from services.features.definitions import FeatureRegistry
from services.features.stream import Router, SourceRecord
from services.inference.settings import InferenceSettings
from tests.bench.bench_features import _demo
from tests.bench.bench_inference import _latency, _request
from tests.bench.bench_monitor import _prediction
from tests.bench.harness import BenchContext, BenchTable, service_gc
from tests.support import create_topic, produce_all, unique
from tests.test_features_support import DEMO_DEFINITIONS

PARTITIONS = 8
BATCH = 2000
"""Messages per consume, as the monitor sink's default batch and above the inference batches."""
INFERENCE_TARGET = 50_000
SINK_TARGET = 100_000
FEATURES_TARGET = 20_000
LATENCY_TARGET_P99_MS = 20.0
LATENCY_RATE = 5_000
SLICE_MS: int = InferenceSettings.model_fields["inference_partition_slice_ms"].default


def run(ctx: BenchContext) -> list[BenchTable]:
    count = 100_000 if ctx.quick else 300_000
    bootstrap = ctx.cluster.kafka_bootstrap
    rng = np.random.default_rng(3)
    prediction = _prediction("fraud", 1, rng).model_dump(mode="json")
    encoded_prediction = orjson.dumps(prediction)
    requests = create_topic(bootstrap, unique("bench.floor.requests"), PARTITIONS)
    predictions = create_topic(bootstrap, unique("bench.floor.predictions"), PARTITIONS)
    produce_all(
        bootstrap,
        requests,
        (
            (b"card-%d" % (i % 5000), _request("fraud", i, 1_767_225_600_000 + i, values))
            for i, values in enumerate(rng.normal(size=(count, 8)))
        ),
    )
    ends = produce_all(
        bootstrap,
        predictions,
        (
            (b"card-%d" % (i % 5000), orjson.dumps(_vary(prediction, i, values.tolist())))
            for i, values in enumerate(rng.normal(size=(count, len(prediction["features"]))))
        ),
    )
    settings = SluiceSettings(kafka_bootstrap=bootstrap)
    outputs = create_topic(bootstrap, unique("bench.floor.out"), PARTITIONS)

    online = dict(list(prediction["features"].items())[:12])  # 8 request + 12 stored = 20

    def relay(message) -> None:
        produce(outputs, encoded_prediction, message.key())

    def inference(message) -> None:
        body = orjson.loads(message.value())
        served = {k: v for k, v in body["features"].items() if k != "merchant_id"} | online
        produce(
            outputs,
            orjson.dumps(
                {
                    **prediction,
                    "request_id": body["request_id"],
                    "entity_id": body["entity_id"],
                    "features": served,
                    "created_at_ms": body["created_at_ms"],
                }
            ),
            message.key(),
        )

    producer = Producer(producer_config(settings))
    produce = producer.produce
    with service_gc():  # each row runs as the services run: start-up objects frozen
        rows = [
            ["relay (no parsing)", *_drain(settings, requests, PARTITIONS, count, relay, producer)],
            [
                "inference floor (relay + parse request + write prediction)",
                *_drain(settings, requests, PARTITIONS, count, inference, producer),
            ],
            [
                "sink floor (consume + parse prediction)",
                *_drain(settings, predictions, PARTITIONS, count, _parse, None),
            ],
            ["sink floor, 2 processes", *_drain_in_processes(settings, predictions, ends, 2)],
            [
                "features floor (decode event + route + repartition hop)",
                *_features_floor(settings, 40_000 if ctx.quick else 100_000),
            ],
        ]
    p50, p99, samples = _latency(
        ctx, None, {}, LATENCY_RATE, 4.0 if ctx.quick else 10.0, start=_start_relay
    )
    return [
        BenchTable(
            title="floor: one Python process moving messages through the local broker, no work",
            columns=["what", "messages", "seconds", "messages/s", "process cores"],
            rows=rows,
            notes=[
                f"inference target {INFERENCE_TARGET:,}/s per process = "
                f"{INFERENCE_TARGET / rows[1][3]:.2f}x the inference floor",
                f"sink target {SINK_TARGET:,} rows/s = {SINK_TARGET / rows[2][3]:.2f}x the "
                f"one-process sink floor, {SINK_TARGET / rows[3][3]:.2f}x with two processes",
                f"features target {FEATURES_TARGET:,} events/s per process = "
                f"{FEATURES_TARGET / rows[4][3]:.2f}x the features floor",
                "the broker, the consumer and librdkafka's threads share this machine's cores",
            ],
        ),
        BenchTable(
            title="latency floor: request -> no-work relay -> reply, two hops through the broker",
            columns=["rate /s", "p50 ms", "p99 ms", "samples"],
            rows=[[LATENCY_RATE, p50, p99, int(samples)]],
            notes=[
                f"the inference target, adaptive p99 <= {LATENCY_TARGET_P99_MS:.0f} ms at half "
                f"of peak, is {LATENCY_TARGET_P99_MS / p99:.2f}x this floor's p99",
            ],
        ),
    ]


def _start_relay(ctx: BenchContext, _root, _env, topics: tuple[str, str]):
    """`_latency`'s consumer: this module run as a relay process; ready once it fetched."""
    ready = ctx.workdir / unique("relay-ready")
    process = subprocess.Popen(
        [sys.executable, "-m", __name__, ctx.cluster.kafka_bootstrap, *topics, str(ready)]
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the relay did not start")
        time.sleep(0.05)
    return process, None


def _relay(bootstrap: str, requests: str, replies: str, ready: str) -> None:
    """Answer each request with a prediction-sized reply carrying its `created_at_ms`, taking
    batches as the inference worker does and placing replies as inference does (sticky by
    time slice); no validation, features, model or metrics. Runs until killed."""
    settings = SluiceSettings(kafka_bootstrap=bootstrap)
    consumer = Consumer(consumer_config(settings, unique("bench-relay")))
    consumer.assign([TopicPartition(requests, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
    producer = Producer(producer_config(settings))
    template = _prediction("fraud", 0, np.random.default_rng(4)).model_dump(mode="json")
    tune_garbage_collector()
    consumer.poll(0.5)
    Path(ready).touch()
    while True:
        batch = collect_batch(consumer.poll, consumer.consume, 512, 0.0, 0.1)
        now_ms = int(time.time() * 1000)
        partition = sticky_partition(range(PARTITIONS), now_ms, SLICE_MS)
        for message in batch:
            try:
                request = orjson.loads(message.value())
            except orjson.JSONDecodeError:  # the benchmark's warm-up message
                continue
            reply = {**template, "created_at_ms": request["created_at_ms"], "scored_at_ms": now_ms}
            producer.produce(replies, orjson.dumps(reply), message.key(), partition)
        producer.flush(0.001)


def _features_floor(settings: SluiceSettings, count: int) -> list[object]:
    """Demo events -> decode + `Router.route` + produce (first drain), then the repartition
    messages -> `orjson.loads` (second drain); events, seconds of both, events/s, cores."""
    bootstrap = settings.kafka_bootstrap
    events = create_topic(bootstrap, unique("bench.floor.events"), PARTITIONS)
    repartition = create_topic(bootstrap, unique("bench.floor.repartition"), PARTITIONS)
    produce_all(
        bootstrap,
        events,
        ((item.event.entities["card"], encode(item.event)) for item in _demo(count, "floor-")),
    )
    router = Router(FeatureRegistry.load(DEMO_DEFINITIONS).with_source(events), PARTITIONS)
    producer = Producer(producer_config(settings))
    pending: list[SourceRecord] = []
    sent = 0

    def route(message) -> None:
        nonlocal sent
        event = decode(Event, message.value())
        pending.append(SourceRecord(events, message.partition(), message.offset(), event))
        if len(pending) == router.records_per_message:
            for partition, payload in router.route(pending):
                producer.produce(repartition, payload, partition=partition)
                sent += 1
            pending.clear()

    assert count % router.records_per_message == 0, "every event routed inside the clock"
    _, routing_s, _, routing_cores = _drain(settings, events, PARTITIONS, count, route, producer)
    _, applying_s, _, applying_cores = _drain(settings, repartition, PARTITIONS, sent, _parse, None)
    seconds = routing_s + applying_s
    cores = (routing_cores * routing_s + applying_cores * applying_s) / seconds
    return [count, round(seconds, 2), count / seconds, round(cores, 2)]


def _vary(prediction: dict, i: int, values: list[float]) -> dict:
    """`prediction` with its own ids, times and feature values (every message parses anew)."""
    return {
        **prediction,
        "request_id": f"fraud-{i}",
        "entity_id": f"card-{i % 5000}",
        "features": dict(zip(prediction["features"], values, strict=True)),
        "score": values[0] % 1,
        "created_at_ms": prediction["created_at_ms"] + i,
        "scored_at_ms": prediction["scored_at_ms"] + i,
    }


def _parse(message) -> None:
    orjson.loads(message.value())


def _drain(
    settings: SluiceSettings,
    topic: str,
    partitions: range | int,
    count: int,
    work: Callable,
    producer: Producer | None,
    span: list[float] | None = None,
    barrier=None,
) -> list[object]:
    """Consume `count` messages of `partitions` (all when an int) calling `work` on each; the
    clock runs from the first message to the last one acknowledged. Returns messages, seconds,
    messages/s, CPU cores used by this process (its librdkafka threads included); `span` gets
    the epoch seconds of the first and the last message. With `barrier`, the clock starts
    once every party holds its first message."""
    chosen = range(partitions) if isinstance(partitions, int) else partitions
    consumer = Consumer(consumer_config(settings, unique("bench-floor")))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in chosen])
    try:
        first = consumer.poll(30)
        assert first is not None and first.error() is None, "backlog not readable"
        if barrier is not None:
            barrier.wait(60)
        started, cpu_started = time.perf_counter(), time.process_time()
        work(first)
        done = 1
        while done < count:
            batch = collect_batch(consumer.poll, consumer.consume, BATCH, 0.0, 0.1)
            for message in batch:
                work(message)
            done += len(batch)
            if producer is not None:
                producer.flush(0.001)
        if producer is not None:
            assert producer.flush(60) == 0, "outputs not acknowledged"
        elapsed = time.perf_counter() - started
        cores = (time.process_time() - cpu_started) / elapsed
        if span is not None:
            span += [time.time() - elapsed, time.time()]
    finally:
        consumer.close()
    return [done, round(elapsed, 2), done / elapsed, round(cores, 2)]


def _sink_share(
    settings: SluiceSettings, topic: str, partitions: range, count: int, barrier, out
) -> None:
    tune_garbage_collector()  # as the services (and the one-process rows) run
    span: list[float] = []
    done, *_ = _drain(settings, topic, partitions, count, _parse, None, span, barrier)
    out.put((*span, done))


def _drain_in_processes(
    settings: SluiceSettings, topic: str, ends: dict[int, int], processes: int
) -> list[object]:
    """The sink floor with `processes` consumers, each assigned its share of the partitions
    (`ends`: messages per partition); the clock starts when both hold their first message
    and stops at the last one's last."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    barrier = context.Barrier(processes)
    share = PARTITIONS // processes
    shares = [range(i * share, (i + 1) * share) for i in range(processes)]
    workers = [
        context.Process(
            target=_sink_share,
            args=(settings, topic, chosen, sum(ends.get(p, 0) for p in chosen), barrier, results),
        )
        for chosen in shares
    ]
    for worker in workers:
        worker.start()
    spans = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join(30)
    started = min(span[0] for span in spans)
    finished = max(span[1] for span in spans)
    done = sum(span[2] for span in spans)
    return [done, round(finished - started, 2), done / (finished - started), "-"]


if __name__ == "__main__":
    _relay(*sys.argv[1:])
