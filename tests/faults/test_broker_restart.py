"""`kill -9` of the broker under load, then `sluice dev up`: nothing acknowledged is lost.

Synchronous predictions flow through the gateway, asynchronous requests and demo events are
produced straight onto Kafka (acks=all, idempotent) the whole time; the broker is killed with
SIGKILL and started again from its log on disk. What must hold, counted:

- every message the broker acknowledged before or after the kill is there afterwards: each
  acknowledged asynchronous request is scored and stored in ClickHouse, each acknowledged event
  is in the features' effect in Redis (equal to the offline reference over those events);
- consumers resume from their committed offsets: what was scored well before the kill is not
  scored again;
- the features service carries on with no manual step (same app id, same markers);
- every synchronous request is answered (200, 503 or 504) within its deadline; none hangs.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import Counter

import pytest
from clickhouse_driver import Client
from redis import Redis

from deploy.demo.generator import DemoConfig, generate
from deploy.local.cluster import stop_part, up
from schemas.topics import EVENTS
from services.features.definitions import FeatureRegistry
from tests.faults.support import (
    AsyncRequests,
    Events,
    SyncLoad,
    encoded_requests,
    late_answers,
    predictions_for,
    request_body,
    seed_online_features,
    summary,
    wait_for,
)
from tests.test_features_support import (
    DEMO_DEFINITIONS,
    applied_fraction,
    read_store,
    reference_store,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE_MS = 2000
SLACK_S = 2.5
"""See test_inference_crash.SLACK_S."""
ASYNC_RATE = 50
EVENT_RATE = 100
"""Asynchronous requests and events produced per second, all through the outage."""


def test_broker_kill_9_loses_nothing_acknowledged_and_every_service_carries_on(
    restore_cluster, stack
):
    cluster = restore_cluster
    prefix = "broker-"
    seed_online_features(Redis.from_url(cluster.redis_url), prefix)
    app_id = f"features-kill-{uuid.uuid4().hex[:6]}"
    stack.add("inference")
    stack.add("ingest")
    stack.add("monitor")
    stack.add("features", SLUICE_FEATURES_APP_ID=app_id)
    stack.start()
    tag = uuid.uuid4().hex[:8]
    async_ids = [f"{tag}-a{i}" for i in range(ASYNC_RATE * 300)]
    requests = AsyncRequests(
        cluster.kafka_bootstrap,
        encoded_requests("fraud", prefix, async_ids),
        async_ids,
        ASYNC_RATE,
    )
    stream = DemoConfig(
        seed=5, cards=300, merchants=30, txns_per_card_per_day=150,
        start_ms=int(time.time() * 1000) - 8 * 3_600_000, id_prefix=f"kill{tag}-",
    )  # fmt: skip
    items = list(itertools.islice(generate(stream), 12_000))
    events = Events(cluster.kafka_bootstrap, items, EVENT_RATE)
    load = SyncLoad(
        stack.url("ingest"),
        "fraud",
        lambda i, rid: request_body(prefix, i, rid, DEADLINE_MS),
        rate=20,
        deadline_ms=DEADLINE_MS,
        tag=tag,
    ).start()
    requests.start()
    events.start()
    wait_for(lambda: sum(a.status == 200 for a in load.answers) >= 40, 60, "traffic flowing")
    wait_for(lambda: len(requests.acked) >= 600, 60, "asynchronous requests acknowledged")

    stop_part(cluster, "kafka", kill=True)
    killed_at = time.monotonic()
    early = {rid for rid, at in list(requests.acked.items()) if at < killed_at - 3}
    time.sleep(3)
    up(cluster, auto_install=False, stop_with_caller=True)
    restarted_at = time.monotonic()
    recovered = wait_for(
        lambda: sum(a.status == 200 for a in load.since(restarted_at)) >= 20, 90, "recovery"
    )
    time.sleep(5)
    requests.stop.set()
    events.stop.set()
    answers = load.stop()
    requests.join(150)
    events.join(150)

    # Synchronous: every request answered within its deadline, with a score or a clear error.
    assert not [a for a in answers if a.status == 0], summary(answers)
    late = late_answers(answers, DEADLINE_MS, SLACK_S)
    assert not late, [(a.request_id, a.elapsed_s, a.status) for a in late[:5]]
    outcomes = summary(answers)
    assert set(outcomes) <= {
        (200, None),
        (503, "broker_unavailable"),
        (503, "not_ready"),
        (504, "deadline_exceeded"),
    }, outcomes
    settled = [a for a in answers if a.sent_at > restarted_at + recovered + 2]
    assert settled and all(a.status == 200 for a in settled), summary(settled)

    # Asynchronous: every acknowledged request scored; none failed to be produced.
    assert not requests.failed, requests.failed[:5]
    acked = set(requests.acked)
    assert len(early) >= 200 and acked > early
    predictions = predictions_for(cluster.kafka_bootstrap, acked, timeout_s=120)
    assert {p["request_id"] for p in predictions} >= acked
    assert all(p["error"] is None for p in predictions)
    # Committed offsets survived: requests acknowledged 3 s before the kill are not scored again.
    scored = Counter(p["request_id"] for p in predictions)
    assert not [rid for rid in early if scored[rid] != 1], "re-scored after the restart"

    # Every acknowledged prediction is stored once after dedup by the monitor.
    client = Client(cluster.host, port=cluster.clickhouse_tcp_port)
    stored_sql = (
        f"SELECT uniqExact(request_id), count() FROM {cluster.clickhouse_database}.predictions "
        "FINAL WHERE request_id LIKE %(tag)s AND route != 'shadow'"
    )
    wait_for(
        lambda: client.execute(stored_sql, {"tag": f"{tag}-a%"})[0][0] == len(acked),
        90,
        "the monitor storing every acknowledged request's prediction",
    )
    unique_rows, rows = client.execute(stored_sql, {"tag": f"{tag}-a%"})[0]

    # Features: every acknowledged event applied, Redis equal to the offline reference.
    assert events.error is None, events.error
    assert len(events.placed) > EVENT_RATE * 10
    redis = Redis.from_url(cluster.redis_url)
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    wait_for(
        lambda: applied_fraction(redis, app_id, EVENTS.name, events.placed) == 1.0,
        120,
        f"every acknowledged event applied\n{stack.log_tail('features')}",
    )
    expected = reference_store(registry, events.placed)
    assert read_store(redis, registry, expected) == expected
    assert all(stack.alive(n) for n in ("inference", "ingest", "monitor", "features"))
    print(
        f"\nsync {outcomes}; async {len(acked)} acknowledged, all scored "
        f"({sum(scored.values()) - len(scored)} twice), {unique_rows} stored ({rows} rows "
        f"after FINAL); {len(events.placed)} events applied; served again {recovered:.1f} s "
        f"after the restart"
    )
