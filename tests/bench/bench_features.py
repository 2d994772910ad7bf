"""Features service: events/s per process, and online read latency.

Throughput: a backlog of demo transactions (20,000 cards, 1,000 merchants, the 15 demo features
over `card` and `merchant`) is produced first; then one `python -m services.features` process
starts, and the rate is events / (all offset markers at the end - process ready). Each runtime
(faust app, shared confluent-kafka worker loop) runs in its own process on its own topic. A third
row runs the same two stages in this process straight against Redis (no Kafka, no decoding), in
the order the worker takes a backlog: it routes the whole backlog first (its polls find only
source records), then applies the repartition messages in batches of the same size.

Read latency: `read_online` (declared defaults, TTL, freshness) and `read_snapshots` (the raw
reader inference calls) of 1, 10 and 100 entities x 20 features, one round trip (MGET) each,
against keys laid out as the stream writes them (the snapshot each reader `MGET`s, and the hash
with `@ts` and window state).
"""

from __future__ import annotations

import time

import httpx
import numpy as np
from redis import Redis

from deploy.demo.generator import DemoConfig, generate
from services.features.client import (
    encode_snapshot,
    feature_key,
    read_online,
    read_snapshots,
    snapshot_key,
)
from services.features.definitions import FeatureRegistry
from services.features.settings import FeaturesSettings
from services.features.store import StateStore
from services.features.stream import Applier, Router, SourceRecord
from tests.bench.harness import BenchContext, BenchTable, service_gc
from tests.support import create_topic, unique
from tests.test_features_support import (
    DEMO_DEFINITIONS,
    FeaturesProcess,
    applied_fraction,
    features_env,
    free_port,
    publish_items,
)

TARGET_EVENTS_PER_S = 20_000
TARGET_P99_MS_100 = 2.0
READ_FEATURES = 20


def run(ctx: BenchContext) -> list[BenchTable]:
    events = 20_000 if ctx.quick else 100_000
    return [_throughput(ctx, events), _read_latency(ctx, 300 if ctx.quick else 3_000)]


def _demo(events: int, prefix: str) -> list:
    config = DemoConfig(
        seed=5,
        cards=20_000,
        merchants=1_000,
        start_ms=int(time.time() * 1000) - 24 * 3_600_000,
        id_prefix=prefix,
    )
    return list(generate(config, limit=events))


def _throughput(ctx: BenchContext, events: int) -> BenchTable:
    cluster = ctx.cluster
    redis = Redis.from_url(cluster.redis_url)
    rows: list[list[object]] = []
    for runtime in ("faust", "worker"):
        prefix = unique(runtime).replace(".", "-") + "-"
        topic = create_topic(cluster.kafka_bootstrap, unique("bench.features"), 8)
        placed = publish_items(cluster.kafka_bootstrap, topic, _demo(events, prefix))
        app_id = unique(f"bench-{runtime}").replace(".", "-")
        port = free_port()
        env = features_env(
            cluster.env(),
            topic=topic,
            app_id=app_id,
            tmp=ctx.workdir,
            runtime=runtime,
            http_port=port,
        )
        process = FeaturesProcess(env, ctx.workdir / f"{runtime}.log").start()
        try:
            _wait_ready(port, process)
            started = time.perf_counter()
            while applied_fraction(redis, app_id, topic, placed) < 1.0:
                assert process.process and process.process.poll() is None, process.log_tail()
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
        finally:
            process.stop()
        rows.append(_throughput_row(f"{runtime} process", events, elapsed))
    rows.append(_throughput_row("in-process stages, no Kafka", events, _in_process(ctx, events)))
    return BenchTable(
        title="features: events/s per process (demo stream, 15 features, card + merchant)",
        columns=["runtime", "events", "seconds", "events/s", "vs target 20,000/s"],
        rows=rows,
        notes=[
            "rate = events / (last offset marker applied - /readyz answered 200)",
            "faust's consumer awaits two asyncio tasks per record (Consumer._drain_messages)",
        ],
    )


