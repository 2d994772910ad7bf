"""Apache Kafka for the local cluster: its jars from Maven Central, its files, its command line.

There is no release tarball to download here, so no `bin/` or `config/` either: `install`
resolves the broker's runtime classpath with Maven from the committed `kafka/pom.xml` into a
cache folder, and this module writes what the release's scripts and config files would have
given: `server.properties` for a combined broker + controller node (KRaft), a console-only
log4j2 configuration, and the JVM flags of `kafka-run-class.sh` with a smaller heap.

Standard library only: `install.sh` runs `python -m deploy.local.kafka install` before the
project's Python dependencies are installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

POM = Path(__file__).with_name("kafka") / "pom.xml"
"""The pinned broker version and its logging binding; the one place the version is set."""

HEAP_MB = 512
"""Heap of a one-node cluster's broker. Kafka's start script uses 1 GiB; see docs/benchmarks.md
for what the demo and the benchmarks use (the page cache, not the heap, holds the log)."""

CLUSTER_HEAP_MB = 384
"""Heap of each broker in a cluster of several: each leads a share of the partitions and
follows the rest."""

JVM_FLAGS = (
    "-server",
    "-Xms128m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-XX:MaxInlineLevel=15",
    "-XX:TieredStopAtLevel=1",
    "-Djava.awt.headless=true",
)
"""`kafka-run-class.sh`'s flags for the broker, less its 1 GiB heap (`broker_command` sets
the heap), plus the client compiler only (`TieredStopAtLevel=1`): on two cores shared with
the services, C2 spent ~16 s of CPU in a fresh broker's first two minutes (one C2 thread at
~0.5 cores), and the broker never earned it back. Measured 2026-12-07 on a fresh broker, C2
then C1: the floor's relay 157k -> 171k messages/s, the latency floor at 5,000/s p50 90 ->
7.5 ms and p99 666 -> 173 ms; the gateway at 4 connections, first 5 s, broker 0.94 -> 0.45
cores; at steady state both ~0.35-0.45 cores (docs/benchmarks.md)."""

TOOL_JVM_FLAGS = ("-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")
"""For the one-shot storage tool: it starts about twice as fast with the client compiler."""

SCRAM_MECHANISM = "SCRAM-SHA-512"

_LOG4J2 = """\
# Console only: the cluster sends the broker's stdout to <state>/logs/kafka.log.
status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stdout.ref = STDOUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
logger.controller.name = org.apache.kafka.controller
logger.controller.level = WARN
"""


class KafkaInstallError(RuntimeError):
    """Java or Maven is missing or too old, or Maven could not resolve the broker's jars."""


def version(pom: Path = POM) -> str:
    """The Kafka version the pom pins (its `kafka.version` property)."""
    namespace = {"m": "http://maven.apache.org/POM/4.0.0"}
    found = ET.parse(pom).getroot().find("m:properties/m:kafka.version", namespace)
    if found is None or not found.text:
        raise KafkaInstallError(f"{pom} sets no kafka.version property")
    return found.text.strip()


def home() -> Path:
    """Where this version's jars live: `$SLUICE_KAFKA_HOME`, else a per-user cache folder
    (`$XDG_CACHE_HOME/sluiceway/kafka-<version>`, shared by every cluster on the machine)."""
    override = os.environ.get("SLUICE_KAFKA_HOME")
    if override:
        return Path(override)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "sluiceway" / f"kafka-{version()}"


def libs(root: Path | None = None) -> Path | None:
    """The folder of the broker's jars, or None when they are not installed (completely)."""
    folder = (root or home()) / "libs"
    return folder if (folder / ".complete").is_file() else None


