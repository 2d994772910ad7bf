"""Static checks of the deploy files: the Dockerfile, the docker-compose dev cluster,
Prometheus and Grafana.

Nothing here needs Docker or a running cluster. The compose file is read with pyyaml and held to
the conventions written at its top (pinned images, localhost-only ports, healthchecks, ordered
start-up, existing mounted paths); the topics that `kafka-init` creates are compared with
`schemas.topics.CATALOG`; the three-node layout that `--env-file deploy/cluster.env` gives is
resolved as Compose would and held to one quorum, replication factor 3 and min.insync.replicas 2,
and kafka-init's wait for every broker is run against stand-in Kafka tools; each Sluiceway
service's compose environment is read by the service's own settings class, which must find the
compose infrastructure and listen where its healthcheck, published port and Prometheus target
point; the Dockerfile is checked for pinned bases, a non-root user, the `python -m` entrypoint
and a build context that admits what it copies; the Prometheus and Grafana files are checked for
shape and for agreeing with the paths the compose file mounts them at. Where `docker compose`
(v2) or `docker-compose` (v1) is installed, `config -q` validates the compose file in both
layouts and what the tool resolves must equal what these tests resolve; where `promtool` is
installed it checks the Prometheus files.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic_settings import BaseSettings

from schemas.topics import CATALOG
from services.common.settings import SluiceSettings

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
CLUSTER_ENV_FILE = DEPLOY / "cluster.env"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PROMETHEUS_FILE = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"
GRAFANA_DIR = DEPLOY / "grafana"
DATASOURCES_FILE = GRAFANA_DIR / "provisioning" / "datasources" / "datasources.yml"
DASHBOARD_PROVIDERS_FILE = GRAFANA_DIR / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"

LOCALHOST = "127.0.0.1"
SCRAPE_TARGETS = {
    "ingest:8080",
    "features:8081",
    "inference:9101",
    "monitor:9102",
    "rollout:8082",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}|\$(\w+)")
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_DURATION_SECONDS = {
    "ms": 0.001,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "y": 365 * 86400,
}


def load_yaml(path: Path) -> Any:
    """Parse one YAML file."""
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def interpolate(text: str, variables: Mapping[str, str] | None = None) -> str:
    """Resolve compose variables as Compose does with exactly `variables` set (none by default).

    `${VAR:-default}` gives `default` when VAR is unset or empty, `${VAR-default}` only when it is
    unset; `${VAR:?message}` and `${VAR?message}` fail the same way; `${VAR}` and `$VAR` give ``
    when unset, and `$$` is a literal `$`.
    """
    values = variables or {}

    def resolve(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(4)
        operator, default = match.group(2) or "", match.group(3) or ""
        value = values.get(name)
        missing = value is None or (operator.startswith(":") and value == "")
        if missing and operator.endswith("?"):
            raise ValueError(f"${{{name}}} is required: {default}")
        return default if missing else str(value)

    return "$".join(_VARIABLE.sub(resolve, part) for part in text.split("$$"))


def env_file_variables(path: Path) -> dict[str, str]:
    """The `KEY=VALUE` lines of a compose env file (`--env-file`), comments and blanks skipped."""
    variables = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.removeprefix("export ").partition("=")
        assert equals and re.fullmatch(r"\w+", key), f"{path.name}: not KEY=VALUE: {line!r}"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        variables[key] = value
    return variables


def active_services(variables: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The services `up` starts with `variables` set: no profile, or one in COMPOSE_PROFILES."""
    profiles = {name for name in variables.get("COMPOSE_PROFILES", "").split(",") if name}
    return {
        name: service
        for name, service in SERVICES.items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }


def is_one_shot(service: dict[str, Any]) -> bool:
    """A one-shot job (restart "no" or "on-failure") rather than a long-running service."""
    restart = str(service.get("restart", "no"))
    return restart == "no" or restart.startswith("on-failure")


def environment(
    service: dict[str, Any], variables: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A service's `environment`, list or mapping form, with variables resolved."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: interpolate(value, variables) for key, _, value in pairs}
    return {str(key): interpolate(str(value), variables) for key, value in raw.items()}


@dataclass(frozen=True)
class Mount:
    """One `volumes` entry of a service."""

    source: str
    target: str
    bind: bool


def mounts(service: dict[str, Any]) -> list[Mount]:
    """A service's `volumes`, short or long syntax, with variables resolved."""
    result = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, dict):
            source = interpolate(str(entry.get("source", "")))
            target = interpolate(str(entry["target"]))
            result.append(Mount(source, target, entry.get("type") == "bind"))
            continue
        parts = interpolate(str(entry)).split(":")
        if len(parts) == 1:  # anonymous volume
            result.append(Mount("", parts[0], bind=False))
            continue
        source, target = parts[0], parts[1]
        result.append(Mount(source, target, bind=source.startswith((".", "/", "~"))))
    return result


def mount_target(service: str, host_path: Path) -> str:
    """Where `service` mounts the host path `host_path` (a path under deploy/)."""
    for mount in mounts(SERVICES[service]):
        if mount.bind and (DEPLOY / mount.source).resolve() == host_path.resolve():
            return mount.target
    raise AssertionError(f"{service} does not mount {host_path.relative_to(REPO)}")


def host_ip(port: Any) -> str:
    """The host address a `ports` entry publishes on; `` means every interface."""
    if isinstance(port, dict):
        return interpolate(str(port.get("host_ip", "")))
    text = interpolate(str(port)).split("/")[0]
    if text.startswith("["):
        return text[1 : text.index("]")]
    parts = text.split(":")
    return parts[0] if len(parts) == 3 else ""


