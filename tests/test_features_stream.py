"""The features service end to end on the demo stream: Kafka -> faust app -> Redis, the HTTP API,
point-in-time training sets from ClickHouse, and the skew check.

One module fixture runs two features processes side by side on two copies of a demo stream (with
out-of-order events): one with the demo definitions, one with a deliberately altered definition.
Each stream is published in two phases; after each, the test "serves" online vectors the way
inference does (`read_online` at the newest event time) and logs them as predictions.
"""

from __future__ import annotations

import csv
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from redis import Redis
from typer.testing import CliRunner

from deploy.demo.generator import DemoConfig, generate
from schemas.messages import DeadLetter
from schemas.topics import DLQ
from services.common.codec import decode
from services.features.cli import app as features_cli
from services.features.client import read_online
from services.features.definitions import FeatureRegistry
from tests.support import create_topic, produce_all, read_topic, unique
from tests.test_features_support import (
    DEMO_DEFINITIONS,
    FeaturesProcess,
    Positioned,
    clickhouse,
    create_database,
    features_env,
    free_port,
    insert_events,
    insert_predictions,
    publish_items,
    read_store,
    reference_observations,
    reference_store,
    reference_values,
    wait_applied,
)

pytestmark = pytest.mark.integration

ALTERED_FEATURE = "card_amount_sum_1h"
SERVED_CARDS = 40


@dataclass
class Run:
    """One stream through one features process, and what was served from it."""

    prefix: str
    topic: str
    app_id: str
    database: str
    http_port: int
    placed: list[Positioned]
    served_at: list[int]
    model: str


def demo_items(prefix: str) -> list:
    """2,400 demo transactions that all lie in the past: the stream's rate follows the hour of
    day, so the span of a fixed count depends on when the test runs; start earlier until the
    newest event is a minute old. Each retry goes back at least an hour: at night a start moved
    back only by the overshoot lands in slower hours and overshoots again (it did, six times,
    at 06:20 UTC), while a day back always holds 2,400 events."""
    now_ms = int(time.time() * 1000)
    start_ms = now_ms - 2 * 3_600_000
    for _ in range(48):
        config = DemoConfig(
            seed=11,
            cards=250,
            merchants=30,
            txns_per_card_per_day=200,
            fraud_episodes_per_card_day=0.5,
            start_ms=start_ms,
            disorder_share=0.05,
            disorder_ms=150_000,
            id_prefix=prefix,
        )
        items = list(generate(config, limit=2400))
        overshoot = max(item.event.ts_ms for item in items) - (now_ms - 60_000)
        if overshoot <= 0:
            return items
        start_ms -= max(overshoot + 600_000, 3_600_000)
    raise AssertionError("the demo stream keeps ending in the future")


def serve(redis: Redis, registry: FeatureRegistry, run: Run, at_ms: int, phase: int) -> list[dict]:
    """What inference would have logged: the fraud view's card features of some cards."""
    cards = []
    for item in run.placed:
        card = item.event.entities["card"]
        if card not in cards:
            cards.append(card)
    cards = [*cards[:SERVED_CARDS], f"{run.prefix}card-never-seen"]
    names = [n for n in registry.view("fraud").features if registry.feature(n).entity == "card"]
    vectors = read_online(redis, registry, [("card", c, names) for c in cards], at_ms)
    return [
        {
            "request_id": f"{run.prefix}req-{phase}-{i}",
            "model": run.model,
            "entity_id": vector.entity_id,
            "features": vector.values,
            "defaulted": vector.defaulted,
            "created_at_ms": at_ms,
        }
        for i, vector in enumerate(vectors)
    ]


