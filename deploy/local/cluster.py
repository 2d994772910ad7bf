"""The local dev cluster: Apache Kafka (KRaft), Redis and ClickHouse as plain processes.

`up` starts each part that is not already running, in its own process session, waits until every
part answers, then creates the catalog's topics and the ClickHouse tables. `down` stops only
processes this module started: a PID file names each one, and a process is ours only while its
`/proc/<pid>/cmdline` still equals the command recorded there, so a reused PID is never killed.

Everything lives under one state directory:

    <state>/<part>.pid       line 1 the pid, line 2 the shell-quoted command (parts: kafka, redis,
                             clickhouse)
    <state>/logs/            stdout and stderr of every part, and ClickHouse's own log files
    <state>/kafka/           server.properties, log4j2.properties, cluster.id (the KRaft cluster
                             id, chosen once), data/ (the broker's log: formatted once, kept
                             across `down`/`up`), tls/ and scram.password when the secure
                             listener is on
    <state>/redis/           Redis's working directory (persistence is off unless
                             `ClusterConfig.redis_durable`: then its append-only files)
    <state>/clickhouse/      the generated config.xml and users.xml, and data/
    <state>/cluster.env      `export SLUICE_...=...` lines pointing services at this cluster

The broker runs from the jars `deploy.local.kafka` resolves from Maven Central, as one
combined broker + controller node. Its log is on disk, so a stopped or killed broker comes back
with every message it acknowledged, every committed offset and the compacted topics.

`stop_part` stops one part and `up` starts it again, which is how the fault tests play an outage
of the broker, Redis or ClickHouse.
"""

from __future__ import annotations

import base64
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import redis
from clickhouse_driver import Client
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from deploy.local import kafka
from schemas.clickhouse import create_statements
from schemas.topics import CATALOG
from services.common.kafka import replication_factor
from services.common.settings import (
    LOCAL_CLICKHOUSE_HTTP_PORT,
    LOCAL_CLICKHOUSE_TCP_PORT,
    LOCAL_KAFKA_PORT,
    LOCAL_REDIS_PORT,
)

PART_NAMES = ("kafka", "redis", "clickhouse")
"""The parts of the default (one-broker) cluster, in the order `status` reports them; a cluster
of N brokers has `kafka`, `kafka-2` ... `kafka-N` first (`ClusterConfig.parts`)."""

APT_PACKAGES = {
    "redis_server": ("redis-server",),
    "clickhouse_server": ("clickhouse-server", "clickhouse-client"),
    "java": ("openjdk-17-jre-headless",),
}
"""Debian packages that provide each server binary."""

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
"""A broker's clean shutdown (SIGTERM) flushes and closes every partition's log first."""
SCRAM_USER = "sluice"
"""The SCRAM-SHA-512 user of the secure listener (its password: `<state>/kafka/scram.password`)."""
_POLL_S = 0.02
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class ClusterError(RuntimeError):
    """The dev cluster could not be started or stopped; the message says what to do."""


class MissingDependency(ClusterError):
    """A server binary is not installed (and was not installed automatically)."""


class PortInUse(ClusterError):
    """A port the cluster needs is held by a process the cluster did not start."""


