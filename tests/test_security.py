"""Security properties, held to docs/security.md: roles on every route of every HTTP app, keys
kept as digests and compared in constant time, request and batch limits, transport security
settings reaching every client, and no secret in any log line.

The roles table in docs/security.md is the specification: every route of the gateway, the
rollout controller and the features API must have a row, and behave as the row says, so a route
added without a role check (or without a row) fails here.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import certifi
import faust
import httpx
import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from redis import Redis
from redis.connection import SSLConnection
from starlette.routing import Mount

from schemas.messages import PredictionRequest
from schemas.topics import DLQ, EVENTS, PREDICTIONS, REQUESTS
from services.common import apikeys
from services.common.clickhouse import clickhouse_client
from services.common.codec import encode
from services.common.kafka import client_config, consumer_config, producer_config
from services.common.settings import SluiceSettings
from services.common.worker import KafkaWorker
from services.features.api import create_api as create_features_api
from services.features.app import http_api as features_http_api
from services.features.definitions import FeatureRegistry
from services.features.settings import FeaturesSettings
from services.inference.settings import InferenceSettings
from services.ingest.app import create_app as create_gateway
from services.ingest.settings import IngestSettings
from services.monitor.settings import MonitorSettings
from services.rollout import auth as rollout_auth
from services.rollout.settings import RolloutSettings
from tests.helpers.models import write_version
from tests.support import body_of, create_topic, json_bodies, produce_all, read_topic, unique

REPO = Path(__file__).resolve().parents[1]
SECURITY_DOC = REPO / "docs" / "security.md"
DEMO_DEFINITIONS = REPO / "deploy" / "demo" / "features.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def secret(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- roles on every route -------------------------------------------------------------------------

ROW = re.compile(r"^\| (\w+) \| ([A-Z]+) \| `([^`]+)` \| `(\w+)` \|$", re.M)
PATH_SAMPLES = {"model": "fraud", "version": "1", "entity": "card", "entity_id": "c1"}


def documented_roles() -> dict[str, dict[tuple[str, str], str]]:
    """service -> {(method, path): role} from the roles table of docs/security.md."""
    table: dict[str, dict[tuple[str, str], str]] = {}
    for service, method, path, role in ROW.findall(SECURITY_DOC.read_text()):
        table.setdefault(service, {})[(method, path)] = role
    return table


def routes_of(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route; a mounted app (static files) as `GET <prefix>/*`."""
    found = set()
    for route in app.routes:
        if isinstance(route, Mount):
            found.add(("GET", f"{route.path}/*"))
        elif getattr(route, "methods", None):
            found |= {(method, route.path) for method in route.methods - {"HEAD"}}
        elif hasattr(route, "effective_route_contexts"):  # an included router (FastAPI >= 0.16x)
            for included in route.effective_route_contexts():
                found |= {(method, included.path) for method in included.methods - {"HEAD"}}
        else:
            raise TypeError(f"unknown route type {type(route).__name__}: teach routes_of")
    documented_in_openapi = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    assert documented_in_openapi <= found, "routes_of missed routes the OpenAPI document lists"
    return found


def concrete(path: str) -> str:
    path = path.replace("/*", "/index.js")
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: PATH_SAMPLES.get(m[1], "x"), path)


class Keyed:
    """An app under test with its keys: role name -> presented key, and who holds which role."""

    def __init__(
        self,
        app: FastAPI,
        keys: dict[str, str],
        satisfies: Callable[[str, str], bool],
        digests: list[str],
    ) -> None:
        self.client = TestClient(app, raise_server_exceptions=False)
        self.keys = keys
        self.satisfies = satisfies
        self.digests = digests

    def call(self, method: str, path: str, key: str | None, header: str) -> httpx.Response:
        headers = {}
        if key is not None:
            headers = (
                {"x-api-key": key} if header == "x-api-key" else {"authorization": f"Bearer {key}"}
            )
        body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
        return self.client.request(method, concrete(path), headers=headers, **body)