def _throughput_row(name: str, events: int, elapsed: float) -> list[object]:
    rate = events / elapsed
    return [name, events, round(elapsed, 2), round(rate), f"{rate / TARGET_EVENTS_PER_S:.2f}x"]


def _wait_ready(port: int, process: FeaturesProcess, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert process.process and process.process.poll() is None, process.log_tail()
        time.sleep(0.02)
    raise TimeoutError(f"features process not ready\n{process.log_tail()}")


def _in_process(ctx: BenchContext, events: int) -> float:
    """Seconds for Router + Applier over pre-decoded events, straight against Redis, batched as
    the worker batches a backlog (see the module docstring)."""
    topic = "bench.in-process"
    registry = FeatureRegistry.load(DEMO_DEFINITIONS).with_source(topic)
    prefix = unique("inproc").replace(".", "-") + "-"
    records = [
        SourceRecord(topic, i % 8, i // 8, item.event)
        for i, item in enumerate(_demo(events, prefix))
    ]
    router = Router(registry, 8)
    applier = Applier(registry, StateStore(Redis.from_url(ctx.cluster.redis_url), prefix), 8)
    batch = FeaturesSettings().features_batch_size  # records per worker poll
    with service_gc():
        started = time.perf_counter()
        messages = [
            message
            for start in range(0, len(records), batch)
            for message in router.route(records[start : start + batch])
        ]
        for start in range(0, len(messages), batch):
            applier.apply(messages[start : start + batch])
        return time.perf_counter() - started


def _read_latency(ctx: BenchContext, iterations: int) -> BenchTable:
    registry = _read_registry()
    redis = Redis.from_url(ctx.cluster.redis_url)
    prefix = unique("bench-read")
    names = registry.plan("card").names
    now = int(time.time() * 1000)
    pipe = redis.pipeline(transaction=False)
    rng = np.random.default_rng(3)
    for i in range(100):
        values = dict(zip(names, rng.random(len(names)).tolist(), strict=True))
        mapping = {"@ts": str(now - 1_000)}
        mapping |= {f"~transaction\x1fe{j}": f'[{now},0,{{"amount":1.5}}]' for j in range(20)}
        pipe.hset(feature_key("card", f"{prefix}-{i}"), mapping=mapping)
        pipe.set(snapshot_key("card", f"{prefix}-{i}"), encode_snapshot(now - 1_000, values))
    pipe.execute()
    rows: list[list[object]] = []
    with service_gc():  # as the features service runs: start-up objects frozen
        for count in (1, 10, 100):
            wanted = [("card", f"{prefix}-{i}", names) for i in range(count)]
            keys = [(entity, entity_id) for entity, entity_id, _ in wanted]
            for reader, read in (
                ("read_online", lambda w=wanted: read_online(redis, registry, w, now)),
                ("read_snapshots", lambda k=keys: read_snapshots(redis, k)),
            ):
                for _ in range(20):
                    read()
                samples = []
                for _ in range(iterations):
                    started = time.perf_counter()
                    read()
                    samples.append((time.perf_counter() - started) * 1000)
                p50, p99 = (float(q) for q in np.percentile(samples, [50, 99]))
                target = f"{TARGET_P99_MS_100 / p99:.2f}x" if count == 100 else ""
                rows.append(
                    [reader, f"{count} x {READ_FEATURES}", round(p50, 3), round(p99, 3), target]
                )
    return BenchTable(
        title="features: online read latency (one round trip, MGET)",
        columns=["reader", "entities x features", "p50 ms", "p99 ms", "vs target p99 2 ms (100)"],
        rows=rows,
        notes=[f"{iterations} reads per row, after 20 warm-up reads; Redis on this machine"],
    )


def _read_registry() -> FeatureRegistry:
    windows = ["10m", "1h", "6h", "24h"]
    features = [
        {
            "name": f"card_f{i:02d}",
            "entity": "card",
            "event_types": ["transaction"],
            "aggregation": "count",
            "window": windows[i % len(windows)],
        }
        for i in range(READ_FEATURES)
    ]
    return FeatureRegistry.model_validate(
        {"entities": {"card": {"ttl": "7d"}}, "features": features}
    )