def published(port: Any, variables: Mapping[str, str] | None = None) -> tuple[str, str]:
    """`(host port, container port)` of a `ports` entry."""
    if isinstance(port, dict):
        host, target = str(port.get("published", "")), str(port["target"])
        return interpolate(host, variables), interpolate(target, variables)
    parts = interpolate(str(port), variables).split("/")[0].rsplit(":", 2)
    return (parts[-2] if len(parts) > 1 else ""), parts[-1]


def image_tag(image: str) -> str:
    """The tag or digest an image reference is pinned to; `` when it has none."""
    if "@" in image:
        return image.split("@", 1)[1]
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else ""


def seconds(duration: str) -> float:
    """A Prometheus duration such as `1m30s`, in seconds."""
    pieces = _DURATION.findall(duration)
    assert pieces and "".join(n + u for n, u in pieces) == duration, f"bad duration {duration!r}"
    return sum(int(number) * _DURATION_SECONDS[unit] for number, unit in pieces)


@dataclass(frozen=True)
class TopicCreate:
    """One `kafka-topics.sh --create` invocation."""

    topic: str
    partitions: int
    replication_factor: int
    if_not_exists: bool
    bootstrap: str
    config: dict[str, str]


_VALUE_OPTIONS = {
    "--topic",
    "--partitions",
    "--replication-factor",
    "--config",
    "--bootstrap-server",
}


def options(words: list[str]) -> dict[str, list[str]]:
    """`--name value`, `--name=value` and `--flag` words as name -> values (a flag gets [])."""
    found: dict[str, list[str]] = {}
    remaining = iter(words)
    for word in remaining:
        if not word.startswith("--"):
            continue
        name, equals, inline = word.partition("=")
        values = found.setdefault(name, [])
        if name in _VALUE_OPTIONS:
            values.append(inline if equals else next(remaining))
    return found


def shell_text(command: Any) -> str:
    """A compose `command` as one shell text (list items joined by newlines)."""
    return "\n".join(command) if isinstance(command, list) else str(command)


def topic_creates(script: str, variables: Mapping[str, str] | None = None) -> list[TopicCreate]:
    """Every `kafka-topics.sh --create` in a shell script, with its options."""
    creates = []
    for line in interpolate(script, variables).replace("\\\n", " ").splitlines():
        for statement in re.split(r"&&|;|\|\|", line):
            words = shlex.split(statement, comments=True)
            if "--create" not in words or not any(w.endswith("kafka-topics.sh") for w in words):
                continue
            found = options(words)
            creates.append(
                TopicCreate(
                    topic=found["--topic"][-1],
                    partitions=int(found["--partitions"][-1]),
                    replication_factor=int(found.get("--replication-factor", ["0"])[-1]),
                    if_not_exists="--if-not-exists" in found,
                    bootstrap=found.get("--bootstrap-server", [""])[-1],
                    config=dict(item.split("=", 1) for item in found.get("--config", [])),
                )
            )
    return creates