def gateway_roles(held: str, needed: str) -> bool:
    return needed in apikeys.ROLES and (held == needed or held == "admin")


def gateway_like_keys() -> tuple[str, dict[str, str]]:
    keys = {role: secret(role) for role in apikeys.ROLES}
    setting = ",".join(f"{role}-app:{sha256(key)}:{role}" for role, key in keys.items())
    return setting, keys


@pytest.fixture(scope="module")
def gateway() -> Keyed:
    setting, keys = gateway_like_keys()
    app = create_gateway(IngestSettings(ingest_api_keys=setting, kafka_bootstrap=unused_address()))
    return Keyed(app, keys, gateway_roles, [sha256(k) for k in keys.values()])


@pytest.fixture(scope="module")
def rollout() -> Iterator[Keyed]:
    from services.rollout.app import build

    keys = {"admin": secret("admin"), "viewer": secret("viewer")}
    settings = RolloutSettings(
        rollout_admin_keys=[SecretStr(f"sha256:{sha256(keys['admin'])}")],
        rollout_viewer_keys=[SecretStr(f"sha256:{sha256(keys['viewer'])}")],
        kafka_bootstrap=unused_address(),
        redis_url=f"redis://{unused_address()}/0",
        clickhouse_port=free_port(),
    )
    app = build(settings)
    try:
        yield Keyed(
            app.api,
            keys,
            lambda held, needed: needed == held or (held == "admin" and needed == "viewer"),
            [f"sha256:{sha256(k)}" for k in keys.values()],
        )
    finally:
        app.stop()


@pytest.fixture(scope="module")
def features() -> Keyed:
    setting, keys = gateway_like_keys()
    check = functools.partial(apikeys.authorize, apikeys.parse_keys(setting))
    app = create_features_api(
        FeatureRegistry.load(DEMO_DEFINITIONS),
        Redis.from_url(f"redis://{unused_address()}/0", socket_connect_timeout=0.2),
        lambda: True,
        authorize=check,
    )
    return Keyed(app, keys, gateway_roles, [sha256(k) for k in keys.values()])


def unused_address() -> str:
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("service", ["gateway", "rollout", "features"])
def test_every_route_has_a_documented_role(service, request):
    app: Keyed = request.getfixturevalue(service)
    documented = documented_roles().get(service, {})
    actual = routes_of(app.client.app)
    assert actual - documented.keys() == set(), "routes missing from docs/security.md"
    assert documented.keys() - actual == set(), "docs/security.md lists routes the app lacks"


@pytest.mark.parametrize("service", ["gateway", "rollout", "features"])
def test_every_route_enforces_its_documented_role(service, request):
    """Keys configured: no key or an unknown one -> 401, a known key without the role -> 403,
    a key with the role -> past the check; open routes need no key."""
    app: Keyed = request.getfixturevalue(service)
    problems = []
    checked_forbidden = 0
    for (method, path), role in sorted(documented_roles()[service].items()):

        def expect(key, header, wanted: Callable[[int], bool], why: str, m=method, p=path):
            status = app.call(m, p, key, header).status_code
            if not wanted(status):
                problems.append(f"{m} {p} ({why}): {status}")

        if role == "open":
            expect(None, "bearer", lambda s: s not in (401, 403), "open, no key")
            continue
        for header in ("bearer", "x-api-key"):
            expect(None, header, lambda s: s == 401, "no key")
            expect(secret("unknown"), header, lambda s: s == 401, "unknown key")
        for digest in app.digests:
            expect(digest, "bearer", lambda s: s == 401, "a configured digest as the key")
        for held, key in app.keys.items():
            if app.satisfies(held, role):
                expect(key, "x-api-key", lambda s: s not in (401, 403), f"{held} key")
            else:
                checked_forbidden += 1
                expect(key, "bearer", lambda s: s == 403, f"{held} key lacks {role}")
    assert not problems, "\n".join(problems)
    assert checked_forbidden, "no wrong-role key was tried: the table names no such role"