def java() -> str | None:
    """A `java` of version 17 or newer (`$JAVA_HOME/bin/java`, else the one on PATH)."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(str(Path(os.environ["JAVA_HOME"]) / "bin" / "java"))
    if found := shutil.which("java"):
        candidates.append(found)
    for candidate in candidates:
        major = java_major(candidate)
        if major is not None and major >= 17:
            return candidate
    return None


def java_major(binary: str) -> int | None:
    """The major version of a `java` binary (`-version` prints it on stderr); None if it fails."""
    try:
        shown = subprocess.run(
            [binary, "-version"], capture_output=True, text=True, timeout=30
        ).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', shown)
    if match is None:
        return None
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


def install(root: Path | None = None) -> Path:
    """Resolve the pinned broker's runtime jars with Maven into `<home>/libs`; returns it.

    A no-op when they are there. Maven downloads into its own repository (~/.m2) first, so a
    second machine-wide install copies without the network. Raises `KafkaInstallError`.
    """
    root = root or home()
    if (done := libs(root)) is not None:
        return done
    if java() is None:
        raise KafkaInstallError("Kafka needs Java 17 or newer: apt-get install -y openjdk-17-jre")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise KafkaInstallError("resolving Kafka's jars needs Maven: apt-get install -y maven")
    folder = root / "libs"
    shutil.rmtree(folder, ignore_errors=True)
    argv = [
        mvn,
        "-q",
        "-B",
        "-Dstyle.color=never",
        "-f",
        str(POM),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={folder}",
    ]
    print(f"resolving Apache Kafka {version()} from Maven Central into {folder}", flush=True)
    try:
        subprocess.run(argv, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise KafkaInstallError(f"`{' '.join(argv)}` failed: {exc}") from exc
    if not any(folder.glob("kafka_2.13-*.jar")):
        raise KafkaInstallError(f"Maven resolved no kafka_2.13 jar into {folder}")
    (folder / ".complete").write_text(version() + "\n")
    return folder


@dataclass(frozen=True)
class Node:
    """One KRaft node of the local cluster: a combined broker and controller."""

    node_id: int
    host: str
    port: int
    """The client listener (PLAINTEXT)."""
    controller_port: int
    log_dir: Path
    secure_port: int | None = None
    """A SASL_SSL listener (SCRAM-SHA-512 over TLS) beside the plain one, when set."""


def server_properties(
    node: Node,
    voters: Sequence[Node],
    tls: Mapping[str, Path] | None = None,
) -> str:
    """`server.properties` of `node` in a cluster whose controllers are `voters`.

    Settings for a small cluster: internal topics replicated as far as the cluster allows
    (min.insync.replicas 2 from three nodes on), no initial rebalance delay (a consumer group
    of one member would otherwise wait 3 s), sessions from 1 s up, few offsets-topic
    partitions (default 50), no
    topic auto-creation (topics come from the catalog). `tls["keystore"]` is the secure
    listener's PEM file: its unencrypted PKCS#8 key, then its certificate.
    """
    replication = min(3, len(voters))
    min_isr = 2 if replication >= 3 else 1
    listeners = [f"PLAINTEXT://{node.host}:{node.port}"]
    protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
    if node.secure_port is not None:
        listeners.append(f"SASL_SSL://{node.host}:{node.secure_port}")
        protocols.append("SASL_SSL:SASL_SSL")
    lines = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        "controller.quorum.voters": ",".join(
            f"{v.node_id}@{v.host}:{v.controller_port}" for v in voters
        ),
        "listeners": ",".join([*listeners, f"CONTROLLER://{node.host}:{node.controller_port}"]),
        "advertised.listeners": ",".join(listeners),
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": ",".join(protocols),
        "log.dirs": str(node.log_dir),
        "num.partitions": "1",
        "default.replication.factor": str(replication),
        "min.insync.replicas": str(min_isr),
        "auto.create.topics.enable": "false",
        "offsets.topic.num.partitions": "8",
        "offsets.topic.replication.factor": str(replication),
        "transaction.state.log.num.partitions": "4",
        "transaction.state.log.replication.factor": str(replication),
        "transaction.state.log.min.isr": str(min_isr),
        "share.coordinator.state.topic.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": str(replication),
        "share.coordinator.state.topic.min.isr": str(min_isr),
        "group.initial.rebalance.delay.ms": "0",
        # Below the default 6 s floor: the tests' consumers use 4 s sessions to fail over fast.
        "group.min.session.timeout.ms": "1000",
        "num.network.threads": "2",
        "num.io.threads": "4",
        "num.recovery.threads.per.data.dir": "1",
        "log.retention.hours": "168",
        "log.segment.bytes": str(256 * 1024 * 1024),
    }
    if node.secure_port is not None:
        if tls is None:
            raise ValueError("a secure listener needs the TLS certificate and key")
        lines |= {
            "sasl.enabled.mechanisms": SCRAM_MECHANISM,
            "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            ),
            "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
            "listener.name.sasl_ssl.ssl.keystore.location": str(tls["keystore"]),
        }
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def log4j2_properties() -> str:
    """The broker's log4j2 configuration: warnings and its start line, to stdout."""
    return _LOG4J2


def broker_command(
    java_bin: str, jars: Path, config_dir: Path, heap_mb: int = HEAP_MB
) -> list[str]:
    """The broker's command line (what `kafka-server-start.sh server.properties` runs)."""
    return [
        java_bin,
        f"-Xmx{heap_mb}m",
        *JVM_FLAGS,
        f"-Dlog4j2.configurationFile={config_dir / 'log4j2.properties'}",
        "-cp",
        f"{jars}/*",
        "kafka.Kafka",
        str(config_dir / "server.properties"),
    ]


def format_command(
    java_bin: str,
    jars: Path,
    config: Path,
    cluster_id: str,
    scram_users: Mapping[str, str] | None = None,
) -> list[str]:
    """`kafka-storage.sh format`: writes the node's metadata log (`-g`: a formatted directory
    is left alone); `scram_users` (name -> password) get SCRAM-SHA-512 credentials."""
    argv = [
        java_bin,
        *TOOL_JVM_FLAGS,
        f"-Dlog4j2.configurationFile={config.parent / 'log4j2.properties'}",
        "-cp",
        f"{jars}/*",
        "kafka.tools.StorageTool",
        "format",
        "-g",
        "-t",
        cluster_id,
        "-c",
        str(config),
    ]
    for name, password in (scram_users or {}).items():
        argv += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
    return argv


def broker_version(argv: Sequence[str]) -> str | None:
    """The Kafka version a broker command runs, read from its classpath's kafka_2.13 jar."""
    if "-cp" not in argv:
        return None
    folder = Path(argv[list(argv).index("-cp") + 1].removesuffix("*"))
    for jar in folder.glob("kafka_2.13-*.jar"):
        return jar.name.removeprefix("kafka_2.13-").removesuffix(".jar")
    return None


def main(args: Sequence[str]) -> int:
    """`python -m deploy.local.kafka install|home|version|java`; `java` prints the java >= 17 the
    broker would run on and exits 1 when there is none (install.sh asks it before apt)."""
    if list(args) == ["install"]:
        try:
            print(install())
        except KafkaInstallError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    if list(args) == ["home"]:
        print(home())
        return 0
    if list(args) == ["version"]:
        print(version())
        return 0
    if list(args) == ["java"]:
        found = java()
        print(found or "no java >= 17 ($JAVA_HOME/bin/java or on PATH)")
        return 0 if found else 1
    print("usage: python -m deploy.local.kafka install|home|version|java", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
