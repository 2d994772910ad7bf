"""Crash safety: `kill -9` the features process mid-stream, restart it, and the online store ends
exactly where a run without the crash ends.

Two copies of one demo stream (ids prefixed differently) go through two features processes side
by side; one of them is killed with SIGKILL part-way and restarted with the same consumer group.
Everything the killed process had not committed to Kafka is consumed again; the applied-offset
markers in Redis must turn that replay into a no-op.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
from redis import Redis

from deploy.demo.generator import DemoConfig, generate
from services.features.client import feature_key
from services.features.definitions import FeatureRegistry
from tests.support import create_topic, unique
from tests.test_features_support import (
    DEMO_DEFINITIONS,
    FeaturesProcess,
    applied_fraction,
    features_env,
    free_port,
    publish_items,
    read_store,
    reference_store,
    wait_applied,
)

pytestmark = pytest.mark.integration


def stream(prefix: str, start_ms: int) -> list:
    config = DemoConfig(
        seed=23,
        cards=400,
        merchants=40,
        txns_per_card_per_day=150,
        start_ms=start_ms,
        disorder_share=0.03,
        disorder_ms=120_000,
        id_prefix=prefix,
    )
    return list(generate(config, limit=3000))


def strip(prefix: str, stored: dict) -> dict:
    return {
        (entity, entity_id.removeprefix(prefix)): v for (entity, entity_id), v in stored.items()
    }


def test_kill_9_mid_stream_then_restart_leaves_redis_identical_to_a_clean_run(
    cluster, cluster_env, tmp_path
):
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    redis = Redis.from_url(cluster.redis_url)
    runs = {}
    start_ms = int(time.time() * 1000) - 3 * 3_600_000
    for name in ("clean", "crash"):
        prefix = unique(name).replace(".", "-") + "-"
        topic = create_topic(cluster.kafka_bootstrap, unique("test.crash"), 8)
        app_id = unique(f"features-{name}").replace(".", "-")
        port = free_port()
        env = features_env(
            cluster_env, topic=topic, app_id=app_id, tmp=tmp_path, http_port=port
        ) | {"SLUICE_FEATURES_BATCH_SIZE": "100", "SLUICE_FEATURES_BATCH_WAIT_MS": "10"}
        process = FeaturesProcess(env, tmp_path / f"{name}.log").start()
        runs[name] = (prefix, topic, app_id, port, env, process, stream(prefix, start_ms))
    try:
        placed = {
            name: publish_items(cluster.kafka_bootstrap, topic, items)
            for name, (_p, topic, _a, _port, _e, _proc, items) in runs.items()
        }
        _prefix, topic, app_id, port, env, crashing, _items = runs["crash"]
        deadline = time.monotonic() + 60
        while applied_fraction(redis, app_id, topic, placed["crash"]) < 0.2:
            assert time.monotonic() < deadline, crashing.log_tail()
            time.sleep(0.01)
        crashing.kill()
        progress_at_kill = applied_fraction(redis, app_id, topic, placed["crash"])
        restarted = FeaturesProcess(env, tmp_path / "crash-restarted.log").start()
        runs["crash"] = (*runs["crash"][:5], restarted, None)
        for name, (_p, topic, app_id, _port, _e, process, _i) in runs.items():
            wait_applied(redis, app_id, topic, placed[name], process, timeout_s=90)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    finally:
        for *_rest, process, _items in runs.values():
            process.stop()

    assert progress_at_kill < 1.0, "the kill must land mid-stream"
    replayed = re.search(r"^sluice_features_replayed_total (\S+)$", metrics, re.M)
    assert replayed and float(replayed.group(1)) > 0, "the restart must replay applied offsets"
    snapshots = {}
    for name in runs:
        prefix = runs[name][0]
        expected = reference_store(registry, placed[name])
        snapshots[name] = strip(prefix, read_store(redis, registry, expected))
        assert snapshots[name] == strip(prefix, expected)
    assert snapshots["crash"] == snapshots["clean"]
    clean_prefix, crash_prefix = runs["clean"][0], runs["crash"][0]
    card = placed["clean"][0].event.entities["card"].removeprefix(clean_prefix)
    clean_state = redis.hgetall(feature_key("card", clean_prefix + card))
    crash_state = redis.hgetall(feature_key("card", crash_prefix + card))
    assert len(crash_state) == len(clean_state), "window state is identical too"