def test_rollout_admin_routes_refuse_a_viewer_key(rollout):
    response = rollout.call("POST", "/v1/rollouts/fraud/abort", rollout.keys["viewer"], "bearer")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "forbidden"


def test_without_keys_every_route_is_open_as_on_the_dev_cluster():
    app = create_gateway(IngestSettings(ingest_api_keys="", kafka_bootstrap=unused_address()))
    client = TestClient(app, raise_server_exceptions=False)
    assert client.post("/v1/models/fraud/predict", json={}).status_code == 422  # past the check


# -- keys at rest and compared ----------------------------------------------------------------


def test_gateway_keys_are_configured_as_digests_only():
    key = secret("clear")
    with pytest.raises(ValueError) as refused:
        apikeys.parse_keys(f"app:{key}:predict")
    assert key not in str(refused.value), "the refusal (logged at start-up) repeats the key"
    with pytest.raises(ValueError):
        apikeys.parse_keys(f"app:{'é' * 64}:predict")  # 64 characters, not a digest
    (configured,) = apikeys.parse_keys(f"app:{sha256(key).upper()}:predict")
    assert apikeys.authorize([configured], key, "predict") is None


def test_rollout_keys_are_kept_as_digests_and_a_digest_is_not_a_key(caplog):
    admin, viewer = secret("admin"), secret("viewer")
    keys = rollout_auth.ApiKeys([SecretStr(f"sha256:{sha256(admin)}")], [SecretStr(viewer)])
    assert keys.role_of(admin) == "admin" and keys.role_of(viewer) == "viewer"
    assert keys.role_of(f"sha256:{sha256(admin)}") is None
    assert keys.role_of(sha256(admin)) is None
    held = repr(vars(keys))
    assert admin not in held and viewer not in held and viewer.encode().hex() not in held
    assert "in clear" in caplog.text and viewer not in caplog.text


def counting_compare(monkeypatch, module) -> list[int]:
    calls: list[int] = []
    original = module.hmac.compare_digest

    def compare(a, b):
        calls.append(1)
        return original(a, b)

    monkeypatch.setattr(module.hmac, "compare_digest", compare)
    return calls


def test_a_presented_gateway_key_is_compared_with_every_configured_key(monkeypatch):
    setting, keys = gateway_like_keys()
    configured = apikeys.parse_keys(setting)
    calls = counting_compare(monkeypatch, apikeys)
    for presented in (keys["predict"], keys["admin"], secret("unknown")):
        calls.clear()
        apikeys.authorize(configured, presented, "predict")
        assert len(calls) == len(configured), "stopped early: timing tells which key matched"


def test_a_presented_rollout_key_is_compared_with_every_configured_key(monkeypatch):
    admins = [secret("a1"), secret("a2")]
    keys = rollout_auth.ApiKeys(
        [SecretStr(f"sha256:{sha256(k)}") for k in admins], [SecretStr(secret("viewer"))]
    )
    calls = counting_compare(monkeypatch, rollout_auth)
    for presented in (admins[0], admins[1], secret("unknown")):
        calls.clear()
        keys.role_of(presented)
        assert len(calls) == 3, "stopped early: timing tells which key matched"


# -- request and batch limits -----------------------------------------------------------------


def limited_gateway() -> tuple[TestClient, dict[str, str]]:
    setting, keys = gateway_like_keys()
    app = create_gateway(
        IngestSettings(
            ingest_api_keys=setting, ingest_max_body_bytes=4096, kafka_bootstrap=unused_address()
        )
    )
    return TestClient(app, raise_server_exceptions=False), keys


JSON_TYPE = {"content-type": "application/json"}