@dataclass(frozen=True)
class ClusterConfig:
    """Where the dev cluster keeps its state and which local ports it listens on."""

    state_dir: Path = Path(".sluice")
    kafka_port: int = LOCAL_KAFKA_PORT
    redis_port: int = LOCAL_REDIS_PORT
    clickhouse_tcp_port: int = LOCAL_CLICKHOUSE_TCP_PORT
    clickhouse_http_port: int = LOCAL_CLICKHOUSE_HTTP_PORT
    clickhouse_database: str = "sluice"
    host: str = "127.0.0.1"
    kafka_controller_port: int | None = None
    """The KRaft controller listener; by default the port after `kafka_port`."""
    kafka_secure_port: int | None = None
    """A second client listener with SASL_SSL (SCRAM-SHA-512 over TLS, a self-signed certificate
    made at the first `up`), for trying the services' security settings; off by default."""
    kafka_brokers: int = 1
    """KRaft nodes, each a combined broker and controller (all of them voters). One by default;
    three give the catalog's topics replication factor 3 and `min.insync.replicas=2`, so the
    cluster keeps taking acks=all writes with one broker down."""
    kafka_node_ports: tuple[tuple[int, int], ...] = ()
    """(client, controller) ports of brokers 2..N; by default each broker takes the two ports
    after the previous one's (9094/9095, 9096/9097 from the defaults)."""
    redis_durable: bool = False
    """Redis appends every write to a file and fsyncs it before answering (`appendfsync
    always`), so a stopped or killed Redis comes back with every acknowledged write. Off by
    default: the local online store, like the docker-compose one, keeps nothing on disk."""

    def __post_init__(self) -> None:
        if self.kafka_brokers < 1:
            raise ValueError(f"a cluster needs at least one broker, got {self.kafka_brokers}")
        if self.kafka_node_ports and len(self.kafka_node_ports) != self.kafka_brokers - 1:
            raise ValueError(
                f"kafka_node_ports lists {len(self.kafka_node_ports)} brokers' ports, "
                f"the cluster has {self.kafka_brokers - 1} besides the first"
            )
        if self.kafka_secure_port is not None and self.kafka_brokers > 1:
            raise ValueError("the SASL_SSL listener is offered on a one-broker cluster only")
        ports = [
            *(port for pair in self.broker_ports for port in pair),
            *([self.kafka_secure_port] if self.kafka_secure_port is not None else []),
            self.redis_port,
            self.clickhouse_tcp_port,
            self.clickhouse_http_port,
        ]
        if len(set(ports)) != len(ports):
            raise ValueError(f"the cluster's ports must differ from each other, got {ports}")

    @property
    def controller_port(self) -> int:
        """The port of the broker's KRaft controller listener."""
        if self.kafka_controller_port is not None:
            return self.kafka_controller_port
        return self.kafka_port + 1

    @property
    def broker_ports(self) -> list[tuple[int, int]]:
        """(client, controller) ports of every broker, the first broker's first."""
        first = (self.kafka_port, self.controller_port)
        if self.kafka_node_ports:
            return [first, *self.kafka_node_ports]
        step = first[1] + 1
        return [first] + [(step + 2 * i, step + 2 * i + 1) for i in range(self.kafka_brokers - 1)]

    @property
    def broker_parts(self) -> tuple[str, ...]:
        """The part name of each broker: `kafka`, then `kafka-2` ... `kafka-N`."""
        return ("kafka", *(f"kafka-{i}" for i in range(2, self.kafka_brokers + 1)))

    @property
    def parts(self) -> tuple[str, ...]:
        """Every part of this cluster, in the order `status` reports them."""
        return (*self.broker_parts, *PART_NAMES[1:])

    @property
    def kafka_bootstrap(self) -> str:
        """`host:port` of every broker, comma-separated, for `bootstrap.servers`."""
        return ",".join(f"{self.host}:{client}" for client, _ in self.broker_ports)

    @property
    def replication_factor(self) -> int:
        """Replicas of each catalog topic: one per broker, at most three."""
        return replication_factor(self.kafka_brokers)

    @property
    def redis_url(self) -> str:
        """URL of Redis database 0."""
        return f"redis://{self.host}:{self.redis_port}/0"

    def env(self) -> dict[str, str]:
        """The `SLUICE_*` variables that point services and tests at this cluster."""
        return {
            "SLUICE_KAFKA_BOOTSTRAP": self.kafka_bootstrap,
            "SLUICE_REDIS_URL": self.redis_url,
            "SLUICE_CLICKHOUSE_HOST": self.host,
            "SLUICE_CLICKHOUSE_PORT": str(self.clickhouse_tcp_port),
            "SLUICE_CLICKHOUSE_DATABASE": self.clickhouse_database,
        }

    def secure_env(self) -> dict[str, str]:
        """`env()` with Kafka reached through the secure listener (SASL_SSL, SCRAM-SHA-512,
        the cluster's own CA); only after an `up` with `kafka_secure_port` set."""
        if self.kafka_secure_port is None:
            raise ValueError("this cluster has no secure listener (kafka_secure_port)")
        layout = _Layout(self.state_dir)
        return {
            **self.env(),
            "SLUICE_KAFKA_BOOTSTRAP": f"{self.host}:{self.kafka_secure_port}",
            "SLUICE_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "SLUICE_KAFKA_SASL_MECHANISM": kafka.SCRAM_MECHANISM,
            "SLUICE_KAFKA_SASL_USERNAME": SCRAM_USER,
            "SLUICE_KAFKA_SASL_PASSWORD": layout.scram_password.read_text().strip(),
            "SLUICE_KAFKA_SSL_CA_LOCATION": str(layout.tls / "ca.pem"),
        }

    @classmethod
    def with_free_ports(
        cls, state_dir: Path, *, secure: bool = False, brokers: int = 1
    ) -> ClusterConfig:
        """A config on ports that were free a moment ago (for tests running side by side);
        `secure` adds the broker's SASL_SSL listener, `brokers` the number of KRaft nodes.

        The ports come from the kernel's ephemeral range, so another process may still take one
        before `up` binds it; `up` then fails with `PortInUse`.
        """
        with ExitStack() as stack:
            sockets = [stack.enter_context(socket.socket()) for _ in range(4 + 2 * brokers)]
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            secure_port, redis_, ch_tcp, ch_http, kafka_, controller, *others = (
                sock.getsockname()[1] for sock in sockets
            )
        return cls(
            state_dir=state_dir,
            kafka_brokers=brokers,
            kafka_node_ports=tuple(zip(others[::2], others[1::2], strict=True)),
            kafka_port=kafka_,
            kafka_controller_port=controller,
            kafka_secure_port=secure_port if secure else None,
            redis_port=redis_,
            clickhouse_tcp_port=ch_tcp,
            clickhouse_http_port=ch_http,
        )


