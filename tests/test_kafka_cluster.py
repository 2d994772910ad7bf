"""`sluice dev up --brokers 3`: three KRaft nodes, the catalog replicated three ways.

What a user of a replicated cluster relies on, checked on the real thing: every catalog topic
has three in-sync replicas and needs two for an acks=all write; the cluster keeps taking and
serving writes with its busiest broker killed; the killed broker comes back from its own log
with `up` and catches up; `down` stops all three.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource
from typer.testing import CliRunner

from deploy.local.cli import app
from deploy.local.cluster import ClusterConfig, down, status, stop_part, up
from schemas.topics import CATALOG, EVENTS
from services.common.kafka import make_producer
from services.common.settings import SluiceSettings
from tests.faults.support import wait_for
from tests.support import read_topic, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterConfig]:
    config = ClusterConfig.with_free_ports(tmp_path_factory.mktemp("brokers3"), brokers=3)
    try:
        up(config, auto_install=False, stop_with_caller=True)
        yield config
    finally:
        down(config, wipe=True)


def leaders(config: ClusterConfig, topic: str | None = None) -> Counter[int]:
    """Partitions led by each broker id, over the catalog (or one topic)."""
    topics = AdminClient({"bootstrap.servers": config.kafka_bootstrap}).list_topics(timeout=10)
    names = [topic] if topic else [spec.name for spec in CATALOG]
    return Counter(p.leader for name in names for p in topics.topics[name].partitions.values())


def test_three_brokers_replicate_every_catalog_topic_and_need_two_in_sync(cluster):
    statuses = status(cluster)
    assert [part.name for part in statuses] == list(cluster.parts)
    assert cluster.parts == ("kafka", "kafka-2", "kafka-3", "redis", "clickhouse")
    assert all(part.healthy for part in statuses), statuses
    assert "node 2 of 3" in statuses[1].detail
    admin = AdminClient({"bootstrap.servers": cluster.kafka_bootstrap})
    metadata = admin.list_topics(timeout=10)
    assert sorted(metadata.brokers) == [1, 2, 3]
    for spec in CATALOG:
        for partition in metadata.topics[spec.name].partitions.values():
            assert sorted(partition.replicas) == [1, 2, 3], (spec.name, partition)
            assert sorted(partition.isrs) == [1, 2, 3], (spec.name, partition)
    resource = ConfigResource(ConfigResource.Type.TOPIC, EVENTS.name)
    configs = admin.describe_configs([resource])[resource].result(10)
    assert configs["min.insync.replicas"].value == "2"
    assert len(leaders(cluster)) == 3, "leadership is spread over the brokers"


def test_writes_survive_killing_the_busiest_broker_and_it_catches_up_after_up(cluster):
    topic = EVENTS.name
    busiest_id, _ = leaders(cluster).most_common(1)[0]
    busiest = cluster.broker_parts[busiest_id - 1]
    producer = make_producer(SluiceSettings(kafka_bootstrap=cluster.kafka_bootstrap))
    tag = unique("kill")
    failed: list[str] = []

    def report(error, _message):
        if error is not None:
            failed.append(str(error))

    for i in range(500):
        producer.produce(topic, f"{tag}-{i}".encode(), key=str(i).encode(), on_delivery=report)
    assert producer.flush(30) == 0
    stop_part(cluster, busiest, kill=True)
    for i in range(500, 1000):
        producer.produce(topic, f"{tag}-{i}".encode(), key=str(i).encode(), on_delivery=report)
        producer.poll(0)
    assert producer.flush(60) == 0, "writes stalled with one broker of three down"
    assert not failed, failed[:5]
    assert busiest_id not in leaders(cluster, topic), "leadership moved off the killed broker"

    wanted = {f"{tag}-{i}".encode() for i in range(1000)}
    got = read_topic(
        cluster.kafka_bootstrap,
        topic,
        lambda messages: wanted <= {m.value() for m in messages},
        60,
    )
    mine = Counter(m.value() for m in got if m.value() in wanted)
    assert set(mine) == wanted and set(mine.values()) == {1}, "idempotence: each once"

    up(cluster, auto_install=False, stop_with_caller=True)
    admin = AdminClient({"bootstrap.servers": cluster.kafka_bootstrap})

    def back_in_sync() -> bool:
        partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions.values()
        return all(sorted(p.isrs) == [1, 2, 3] for p in partitions)

    wait_for(back_in_sync, 60, f"{busiest} back in every in-sync replica set")


def test_down_from_the_cli_stops_every_broker(cluster):
    pids = [part.pid for part in status(cluster) if part.name.startswith("kafka")]
    env = {"SLUICE_DEV_STATE_DIR": str(cluster.state_dir)}
    stopped = CliRunner().invoke(app, ["down"], env=env)
    assert stopped.exit_code == 0, stopped.output
    assert "kafka, kafka-2, kafka-3" in stopped.output
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    up(cluster, auto_install=False, stop_with_caller=True)