def test_a_body_declared_over_the_limit_is_refused_before_any_key_check():
    """The size is checked before the key, so an anonymous client cannot make the gateway
    read a large body."""
    client, _keys = limited_gateway()
    for path in ("/v1/events", "/v1/models/fraud/predict", "/v2/models/fraud/infer"):
        declared = client.post(path, content=b"x" * 5000, headers=JSON_TYPE)
        assert declared.status_code == 413, path
        assert declared.json()["error"]["code"] == "body_too_large"
    assert client.post("/v1/events", content=b"x" * 100).status_code == 401


def test_a_streamed_body_over_the_limit_is_cut_off_with_413():
    """Without a Content-Length the limit applies as the chunks arrive."""
    client, keys = limited_gateway()
    streamed = client.post(
        "/v1/models/fraud/predict",
        content=(b"x" * 1000 for _ in range(5)),
        headers={**JSON_TYPE, "x-api-key": keys["admin"]},
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "body_too_large"


@pytest.mark.integration
def test_batch_limits_apply_to_every_batch_endpoint(cluster, tmp_path):
    """`ingest_max_batch_items` bounds predict:batch instances, capture lines (JSON array and
    NDJSON) and OIP infer rows alike."""
    model = unique("limits").replace(".", "-")
    write_version(tmp_path, model, "1", "gbdt")
    env = {k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()}
    settings = IngestSettings(
        **env,
        model_repository=tmp_path,
        ingest_max_batch_items=3,
        ingest_reply_group=unique("limits"),
    )
    instance = {"entity_id": "c1", "features": {}}
    event = {"event_id": "e", "event_type": "t", "ts_ms": 1, "entities": {"card": "c"}}
    ndjson = b"\n".join(orjson.dumps(event) for _ in range(4))
    manifest = orjson.loads((tmp_path / model / "1" / "manifest.json").read_bytes())
    rows = {
        "name": manifest["input_name"],
        "shape": [4, 20],
        "datatype": "FP32",
        "data": [0.0] * 80,
    }
    with TestClient(create_gateway(settings), raise_server_exceptions=False) as client:
        calls = {
            "predict:batch": client.post(
                f"/v1/models/{model}/predict:batch", json={"instances": [instance] * 4}
            ),
            "events array": client.post("/v1/events", json=[event] * 4),
            "events ndjson": client.post("/v1/events", content=ndjson),
            "labels": client.post("/v1/labels", content=ndjson),
            "oip infer": client.post(f"/v2/models/{model}/infer", json={"inputs": [rows]}),
        }
        at_limit = client.post("/v1/events", json=[{**event, "event_id": f"e{i}"} for i in "abc"])
    statuses = {name: response.status_code for name, response in calls.items()}
    assert statuses == dict.fromkeys(calls, 413), statuses
    assert calls["events ndjson"].json()["error"]["code"] == "too_many_items"
    assert at_limit.status_code == 202 and at_limit.json()["accepted"] == 3


# -- transport security settings reach every client -----------------------------------------------

SECURE = {
    "kafka_security_protocol": "SASL_SSL",
    "kafka_sasl_mechanism": "SCRAM-SHA-512",
    "kafka_sasl_username": "sluice-svc",
    "kafka_sasl_password": "kafka-secret-value",
    "kafka_ssl_ca_location": "/etc/ssl/kafka-ca.pem",
    "redis_url": "rediss://redis.internal:6380/3?ssl_cert_reqs=required"
    "&ssl_ca_certs=/etc/ssl/redis-ca.pem",
    "redis_password": "redis-secret-value",
    "clickhouse_host": "clickhouse.internal",
    "clickhouse_port": 9440,
    "clickhouse_user": "sluice-svc",
    "clickhouse_password": "clickhouse-secret-value",
    "clickhouse_secure": True,
}
KAFKA_SECURITY = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanism": "SCRAM-SHA-512",
    "sasl.username": "sluice-svc",
    "sasl.password": "kafka-secret-value",
    "ssl.ca.location": "/etc/ssl/kafka-ca.pem",
}


class RecordedClient:
    """Stands in for a librdkafka client: records its configuration, connects nowhere."""

    configs: list[dict] = []

    def __init__(self, config: dict) -> None:
        RecordedClient.configs.append(config)

    def __getattr__(self, name: str):
        if name == "list_topics":
            raise LookupError("no broker here")
        return lambda *args, **kwargs: 0


