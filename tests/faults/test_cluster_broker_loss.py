"""A three-broker cluster under load loses a broker, twice; an inference process dies on it.

The cluster is `sluice dev up --brokers 3` (replication factor 3, `min.insync.replicas=2`); the
services get only its bootstrap list. Synchronous predictions through the gateway, asynchronous
requests and demo events produced straight onto Kafka (acks=all, idempotent) run the whole time.
The broker leading most partitions is killed with SIGKILL, started again with `up` once the
cluster has moved its leaders, and when it is back in every in-sync replica set, another broker
is killed and restarted the same way. What must hold, counted:

- every request the broker acknowledged is scored and stored in ClickHouse, exactly once after
  the monitor's dedup (`FINAL`);
- every acknowledged event is in the features' effect in Redis (equal to the offline reference);
- every synchronous request is answered within its deadline, with a score or a 503/504;
- the gateway's p99 over the window after each recovery is within 2x the window before the
  first kill.

`WINDOW_S` (the windows, default 20 s) is 60 in `make faults-cluster`, which runs the broker-loss
test; `make test` deselects it (marker `cluster_faults`: on two cores it takes ~3.5 min, and
beside the rest of the suite its three brokers' restarts starve the gateway's clients) and runs
the inference-pair test. `.ci/run` runs it after `make test`, alone, with 15 s windows and half
the load (`FAULTS_WINDOW_S=15 FAULTS_LOAD_SCALE=0.5`).
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from clickhouse_driver import Client
from confluent_kafka.admin import AdminClient
from redis import Redis

from deploy.demo.generator import DemoConfig, generate
from deploy.local.cluster import ClusterConfig, status, stop_part, up
from schemas.topics import CATALOG, EVENTS, REQUESTS
from services.common.settings import SluiceSettings
from services.features.definitions import FeatureRegistry
from tests.faults.support import (
    Answer,
    AsyncRequests,
    Events,
    Stack,
    SyncLoad,
    encoded_requests,
    late_answers,
    predictions_for,
    request_body,
    running_cluster,
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

WINDOW_S = float(os.environ.get("SLUICE_FAULTS_WINDOW_S", "20"))
DEADLINE_MS = 2000
SLACK_S = 4.0
"""How far past its deadline an answer may arrive (see test_inference_crash.SLACK_S, 2.5 s
there): here a restarting broker's JVM and the two others take the shared cores too, and on
2026-12-07 one 504 reached the client 5.2 s after it was sent (deadline 2 s). A request the
gateway leaves hanging still fails: the client gives up at the deadline + 5 s (status 0)."""
LOAD_SCALE = float(os.environ.get("SLUICE_FAULTS_LOAD_SCALE", "1"))
"""Multiplies the three rates: CI runs the broker-loss test at half of them (.ci/run)."""
SYNC_RATE, ASYNC_RATE, EVENT_RATE = (round(r * LOAD_SCALE) for r in (20, 50, 100))
P99_FLOOR_MS = 25.0
"""The window before is taken as at least this: at 20 requests/s a window's p99 is its few
slowest requests, and a quiet window's 10-15 ms doubles on any scheduling hiccup of the two
shared cores. Measured values are printed and in docs/reliability.md."""


@pytest.fixture(scope="module")
def cluster3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    yield from running_cluster(tmp_path_factory.mktemp("brokers3"), brokers=3)


@pytest.fixture
def stack3(cluster3: ClusterConfig, models: Path, tmp_path: Path) -> Iterator[Stack]:
    services = Stack(cluster3, tmp_path, models)
    try:
        yield services
    finally:
        services.stop()
        if not all(part.healthy for part in status(cluster3)):
            up(cluster3, auto_install=False, stop_with_caller=True)


def leadership(config: ClusterConfig) -> Counter[int]:
    """Catalog partitions led by each broker id."""
    topics = AdminClient({"bootstrap.servers": config.kafka_bootstrap}).list_topics(timeout=10)
    return Counter(
        p.leader for spec in CATALOG for p in topics.topics[spec.name].partitions.values()
    )


def all_in_sync(config: ClusterConfig) -> bool:
    topics = AdminClient({"bootstrap.servers": config.kafka_bootstrap}).list_topics(timeout=10)
    return all(
        len(p.isrs) == config.kafka_brokers
        for spec in CATALOG
        for p in topics.topics[spec.name].partitions.values()
    )


def server_p99_ms(answers: list[Answer]) -> float:
    """p99 of the gateway's own time (`latency_ms.server`) over the scored answers."""
    times = sorted(a.body["latency_ms"]["server"] for a in answers if a.status == 200)
    assert len(times) >= 50, f"only {len(times)} scored answers in the window"
    return times[min(len(times) - 1, int(0.99 * len(times)))]