@dataclass(frozen=True)
class PartStatus:
    """How one part of the cluster is doing.

    `running` means a process this cluster started is alive; `healthy` means it also answers on
    its port. `detail` is the endpoint when healthy, else the reason it is not.
    """

    name: str
    port: int
    pid: int | None
    running: bool
    healthy: bool
    detail: str


@dataclass(frozen=True)
class Binaries:
    """Paths of the server executables, and the folder of the broker's jars."""

    java: str
    kafka_libs: str
    redis_server: str
    clickhouse_server: str


def ensure_installed(auto_install: bool) -> Binaries:
    """Find the servers, first installing missing ones when `auto_install` allows it.

    Installing runs, only as root, `apt-get update && apt-get install -y ...` (Java, Redis,
    ClickHouse), then resolves the broker's jars with Maven (`python -m deploy.local.kafka
    install`). Raises `MissingDependency` with the exact commands to run when something is still
    missing.
    """
    found = _find_binaries()
    if auto_install and None in found.values():
        _install([name for name, path in found.items() if path is None])
        found = _find_binaries()
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise MissingDependency(
            "missing: "
            + ", ".join(missing)
            + ". Install with:\n  "
            + "\n  ".join(_install_commands(missing))
        )
    return Binaries(**{name: str(path) for name, path in found.items()})