@pytest.fixture
def kafka_clients(monkeypatch) -> list[dict]:
    """Every module that constructs a librdkafka client, with the client recorded instead."""
    RecordedClient.configs = []
    for module, name in KAFKA_CONSTRUCTION_SITES:
        monkeypatch.setattr(f"{module}.{name}", RecordedClient)
    return RecordedClient.configs


KAFKA_CONSTRUCTION_SITES = [
    ("services.common.kafka", "ServiceProducer"),
    ("services.common.worker", "Consumer"),
    ("services.inference.control", "Consumer"),
    ("services.rollout.publisher", "Consumer"),
    ("services.ingest.replies", "Consumer"),
    ("services.monitor.app", "Consumer"),
    ("services.features.runtime", "AdminClient"),
]


def constructing_files(pattern: str) -> set[str]:
    """Files under services/ whose code matches `pattern`."""
    regex = re.compile(pattern)
    return {
        str(path.relative_to(REPO))
        for path in (REPO / "services").rglob("*.py")
        if regex.search(path.read_text())
    }


def test_kafka_clients_are_built_only_where_the_pass_through_test_looks():
    """A new place that builds a librdkafka client must be added to KAFKA_CONSTRUCTION_SITES,
    and so to the test below."""
    expected = {f"{module.replace('.', '/')}.py" for module, _ in KAFKA_CONSTRUCTION_SITES}
    pattern = r"(?<![\w.])(Consumer|Producer|ServiceProducer|AdminClient)\("
    assert constructing_files(pattern) == expected


def test_kafka_security_settings_reach_every_producer_consumer_and_admin_client(kafka_clients):
    from services.common.worker import KafkaWorker
    from services.features.runtime import Pipeline
    from services.inference.control import ControlPlane
    from services.ingest.producer import AsyncProducer
    from services.ingest.replies import ReplyListener
    from services.monitor.app import alert_publisher, published_alerts
    from services.rollout.publisher import ControlFollower, RoutingPublisher

    base = SluiceSettings(**SECURE)
    assert {**client_config(base), **KAFKA_SECURITY} == client_config(base)
    for config in (consumer_config(base, "g"), producer_config(base)):
        assert KAFKA_SECURITY.items() <= config.items()
    KafkaWorker(base, service="t", group_id="g", topics=[EVENTS.name], handler=lambda r: [])
    ControlPlane(InferenceSettings(**SECURE), service=None)
    ControlFollower(RolloutSettings(**SECURE))
    RoutingPublisher(RolloutSettings(**SECURE), Redis())
    ReplyListener(base, "g")
    AsyncProducer(base)
    alert_publisher(MonitorSettings(**SECURE))
    with pytest.raises(LookupError):
        published_alerts(MonitorSettings(**SECURE))
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    with pytest.raises(LookupError):
        Pipeline(FeaturesSettings(**SECURE), registry, Redis()).ensure_topics()
    assert len(kafka_clients) >= 14
    for config in kafka_clients:
        assert KAFKA_SECURITY.items() <= config.items(), config


def test_faust_gets_the_sasl_settings():
    from services.features.runtime import _faust_credentials

    ca = certifi.where()  # faust builds its TLS context at once: the CA file must exist
    credentials = _faust_credentials(FeaturesSettings(**{**SECURE, "kafka_ssl_ca_location": ca}))
    assert credentials.username == "sluice-svc" and credentials.password == "kafka-secret-value"
    assert credentials.mechanism.name.replace("_", "-") == "SCRAM-SHA-512"
    assert credentials.ssl_context is not None
    tls_only = FeaturesSettings(kafka_security_protocol="SSL", kafka_ssl_ca_location=ca)
    assert isinstance(_faust_credentials(tls_only), faust.SSLCredentials)
    assert _faust_credentials(FeaturesSettings()) is None