def kill_and_restart(config: ClusterConfig, broker_id: int) -> tuple[float, float]:
    """SIGKILL broker `broker_id`, wait until no partition names it leader, start it with `up`,
    wait until it is back in every in-sync replica set; (leaders moved, back in sync) in s."""
    killed_at = time.monotonic()
    stop_part(config, config.broker_parts[broker_id - 1], kill=True)
    moved = wait_for(lambda: broker_id not in leadership(config), 60, "leaders moved")
    up(config, auto_install=False, stop_with_caller=True)
    wait_for(lambda: all_in_sync(config), 90, f"broker {broker_id} back in sync")
    return moved, time.monotonic() - killed_at


@pytest.mark.cluster_faults  # 3.5 min, and 5 requests unanswered in a loaded suite: see #23
def test_losing_brokers_of_three_under_load_loses_nothing_acknowledged(cluster3, stack3):
    cluster, stack = cluster3, stack3
    prefix = "cluster-"
    seed_online_features(Redis.from_url(cluster.redis_url), prefix)
    app_id = f"features-cluster-{uuid.uuid4().hex[:6]}"
    for name in ("inference", "ingest", "monitor"):
        stack.add(name)
    stack.add("features", SLUICE_FEATURES_APP_ID=app_id)
    stack.start()
    tag = uuid.uuid4().hex[:8]
    seconds = 4 * WINDOW_S + 240  # the windows and both outages, with room to spare
    async_ids = [f"{tag}-a{i}" for i in range(int(ASYNC_RATE * seconds))]
    requests = AsyncRequests(
        cluster.kafka_bootstrap,
        encoded_requests("fraud", prefix, async_ids),
        async_ids,
        ASYNC_RATE,
    )
    stream = DemoConfig(
        seed=6, cards=300, merchants=30, txns_per_card_per_day=150,
        start_ms=int(time.time() * 1000) - 8 * 3_600_000, id_prefix=f"c3{tag}-",
    )  # fmt: skip
    events = Events(
        cluster.kafka_bootstrap,
        list(itertools.islice(generate(stream), int(EVENT_RATE * seconds))),
        EVENT_RATE,
    )
    load = SyncLoad(
        stack.url("ingest"),
        "fraud",
        lambda i, rid: request_body(prefix, i, rid, DEADLINE_MS),
        rate=SYNC_RATE,
        deadline_ms=DEADLINE_MS,
        tag=tag,
    ).start()
    requests.start()
    events.start()
    wait_for(lambda: sum(a.status == 200 for a in load.answers) >= 40, 60, "traffic flowing")
    before_from = time.monotonic()
    time.sleep(WINDOW_S)
    before = server_p99_ms(load.since(before_from))

    first, _ = leadership(cluster).most_common(1)[0]
    first_moved, first_back = kill_and_restart(cluster, first)
    after_first_from = time.monotonic()
    time.sleep(WINDOW_S)
    after_first = server_p99_ms(load.since(after_first_from))

    second = next(b for b, _ in leadership(cluster).most_common() if b != first)
    second_moved, second_back = kill_and_restart(cluster, second)
    after_second_from = time.monotonic()
    time.sleep(WINDOW_S)
    answers_now = load.since(after_second_from)
    requests.stop.set()
    events.stop.set()
    answers = load.stop()
    after_second = server_p99_ms(answers_now)
    requests.join(150)
    events.join(150)

    # Synchronous: answered within the deadline, a score or a clear 503/504; never a hang.
    unanswered = [a for a in answers if a.status == 0]
    assert not unanswered, (
        summary(answers),
        [(a.request_id, round(a.elapsed_s, 2), a.body) for a in unanswered[:5]],
        stack.log_tail("ingest"),
    )
    late = late_answers(answers, DEADLINE_MS, SLACK_S)
    assert not late, [(a.request_id, a.elapsed_s, a.status) for a in late[:5]]
    outcomes = summary(answers)
    assert set(outcomes) <= {
        (200, None),
        (503, "broker_unavailable"),
        (503, "not_ready"),
        (504, "deadline_exceeded"),
    }, outcomes
    bound = 2 * max(before, P99_FLOOR_MS)
    assert after_first <= bound and after_second <= bound, (before, after_first, after_second)

    # Asynchronous: every acknowledged request scored, and stored exactly once after dedup.
    assert not requests.failed, requests.failed[:5]
    acked = set(requests.acked)
    assert len(acked) >= ASYNC_RATE * 3 * WINDOW_S
    predictions = predictions_for(cluster.kafka_bootstrap, acked, timeout_s=120)
    assert {p["request_id"] for p in predictions} >= acked
    assert all(p["error"] is None for p in predictions)
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
    assert unique_rows == rows == len(acked), (unique_rows, rows, len(acked))

    # Features: every acknowledged event applied, Redis equal to the offline reference.
    assert events.error is None, events.error
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
    scored = Counter(p["request_id"] for p in predictions)
    slowest = max(a.elapsed_s for a in answers)
    print(
        f"\nwindows {WINDOW_S:.0f} s; sync {outcomes}, slowest answer {slowest:.1f} s; "
        f"gateway p99 {before:.1f} ms before, "
        f"{after_first:.1f} after broker {first} came back, {after_second:.1f} after broker "
        f"{second}; leaders moved in {first_moved:.1f} / {second_moved:.1f} s, back in sync "
        f"{first_back:.1f} / {second_back:.1f} s after the kill; async {len(acked)} "
        f"acknowledged, all scored ({sum(scored.values()) - len(scored)} twice), {rows} "
        f"stored after FINAL; {len(events.placed)} events applied ({events.unplaced} "
        "acknowledged without an offset)"
    )


