"""The broker stopped under load and started again: every service reconnects by itself.

The local broker (Tansu) keeps everything in memory, so its restart loses every message, every
topic (`up` recreates the catalog's, empty) and every committed offset. What must hold anyway:
each synchronous request gets an explicit answer within its deadline during the outage, and
afterwards the gateway, inference and monitor serve new traffic end to end without a restart:
predictions come back, asynchronous requests are scored, and the monitor stores them.
"""

from __future__ import annotations

import time
import uuid

import pytest
from clickhouse_driver import Client
from redis import Redis

from deploy.local.cluster import stop_part, up
from tests.faults.support import (
    SyncLoad,
    encoded_requests,
    late_answers,
    predictions_for,
    produce_requests,
    request_body,
    seed_online_features,
    summary,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEADLINE_MS = 2000
SLACK_S = 2.5
"""See test_inference_crash.SLACK_S."""
AFTER = 2000
"""Asynchronous requests produced once the broker is back."""


def test_broker_restart_every_service_reconnects_without_manual_action(restore_cluster, stack):
    cluster = restore_cluster
    prefix = "broker-"
    seed_online_features(Redis.from_url(cluster.redis_url), prefix)
    stack.add("inference")
    stack.add("ingest")
    stack.add("monitor")
    stack.start()
    tag = uuid.uuid4().hex[:8]
    async_ids = [f"{tag}-a{i}" for i in range(AFTER)]
    after = encoded_requests("fraud", prefix, async_ids)
    load = SyncLoad(
        stack.url("ingest"),
        "fraud",
        lambda i, rid: request_body(prefix, i, rid, DEADLINE_MS),
        rate=20,
        deadline_ms=DEADLINE_MS,
        tag=tag,
    ).start()
    wait_for(lambda: sum(a.status == 200 for a in load.answers) >= 20, 30, "traffic flowing")

    stop_part(cluster, "kafka")
    stopped_at = time.monotonic()
    time.sleep(3)
    up(cluster, auto_install=False, stop_with_caller=True)
    restarted_at = time.monotonic()
    recovered = wait_for(
        lambda: sum(a.status == 200 for a in load.since(restarted_at)) >= 10, 90, "recovery"
    )
    produce_requests(cluster.kafka_bootstrap, after)
    predictions = predictions_for(cluster.kafka_bootstrap, set(async_ids), timeout_s=60)
    time.sleep(3)
    answers = load.stop()

    assert all(stack.alive(name) for name in ("inference", "ingest", "monitor"))
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
    assert {p["request_id"] for p in predictions} == set(async_ids)
    assert all(p["error"] is None for p in predictions)

    client = Client(cluster.host, port=cluster.clickhouse_tcp_port)
    stored_sql = (
        f"SELECT uniqExact(request_id) FROM {cluster.clickhouse_database}.predictions "
        "WHERE request_id LIKE %(tag)s"
    )
    wait_for(
        lambda: client.execute(stored_sql, {"tag": f"{tag}-a%"})[0][0] == AFTER,
        60,
        "the monitor storing predictions made after the restart",
    )
    print(
        f"\n{outcomes}; outage {restarted_at - stopped_at:.1f} s; served again "
        f"{recovered:.1f} s after the restart; {AFTER} asynchronous requests scored and stored"
    )