COMPOSE: dict[str, Any] = load_yaml(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE.get("services") or {}
SERVICE_NAMES = sorted(SERVICES)
LONG_RUNNING = [name for name in SERVICE_NAMES if not is_one_shot(SERVICES[name])]
KAFKA_INIT = topic_creates(shell_text(SERVICES.get("kafka-init", {}).get("command", "")))
# The three-node layout: the variables `--env-file deploy/cluster.env` sets.
CLUSTER = env_file_variables(CLUSTER_ENV_FILE)


# --- compose: structure and conventions ---------------------------------------------------------


def test_compose_has_the_infrastructure_services() -> None:
    assert {"kafka", "kafka-init", "redis", "clickhouse", "prometheus", "grafana"} <= set(SERVICES)


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_image_is_pinned(name: str) -> None:
    service = SERVICES[name]
    assert "image" in service or "build" in service, f"{name} has neither image nor build"
    if "image" in service:
        image = interpolate(str(service["image"]))
        tag = image_tag(image)
        assert tag, f"{name}: image {image!r} has no tag (that means latest)"
        assert tag != "latest", f"{name}: image {image!r} is not pinned"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_restart_policy_is_stated(name: str) -> None:
    """One-shot or long-running is read from `restart`, so every service must say which."""
    assert "restart" in SERVICES[name], f"{name} states no restart policy"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_service_has_a_healthcheck(name: str) -> None:
    check = SERVICES[name].get("healthcheck")
    assert check, f"{name} is long-running but has no healthcheck"
    assert not check.get("disable"), f"{name} disables its healthcheck"
    test = check.get("test")
    assert test and test != ["NONE"], f"{name}: healthcheck has no test"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_depends_on_waits_for_ready_services(name: str) -> None:
    depends = SERVICES[name].get("depends_on") or {}
    if isinstance(depends, list):
        depends = {target: {"condition": "service_started"} for target in depends}
    for target, spec in depends.items():
        assert target in SERVICES, f"{name} depends on unknown service {target!r}"
        wanted = (
            "service_completed_successfully" if is_one_shot(SERVICES[target]) else "service_healthy"
        )
        condition = (spec or {}).get("condition", "service_started")
        assert condition == wanted, f"{name} -> {target}: condition {condition}, want {wanted}"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_ports_bind_to_localhost_only(name: str) -> None:
    service = SERVICES[name]
    assert service.get("network_mode") != "host", f"{name} uses the host network"
    for port in service.get("ports") or []:
        assert host_ip(port) == LOCALHOST, f"{name}: port {port!r} is not bound to {LOCALHOST}"


INFRASTRUCTURE = ("kafka", "redis", "clickhouse", "prometheus", "grafana")
"""Infrastructure services a developer reaches from the host (their ports are published)."""


@pytest.mark.parametrize("name", INFRASTRUCTURE)
def test_infrastructure_ports_are_published_on_localhost_only(name: str) -> None:
    """Kafka, Redis, ClickHouse, Prometheus and Grafana run without authentication in the dev
    cluster (or with dev passwords): a port on every interface would open them to the network."""
    ports = SERVICES[name].get("ports") or []
    assert ports, f"{name} publishes no port: the dev cluster is unusable from the host"
    for port in ports:
        assert host_ip(port) == LOCALHOST, f"{name}: port {port!r} is not bound to {LOCALHOST}"
    assert not SERVICES[name].get("network_mode"), f"{name} must stay on the compose network"


def test_kafka_controller_listener_is_never_published() -> None:
    listeners = environment(SERVICES["kafka"])["KAFKA_LISTENERS"].split(",")
    controller_port = next(item for item in listeners if item.startswith("CONTROLLER:"))
    container_port = controller_port.rsplit(":", 1)[1]
    published_ports = [published(port)[1] for port in SERVICES["kafka"].get("ports") or []]
    assert container_port not in published_ports


@pytest.mark.parametrize(
    ("port", "address"),
    [
        ("6379:6379", ""),
        ("6379", ""),
        ("0.0.0.0:6379:6379", "0.0.0.0"),
        ("[::]:6379:6379", "::"),
        ("127.0.0.1:${REDIS_HOST_PORT:-6379}:6379", "127.0.0.1"),
        ("${BIND:-0.0.0.0}:6379:6379/tcp", "0.0.0.0"),
        ({"target": 6379, "published": 6379}, ""),
        ({"target": 6379, "published": 6379, "host_ip": "127.0.0.1"}, "127.0.0.1"),
    ],
)
def test_host_address_is_read_from_every_port_syntax(port: Any, address: str) -> None:
    """The localhost checks above rely on `host_ip`: it must see through every syntax."""
    assert host_ip(port) == address


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_mounted_paths_exist(name: str) -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for mount in mounts(SERVICES[name]):
        if mount.bind:
            if mount.source.startswith((".", "~")):
                path = DEPLOY / mount.source
                assert path.exists(), f"{name}: {mount.source} does not exist under deploy/"
        elif mount.source:
            assert mount.source in declared, f"{name}: volume {mount.source!r} is not declared"


@pytest.mark.parametrize("name", SERVICE_NAMES)
def test_build_context_exists(name: str) -> None:
    build = SERVICES[name].get("build")
    if build is None:
        return
    spec = build if isinstance(build, dict) else {"context": build}
    context = DEPLOY / interpolate(str(spec.get("context", ".")))
    assert context.is_dir(), f"{name}: build context {context} does not exist"
    dockerfile = context / interpolate(str(spec.get("dockerfile", "Dockerfile")))
    assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"


def test_kafka_advertises_in_network_and_host_listeners() -> None:
    env = environment(SERVICES["kafka"])
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    listeners = dict(item.split("://", 1) for item in env["KAFKA_LISTENERS"].split(","))
    assert "kafka:9092" in advertised.values()
    host_listener = next(name for name, addr in advertised.items() if addr.startswith("local"))
    host_port = advertised[host_listener].rsplit(":", 1)[1]
    container_port = listeners[host_listener].rsplit(":", 1)[1]
    assert advertised[host_listener] == "localhost:29092"
    ports = [published(port) for port in SERVICES["kafka"].get("ports") or []]
    assert (host_port, container_port) in ports, "the host listener's port is not published"
    assert any(m.target == env["KAFKA_LOG_DIRS"] and not m.bind for m in mounts(SERVICES["kafka"]))


# --- compose: kafka-init follows the topic catalog ----------------------------------------------


def test_kafka_init_creates_exactly_the_catalog_topics() -> None:
    created = sorted(create.topic for create in KAFKA_INIT)
    assert created == sorted(spec.name for spec in CATALOG)


def test_kafka_init_partition_counts_follow_the_catalog() -> None:
    created = {create.topic: create.partitions for create in KAFKA_INIT}
    assert created == {spec.name: spec.partitions for spec in CATALOG}


def test_kafka_init_topic_configs_follow_the_catalog() -> None:
    created = {create.topic: create.config for create in KAFKA_INIT}
    assert created == {spec.name: spec.config() for spec in CATALOG}


def test_kafka_init_is_idempotent_and_waits_for_kafka() -> None:
    init = SERVICES["kafka-init"]
    assert is_one_shot(init)
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    for create in KAFKA_INIT:
        assert create.if_not_exists, f"{create.topic}: no --if-not-exists"
        assert create.replication_factor == 1, f"{create.topic}: single broker, factor must be 1"
        assert create.bootstrap == "kafka:9092", f"{create.topic}: bootstrap {create.bootstrap}"


# --- compose: the Sluiceway services ------------------------------------------------------------

SLUICEWAY_SERVICES = ("ingest", "features", "inference", "monitor", "rollout")
# compose service -> the service package it runs
SLUICEWAY_COMPOSE = {**{name: name for name in SLUICEWAY_SERVICES}, "inference-gpu": "inference"}
MODEL_READERS = {"ingest", "inference", "inference-gpu", "monitor"}
# The port each service listens on (settings field) and its bind-address field, if it has one.
LISTEN = {
    "ingest": ("ingest_port", "ingest_host"),
    "features": ("features_http_port", "features_http_host"),
    "inference": ("metrics_port", None),
    "monitor": ("metrics_port", None),
    "rollout": ("rollout_http_port", "rollout_http_host"),
}
# Ports a service listens on besides its HTTP port (settings fields).
OTHER_PORTS = {"ingest": ("ingest_grpc_port",)}


def settings_class(package: str) -> type[BaseSettings]:
    """The settings class of `services.<package>` (its subclass of SluiceSettings)."""
    module = importlib.import_module(f"services.{package}.settings")
    return next(
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, SluiceSettings)
        and value.__module__ == module.__name__
    )


def setting_names() -> set[str]:
    """Every `SLUICE_*` environment variable that some settings class reads."""
    classes = [SluiceSettings, *(settings_class(name) for name in SLUICEWAY_SERVICES)]
    return {f"SLUICE_{field.upper()}" for cls in classes for field in cls.model_fields}