def group_members(config: ClusterConfig, group: str) -> list[set[tuple[str, int]]]:
    """The requests' partitions assigned to each member of consumer group `group`."""
    admin = AdminClient({"bootstrap.servers": config.kafka_bootstrap})
    described = admin.describe_consumer_groups([group])[group].result(10)
    return [
        {
            (tp.topic, tp.partition)
            for tp in member.assignment.topic_partitions
            if tp.topic == REQUESTS.name
        }
        for member in described.members
    ]


def test_a_killed_inference_process_hands_its_partitions_to_the_other(cluster3, stack3):
    cluster, stack = cluster3, stack3
    prefix = "pair-"
    seed_online_features(Redis.from_url(cluster.redis_url), prefix)
    group = f"inference-pair-{uuid.uuid4().hex[:6]}"
    session_ms = SluiceSettings().kafka_session_timeout_ms
    stack.add("inference", SLUICE_INFERENCE_GROUP_ID=group)
    stack.add("inference", instance="inference-2", SLUICE_INFERENCE_GROUP_ID=group)
    stack.start()
    partitions = {(REQUESTS.name, p) for p in range(REQUESTS.partitions)}
    wait_for(
        lambda: sorted(len(m) for m in group_members(cluster, group)) == [
            REQUESTS.partitions // 2, REQUESTS.partitions - REQUESTS.partitions // 2
        ],
        60,
        "both processes assigned half of the requests' partitions",
    )  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    ids = [f"{tag}-p{i}" for i in range(ASYNC_RATE * 60)]
    requests = AsyncRequests(
        cluster.kafka_bootstrap, encoded_requests("fraud", prefix, ids), ids, ASYNC_RATE
    )
    requests.start()
    wait_for(lambda: len(requests.acked) >= ASYNC_RATE * 5, 30, "requests flowing")

    stack.kill("inference-2")
    killed_at = time.monotonic()
    moved = wait_for(
        lambda: group_members(cluster, group) == [partitions],
        session_ms / 1000 + 30,
        "the survivor owning every partition",
    )
    time.sleep(5)
    requests.stop.set()
    requests.join(60)

    assert not requests.failed, requests.failed[:5]
    acked = set(requests.acked)
    predictions = predictions_for(cluster.kafka_bootstrap, acked, timeout_s=90)
    assert {p["request_id"] for p in predictions} >= acked, "a request was lost"
    # Within the session timeout, plus the rebalance itself on two shared cores.
    assert moved <= session_ms / 1000 + 5, moved
    assert stack.alive("inference")
    print(
        f"\nsurvivor owned all {len(partitions)} partitions {moved:.1f} s after the kill "
        f"(session timeout {session_ms / 1000:.0f} s); {len(acked)} acknowledged, all scored; "
        f"{time.monotonic() - killed_at:.0f} s observed"
    )
