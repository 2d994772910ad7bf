"""Redis killed under load, then restarted (durable: append-only file, fsync on every write).

While it is down, every synchronous prediction gets an answer at once, per the model's manifest:
a model whose online features all have defaults is scored degraded (HTTP 200, the online features
listed in `defaulted`), a model with a required online feature answers 503
`online_store_unavailable`. Nobody waits for the deadline. Once Redis is back, both recover by
themselves. The features stream, fed all along, retries its commits and ends exactly where a run
without the outage ends: no event lost, none counted twice.
"""

from __future__ import annotations

import shutil
import time
import uuid

import pytest
from redis import Redis

from deploy.demo.generator import DemoConfig, generate
from deploy.local.cluster import stop_part, up
from services.features.definitions import FeatureRegistry
from services.inference.manifest import Manifest
from tests.faults.support import (
    DEMO_FEATURES,
    SyncLoad,
    late_answers,
    metric_total,
    request_body,
    seed_online_features,
    summary,
    wait_for,
)
from tests.helpers.models import CARD_FEATURES, MERCHANT_FEATURES
from tests.test_features_support import (
    applied_fraction,
    publish_items,
    read_store,
    reference_store,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE_MS = 2000
SLACK_S = 2.5
"""See test_inference_crash.SLACK_S."""
ONLINE = sorted(CARD_FEATURES + MERCHANT_FEATURES)


def add_model_with_defaults(root, name: str) -> None:
    """A copy of `fraud` v1 whose online features all have a default (0.0)."""
    shutil.copytree(root / "fraud" / "1", root / name / "1")
    manifest = Manifest.load(root / name / "1" / "manifest.json")
    features = [
        f.model_copy(update={"default": 0.0}) if f.source == "online" else f
        for f in manifest.features
    ]
    manifest.model_copy(update={"model": name, "features": features}).save(
        root / name / "1" / "manifest.json"
    )


def demo_stream(prefix: str, start_ms: int) -> list:
    config = DemoConfig(
        seed=31, cards=300, merchants=30, txns_per_card_per_day=150, start_ms=start_ms,
        id_prefix=prefix,
    )  # fmt: skip
    return list(generate(config, limit=3000))


def test_redis_outage_degrades_per_manifest_and_recovers_without_double_counting(
    restore_cluster, stack, models
):
    cluster = restore_cluster
    redis = Redis.from_url(cluster.redis_url)
    prefix = "redis-"
    seed_online_features(redis, prefix)
    add_model_with_defaults(models, "fraud-defaults")
    stack.add("inference")
    stack.add("ingest")
    stack.add("features")
    stack.start()
    tag = uuid.uuid4().hex[:6]
    loads = {
        model: SyncLoad(
            stack.url("ingest"),
            model,
            lambda i, rid: request_body(prefix, i, rid, DEADLINE_MS),
            rate=20,
            deadline_ms=DEADLINE_MS,
            tag=f"{tag}-{model}",
        ).start()
        for model in ("fraud", "fraud-defaults")
    }
    registry = FeatureRegistry.load(DEMO_FEATURES)
    items = demo_stream(f"{tag}-", int(time.time() * 1000) - 3 * 3_600_000)
    placed = publish_items(cluster.kafka_bootstrap, "sluice.events", items[:1500])
    wait_for(
        lambda: applied_fraction(redis, "sluice-features", "sluice.events", placed) >= 1.0,
        60,
        "first half applied",
    )

    stop_part(cluster, "redis", kill=True)
    stopped_at = time.monotonic()
    placed += publish_items(cluster.kafka_bootstrap, "sluice.events", items[1500:])
    time.sleep(6)
    assert all(stack.alive(name) for name in ("inference", "features", "ingest"))
    up(cluster, auto_install=False, stop_with_caller=True)
    restarted_at = time.monotonic()
    recovered = wait_for(
        lambda: any(a.status == 200 for a in loads["fraud"].since(restarted_at)), 30, "recovery"
    )
    wait_for(
        lambda: applied_fraction(redis, "sluice-features", "sluice.events", placed) >= 1.0,
        60,
        "second half applied",
    )
    time.sleep(3)
    answers = {model: load.stop() for model, load in loads.items()}

    # every request answered within its deadline, per the manifest
    for model, got in answers.items():
        assert not [a for a in got if a.status == 0], (model, summary(got))
        late = late_answers(got, DEADLINE_MS, SLACK_S)
        assert not late, (model, [(a.request_id, a.elapsed_s, a.status) for a in late[:5]])
    required = summary(answers["fraud"])
    # no 504: an outage answer comes at once instead of waiting for the deadline
    assert set(required) == {(200, None), (503, "online_store_unavailable")}, required
    unavailable = [a for a in answers["fraud"] if a.status == 503]
    assert all(stopped_at - 1 <= a.sent_at <= restarted_at + recovered for a in unavailable)
    defaulted = summary(answers["fraud-defaults"])
    assert set(defaulted) == {(200, None)}, defaulted
    degraded = [a for a in answers["fraud-defaults"] if a.body["defaulted"]]
    assert degraded and all(sorted(a.body["defaulted"]) == ONLINE for a in degraded)
    assert all(stopped_at - 1 <= a.sent_at <= restarted_at + recovered for a in degraded)
    for got in answers.values():
        after = [a for a in got if a.sent_at > restarted_at + recovered + 1]
        assert after and all(a.status == 200 and not a.body["defaulted"] for a in after)
    assert metric_total(stack.url("inference"), "sluice_inference_degraded_total") >= len(degraded)

    # the stream applied every event exactly once across the outage
    expected = reference_store(registry, placed)
    assert read_store(redis, registry, expected) == expected
    print(
        f"\nfraud {required}; fraud-defaults: {len(degraded)} degraded of "
        f"{len(answers['fraud-defaults'])}; outage {restarted_at - stopped_at:.1f} s, "
        f"recovered {recovered:.1f} s after the restart; {len(placed)} events, "
        f"{len(expected)} entities as the reference"
    )