@pytest.fixture(scope="module")
def runs(cluster, cluster_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("features")
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    altered = yaml.safe_load(DEMO_DEFINITIONS.read_text())
    for feature in altered["features"]:
        if feature["name"] == ALTERED_FEATURE:
            feature["window"] = "10m"
    altered_path = tmp / "altered.yaml"
    altered_path.write_text(yaml.safe_dump(altered))
    redis = Redis.from_url(cluster.redis_url)
    ch = clickhouse(cluster_env)
    result: dict[str, Run] = {}
    processes: dict[str, FeaturesProcess] = {}
    items: dict[str, list] = {}
    try:
        for name, definitions in (("demo", DEMO_DEFINITIONS), ("altered", altered_path)):
            prefix = unique(name).replace(".", "-") + "-"
            run = Run(
                prefix=prefix,
                topic=create_topic(cluster.kafka_bootstrap, unique("test.features"), 8),
                app_id=unique("features").replace(".", "-"),
                database=create_database(ch, unique("features").replace(".", "_")),
                http_port=free_port(),
                placed=[],
                served_at=[],
                model=unique("fraud"),
            )
            env = features_env(
                cluster_env,
                topic=run.topic,
                app_id=run.app_id,
                tmp=tmp,
                definitions=definitions,
                http_port=run.http_port,
            )
            processes[name] = FeaturesProcess(env, tmp / f"{name}.log").start()
            items[name] = demo_items(prefix)
            result[name] = run
        produce_all(cluster.kafka_bootstrap, result["demo"].topic, [(b"poison", b"not json")])
        for phase, (start, stop) in enumerate(((0, 1500), (1500, None))):
            for name, run in result.items():
                run.placed += publish_items(
                    cluster.kafka_bootstrap, run.topic, items[name][start:stop]
                )
            for name, run in result.items():
                wait_applied(redis, run.app_id, run.topic, run.placed, processes[name])
                at_ms = max(item.event.ts_ms for item in run.placed)
                run.served_at.append(at_ms)
                insert_predictions(ch, run.database, serve(redis, registry, run, at_ms, phase))
        for run in result.values():
            insert_events(ch, run.database, run.placed)
        yield result
    finally:
        for process in processes.values():
            process.stop()


def test_redis_values_equal_a_brute_force_recomputation_of_the_same_events(runs, cluster):
    run = runs["demo"]
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    expected = reference_store(registry, run.placed)
    stored = read_store(Redis.from_url(cluster.redis_url), registry, expected)
    assert len(expected) > 250
    assert {key for key in expected if key[0] == "merchant"}, "merchants are computed too"
    mismatched = {
        key: (expected[key], stored[key]) for key in expected if expected[key] != stored[key]
    }
    assert not mismatched


def test_an_undecodable_event_goes_to_the_dead_letter_topic_and_the_stream_goes_on(runs, cluster):
    run = runs["demo"]

    def ours(messages) -> list[DeadLetter]:
        letters = [decode(DeadLetter, m.value()) for m in messages]
        return [letter for letter in letters if letter.source_topic == run.topic]

    messages = read_topic(cluster.kafka_bootstrap, DLQ.name, lambda ms: bool(ours(ms)))
    (letter,) = ours(messages)
    assert letter.original == b"not json"
    assert letter.error.code == "malformed_json"
    assert letter.consumer_group == run.app_id


def test_events_later_than_the_allowed_lateness_are_dropped_and_counted(runs):
    run = runs["demo"]
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    expected: dict[str, int] = {}
    for (entity, _id), logged in reference_observations(registry, run.placed).items():
        for observation, _, _ in logged:
            for spec in registry.plan(entity).specs:
                if spec.rejects_as_late(observation):
                    expected[spec.name] = expected.get(spec.name, 0) + 1
    metrics = httpx.get(f"http://127.0.0.1:{run.http_port}/metrics").text
    counted = {
        match.group(1): int(float(match.group(2)))
        for match in re.finditer(
            r'^sluice_features_late_events_total\{feature="([^"]+)"\} (\S+)$', metrics, re.M
        )
    }
    assert sum(expected.values()) > 0, "the stream should have late events"
    assert counted == expected


def test_http_api_serves_an_entity_with_freshness_and_flags_defaults(runs):
    run = runs["demo"]
    card = run.placed[0].event.entities["card"]
    base = f"http://127.0.0.1:{run.http_port}"
    found = httpx.get(f"{base}/v1/features/card/{card}").json()
    missing = httpx.get(f"{base}/v1/features/card/{run.prefix}nobody").json()
    unknown = httpx.get(f"{base}/v1/features/planet/earth")
    assert found["as_of_ms"] is not None and found["freshness_s"] > 0
    assert found["features"]["card_txn_count_24h"] == {
        "value": found["features"]["card_txn_count_24h"]["value"],
        "defaulted": False,
    }
    assert found["features"]["card_txn_count_24h"]["value"] >= 1
    assert missing["as_of_ms"] is None
    assert all(f["defaulted"] and f["value"] == 0.0 for f in missing["features"].values())
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_entity"
    assert httpx.get(f"{base}/readyz").status_code == 200


def cli(cluster_env: dict, database: str, *args: str):
    env = {**cluster_env, "SLUICE_CLICKHOUSE_DATABASE": database}
    return CliRunner().invoke(features_cli, list(args), env=env)


def test_training_set_export_is_point_in_time_without_future_leakage(
    runs, cluster_env, tmp_path: Path
):
    run = runs["demo"]
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    early, late = run.served_at
    cards = sorted({item.event.entities["card"] for item in run.placed})[:15]
    merchant = run.placed[-1].event.entities["merchant"]
    spine = tmp_path / "spine.csv"
    with spine.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["card", "merchant", "ts_ms", "label"])
        for card in cards:
            for at in (early, late):
                writer.writerow([card, merchant, at, "0"])
    out = tmp_path / "train.csv"
    result = cli(
        cluster_env,
        run.database,
        "export",
        "--view",
        "fraud",
        "--spine",
        str(spine),
        "-o",
        str(out),
    )
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * len(cards)
    parquet = tmp_path / "train.parquet"
    result = cli(
        cluster_env, run.database, "export", "--view", "fraud", "--spine", str(spine),
        "-o", str(parquet),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = pq.read_table(parquet)
    assert table.schema.field("ts_ms").type == pa.int64()
    assert table.schema.field("card").type == pa.string()
    assert table.to_pylist() == [
        {k: (int(v) if k in ("ts_ms", "label") else v if k in ("card", "merchant") else float(v))
         for k, v in row.items()}
        for row in rows
    ]  # fmt: skip
    as_of = {at: reference_observations(registry, run.placed, until_ms=at) for at in (early, late)}
    for row in rows:
        at = int(row["ts_ms"])
        for entity in ("card", "merchant"):
            logged = as_of[at].get((entity, row[entity]), [])
            _clock, values = reference_values(registry, entity, [o for o, _, _ in logged])
            for name, value in values.items():
                want = registry.feature(name).default if value is None else value
                assert float(row[name]) == want, (name, row[entity], at)


def test_skew_check_finds_no_mismatch_on_the_demo_stream(runs, cluster_env):
    run = runs["demo"]
    result = cli(cluster_env, run.database, "skew", "--model", run.model, "--json")
    assert result.exit_code == 0, (result.output, result.exception)
    report = orjson.loads(result.output)
    served = 2 * (SERVED_CARDS + 1)
    assert report["predictions"] == served
    assert report["mismatched"] == 0
    assert {f["checked"] for f in report["features"].values()} == {served}
    assert all(f["matched"] + f["stale"] == served for f in report["features"].values())


def test_skew_check_catches_a_deliberately_altered_online_definition(runs, cluster_env):
    run = runs["altered"]
    result = cli(cluster_env, run.database, "skew", "--model", run.model, "--json")
    assert result.exit_code == 1, (result.output, result.exception)
    report = orjson.loads(result.output)
    mismatched = {n: f["mismatched"] for n, f in report["features"].items() if f["mismatched"]}
    assert set(mismatched) == {ALTERED_FEATURE}
    assert mismatched[ALTERED_FEATURE] >= SERVED_CARDS // 2


def test_a_training_set_can_be_built_from_logged_predictions_and_their_labels(
    runs, cluster_env, tmp_path: Path
):
    run = runs["demo"]
    ch = clickhouse(cluster_env)
    labelled = ch.execute(
        f"SELECT request_id, entity_id, created_at_ms FROM {run.database}.predictions "
        "ORDER BY request_id LIMIT 3"
    )
    ch.execute(
        f"INSERT INTO {run.database}.labels (request_id, model, entity_id, value, ts, ts_ms) "
        "VALUES",
        [
            {
                "request_id": request_id,
                "model": run.model,
                "entity_id": entity_id,
                "value": 1.0,
                "ts": datetime.fromtimestamp(at / 1000, UTC).replace(tzinfo=None),
                "ts_ms": at,
            }
            for request_id, entity_id, at in labelled
        ],
    )
    out = tmp_path / "from-predictions.csv"
    result = cli(
        cluster_env,
        run.database,
        "export",
        "--features",
        "card_txn_count_1h,card_last_amount",
        "--model",
        run.model,
        "-o",
        str(out),
    )
    assert result.exit_code == 0, (result.output, result.exception)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 2 * (SERVED_CARDS + 1)
    assert sum(row["label"] == "1.0" for row in rows) == 3
    assert {row["card"] for row in rows} >= {entity_id for _, entity_id, _ in labelled}


def test_cli_shows_definitions_and_reads_one_entity(runs, cluster_env):
    run = runs["demo"]
    card = run.placed[0].event.entities["card"]
    shown = CliRunner().invoke(features_cli, ["show"], env=cluster_env)
    got = CliRunner().invoke(features_cli, ["get", "card", card], env=cluster_env)
    assert shown.exit_code == 0 and "view fraud" in shown.output
    assert got.exit_code == 0, got.output
    assert orjson.loads(got.output)["features"]["card_txn_count_24h"]["defaulted"] is False


def test_the_worker_loop_runtime_writes_the_same_values_as_the_definitions(
    cluster, cluster_env, tmp_path
):
    prefix = unique("worker").replace(".", "-") + "-"
    topic = create_topic(cluster.kafka_bootstrap, unique("test.features"), 8)
    app_id = unique("features-worker").replace(".", "-")
    env = features_env(cluster_env, topic=topic, app_id=app_id, tmp=tmp_path, runtime="worker")
    process = FeaturesProcess(env, tmp_path / "worker.log").start()
    redis = Redis.from_url(cluster.redis_url)
    try:
        placed = publish_items(cluster.kafka_bootstrap, topic, demo_items(prefix)[:800])
        wait_applied(redis, app_id, topic, placed, process)
    finally:
        process.stop()
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    expected = reference_store(registry, placed)
    assert read_store(redis, registry, expected) == expected