def test_the_worker_loop_takes_the_message_size_limit_from_its_settings(cluster):
    topic = create_topic(cluster.kafka_bootstrap, unique("test.size-limit"), 1)
    settings = SluiceSettings(kafka_bootstrap=cluster.kafka_bootstrap, kafka_max_message_bytes=1024)
    request = PredictionRequest(request_id="r-small", model="m", entity_id="e", created_at_ms=1)
    big = encode(request.model_copy(update={"request_id": "r-big", "features": {"x": "y" * 1100}}))
    small = encode(request)
    produce_all(cluster.kafka_bootstrap, topic, [(b"e", big), (b"e", small)])
    handled: list[str] = []
    worker = KafkaWorker(
        settings, service="sizetest", group_id=unique("size-limit"), topics=[topic],
        handler=lambda records: handled.extend(r.value.request_id for r in records) or [],
        decoders={topic: PredictionRequest},
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not handled and time.monotonic() < deadline:
        worker.poll_once()
    worker.close()
    assert handled == ["r-small"]

    def letters_of(messages) -> list[dict]:
        return [b for b in json_bodies(messages) if b.get("source_topic") == topic]

    letters = letters_of(read_topic(cluster.kafka_bootstrap, DLQ.name, letters_of, 30))
    assert [letter["error"]["code"] for letter in letters] == ["message_too_large"]


def assert_redis_is_secured(client: Redis) -> None:
    pool = client.connection_pool
    assert issubclass(pool.connection_class, SSLConnection)
    kwargs = pool.connection_kwargs
    assert kwargs["password"] == "redis-secret-value"
    assert kwargs["ssl_ca_certs"] == "/etc/ssl/redis-ca.pem" and kwargs["host"] == "redis.internal"


def test_redis_clients_are_built_only_where_the_pass_through_test_looks():
    builders = {
        "services/inference/app.py",
        "services/features/app.py",
        "services/rollout/app.py",
    }
    assert constructing_files(r"\bRedis\(|\.from_url\(") == builders
    for path in builders:
        source = (REPO / path).read_text()
        calls = re.findall(r"Redis\.from_url\((.*?)\n\s*\)", source, re.S)
        assert len(calls) == source.count("from_url(") >= 1, path
        assert all("password=" in call for call in calls), path


def test_redis_auth_and_tls_reach_every_redis_client(kafka_clients):
    from services.features.app import connect_redis
    from services.inference.app import build as build_inference
    from services.rollout.app import build as build_rollout

    _worker, service, _control = build_inference(InferenceSettings(**SECURE))
    assert_redis_is_secured(service.redis)
    assert_redis_is_secured(connect_redis(FeaturesSettings(**SECURE)))
    rollout = build_rollout(RolloutSettings(**SECURE))
    assert_redis_is_secured(rollout.publisher.redis)


def test_clickhouse_clients_are_built_only_by_the_common_builder():
    assert constructing_files(r"(?<![\w.])Client\(") == {"services/common/clickhouse.py"}


def test_clickhouse_user_password_and_tls_reach_every_clickhouse_client():
    from services.features.offline import connect_clickhouse
    from services.monitor.client import MonitorClient
    from services.monitor.store import Store
    from services.rollout.store import ClickHouse

    settings = MonitorSettings(**SECURE)
    clients = [
        clickhouse_client(settings),
        Store.from_settings(settings).client,
        MonitorClient.from_settings(settings).store.client,
        ClickHouse.from_settings(RolloutSettings(**SECURE)).client,
        connect_clickhouse(FeaturesSettings(**SECURE)),
    ]
    for client in clients:
        connection = client.connection
        assert (connection.user, connection.password) == ("sluice-svc", "clickhouse-secret-value")
        assert connection.secure_socket and list(connection.hosts) == [
            ("clickhouse.internal", 9440)
        ]


def test_secrets_are_secret_settings_that_never_print():
    settings = SluiceSettings(**SECURE)
    shown = repr(settings) + str(settings.model_dump())
    for value in ("kafka-secret-value", "redis-secret-value", "clickhouse-secret-value"):
        assert value not in shown


# -- no secret in any log line --------------------------------------------------------------------


@pytest.fixture(scope="module")
def private_redis() -> Iterator[tuple[str, str]]:
    """A redis-server that requires AUTH: (url without the password, password)."""
    password, port = secret("redis-auth"), free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
         "--requirepass", password],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                Redis(port=port, password=password).ping()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0", password
    finally:
        process.terminate()
        process.wait(10)


