"""The local dev cluster: `up`, `status`, `down` and the `sluice dev` CLI, on real processes.

Each integration test runs its own cluster on free ports (not the shared `cluster` fixture),
because these tests stop and restart it.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import redis
from clickhouse_driver import Client
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from deploy.local import kafka
from deploy.local.cli import app
from deploy.local.cluster import (
    PART_NAMES,
    ClusterConfig,
    ClusterError,
    MissingDependency,
    PortInUse,
    down,
    ensure_installed,
    status,
    up,
)
from schemas.clickhouse import TABLES
from schemas.topics import CATALOG, EVENTS
from tests.support import read_topic


@pytest.fixture
def config(tmp_path: Path) -> Iterator[ClusterConfig]:
    """A cluster config on free ports whose processes are stopped after the test."""
    config = ClusterConfig.with_free_ports(tmp_path / "state")
    try:
        yield config
    finally:
        down(config, wipe=True)


def pids(config: ClusterConfig) -> dict[str, int | None]:
    """The pid of each part, by name."""
    return {part.name: part.pid for part in status(config)}


def process_exists(pid: int) -> bool:
    """Whether any process, zombies included, has this pid."""
    return Path(f"/proc/{pid}").exists()


@pytest.mark.integration
def test_up_starts_every_part_healthy_with_catalog_topics_and_tables(
    config: ClusterConfig,
) -> None:
    statuses = up(config, auto_install=False)

    assert [part.name for part in statuses] == list(PART_NAMES)
    assert all(part.running and part.healthy and part.pid for part in statuses), statuses
    topics = AdminClient({"bootstrap.servers": config.kafka_bootstrap}).list_topics(timeout=10)
    assert {spec.name: len(topics.topics[spec.name].partitions) for spec in CATALOG} == {
        spec.name: spec.partitions for spec in CATALOG
    }
    client = Client(config.host, port=config.clickhouse_tcp_port)
    tables = client.execute(f"SHOW TABLES FROM {config.clickhouse_database}")
    client.disconnect()
    assert {name for (name,) in tables} == set(TABLES)
    assert redis.Redis.from_url(config.redis_url).ping()


@pytest.mark.integration
def test_env_and_cluster_env_file_point_at_the_cluster(config: ClusterConfig) -> None:
    up(config, auto_install=False)

    assert config.env() == {
        "SLUICE_KAFKA_BOOTSTRAP": f"127.0.0.1:{config.kafka_port}",
        "SLUICE_REDIS_URL": f"redis://127.0.0.1:{config.redis_port}/0",
        "SLUICE_CLICKHOUSE_HOST": "127.0.0.1",
        "SLUICE_CLICKHOUSE_PORT": str(config.clickhouse_tcp_port),
        "SLUICE_CLICKHOUSE_DATABASE": "sluice",
    }
    exported = subprocess.run(
        ["sh", "-c", f". {shlex.quote(str(config.state_dir / 'cluster.env'))} && env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert {f"{key}={value}" for key, value in config.env().items()} <= set(exported)


@pytest.mark.integration
def test_second_up_is_a_noop_keeping_the_same_pids(config: ClusterConfig) -> None:
    up(config, auto_install=False)
    first = pids(config)

    statuses = up(config, auto_install=False)

    assert {part.name: part.pid for part in statuses} == first
    assert all(part.healthy for part in status(config))


@pytest.mark.integration
def test_down_stops_every_process_and_up_starts_again(config: ClusterConfig) -> None:
    up(config, auto_install=False)
    before = pids(config)

    assert down(config) == list(PART_NAMES)

    assert not any(process_exists(pid) for pid in before.values() if pid)
    assert not any(part.running or part.healthy for part in status(config))
    assert not list(config.state_dir.glob("*.pid"))
    assert down(config) == []

    statuses = up(config, auto_install=False)
    assert all(part.healthy for part in statuses)
    assert all(part.pid not in before.values() for part in statuses)


@pytest.mark.integration
def test_down_spares_a_process_whose_pid_was_reused(config: ClusterConfig) -> None:
    config.state_dir.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # The PID file records a broker command, but the pid now belongs to `sleep`.
        (config.state_dir / "kafka.pid").write_text(f"{sleeper.pid}\njava kafka.Kafka x\n")

        assert down(config) == []

        assert sleeper.poll() is None
        assert not (config.state_dir / "kafka.pid").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.integration
def test_up_refuses_a_port_held_by_another_process(config: ClusterConfig) -> None:
    with socket.socket() as squatter:
        squatter.bind((config.host, config.clickhouse_http_port))
        squatter.listen()

        with pytest.raises(
            PortInUse, match=rf"{config.clickhouse_http_port}.*clickhouse-http-port"
        ):
            up(config, auto_install=False)

    assert not any(part.running for part in status(config))


@pytest.mark.integration
def test_cli_status_names_each_part_and_exits_1_unless_all_are_healthy(
    config: ClusterConfig,
) -> None:
    env = {
        "SLUICE_DEV_STATE_DIR": str(config.state_dir),
        "SLUICE_DEV_KAFKA_PORT": str(config.kafka_port),
        "SLUICE_DEV_REDIS_PORT": str(config.redis_port),
        "SLUICE_DEV_CLICKHOUSE_TCP_PORT": str(config.clickhouse_tcp_port),
        "SLUICE_DEV_CLICKHOUSE_HTTP_PORT": str(config.clickhouse_http_port),
    }
    runner = CliRunner(env=env)

    stopped = runner.invoke(app, ["status"])
    up(config, auto_install=False)
    running = runner.invoke(app, ["status"])

    assert stopped.exit_code == 1
    assert running.exit_code == 0, running.output
    for part in status(config):
        assert part.name in running.output
        assert str(part.pid) in running.output
    assert running.output.count("healthy") == len(PART_NAMES)


@pytest.mark.integration
def test_up_refuses_a_running_part_asked_for_other_ports(config: ClusterConfig) -> None:
    up(config, auto_install=False)
    swapped = replace(
        config,
        clickhouse_tcp_port=config.clickhouse_http_port,
        clickhouse_http_port=config.clickhouse_tcp_port,
    )

    with pytest.raises(ClusterError, match="clickhouse is already running"):
        up(swapped, auto_install=False)

    assert all(part.healthy for part in status(config))


@pytest.mark.integration
def test_parts_tied_to_their_caller_stop_when_the_caller_is_killed(config: ClusterConfig) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from deploy.local.cluster import ClusterConfig, up\n"
        "state_dir, kafka, controller, *ports = sys.argv[1:]\n"
        "config = ClusterConfig(Path(state_dir), int(kafka), *map(int, ports),\n"
        "                       kafka_controller_port=int(controller))\n"
        "up(config, stop_with_caller=True)\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    args = [
        str(config.state_dir),
        str(config.kafka_port),
        str(config.controller_port),
        str(config.redis_port),
        str(config.clickhouse_tcp_port),
        str(config.clickhouse_http_port),
    ]
    caller = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True
    )
    try:
        assert caller.stdout is not None and caller.stdout.readline() == "up\n"
        started = pids(config)
    finally:
        caller.kill()
        caller.wait()

    deadline = time.monotonic() + 10
    while any(part.running for part in status(config)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(pid is not None for pid in started.values())
    assert not any(part.running for part in status(config))


def test_missing_binaries_raise_with_the_commands_that_install_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SLUICE_KAFKA_HOME", str(tmp_path / "no-kafka"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")

    with pytest.raises(MissingDependency) as error:
        ensure_installed(auto_install=False)

    assert "apt-get install -y" in str(error.value) and "redis-server" in str(error.value)
    assert "openjdk-17-jre-headless" in str(error.value)
    assert "maven" in str(error.value)
    assert "python -m deploy.local.kafka install" in str(error.value)


@pytest.mark.integration
def test_the_broker_keeps_its_log_and_cluster_id_across_down_and_up(
    config: ClusterConfig,
) -> None:
    up(config, auto_install=False)
    cluster_id = (config.state_dir / "kafka" / "cluster.id").read_text()
    producer = Producer({"bootstrap.servers": config.kafka_bootstrap, "acks": "all"})
    for i in range(100):
        producer.produce(EVENTS.name, f"kept-{i}".encode(), key=b"k")
    assert producer.flush(30) == 0

    down(config)
    statuses = up(config, auto_install=False)

    assert (config.state_dir / "kafka" / "cluster.id").read_text() == cluster_id
    kafka_status = next(part for part in statuses if part.name == "kafka")
    assert f"Apache Kafka {kafka.version()}" in kafka_status.detail
    kept = read_topic(config.kafka_bootstrap, EVENTS.name, lambda got: len(got) >= 100, 30)
    assert sorted(m.value() for m in kept) == sorted(f"kept-{i}".encode() for i in range(100))
