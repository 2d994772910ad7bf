"""ClickHouse stopped while traffic keeps arriving, then restarted: the monitor process backs off
instead of crashing or dropping, then inserts everything it held; the counts match."""

from __future__ import annotations

import time
import uuid

import pytest
from clickhouse_driver import Client

from deploy.local.cluster import stop_part, up
from schemas.messages import Event, Label, LatencyBreakdown, Prediction, Route
from schemas.topics import EVENTS, LABELS, PREDICTIONS
from services.common.codec import encode
from tests.faults.support import metric_total, wait_for
from tests.support import produce_all

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BEFORE, DURING = 1500, 1500
"""Messages of each kind produced before and during the outage."""


def produce_traffic(bootstrap: str, model: str, start: int, count: int) -> None:
    now = int(time.time() * 1000)
    ids = range(start, start + count)
    predictions = [
        Prediction(request_id=f"{model}-r{i}", model=model, version="1", route=Route.champion,
                   entity_id=f"card-{i % 97}", score=(i % 100) / 100, features={"amount": i},
                   latency=LatencyBreakdown(total_ms=3), created_at_ms=now, scored_at_ms=now + 3)
        for i in ids
    ]  # fmt: skip
    labels = [
        Label(request_id=f"{model}-r{i}", model=model, entity_id=f"card-{i % 97}",
              value=float(i % 2), ts_ms=now)
        for i in ids
    ]  # fmt: skip
    events = [
        Event(event_id=f"{model}-e{i}", event_type=model, ts_ms=now,
              entities={"card": f"card-{i % 97}"}, fields={"amount": float(i)})
        for i in ids
    ]  # fmt: skip
    produce_all(bootstrap, PREDICTIONS.name, [(p.entity_id, encode(p)) for p in predictions])
    produce_all(bootstrap, LABELS.name, [(x.entity_id, encode(x)) for x in labels])
    produce_all(bootstrap, EVENTS.name, [(e.entities["card"], encode(e)) for e in events])


def stored(client: Client, db: str, model: str, final: bool = True) -> dict[str, int]:
    """Rows of this test per table (`FINAL`: the documented dedup form counts each once)."""
    f = " FINAL" if final else ""
    queries = {
        "predictions": f"SELECT count() FROM {db}.predictions{f} WHERE model = %(m)s",
        "labels": f"SELECT count() FROM {db}.labels{f} WHERE model = %(m)s",
        "events": f"SELECT count() FROM {db}.events{f} WHERE event_type = %(m)s",
    }
    return {table: client.execute(sql, {"m": model})[0][0] for table, sql in queries.items()}


def test_clickhouse_outage_backs_off_then_inserts_everything_held(restore_cluster, stack):
    cluster = restore_cluster
    model = f"ch-{uuid.uuid4().hex[:8]}"
    client = Client(cluster.host, port=cluster.clickhouse_tcp_port)
    db = cluster.clickhouse_database
    stack.add("monitor", SLUICE_MONITOR_SINK_MAX_WAIT_MS="50")
    stack.start()
    monitor = stack.url("monitor")

    produce_traffic(cluster.kafka_bootstrap, model, 0, BEFORE)
    everything = dict.fromkeys(("predictions", "labels", "events"), BEFORE)
    wait_for(lambda: stored(client, db, model) == everything, 60, "rows before the outage")

    stop_part(cluster, "clickhouse")
    client.disconnect()
    stopped_at = time.monotonic()
    retries_before = metric_total(monitor, "sluice_monitor_retries_total")
    produce_traffic(cluster.kafka_bootstrap, model, BEFORE, DURING)
    wait_for(
        lambda: metric_total(monitor, "sluice_monitor_retries_total") >= retries_before + 9,
        60,
        "the sinks retrying",
    )
    time.sleep(5)  # hold the outage long enough for the backoff to reach its cap (5 s)
    outage_s = time.monotonic() - stopped_at
    retries = metric_total(monitor, "sluice_monitor_retries_total") - retries_before
    assert stack.alive("monitor"), stack.log_tail("monitor")
    # three sinks, each doubling its wait from 50 ms up to 5 s: a few retries each, not a spin
    assert retries <= 3 * 12, f"{retries} retries in {outage_s:.0f} s: no backoff"

    up(cluster, auto_install=False, stop_with_caller=True)
    restarted_at = time.monotonic()
    everything = dict.fromkeys(("predictions", "labels", "events"), BEFORE + DURING)
    took = wait_for(lambda: stored(client, db, model) == everything, 60, "rows after the outage")
    assert stored(client, db, model) == everything
    raw = stored(client, db, model, final=False)
    assert all(raw[table] >= BEFORE + DURING for table in raw), raw
    # lag comes from librdkafka statistics, every 5 s
    wait_for(lambda: metric_total(monitor, "sluice_monitor_consumer_lag") == 0, 20, "no lag")
    print(
        f"\noutage {outage_s:.1f} s, {retries:.0f} retries; all {BEFORE + DURING} rows of each "
        f"table in {took:.1f} s after the restart ({time.monotonic() - restarted_at:.1f} s); "
        f"rows before dedup {raw}"
    )
