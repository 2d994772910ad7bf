"""The local broker's files and checks (`deploy/local/kafka.py`), without starting it: what
`install.sh` asks before apt, and the settings one and three nodes get."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.local import kafka

REPO = Path(__file__).resolve().parent.parent


def fake_java(folder: Path, shown: str) -> Path:
    """A `java` that prints `shown` as its `-version` line on stderr, as the JDK does."""
    folder.mkdir(parents=True)
    binary = folder / "java"
    binary.write_text(f"#!/bin/sh\necho '{shown}' >&2\n")
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    return binary


@pytest.mark.parametrize(
    ("shown", "major"),
    [
        ('openjdk version "17.0.13" 2024-10-15', 17),
        ('openjdk version "25" 2025-09-16', 25),
        ('java version "1.8.0_412"', 8),
        ("no version here", None),
    ],
)
def test_java_major_reads_the_version_line(tmp_path: Path, shown: str, major: int | None) -> None:
    assert kafka.java_major(str(fake_java(tmp_path / "bin", shown))) == major


def run_java_check(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deploy.local.kafka", "java"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_install_check_refuses_a_java_older_than_17(tmp_path: Path) -> None:
    old = fake_java(tmp_path / "jdk11" / "bin", 'openjdk version "11.0.22" 2024-01-16')
    env = {"PATH": str(old.parent), "JAVA_HOME": str(tmp_path / "jdk11")}
    found = run_java_check(env)
    assert found.returncode == 1, found
    assert "no java >= 17" in found.stdout


def test_the_install_check_prefers_java_home_when_it_is_new_enough(tmp_path: Path) -> None:
    old = fake_java(tmp_path / "old" / "bin", 'openjdk version "11.0.22" 2024-01-16')
    new = fake_java(tmp_path / "jdk21" / "bin", 'openjdk version "21.0.5" 2024-10-15')
    env = {"PATH": f"{old.parent}{os.pathsep}/usr/bin", "JAVA_HOME": str(new.parent.parent)}
    found = run_java_check(env)
    assert found.returncode == 0, found
    assert found.stdout.strip() == str(new)


def properties(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines())


def nodes(count: int, root: Path) -> list[kafka.Node]:
    return [
        kafka.Node(i + 1, "127.0.0.1", 9092 + 10 * i, 9093 + 10 * i, root / str(i + 1))
        for i in range(count)
    ]


def test_one_node_replicates_nothing_and_lists_itself_as_the_only_voter(tmp_path: Path) -> None:
    (node,) = nodes(1, tmp_path)
    found = properties(kafka.server_properties(node, [node]))
    assert found["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert found["default.replication.factor"] == "1"
    assert found["offsets.topic.replication.factor"] == "1"
    assert found["min.insync.replicas"] == "1"
    assert found["listeners"] == "PLAINTEXT://127.0.0.1:9092,CONTROLLER://127.0.0.1:9093"
    assert found["advertised.listeners"] == "PLAINTEXT://127.0.0.1:9092"
    assert found["auto.create.topics.enable"] == "false"


def test_three_nodes_replicate_three_ways_and_need_two_in_sync(tmp_path: Path) -> None:
    voters = nodes(3, tmp_path)
    found = properties(kafka.server_properties(voters[1], voters))
    assert found["node.id"] == "2"
    assert found["controller.quorum.voters"] == (
        "1@127.0.0.1:9093,2@127.0.0.1:9103,3@127.0.0.1:9113"
    )
    assert found["default.replication.factor"] == "3"
    assert found["transaction.state.log.replication.factor"] == "3"
    assert found["min.insync.replicas"] == "2"
    assert found["log.dirs"] == str(tmp_path / "2")


def test_a_secure_listener_needs_its_keystore(tmp_path: Path) -> None:
    node = kafka.Node(1, "127.0.0.1", 9092, 9093, tmp_path, secure_port=9094)
    with pytest.raises(ValueError, match="TLS"):
        kafka.server_properties(node, [node])
    found = properties(kafka.server_properties(node, [node], {"keystore": tmp_path / "k.pem"}))
    assert "SASL_SSL://127.0.0.1:9094" in found["advertised.listeners"]
    assert found["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    assert found["listener.name.sasl_ssl.ssl.keystore.location"] == str(tmp_path / "k.pem")


def test_the_broker_version_is_read_from_its_classpath(tmp_path: Path) -> None:
    (tmp_path / "kafka_2.13-4.1.2.jar").write_bytes(b"")
    argv = kafka.broker_command("java", tmp_path, tmp_path / "config")
    assert kafka.broker_version(argv) == "4.1.2"
    assert kafka.broker_version(["java", "-version"]) is None