def up(
    config: ClusterConfig,
    *,
    auto_install: bool = True,
    stop_with_caller: bool = False,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> list[PartStatus]:
    """Start every part that is not running, wait until all are healthy, create topics and tables.

    Idempotent: parts already running from this state directory are left alone, and topics and
    tables are only created when missing. Writes `<state>/cluster.env`. Raises `PortInUse` before
    starting anything when a needed port belongs to another process, and `ClusterError` (with the
    tail of the part's log) when a part exits or stays unhealthy for `timeout_s` seconds.

    Parts outlive the caller unless `stop_with_caller`: then the parts started now get SIGTERM
    when the calling thread's process dies, even by SIGKILL (Linux `PR_SET_PDEATHSIG`), so a
    killed test run leaves no servers behind.
    """
    binaries = ensure_installed(auto_install)
    layout = _Layout(config.state_dir)
    brokers = [layout.broker_log(name) for name in config.broker_parts]
    for directory in (layout.logs, *brokers, layout.redis, layout.clickhouse_data):
        directory.mkdir(parents=True, exist_ok=True)
    commands = _commands(config, layout, binaries)
    files = _config_files(config, layout)
    pids = _running_parts(config, layout, commands, files)
    to_start = [name for name in config.parts if name not in pids]
    for name in to_start:
        _check_ports_free(config, name)
    for name in to_start:
        for path, text in files[name].items():
            path.write_text(text)
    for name in to_start:
        if name in config.broker_parts:
            _format_kafka(config, layout, binaries, name)
    for name in to_start:
        pids[name] = _spawn(layout, name, commands[name], stop_with_caller)

    _wait_until_healthy(config, layout, pids, timeout_s)
    _ensure_topics(config)
    _ensure_tables(config)
    layout.env_file.write_text(shell_exports(config))
    return status(config)


def down(config: ClusterConfig, *, wipe: bool = False) -> list[str]:
    """Stop the parts this state directory started; return the names of those stopped.

    Each part's process group gets SIGTERM, then SIGKILL if its leader is still alive after
    `STOP_TIMEOUT_S`. A PID file whose process is gone or is not the recorded command is just
    removed. `wipe=True` also deletes the data, logs and generated files under the state dir.
    """
    layout = _Layout(config.state_dir)
    brokers = sorted(set(config.broker_parts) | set(layout.brokers_on_disk()))
    stopped = _stop_parts(layout, [*brokers, *PART_NAMES[1:]], signal.SIGTERM)
    if wipe:
        folders = [layout.broker(name) for name in brokers]
        for directory in (layout.logs, *folders, layout.redis, layout.clickhouse):
            shutil.rmtree(directory, ignore_errors=True)
        layout.env_file.unlink(missing_ok=True)
        if layout.root.is_dir() and not any(layout.root.iterdir()):
            layout.root.rmdir()
    return stopped


def stop_part(config: ClusterConfig, name: str, *, kill: bool = False) -> bool:
    """Stop one part of the cluster (`kafka`, `kafka-2` ..., `redis` or `clickhouse`); `up`
    starts it again.

    For playing outages: SIGTERM (a clean shutdown) by default, SIGKILL with `kill=True` (a
    crash); either way the part is gone when this returns. Only a process this state directory
    started is signalled (see `down`). Returns whether the part was running. What survives a
    restart: the broker's log (every acknowledged message, committed offsets, compacted topics;
    a killed broker recovers its log segments at start); Redis's data only with
    `redis_durable`; ClickHouse's tables and rows always.
    """
    if name not in config.parts:
        raise ValueError(f"no part named {name!r}; parts are {', '.join(config.parts)}")
    sig = signal.SIGKILL if kill else signal.SIGTERM
    return bool(_stop_parts(_Layout(config.state_dir), [name], sig))


def status(config: ClusterConfig) -> list[PartStatus]:
    """The state of each part, probing its port; never starts or stops anything."""
    layout = _Layout(config.state_dir)
    return [_part_status(config, layout, name) for name in config.parts]


def shell_exports(config: ClusterConfig) -> str:
    """`config.env()` as `export KEY=VALUE` lines for a POSIX shell."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in config.env().items())


class _Layout:
    """Paths under the state directory (absolute, so recorded commands do not depend on cwd)."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir.absolute()
        self.logs = self.root / "logs"
        self.kafka = self.root / "kafka"
        self.tls = self.kafka / "tls"
        self.scram_password = self.kafka / "scram.password"
        self.redis = self.root / "redis"
        self.clickhouse = self.root / "clickhouse"
        self.clickhouse_data = self.clickhouse / "data"
        self.env_file = self.root / "cluster.env"

    def broker(self, part: str) -> Path:
        """A broker's folder: its config files and, under `data`, its log."""
        return self.kafka if part == "kafka" else self.root / part

    def broker_log(self, part: str) -> Path:
        """A broker's log directory (`log.dirs`)."""
        return self.broker(part) / "data"

    def brokers_on_disk(self) -> list[str]:
        """The part names of the brokers this state directory has folders or PID files for."""
        extra = {p.name for p in self.root.glob("kafka-*") if p.is_dir()}
        extra |= {p.stem for p in self.root.glob("kafka-*.pid")}
        return ["kafka", *sorted(extra, key=lambda name: int(name.split("-")[1]))]

    def pid_file(self, name: str) -> Path:
        return self.root / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"


_SPAWNED: dict[int, subprocess.Popen[bytes]] = {}
"""Children this interpreter started, kept so that `down` can reap them (no zombies left)."""


def _find_binaries() -> dict[str, str | None]:
    sbin_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin"])
    libs = kafka.libs()
    return {
        "java": kafka.java(),
        "kafka_libs": str(libs) if libs is not None else None,
        "redis_server": shutil.which("redis-server", path=sbin_path),
        "clickhouse_server": shutil.which("clickhouse-server", path=sbin_path),
    }


def _install_commands(missing: list[str]) -> list[str]:
    commands = []
    packages = [pkg for name in missing for pkg in APT_PACKAGES.get(name, ())]
    if "kafka_libs" in missing and not shutil.which("mvn"):
        packages.append("maven")
    if packages:
        commands.append("apt-get install -y " + " ".join(packages))
    if "kafka_libs" in missing:
        commands.append("python -m deploy.local.kafka install")
    return commands


def _install(missing: list[str]) -> None:
    packages = [pkg for name in missing for pkg in APT_PACKAGES.get(name, ())]
    if "kafka_libs" in missing and not shutil.which("mvn"):
        packages.append("maven")
    if packages and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", *packages]):
            try:
                subprocess.run(argv, check=True, env=env)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise MissingDependency(f"`{shlex.join(argv)}` failed: {exc}") from exc
    if "kafka_libs" in missing:
        try:
            kafka.install()
        except kafka.KafkaInstallError as exc:
            raise MissingDependency(str(exc)) from exc


def _commands(config: ClusterConfig, layout: _Layout, binaries: Binaries) -> dict[str, list[str]]:
    heap = kafka.HEAP_MB if config.kafka_brokers == 1 else kafka.CLUSTER_HEAP_MB
    brokers = {
        name: kafka.broker_command(
            binaries.java, Path(binaries.kafka_libs), layout.broker(name), heap_mb=heap
        )
        for name in config.broker_parts
    }
    return brokers | {
        # Without --set-proc-title no, Redis rewrites its argv and the PID-file check fails.
        "redis": [
            binaries.redis_server,
            "--port",
            str(config.redis_port),
            "--bind",
            config.host,
            "--save",
            "",
            *(
                ["--appendonly", "yes", "--appendfsync", "always"]
                if config.redis_durable
                else ["--appendonly", "no"]
            ),
            "--dir",
            str(layout.redis),
            "--set-proc-title",
            "no",
        ],
        "clickhouse": [
            binaries.clickhouse_server,
            f"--config-file={layout.clickhouse / 'config.xml'}",
        ],
    }


def _config_files(config: ClusterConfig, layout: _Layout) -> dict[str, dict[Path, str]]:
    """The generated files each part reads at start, by part: path -> text."""
    nodes = [
        kafka.Node(
            node_id=i + 1,
            host=config.host,
            port=client,
            controller_port=controller,
            log_dir=layout.broker_log(name),
            secure_port=config.kafka_secure_port if i == 0 else None,
        )
        for i, (name, (client, controller)) in enumerate(
            zip(config.broker_parts, config.broker_ports, strict=True)
        )
    ]
    tls = {"keystore": layout.tls / "keystore.pem"} if config.kafka_secure_port else None
    brokers = {
        name: {
            layout.broker(name) / "server.properties": kafka.server_properties(node, nodes, tls),
            layout.broker(name) / "log4j2.properties": kafka.log4j2_properties(),
        }
        for name, node in zip(config.broker_parts, nodes, strict=True)
    }
    return brokers | {
        "redis": {},
        "clickhouse": {
            layout.clickhouse / "config.xml": _clickhouse_config(config, layout),
            layout.clickhouse / "users.xml": _CLICKHOUSE_USERS,
        },
    }


def _format_kafka(config: ClusterConfig, layout: _Layout, binaries: Binaries, part: str) -> None:
    """Format a broker's storage the first time (`kafka-storage.sh format`), with the cluster
    id every broker shares kept in `<state>/kafka/cluster.id`; make the secure listener's
    certificate and SCRAM password first when it is on. A formatted log directory is left as
    it is."""
    if config.kafka_secure_port is not None:
        _ensure_tls(config, layout)
    if (layout.broker_log(part) / "meta.properties").exists():
        return
    id_file = layout.kafka / "cluster.id"
    if not id_file.exists():
        id_file.write_text(_new_cluster_id() + "\n")
    users = (
        {SCRAM_USER: layout.scram_password.read_text().strip()}
        if config.kafka_secure_port is not None
        else None
    )
    argv = kafka.format_command(
        binaries.java,
        Path(binaries.kafka_libs),
        layout.broker(part) / "server.properties",
        id_file.read_text().strip(),
        users,
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ClusterError(
            f"formatting the broker's storage failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()[-2000:]}"
        )


def _new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, as `kafka-storage.sh random-uuid`
    prints it (never starting with '-', which would read as an option)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _ensure_tls(config: ClusterConfig, layout: _Layout) -> None:
    """A self-signed certificate for `config.host` (also the clients' CA file) and its key, as
    the broker's PEM keystore, and a random SCRAM password; made once per state directory."""
    layout.tls.mkdir(parents=True, exist_ok=True)
    if not layout.scram_password.exists():
        layout.scram_password.write_text(secrets.token_urlsafe(18) + "\n")
    keystore = layout.tls / "keystore.pem"
    if keystore.exists():
        return
    key, cert = layout.tls / "key.pem", layout.tls / "ca.pem"
    san = f"IP:{config.host}" if config.host.replace(".", "").isdigit() else f"DNS:{config.host}"
    argv = [
        "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "3650",
        "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={config.host}",
        "-addext", f"subjectAltName={san}",
    ]  # fmt: skip
    try:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(f"could not make the broker's TLS certificate: {exc}") from exc
    keystore.write_text(key.read_text() + cert.read_text())


def _running_parts(
    config: ClusterConfig,
    layout: _Layout,
    commands: dict[str, list[str]],
    files: dict[str, dict[Path, str]],
) -> dict[str, int]:
    """The pid of each running part; raises `ClusterError` if one runs with other settings
    (a broker of another cluster size included)."""
    for name in set(layout.brokers_on_disk()) - set(config.broker_parts):
        pid, _ = _our_process(layout, name)
        if pid is not None:
            raise ClusterError(
                f"{name} is running (pid {pid}): this state directory runs a cluster of more "
                f"brokers than {config.kafka_brokers}; stop it first with `sluice dev down`."
            )
    running = {}
    for name in config.parts:
        pid, recorded = _our_process(layout, name)
        if pid is None:
            continue
        # Kafka's and ClickHouse's ports live in their config files, not their command lines.
        files_changed = any(
            not path.exists() or path.read_text() != text for path, text in files[name].items()
        )
        if recorded != commands[name] or files_changed:
            raise ClusterError(
                f"{name} is already running (pid {pid}) with other settings; stop it first "
                "with `sluice dev down`."
            )
        running[name] = pid
    return running


def _clickhouse_config(config: ClusterConfig, layout: _Layout) -> str:
    """config.xml for ClickHouse 18.16 (Debian's server).

    No `interserver_http_port`: 18.16 opens that port only when it is configured, and a single
    local server has no replicas to talk to.
    """
    data = layout.clickhouse_data

    def path(p: Path) -> str:
        return escape(f"{p}/")

    return f"""<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{escape(str(layout.logs / "clickhouse-server.log"))}</log>
        <errorlog>{escape(str(layout.logs / "clickhouse-server.err.log"))}</errorlog>
        <size>10M</size>
        <count>1</count>
    </logger>
    <listen_host>{escape(config.host)}</listen_host>
    <tcp_port>{config.clickhouse_tcp_port}</tcp_port>
    <http_port>{config.clickhouse_http_port}</http_port>
    <path>{path(data)}</path>
    <tmp_path>{path(data / "tmp")}</tmp_path>
    <user_files_path>{path(data / "user_files")}</user_files_path>
    <format_schema_path>{path(data / "format_schemas")}</format_schema_path>
    <users_config>{escape(str(layout.clickhouse / "users.xml"))}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>67108864</mark_cache_size>
</yandex>
"""


_CLICKHOUSE_USERS = """<?xml version="1.0"?>
<yandex>
    <profiles>
        <default/>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"""


def _ports(config: ClusterConfig, name: str) -> list[tuple[str, int]]:
    """The ports a part listens on, each with the ClusterConfig field that sets it."""
    if name in config.broker_parts[1:]:
        client, controller = config.broker_ports[config.broker_parts.index(name)]
        return [("kafka_node_ports", client), ("kafka_node_ports", controller)]
    names = {
        "kafka": ["kafka_port", "controller_port"]
        + (["kafka_secure_port"] if config.kafka_secure_port is not None else []),
        "redis": ["redis_port"],
        "clickhouse": ["clickhouse_tcp_port", "clickhouse_http_port"],
    }[name]
    return [(field, getattr(config, field)) for field in names]


def _check_ports_free(config: ClusterConfig, name: str) -> None:
    for field, port in _ports(config, name):
        if not _port_free(config.host, port):
            option = field.replace("_", "-")
            raise PortInUse(
                f"port {port} on {config.host} (for {name}) is in use by a process this cluster "
                f"did not start. Stop that process or pick another port: --{option}, "
                f"SLUICE_DEV_{field.upper()} or ClusterConfig.{field}."
            )


def _port_free(host: str, port: int) -> bool:
    """Whether a listener could bind `host:port` now (SO_REUSEADDR: TIME_WAIT does not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _spawn(layout: _Layout, name: str, argv: list[str], stop_with_caller: bool) -> int:
    """Start one part and write its PID file; returns its pid."""
    with layout.log_file(name).open("ab") as log:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=layout.root,
            start_new_session=True,
            preexec_fn=_terminate_with_parent if stop_with_caller else None,
        )
    _SPAWNED[child.pid] = child
    layout.pid_file(name).write_text(f"{child.pid}\n{shlex.join(argv)}\n")
    return child.pid


def _terminate_with_parent() -> None:
    """In a forked child: ask the kernel for SIGTERM when the parent thread exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _our_process(layout: _Layout, name: str) -> tuple[int | None, list[str]]:
    """The pid and recorded command of the part's process, or (None, []) when it is not running.

    A process counts only while its /proc cmdline equals the command in the PID file.
    """
    try:
        pid_line, _, command = layout.pid_file(name).read_text().partition("\n")
        pid = int(pid_line)
        argv = shlex.split(command)
    except (FileNotFoundError, ValueError):
        return None, []
    if not _alive(pid):
        return None, []
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None, []
    if cmdline.split(b"\0")[:-1] != [os.fsencode(arg) for arg in argv]:
        return None, []
    return pid, argv


def _alive(pid: int) -> bool:
    """Whether `pid` is a live (not zombie) process; reaps it when it is our exited child."""
    child = _SPAWNED.get(pid)
    if child is not None:  # Our child keeps its pid until reaped, so poll() is the answer.
        if child.poll() is None:
            return True
        del _SPAWNED[pid]
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _stop_parts(layout: _Layout, names: Sequence[str], sig: signal.Signals) -> list[str]:
    """Signal the process group of each named part that runs, wait for every one to exit
    (SIGKILL after `STOP_TIMEOUT_S`), remove their PID files; returns the names stopped."""
    stopping: dict[str, int] = {}
    for name in names:
        pid, _ = _our_process(layout, name)
        if pid is not None:
            _signal_group(pid, sig)
            stopping[name] = pid
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for pid in stopping.values():
        if not _wait_for_exit(pid, deadline):
            _signal_group(pid, signal.SIGKILL)
            _wait_for_exit(pid, time.monotonic() + STOP_TIMEOUT_S)
    for name in names:
        layout.pid_file(name).unlink(missing_ok=True)
    return list(stopping)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group `pid` leads (each part is started as a session leader)."""
    with suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _wait_for_exit(pid: int, deadline: float) -> bool:
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _part_status(config: ClusterConfig, layout: _Layout, name: str) -> PartStatus:
    ports = [port for _, port in _ports(config, name)]
    pid, argv = _our_process(layout, name)
    if pid is None:
        taken = [p for p in ports if not _port_free(config.host, p)]
        detail = "not running"
        if taken:
            detail += f"; port {taken[0]} is used by another process"
        return PartStatus(name, ports[0], None, False, False, detail)
    problem = _problem(config, name)
    detail = problem or _endpoint(config, name, argv)
    return PartStatus(name, ports[0], pid, True, problem is None, detail)


def _endpoint(config: ClusterConfig, name: str, argv: list[str]) -> str:
    """Where a running part answers; `argv` is its recorded command line (the broker's names
    its version)."""
    if name in config.broker_parts:
        index = config.broker_parts.index(name)
        where = f"{config.host}:{config.broker_ports[index][0]}"
        secure = f", SASL_SSL :{config.kafka_secure_port}" if config.kafka_secure_port else ""
        node = f", node {index + 1} of {config.kafka_brokers}" if config.kafka_brokers > 1 else ""
        return f"{where} (Apache Kafka {kafka.broker_version(argv)}{secure}{node})"
    return {
        "redis": config.redis_url,
        "clickhouse": f"{config.host}:{config.clickhouse_tcp_port} "
        f"(http :{config.clickhouse_http_port}, database {config.clickhouse_database})",
    }[name]


def _accepts_connections(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _broker_problem(config: ClusterConfig, part: str) -> str | None:
    """None once the broker answers a metadata request that lists it (in a cluster of several,
    a broker registers only after the controllers have a quorum)."""
    index = config.broker_parts.index(part)
    port = config.broker_ports[index][0]
    # Connect first: librdkafka would log a retry error for every refused connection.
    if not _accepts_connections(config.host, port):
        return "not accepting connections"
    try:
        metadata = AdminClient({"bootstrap.servers": f"{config.host}:{port}"}).list_topics(
            timeout=2.0
        )
    except KafkaException as exc:
        return f"metadata request failed: {exc}"
    if index + 1 not in metadata.brokers:
        return f"not registered yet (brokers {sorted(metadata.brokers)})"
    return None


def _redis_problem(config: ClusterConfig) -> str | None:
    client = redis.Redis(
        host=config.host, port=config.redis_port, socket_timeout=1.0, socket_connect_timeout=1.0
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"PING failed: {exc}"
    finally:
        client.close()
    return None


def _clickhouse_problem(config: ClusterConfig) -> str | None:
    url = f"http://{config.host}:{config.clickhouse_http_port}/ping"
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            body = response.read().decode()
    except OSError as exc:
        return f"GET /ping failed: {exc}"
    return None if body.strip() == "Ok." else f"GET /ping answered {body!r}"


_PROBES: dict[str, Callable[[ClusterConfig], str | None]] = {
    "redis": _redis_problem,
    "clickhouse": _clickhouse_problem,
}


def _problem(config: ClusterConfig, name: str) -> str | None:
    """Health check of a part: None when healthy, else what is wrong."""
    if name in config.broker_parts:
        return _broker_problem(config, name)
    return _PROBES[name](config)


def _wait_until_healthy(
    config: ClusterConfig, layout: _Layout, pids: dict[str, int], timeout_s: float
) -> None:
    """Wait until every part answers; raises `ClusterError` if one exits or times out.

    Liveness is checked by pid, not by `_our_process`: for a moment after `Popen` returns, the
    new program's /proc cmdline can still read empty.
    """
    deadline = time.monotonic() + timeout_s
    waiting = list(config.parts)
    while waiting:
        for name in list(waiting):
            pid = pids[name]
            if not _alive(pid):
                raise ClusterError(f"{name} exited during startup; {_log_tail(layout, name)}")
            problem = _problem(config, name)
            if problem is None:
                waiting.remove(name)
            elif time.monotonic() >= deadline:
                raise ClusterError(
                    f"{name} (pid {pid}) is not healthy after {timeout_s:.0f} s: "
                    f"{problem}; {_log_tail(layout, name)}"
                )
        if waiting:
            time.sleep(_POLL_S)


def _log_tail(layout: _Layout, name: str, lines: int = 20) -> str:
    log = layout.log_file(name)
    try:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"no log at {log}"
    return f"last lines of {log}:\n" + "\n".join(tail)


def _admin(config: ClusterConfig) -> AdminClient:
    return AdminClient({"bootstrap.servers": config.kafka_bootstrap})


def _ensure_topics(config: ClusterConfig) -> None:
    """Create the catalog's missing topics, then check every partition count.

    A topic that exists with another count (from an older catalog) is an error: Kafka cannot
    shrink a topic, and moving keys to other partitions would break per-key order.
    """
    admin = _admin(config)
    existing = admin.list_topics(timeout=10.0).topics
    missing = [spec for spec in CATALOG if spec.name not in existing]
    if missing:
        replicas = config.replication_factor
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, replicas, config=s.config()) for s in missing],
            operation_timeout=10.0,
            request_timeout=10.0,
        )
        for name, future in futures.items():
            try:
                future.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise ClusterError(f"could not create topic {name}: {exc}") from exc
    # A new topic's partitions reach the metadata a moment after CreateTopics answers.
    deadline = time.monotonic() + 30.0
    while True:
        topics = admin.list_topics(timeout=10.0).topics
        led = {
            name: sum(p.leader >= 0 for p in meta.partitions.values())
            for name, meta in topics.items()
        }
        if all(led.get(spec.name, 0) >= spec.partitions for spec in CATALOG):
            break
        if time.monotonic() > deadline:
            waiting = [spec.name for spec in CATALOG if led.get(spec.name, 0) < spec.partitions]
            raise ClusterError(f"topics without a leader for every partition: {waiting}")
        time.sleep(0.1)
    for spec in CATALOG:
        found = len(topics[spec.name].partitions)
        if found != spec.partitions:
            raise ClusterError(
                f"topic {spec.name} has {found} partitions but the catalog says "
                f"{spec.partitions}; start from empty storage with `sluice dev down --wipe`, "
                "then `up` (this deletes the cluster's data)."
            )


def _ensure_tables(config: ClusterConfig) -> None:
    client = Client(
        config.host, port=config.clickhouse_tcp_port, connect_timeout=5, send_receive_timeout=30
    )
    try:
        for statement in create_statements(config.clickhouse_database):
            client.execute(statement)
    finally:
        client.disconnect()