def settings_from(
    env: dict[str, str], cls: type[BaseSettings], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """`cls` as a process with exactly the `SLUICE_*` variables of `env` would read it."""
    for name in [name for name in os.environ if name.upper().startswith("SLUICE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return cls()


def dockerfile_of(service: dict[str, Any]) -> Path | None:
    """The Dockerfile a service is built from, if it has `build`."""
    build = service.get("build")
    if build is None:
        return None
    spec = build if isinstance(build, dict) else {"context": build}
    context = DEPLOY / interpolate(str(spec.get("context", ".")))
    return (context / interpolate(str(spec.get("dockerfile", "Dockerfile")))).resolve()


def test_compose_runs_every_sluiceway_service() -> None:
    assert set(SLUICEWAY_COMPOSE) | {"clickhouse-init"} <= set(SERVICES)


@pytest.mark.parametrize("name", [*SLUICEWAY_COMPOSE, "clickhouse-init"])
def test_sluiceway_service_is_built_from_the_one_dockerfile(name: str) -> None:
    service = SERVICES[name]
    assert dockerfile_of(service) == DOCKERFILE.resolve()
    assert service["build"]["context"] == "..", "the repository root is the build context"


def test_no_two_built_services_share_an_image_tag() -> None:
    """Compose builds services in parallel (bake): a shared tag fails a first build."""
    tags = [interpolate(s["image"]) for s in SERVICES.values() if "build" in s and "image" in s]
    assert len(tags) == len(set(tags)), f"shared image tags: {tags}"


@pytest.mark.parametrize("name", SLUICEWAY_COMPOSE)
def test_sluiceway_service_runs_its_module(name: str) -> None:
    service = SERVICES[name]
    package = SLUICEWAY_COMPOSE[name]
    assert "entrypoint" not in service, "keep the image's `python -m` entrypoint"
    assert service["command"] == [f"services.{package}"]
    assert (REPO / "services" / package / "__main__.py").is_file()


@pytest.mark.parametrize("name", [*SLUICEWAY_COMPOSE, "clickhouse-init"])
def test_sluiceway_service_points_at_the_compose_infrastructure(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = SLUICEWAY_COMPOSE.get(name)
    cls = settings_class(package) if package else SluiceSettings
    settings = settings_from(environment(SERVICES[name]), cls, monkeypatch)
    kafka_advertised = environment(SERVICES["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    assert f"PLAINTEXT://{settings.kafka_bootstrap}" in kafka_advertised.split(",")
    redis = urlsplit(settings.redis_url)
    assert (redis.hostname, redis.port) == ("redis", 6379)
    clickhouse = environment(SERVICES["clickhouse"])
    assert settings.clickhouse_host == "clickhouse"
    assert settings.clickhouse_port == 9000
    assert settings.clickhouse_database == clickhouse["CLICKHOUSE_DB"]
    assert settings.clickhouse_user == clickhouse["CLICKHOUSE_USER"]
    assert settings.clickhouse_password.get_secret_value() == clickhouse["CLICKHOUSE_PASSWORD"]
    if name in MODEL_READERS:
        roots = {str(settings.model_repository)}
        if package == "monitor":
            roots.add(str(settings.model_repository))
        targets = {m.target: m for m in mounts(SERVICES[name])}
        for root in roots:
            assert root in targets, f"{name}: {root} is not mounted"
        sources = {targets[root].source for root in roots}
        assert sources == {"model-repository"}, f"{name}: mounts {sources}"
        entries = [str(entry) for entry in SERVICES[name]["volumes"]]
        assert all(e.endswith(":ro") for e in entries if ":/models" in e), "mount models read-only"


@pytest.mark.parametrize("name", SLUICEWAY_COMPOSE)
def test_sluiceway_service_listens_where_its_healthcheck_ports_and_prometheus_point(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = SLUICEWAY_COMPOSE[name]
    settings = settings_from(environment(SERVICES[name]), settings_class(package), monkeypatch)
    port_field, host_field = LISTEN[package]
    port = getattr(settings, port_field)
    if host_field:
        assert getattr(settings, host_field) == "0.0.0.0", f"{name} must bind every interface"
    check = SERVICES[name]["healthcheck"]["test"]
    assert check[:3] == ["CMD", "python", "-c"], "the slim image has no curl or wget"
    assert f"http://127.0.0.1:{port}/readyz" in check[3]
    listening = {str(port), *(str(getattr(settings, f)) for f in OTHER_PORTS.get(package, ()))}
    for published_port in SERVICES[name].get("ports") or []:
        assert published(published_port)[1] in listening
    if name in SLUICEWAY_SERVICES:
        assert f"{name}:{port}" in SCRAPE_TARGETS


def test_http_services_are_published_and_consumers_are_not() -> None:
    for name in ("ingest", "features", "rollout"):
        assert SERVICES[name].get("ports"), f"{name} is not published"
    for name in ("inference", "inference-gpu", "monitor"):
        assert not SERVICES[name].get("ports"), f"{name}: Prometheus scrapes it inside"


@pytest.mark.parametrize("name", SLUICEWAY_COMPOSE)
def test_sluiceway_service_waits_for_its_topics_and_tables(name: str) -> None:
    depends = SERVICES[name]["depends_on"]
    assert "kafka-init" in depends
    if SLUICEWAY_COMPOSE[name] in ("monitor", "rollout"):
        assert "clickhouse-init" in depends
    if SLUICEWAY_COMPOSE[name] in ("features", "inference", "rollout"):
        assert "redis" in depends


def test_clickhouse_init_creates_the_tables_once_clickhouse_is_healthy() -> None:
    init = SERVICES["clickhouse-init"]
    assert is_one_shot(init)
    assert init["depends_on"] == {"clickhouse": {"condition": "service_healthy"}}
    assert init["entrypoint"] == ["python", "-c"]
    script = init["command"][0]
    compile(script, "clickhouse-init", "exec")
    for module in re.findall(r"^(?:from|import)\s+([\w.]+)", script, re.M):
        assert importlib.util.find_spec(module) is not None, module
    assert "create_statements" in script
    # the services' one ClickHouse client builder: user, password and TLS settings all apply
    assert "clickhouse_client(settings" in script
    assert "Client(" not in script.replace("clickhouse_client(", "")


def test_only_the_gpu_service_and_kafka_nodes_2_and_3_have_profiles() -> None:
    """Everything else runs by default: a profile on, say, redis would leave the services waiting
    for it."""
    profiles = {name: s["profiles"] for name, s in SERVICES.items() if "profiles" in s}
    assert profiles == {"inference-gpu": ["gpu"], "kafka-2": ["cluster"], "kafka-3": ["cluster"]}


def test_gpu_profile_runs_inference_on_an_nvidia_gpu() -> None:
    gpu = SERVICES["inference-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    env = environment(gpu)
    assert env.pop("SLUICE_INFERENCE_PROVIDER") == "cuda"
    cpu_env = environment(SERVICES["inference"])
    assert cpu_env.pop("SLUICE_INFERENCE_PROVIDER") == "cpu"
    assert env == cpu_env, "the GPU service differs from inference in its provider only"
    base = gpu["build"]["args"]["BASE_IMAGE"]
    # onnxruntime-gpu 1.31 wheels are built for CUDA 13 and cuDNN 9 (deploy/Dockerfile).
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", base), base


def test_every_configured_variable_is_a_setting() -> None:
    """A misspelt `SLUICE_*` name would be ignored silently (`extra="ignore"`): catch it here."""
    configured = {
        key
        for name in [*SLUICEWAY_COMPOSE, "clickhouse-init"]
        for key in environment(SERVICES[name])
    }
    configured |= set(dockerfile_env())
    unknown = {key for key in configured if key.startswith("SLUICE_")} - setting_names()
    assert not unknown, f"not a setting of any service: {sorted(unknown)}"


# --- compose: the three-node layout (`--env-file deploy/cluster.env`) ---------------------------

# The layouts these tests read: the default (no variables) and the one cluster.env gives.
LAYOUTS = {"default": {}, "cluster": CLUSTER}


def kafka_nodes(variables: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """The Kafka nodes `up` starts in a layout, as service name -> resolved environment."""
    return {
        name: environment(service, variables)
        for name, service in active_services(variables).items()
        if "KAFKA_PROCESS_ROLES" in (service.get("environment") or {})
    }


def listener(env: dict[str, str], key: str, name: str) -> str:
    """`host:port` of listener `name` in a node's KAFKA_LISTENERS or KAFKA_ADVERTISED_LISTENERS."""
    listeners = dict(item.split("://", 1) for item in env[key].split(","))
    return listeners[name]


def voter(name: str, env: dict[str, str]) -> str:
    """The `id@host:port` entry a node must have in the voters: its service name, its CONTROLLER
    listener's port."""
    port = listener(env, "KAFKA_LISTENERS", "CONTROLLER").rsplit(":", 1)[1]
    return f"{env['KAFKA_NODE_ID']}@{name}:{port}"


def test_cluster_env_file_turns_on_the_cluster_profile_in_a_project_of_its_own() -> None:
    """Only cluster.env starts kafka-2 and kafka-3, and under another project name, so the three
    nodes never reuse the single node's volume (topics with factor 1 that kafka-init never
    alters)."""
    assert CLUSTER["COMPOSE_PROFILES"].split(",") == ["cluster"]
    assert CLUSTER["COMPOSE_PROJECT_NAME"] not in ("", "deploy")
    assert sorted(kafka_nodes({})) == ["kafka"]
    assert sorted(kafka_nodes(CLUSTER)) == ["kafka", "kafka-2", "kafka-3"]
    assert set(active_services(CLUSTER)) - set(active_services({})) == {"kafka-2", "kafka-3"}


def test_default_layout_is_one_kafka_node_with_replication_factor_one() -> None:
    (env,) = kafka_nodes({}).values()
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == voter("kafka", env) == "1@kafka:9093"
    for key in (
        "KAFKA_DEFAULT_REPLICATION_FACTOR",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        "KAFKA_MIN_INSYNC_REPLICAS",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
        "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
    ):
        assert env[key] == "1", f"{key}={env[key]}: one node cannot hold more replicas"
    assert {create.replication_factor for create in KAFKA_INIT} == {1}
    assert environment(SERVICES["ingest"])["SLUICE_KAFKA_BOOTSTRAP"] == "kafka:9092"


def test_cluster_layout_is_three_kafka_nodes_in_one_quorum() -> None:
    nodes = kafka_nodes(CLUSTER)
    assert len(nodes) == 3
    ids = [env["KAFKA_NODE_ID"] for env in nodes.values()]
    assert sorted(ids) == ["1", "2", "3"], f"node ids {ids}"
    assert len({env["CLUSTER_ID"] for env in nodes.values()}) == 1, "one cluster id for all"
    voters = {env["KAFKA_CONTROLLER_QUORUM_VOTERS"] for env in nodes.values()}
    assert len(voters) == 1, f"nodes disagree on the voters: {voters}"
    (voters_text,) = voters
    assert sorted(voters_text.split(",")) == sorted(voter(n, env) for n, env in nodes.items())
    for name, env in nodes.items():
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, name
        assert listener(env, "KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT") == f"{name}:9092"


def test_cluster_layout_replicates_internal_topics_three_times_with_min_isr_two() -> None:
    """Factor 3 with min ISR 2: an acks=all write goes on while any one node is down."""
    for name, env in kafka_nodes(CLUSTER).items():
        for key in (
            "KAFKA_DEFAULT_REPLICATION_FACTOR",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR",
        ):
            assert env[key] == "3", f"{name}: {key}={env[key]}"
        for key in (
            "KAFKA_MIN_INSYNC_REPLICAS",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
            "KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR",
        ):
            assert env[key] == "2", f"{name}: {key}={env[key]}"


def test_cluster_kafka_init_creates_every_catalog_topic_with_factor_three_and_min_isr_two() -> None:
    creates = topic_creates(shell_text(SERVICES["kafka-init"]["command"]), CLUSTER)
    assert sorted(create.topic for create in creates) == sorted(spec.name for spec in CATALOG)
    broker_min_isr = {env["KAFKA_MIN_INSYNC_REPLICAS"] for env in kafka_nodes(CLUSTER).values()}
    assert len(broker_min_isr) == 1, f"nodes disagree on min.insync.replicas: {broker_min_isr}"
    for create in creates:
        assert create.replication_factor == 3, f"{create.topic}: {create.replication_factor}"
        min_isr = create.config.get("min.insync.replicas", *broker_min_isr)
        assert min_isr == "2", f"{create.topic}: min.insync.replicas {min_isr}"


@pytest.mark.parametrize("name", [*SLUICEWAY_COMPOSE, "clickhouse-init"])
def test_cluster_services_bootstrap_from_every_broker(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given only `kafka:9092`, a client finds no cluster while that node is down; given all
    three, it bootstraps from any node that is up."""
    package = SLUICEWAY_COMPOSE.get(name)
    cls = settings_class(package) if package else SluiceSettings
    settings = settings_from(environment(SERVICES[name], CLUSTER), cls, monkeypatch)
    nodes = kafka_nodes(CLUSTER)
    advertised = {
        listener(env, "KAFKA_ADVERTISED_LISTENERS", "PLAINTEXT") for env in nodes.values()
    }
    bootstrap = settings.kafka_bootstrap.split(",")
    assert len(bootstrap) == len(set(bootstrap)) == 3
    assert set(bootstrap) == advertised


def test_cluster_kafka_nodes_publish_their_own_host_port_and_keep_their_own_log() -> None:
    host_ports, volumes = set(), set()
    for name, env in kafka_nodes(CLUSTER).items():
        service = SERVICES[name]
        host = listener(env, "KAFKA_ADVERTISED_LISTENERS", "HOST")
        container_port = listener(env, "KAFKA_LISTENERS", "HOST").rsplit(":", 1)[1]
        controller_port = listener(env, "KAFKA_LISTENERS", "CONTROLLER").rsplit(":", 1)[1]
        ports = [published(port, CLUSTER) for port in service["ports"]]
        assert host.startswith("localhost:")
        assert (host.rsplit(":", 1)[1], container_port) in ports, f"{name}: {host} not published"
        assert controller_port not in [target for _, target in ports], f"{name}: controller"
        host_ports.update(host_port for host_port, _ in ports)
        log = [m for m in mounts(service) if m.target == env["KAFKA_LOG_DIRS"] and not m.bind]
        assert len(log) == 1, f"{name}: its log dir is not on a named volume"
        volumes.add(log[0].source)
    assert len(host_ports) == 3, f"host ports {host_ports}"
    assert len(volumes) == 3, f"data volumes {volumes}"


def run_kafka_init(tmp_path: Path, variables: Mapping[str, str], brokers_up: int) -> Any:
    """Run kafka-init's script with `kafka-broker-api-versions.sh` listing one broker more at
    each call, up to `brokers_up` (the nodes coming up one by one), `kafka-topics.sh` writing its
    arguments to `topics.log`, and `sleep` returning at once. Returns the finished process."""
    bin_dir, fake_path = tmp_path / "kafka-bin", tmp_path / "path"
    bin_dir.mkdir()
    fake_path.mkdir()
    fakes = {
        bin_dir / "kafka-broker-api-versions.sh": (
            'echo x >> "$PROBES"\n'
            'up=$(wc -l < "$PROBES")\n'
            '[ "$up" -le "$FAKE_BROKERS" ] || up=$FAKE_BROKERS\n'
            'for id in $(seq "$up"); do\n'
            '  echo "kafka-$id:9092 (id: $id rack: null isFenced: false) -> ("\n'
            '  echo "  Produce(0): 3 to 12 [usable: 12],"\n'
            "  echo ')'\n"
            "done\n"
        ),
        bin_dir / "kafka-topics.sh": 'echo "$*" >> "$TOPICS_LOG"\n',
        fake_path / "sleep": "exit 0\n",
    }
    for path, body in fakes.items():
        path.write_text("#!/bin/bash\n" + body, encoding="utf-8")
        path.chmod(0o755)
    command = SERVICES["kafka-init"]["command"]
    assert command[:2] == ["bash", "-ec"]
    script = interpolate(command[2], variables).replace("/opt/kafka/bin/", f"{bin_dir}/")
    env = {
        "PATH": f"{fake_path}:{os.environ['PATH']}",
        "FAKE_BROKERS": str(brokers_up),
        "TOPICS_LOG": str(tmp_path / "topics.log"),
        "PROBES": str(tmp_path / "probes"),
    }
    return subprocess.run(
        ["bash", "-ec", script], env=env, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize(
    ("layout", "brokers_up", "created"),
    [("default", 1, True), ("cluster", 2, False), ("cluster", 3, True)],
)
def test_kafka_init_creates_topics_only_once_every_broker_is_up(
    tmp_path: Path, layout: str, brokers_up: int, created: bool
) -> None:
    """kafka-init waits for the brokers itself (`depends_on` reaches only `kafka`): with two of
    three up it must give up without creating a topic, not create them with fewer replicas."""
    variables = LAYOUTS[layout]
    result = run_kafka_init(tmp_path, variables, brokers_up)
    log = tmp_path / "topics.log"
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    if not created:
        assert result.returncode != 0, result.stdout
        assert calls == [], "topics created before every broker was up"
        assert "gave up waiting" in result.stderr
        return
    assert result.returncode == 0, result.stdout + result.stderr
    creates = [shlex.split(call) for call in calls if "--create" in call]
    assert len(creates) == len(CATALOG)
    expected = str(len(kafka_nodes(variables)))
    for words in creates:
        assert options(words)["--replication-factor"] == [expected], words


# --- Dockerfile ---------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    pairs = []
    for text in logical:
        instruction, _, arguments = text.strip().partition(" ")
        pairs.append((instruction.upper(), arguments.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image `docker build` produces by default)."""
    instructions = dockerfile_instructions()
    last_from = max(i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM")
    return instructions[last_from:]


def dockerfile_env() -> dict[str, str]:
    """The `ENV key=value` settings of the final stage."""
    env = {}
    for instruction, arguments in final_stage():
        if instruction == "ENV":
            for word in shlex.split(arguments):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def test_dockerfile_base_images_are_pinned() -> None:
    args: dict[str, str] = {}
    stages: set[str] = set()
    for instruction, arguments in dockerfile_instructions():
        if instruction == "ARG" and "=" in arguments:
            key, _, value = arguments.partition("=")
            args[key] = value
        if instruction == "FROM":
            words = arguments.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            if len(words) == 3 and words[1].upper() == "AS":
                stages.add(words[2])
            if image in stages:
                continue
            assert image_tag(image) and image_tag(image) != "latest", f"FROM {image}"
    # Exact patch releases: a rebuild must not move to another Python or CUDA by itself.
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", args["BASE_IMAGE"]), args["BASE_IMAGE"]


def test_dockerfile_runs_a_service_module_as_a_non_root_user() -> None:
    stage = final_stage()
    instructions = [instruction for instruction, _ in stage]
    users = [arguments for instruction, arguments in stage if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a non-root user"
    assert users[-1].split(":")[0].isdigit(), "a numeric uid lets Kubernetes check runAsNonRoot"
    entrypoint = [arguments for instruction, arguments in stage if instruction == "ENTRYPOINT"]
    assert [json.loads(e) for e in entrypoint] == [["python", "-m"]]
    command = [json.loads(a) for instruction, a in stage if instruction == "CMD"]
    assert command and command[-1][0].startswith("services.")
    assert "HEALTHCHECK" not in instructions, "compose and Kubernetes define health"
    env = dockerfile_env()
    assert env["SLUICE_INGEST_HOST"] == "0.0.0.0", "a gateway on 127.0.0.1 is unreachable"


def dockerignore_admits(path: str) -> bool:
    """Whether the build context includes `path` (relative to the repo) under .dockerignore."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    admitted = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        clean = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(candidate, clean) for candidate in candidates):
            admitted = negated
    return admitted


def test_dockerfile_copies_files_that_exist_and_the_context_admits() -> None:
    copied = []
    for instruction, arguments in dockerfile_instructions():
        if instruction not in ("COPY", "ADD"):
            continue
        words = [word for word in arguments.split() if not word.startswith("--")]
        if "--from=" in arguments:
            continue
        copied += words[:-1]
    assert {"pyproject.toml", "README.md", "schemas", "services", "deploy"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path"
        assert dockerignore_admits(source), f"COPY {source}: excluded by .dockerignore"
    for private in (".sluice", "models", ".git", ".env", "tests"):
        assert not dockerignore_admits(private), f"{private} must stay out of the build context"
    assert not dockerignore_admits("services/__pycache__")


def test_compose_features_definitions_ship_in_the_image() -> None:
    definitions = environment(SERVICES["features"])["SLUICE_FEATURES_DEFINITIONS"]
    copied = [a.split()[-1] for i, a in final_stage() if i == "COPY" and "--from=" not in a]
    assert any(PurePosixPath(definitions) == PurePosixPath(target) for target in copied)
    assert (REPO / definitions).is_file()


# --- compose: the tool's own validation ---------------------------------------------------------


def compose_tool() -> list[str] | None:
    """`docker compose` (v2 plugin) if it works here, else `docker-compose` (v1), else None."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=60, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def compose_config(layout: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`compose [--env-file cluster.env] config ARGS` in an environment with no compose variables
    of the developer's, so that it resolves what these tests resolve."""
    tool = compose_tool()
    if tool is None:
        pytest.skip(
            "neither `docker compose` (v2) nor `docker-compose` (v1, Debian package "
            "docker-compose) is installed"
        )
    env_file = ["--env-file", str(CLUSTER_ENV_FILE)] if layout == "cluster" else []
    keep = ("PATH", "HOME", "DOCKER_HOST", "DOCKER_CONFIG", "DOCKER_CONTEXT")
    return subprocess.run(
        [*tool, "-f", str(COMPOSE_FILE), *env_file, "config", *args],
        cwd=REPO,
        env={name: os.environ[name] for name in keep if name in os.environ},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compose_config_validates(layout: str) -> None:
    result = compose_config(layout, "-q")
    assert result.returncode == 0, result.stderr or result.stdout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compose_tool_resolves_the_variables_as_these_tests_do(layout: str) -> None:
    """The layout tests above resolve `${...}` themselves; the compose tool must agree, or they
    check a file Compose never runs."""
    result = compose_config(layout)
    assert result.returncode == 0, result.stderr or result.stdout
    resolved = yaml.safe_load(result.stdout)["services"]
    variables = LAYOUTS[layout]
    for name in active_services(variables):
        ours = environment(SERVICES[name], variables)
        theirs = {
            key: "" if v is None else str(v)
            for key, v in resolved[name].get("environment", {}).items()
        }
        assert theirs == ours, name
    script = shell_text(resolved["kafka-init"]["command"])
    assert topic_creates(script) == topic_creates(
        shell_text(SERVICES["kafka-init"]["command"]), variables
    )


# --- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_scrapes_every_service() -> None:
    config = load_yaml(PROMETHEUS_FILE)
    interval = seconds(config["global"]["scrape_interval"])
    assert interval == 5
    assert seconds(config["global"].get("scrape_timeout", "10s")) <= interval
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics", job["job_name"]
        for static in job.get("static_configs") or []:
            targets.update(static["targets"])
    assert targets >= SCRAPE_TARGETS
    job_names = [job["job_name"] for job in config["scrape_configs"]]
    assert len(job_names) == len(set(job_names)), "duplicate job names"


def test_prometheus_paths_match_the_compose_mounts() -> None:
    config = load_yaml(PROMETHEUS_FILE)
    config_target = mount_target("prometheus", PROMETHEUS_FILE)
    assert f"--config.file={config_target}" in SERVICES["prometheus"]["command"]
    rules_target = PurePosixPath(mount_target("prometheus", RULES_DIR))
    assert [str(rules_target / "*.yml")] == config["rule_files"]


def rule_files() -> list[Path]:
    """The alerting/recording rule files Prometheus loads."""
    return sorted(RULES_DIR.glob("*.yml"))


def test_rules_parse_and_every_rule_is_complete() -> None:
    assert rule_files(), "no rule files"
    group_names: list[str] = []
    alerts: list[str] = []
    for path in rule_files():
        groups = load_yaml(path)["groups"]
        assert groups, f"{path.name}: no groups"
        for group in groups:
            group_names.append(group["name"])
            assert group["rules"], f"{path.name}/{group['name']}: no rules"
            for rule in group["rules"]:
                assert rule.get("expr"), f"{path.name}: rule without expr: {rule}"
                assert ("alert" in rule) != ("record" in rule), f"{path.name}: {rule}"
                if "for" in rule:
                    seconds(rule["for"])
                for key in ("labels", "annotations"):
                    assert all(isinstance(v, str) for v in (rule.get(key) or {}).values())
                if "alert" in rule:
                    alerts.append(rule["alert"])
    assert len(group_names) == len(set(group_names)), "duplicate rule group names"
    assert len(alerts) == len(set(alerts)), "duplicate alert names"
    assert "SluicewayTargetDown" in alerts


def test_promtool_accepts_the_config_and_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    checks = [
        ["check", "config", str(PROMETHEUS_FILE)],
        ["check", "rules", *map(str, rule_files())],
    ]
    for args in checks:
        result = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- Grafana ------------------------------------------------------------------------------------


def datasource_uids() -> set[str]:
    """The uids of the provisioned data sources."""
    return {source["uid"] for source in load_yaml(DATASOURCES_FILE)["datasources"]}


def test_grafana_datasources() -> None:
    sources = load_yaml(DATASOURCES_FILE)["datasources"]
    assert sum(bool(source.get("isDefault")) for source in sources) == 1
    default = next(source for source in sources if source.get("isDefault"))
    assert default["type"] == "prometheus"
    assert default["url"] == "http://prometheus:9090"
    for source in sources:
        assert source.get("uid"), f"{source['name']}: give it a fixed uid for dashboards"
        host = urlsplit(source["url"]).hostname
        assert host in SERVICES, f"{source['name']}: {host} is not a compose service"


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    provisioning = mount_target("grafana", GRAFANA_DIR / "provisioning")
    assert provisioning == "/etc/grafana/provisioning"
    dashboards = mount_target("grafana", DASHBOARDS_DIR)
    providers = load_yaml(DASHBOARD_PROVIDERS_FILE)["providers"]
    assert providers
    for provider in providers:
        assert provider["type"] == "file"
        assert provider["options"]["path"] == dashboards
    home = environment(SERVICES["grafana"]).get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        relative = PurePosixPath(home).relative_to(dashboards)
        assert (DASHBOARDS_DIR / relative).is_file(), f"home dashboard {home} is not mounted"


def dashboard_files() -> list[Path]:
    """Every provisioned dashboard."""
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def panel_tree(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Panels including those nested in rows."""
    result = []
    for panel in panels:
        result.append(panel)
        result.extend(panel_tree(panel.get("panels") or []))
    return result


def test_dashboards_parse_and_have_panels() -> None:
    assert dashboard_files(), "no dashboards"
    uids = datasource_uids()
    dashboard_uids = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        dashboard_uids.append(dashboard["uid"])
        assert dashboard["title"]
        assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
        panels = panel_tree(dashboard["panels"])
        assert panels, f"{path.name}: no panels"
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels:
            assert panel["type"] and panel["title"] and panel["gridPos"], panel.get("id")
            if panel["type"] == "row":
                continue
            assert panel.get("targets"), f"{path.name}: panel {panel['title']!r} has no query"
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), f"{path.name}: {panel['title']!r}"
            for item in (panel, *panel["targets"]):
                source = item.get("datasource")
                if isinstance(source, dict) and "uid" in source:
                    assert source["uid"] in uids, f"{path.name}: unknown data source {source}"
            assert all(target.get("expr") for target in panel["targets"]), panel["title"]
    assert len(dashboard_uids) == len(set(dashboard_uids)), "duplicate dashboard uids"


def test_overview_dashboard_shows_scrape_health_and_inference_lag() -> None:
    dashboard = json.loads((DASHBOARDS_DIR / "sluiceway-overview.json").read_text("utf-8"))
    exprs = " ".join(
        target["expr"]
        for panel in panel_tree(dashboard["panels"])
        for target in panel.get("targets") or []
    )
    assert re.search(r"\bup\b", exprs)
    assert "sluice_inference_consumer_lag" in exprs