class LoggedService:
    """`python -m services.<name>` at DEBUG, its whole output (stdout and stderr) in a file."""

    def __init__(self, module: str, env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        full_env = {**os.environ, **env, "SLUICE_LOG_LEVEL": "DEBUG", "SLUICE_LOG_FORMAT": "json"}
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", module], cwd=REPO, env=full_env, stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_http(self, url: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, self.output()[-3000:]
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"{url} not ready\n{self.output()[-3000:]}"
            time.sleep(0.2)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.output()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def assert_never_logged(output: str, secrets: dict[str, str], seen: str, debug: bool) -> None:
    """No secret in `output`, which must show `seen` (the capture works) and, with `debug`,
    DEBUG records (the level took effect; the gateway itself logs nothing at DEBUG)."""
    assert seen in output, f"{seen!r} is missing: the output was not captured\n{output[-2000:]}"
    if debug:
        assert '"level":"debug"' in output, "DEBUG did not take effect"
    leaked = [name for name, value in secrets.items() if value in output]
    assert not leaked, f"logged: {leaked}"


def shared_secrets(redis_password: str) -> tuple[dict[str, str], dict[str, str]]:
    """(secrets by name, the env that sets them) common to every service run."""
    secrets = {
        "kafka sasl password": secret("kafka-sasl"),
        "redis password": redis_password,
        "clickhouse password": secret("clickhouse"),
    }
    env = {
        "SLUICE_KAFKA_SASL_USERNAME": "sluice-svc",
        "SLUICE_KAFKA_SASL_PASSWORD": secrets["kafka sasl password"],
        "SLUICE_REDIS_PASSWORD": secrets["redis password"],
        "SLUICE_CLICKHOUSE_PASSWORD": secrets["clickhouse password"],
    }
    return secrets, env


@pytest.mark.integration
def test_the_gateway_logs_no_key_or_password_at_debug(cluster, private_redis, tmp_path):
    _redis_url, redis_password = private_redis
    secrets, env = shared_secrets(redis_password)
    setting, keys = gateway_like_keys()
    secrets |= {f"{role} key": key for role, key in keys.items()}
    secrets["unknown key"] = secret("guess")
    port = free_port()
    gateway = LoggedService(
        "services.ingest",
        {
            **cluster.env(),
            **env,
            "SLUICE_INGEST_PORT": str(port),
            "SLUICE_INGEST_API_KEYS": setting,
            "SLUICE_INGEST_REPLY_GROUP": unique("keys-logged"),
            "SLUICE_MODEL_REPOSITORY": str(tmp_path),
        },
        tmp_path / "gateway.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        gateway.wait_http(f"{url}/readyz")
        body = {"entity_id": "c1", "features": {}}
        for key in (keys["predict"], keys["ingest"], secrets["unknown key"], None):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            httpx.post(f"{url}/v1/models/nope/predict", json=body, headers=headers, timeout=10)
            httpx.post(f"{url}/v1/events", content=b"{}", headers=headers, timeout=10)
        httpx.get(f"{url}/v2/models/nope", headers={"x-api-key": keys["admin"]}, timeout=10)
    finally:
        output = gateway.stop()
    assert_never_logged(output, secrets, seen=f"127.0.0.1:{port}", debug=False)


@pytest.mark.integration
def test_the_rollout_controller_logs_no_key_or_password_at_debug(cluster, private_redis, tmp_path):
    redis_url, redis_password = private_redis
    secrets, env = shared_secrets(redis_password)
    env.pop("SLUICE_CLICKHOUSE_PASSWORD")  # the cluster's ClickHouse has none: it must connect
    secrets.pop("clickhouse password")
    secrets |= {"admin key": secret("admin"), "viewer key": secret("viewer")}
    secrets["clear admin key"] = secret("clear-admin")
    secrets["unknown key"] = secret("guess")
    admin_digest = f"sha256:{sha256(secrets['admin key'])}"
    secrets["admin digest"] = admin_digest
    port = free_port()
    controller = LoggedService(
        "services.rollout",
        {
            **cluster.env(),
            **env,
            "SLUICE_REDIS_URL": redis_url,
            "SLUICE_ROLLOUT_HTTP_HOST": "127.0.0.1",
            "SLUICE_ROLLOUT_HTTP_PORT": str(port),
            "SLUICE_ROLLOUT_ADMIN_KEYS": f'["{admin_digest}", "{secrets["clear admin key"]}"]',
            "SLUICE_ROLLOUT_VIEWER_KEYS": f'["sha256:{sha256(secrets["viewer key"])}"]',
        },
        tmp_path / "rollout.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        controller.wait_http(f"{url}/readyz")
        for key in ("admin key", "clear admin key", "viewer key", "unknown key", "admin digest"):
            headers = {"x-api-key": secrets[key]}
            httpx.get(f"{url}/v1/rollouts", headers=headers, timeout=10)
            httpx.post(f"{url}/v1/rollouts/nope/abort", json={}, headers=headers, timeout=10)
    finally:
        output = controller.stop()
    assert_never_logged(output, secrets, seen="keys_in_clear", debug=True)


@pytest.mark.integration
def test_inference_logs_no_password_at_debug_while_it_reads_redis_with_auth(
    cluster, private_redis, tmp_path
):
    redis_url, redis_password = private_redis
    secrets, env = shared_secrets(redis_password)
    model = unique("logged").replace(".", "-")
    write_version(tmp_path, model, "1", "gbdt")
    group = unique("inference-logged")
    inference = LoggedService(
        "services.inference",
        {
            **cluster.env(),
            **env,
            "SLUICE_REDIS_URL": redis_url,
            "SLUICE_MODEL_REPOSITORY": str(tmp_path),
            "SLUICE_INFERENCE_GROUP_ID": group,
        },
        tmp_path / "inference.log",
    )
    try:
        request_id = f"{group}-request"
        request = PredictionRequest(
            request_id=request_id,
            model=model,
            entity_id="card-without-features",
            created_at_ms=int(time.time() * 1000),
        )
        produce_all(cluster.kafka_bootstrap, REQUESTS.name, [(request.entity_id, encode(request))])
        answered = read_topic(
            cluster.kafka_bootstrap,
            PREDICTIONS.name,
            lambda ms: any(body_of(m).get("request_id") == request_id for m in ms),
            90,
        )
        prediction = next(
            body_of(m) for m in answered if body_of(m).get("request_id") == request_id
        )
        # the online store was read (with AUTH): the card has no features there
        assert prediction["error"]["code"] == "missing_feature", prediction
    finally:
        output = inference.stop()
    assert_never_logged(output, secrets, seen="repository loaded", debug=True)


def test_the_features_service_takes_its_keys_from_its_settings():
    setting, keys = gateway_like_keys()
    app = features_http_api(
        FeaturesSettings(features_api_keys=setting),
        FeatureRegistry.load(DEMO_DEFINITIONS),
        Redis.from_url(f"redis://{unused_address()}/0", socket_connect_timeout=0.2),
        lambda: True,
    )
    client = TestClient(app)
    path = "/v1/features/planet/earth"
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"x-api-key": keys["predict"]}).status_code == 403
    assert client.get(path, headers={"x-api-key": keys["admin"]}).status_code == 404
    assert client.get("/healthz").status_code == 200
