"""Every consumer of every topic dead-letters what it cannot decode, with the reason, and keeps
going: garbage bytes, a message over `kafka_max_message_bytes`, and a newer schema_version, on
each topic the services consume, with the real services running.

| topic | consumers (consumer_group of their dead letters) |
|---|---|
| `sluice.requests` | inference worker (`inference.*`) |
| `sluice.events` | features app (faust runtime; its app id); monitor events sink (`<g>.events`) |
| `sluice.labels` | monitor labels sink (`<group>.labels`) |
| `sluice.predictions` | monitor predictions sink (`<group>.predictions`); gateway reply listener |
| `sluice.models` | inference control plane (`sluice-inference-control`) |
| `sluice.routing` | inference control plane; rollout follower (`sluice-rollout-follower`) |
| `sluice.alerts` | rollout follower; monitor start-up read (`<group>.restore`) |

The services are started by the other tests' launchers: `serving` (tests/test_inference.py), the
monitor sinks (tests/test_monitor_sink.py), `FeaturesProcess` (tests/test_features_support.py)
and `Controller` (tests/test_rollout_e2e.py). The gateway's reply listener is driven in process:
its own gateway would answer a request before a bad reply could be slipped in front of it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource
from redis import Redis

from schemas.messages import (
    Alert,
    AlertState,
    DeadLetter,
    Event,
    Label,
    LatencyBreakdown,
    ModelRegistered,
    Prediction,
    Route,
    RouteRole,
    RoutingEntry,
    RoutingTable,
)
from schemas.topics import ALERTS, DLQ, EVENTS, LABELS, MODELS, PREDICTIONS, REQUESTS, ROUTING
from services.common.codec import DecodeError, decode, encode
from services.common.settings import DEFAULT_MAX_MESSAGE_BYTES, SluiceSettings
from services.features.client import read_online
from services.features.definitions import FeatureRegistry
from services.inference.control import CONTROL_GROUP
from services.ingest.replies import ReplyListener
from services.monitor.app import Monitor, published_alerts, sink_workers
from services.monitor.store import Store
from services.rollout.publisher import FOLLOWER_GROUP
from tests import test_inference as inference_tests
from tests.helpers.models import write_version
from tests.support import body_of, json_bodies, read_topic, unique
from tests.test_features_support import DEMO_DEFINITIONS, FeaturesProcess, features_env, free_port
from tests.test_monitor_sink import run_until_ready, settings_for, wait_for
from tests.test_rollout_e2e import Controller

pytestmark = pytest.mark.integration

online_store = inference_tests.online_store  # the inference tests' fixtures, reused as they are
serving = inference_tests.serving

BAD_KINDS = ("malformed_json", "message_too_large", "unsupported_schema_version")
HUGE_BYTES = DEFAULT_MAX_MESSAGE_BYTES + 200 * 1024


def bad_payloads(tag: str, valid: dict) -> dict[str, bytes]:
    """Garbage bytes, a message over the consumers' size limit and a newer schema version, each
    carrying `tag` so their dead letters can be told from everyone else's."""
    padding = "x" * HUGE_BYTES
    return {
        "malformed_json": b"\xff\xfe\x00 not json " + tag.encode(),
        "message_too_large": orjson.dumps({**valid, "test_tag": tag, "padding": padding}),
        "unsupported_schema_version": orjson.dumps({**valid, "schema_version": 99, "tag": tag}),
    }


def produce(
    bootstrap: str, topic: str, items: list[tuple[bytes, bytes, dict | None]], partition: int = 0
) -> None:
    """Produce (key, value, headers) in order to one partition and wait for every ack; allows
    messages bigger than the consumers' 1 MiB limit, as a topic and producer configured for
    more than the consumers expect would (Kafka refuses them under its 1 MB default)."""
    accept_big_messages(bootstrap, topic)
    producer = Producer(
        {"bootstrap.servers": bootstrap, "message.max.bytes": 8 * 1024 * 1024, "linger.ms": 5}
    )
    errors: list[str] = []
    for key, value, headers in items:
        producer.produce(
            topic,
            value,
            key,
            partition=partition,
            headers=headers,
            on_delivery=lambda error, _m: errors.append(str(error)) if error else None,
        )
    assert producer.flush(30) == 0 and not errors, errors


def accept_big_messages(bootstrap: str, topic: str, max_bytes: int = 8 * 1024 * 1024) -> None:
    """Raise `topic`'s `max.message.bytes` on the broker to `max_bytes`."""
    resource = ConfigResource(
        ConfigResource.Type.TOPIC,
        topic,
        incremental_configs=[
            ConfigEntry(
                "max.message.bytes",
                str(max_bytes),
                incremental_operation=AlterConfigOpType.SET,
            )
        ],
    )
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(30)


@dataclass
class Running:
    """The services under test and what identifies their consumers."""

    model: str
    root: Path
    monitor_settings: object
    monitor_group: str
    features_app_id: str
    controller: Controller


@pytest.fixture(scope="module")
def running(cluster, cluster_env, serving, tmp_path_factory) -> Iterator[Running]:
    """Inference (worker and control plane), the monitor's three sinks, the features app on
    `sluice.events` and a rollout controller, all consuming the catalog's topics."""
    model, root, _table = serving
    tmp = tmp_path_factory.mktemp("dlq")
    monitor_settings = settings_for(cluster)
    monitor = Monitor(sink_workers(monitor_settings), None)
    app_id = unique("features-dlq").replace(".", "-")
    http_port = free_port()
    features = FeaturesProcess(
        features_env(cluster_env, topic=EVENTS.name, app_id=app_id, tmp=tmp, http_port=http_port),
        tmp / "features.log",
    ).start()
    controller = Controller(cluster)
    try:
        run_until_ready(monitor)
        deadline = time.monotonic() + 90
        while not features_ready(http_port):
            assert features.process.poll() is None, features.log_tail()
            assert time.monotonic() < deadline, f"features not ready\n{features.log_tail()}"
            time.sleep(0.2)
        yield Running(
            model, root, monitor_settings, monitor_settings.monitor_group_id, app_id, controller
        )
    finally:
        controller.stop()
        monitor.stop()
        features.stop()


def features_ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Sent:
    """What the module's one injection produced."""

    tag: str
    started_ms: int
    valid: dict[str, object]


@pytest.fixture(scope="module")
def sent(cluster, running: Running) -> Sent:
    """Three bad messages on every consumed topic, then a valid one after them."""
    tag = f"dlq-{uuid.uuid4().hex[:10]}"
    now = int(time.time() * 1000)
    model = running.model
    write_version(running.root, model, "3", "gbdt", seed=3)
    manifest = orjson.loads((running.root / model / "3" / "manifest.json").read_bytes())
    valid = {
        REQUESTS.name: inference_tests.request(model, 7, request_id=f"{tag}-request"),
        EVENTS.name: Event(
            event_id=f"{tag}-event",
            event_type="transaction",
            ts_ms=now,
            entities={"card": f"{tag}-card", "merchant": f"{tag}-merchant"},
            fields={"amount": 12.5, "hour": 14, "card_present": 1},
        ),
        LABELS.name: Label(request_id=f"{tag}-label", entity_id="card-1", value=1.0, ts_ms=now),
        PREDICTIONS.name: Prediction(
            request_id=f"{tag}-prediction",
            model=model,
            version="1",
            route=Route.champion,
            entity_id="card-1",
            score=0.25,
            latency=LatencyBreakdown(total_ms=3),
            created_at_ms=now,
            scored_at_ms=now + 3,
        ),
        MODELS.name: ModelRegistered(
            model=model,
            version="3",
            path=str(running.root / model / "3"),
            sha256=manifest["sha256"],
            registered_at_ms=now,
        ),
        ROUTING.name: RoutingTable(
            model=model,
            entries=[RoutingEntry(version="2", role=RouteRole.champion, weight=1.0)],
            revision=2,
            updated_at_ms=now,
        ),
        ALERTS.name: Alert(
            alert_id=f"{tag}-alert",
            model=model,
            version="2",
            kind="drift",
            metric="psi",
            feature="amount",
            value=0.9,
            threshold=0.2,
            state=AlertState.firing,
            window_start_ms=now - 60_000,
            window_end_ms=now,
            ts_ms=now,
        ),
    }
    for topic, message in valid.items():
        key = f"{model}-{tag}".encode()
        payloads = bad_payloads(tag, message.model_dump(mode="json"))
        produce(
            cluster.kafka_bootstrap,
            topic,
            [(key, payload, None) for payload in payloads.values()]
            + [(key if topic != REQUESTS.name else b"card-7", encode(message), None)],
        )
    return Sent(tag, now, valid)


def dead_letters(cluster, tag: str, until: Callable[[list[DeadLetter]], bool]) -> list[DeadLetter]:
    """The dead letters whose original carries `tag`, read until `until` holds."""

    def ours(messages) -> list[DeadLetter]:
        letters = []
        for message in messages:
            try:
                letter = decode(DeadLetter, message.value())
            except DecodeError:
                continue
            if tag.encode() in letter.original:
                letters.append(letter)
        return letters

    return ours(read_topic(cluster.kafka_bootstrap, DLQ.name, lambda ms: until(ours(ms)), 120))


def expected_consumers(running: Running) -> dict[str, set[str]]:
    group = running.monitor_group
    return {
        REQUESTS.name: {"inference"},
        EVENTS.name: {running.features_app_id, f"{group}.events"},
        LABELS.name: {f"{group}.labels"},
        PREDICTIONS.name: {f"{group}.predictions"},
        MODELS.name: {CONTROL_GROUP},
        ROUTING.name: {CONTROL_GROUP, FOLLOWER_GROUP},
        ALERTS.name: {FOLLOWER_GROUP, f"{group}.restore"},
    }


def consumer_of(letter: DeadLetter) -> str:
    """The consumer group, with the inference worker's random suffix dropped."""
    group = letter.consumer_group
    return "inference" if group.startswith("inference.") else group


def test_every_consumer_dead_letters_each_bad_message_with_its_reason(cluster, running, sent):
    # the monitor reads sluice.alerts only when it starts: start-up is when it dead-letters
    assert sent.valid[ALERTS.name].alert_id in {
        a.alert_id for a in published_alerts(running.monitor_settings)
    }
    expected = {
        (topic, consumer, code)
        for topic, consumers in expected_consumers(running).items()
        for consumer in consumers
        for code in BAD_KINDS
    }

    def found(letters: list[DeadLetter]) -> set[tuple[str, str, str]]:
        return {(x.source_topic, consumer_of(x), x.error.code) for x in letters}

    letters = dead_letters(cluster, sent.tag, lambda ls: found(ls) >= expected)
    assert found(letters) == expected, "a consumer dead-lettered what it should not have"
    for letter in letters:
        assert letter.partition == 0 and letter.offset >= 0
        if letter.error.code == "message_too_large":
            assert letter.error.details["max_bytes"] == DEFAULT_MAX_MESSAGE_BYTES
            assert letter.error.details["bytes"] > DEFAULT_MAX_MESSAGE_BYTES
            assert len(letter.original) < DEFAULT_MAX_MESSAGE_BYTES  # cut, and says so
            assert letter.error.details["original_truncated_from_bytes"] > HUGE_BYTES
        elif letter.error.code == "unsupported_schema_version":
            assert letter.error.details["received"] == 99
        else:
            assert letter.original.startswith(b"\xff\xfe\x00 not json")


def test_every_consumer_handles_the_valid_message_sent_after_the_bad_ones(cluster, running, sent):
    model, tag = running.model, sent.tag
    store = Store.from_settings(running.monitor_settings)

    def rows(table: str, column: str, value: str) -> int:
        sql = f"SELECT count() FROM {{db}}.{table} WHERE {column} = %(v)s"
        return int(store.query(sql, {"v": value})[0][0])

    # inference worker: the request is scored
    request_id = sent.valid[REQUESTS.name].request_id
    read_topic(
        cluster.kafka_bootstrap,
        PREDICTIONS.name,
        lambda ms: any(body_of(m).get("request_id") == request_id for m in ms),
        60,
    )
    # monitor sinks: the event, the label and the prediction are stored
    wait_for(lambda: rows("events", "event_id", f"{tag}-event") == 1, 60)
    wait_for(lambda: rows("labels", "request_id", f"{tag}-label") == 1, 60)
    wait_for(lambda: rows("predictions", "request_id", f"{tag}-prediction") == 1, 60)
    # features: the event counts in the card's online features
    redis, registry = Redis.from_url(cluster.redis_url), FeatureRegistry.load(DEMO_DEFINITIONS)

    def counted() -> bool:
        (vector,) = read_online(
            redis, registry, [("card", f"{tag}-card", ["card_txn_count_1h"])], sent.started_ms
        )
        return vector.values["card_txn_count_1h"] == 1.0 and not vector.defaulted

    wait_for(counted, 60)
    # inference control plane: version 3 was registered (a pinned request is scored by it) and
    # routing revision 2 is in force (version 2 is champion for everyone now)
    scored = scored_by(cluster, model, tag)
    assert ("3", "pinned") in scored and ("2", "champion") in scored, scored
    # rollout follower: the routing table and the alert were taken in
    follower = running.controller.app.follower
    wait_for(lambda: (follower.table(model) or sent.valid[ROUTING.name]).revision == 2, 30)
    assert follower.table(model) == sent.valid[ROUTING.name]
    wait_for(lambda: any(a.metric == "psi" for a in follower.firing(model, "2", 0)), 30)


def scored_by(cluster, model: str, tag: str, timeout_s: float = 60) -> set[tuple[str, str]]:
    """(version, route) of successful predictions for requests sent until version 3 answers a
    pinned request and version 2 answers as champion (the control plane applies messages on its
    own thread, so the first requests may still meet the old state)."""
    producer = Producer({"bootstrap.servers": cluster.kafka_bootstrap, "linger.ms": 1})
    wanted = {("3", "pinned"), ("2", "champion")}
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout_s
    attempt = 0
    while not wanted <= seen and time.monotonic() < deadline:
        attempt += 1
        requests = [
            inference_tests.request(model, attempt, request_id=f"{tag}-pin-{attempt}", version="3"),
            inference_tests.request(model, attempt, request_id=f"{tag}-live-{attempt}"),
        ]
        for request in requests:
            producer.produce(REQUESTS.name, encode(request), request.entity_id)
        assert producer.flush(10) == 0
        ids = {r.request_id for r in requests}
        bodies = json_bodies(
            read_topic(
                cluster.kafka_bootstrap,
                PREDICTIONS.name,
                lambda ms, ids=ids: ids <= {body_of(m).get("request_id") for m in ms},
                30,
            )
        )
        seen |= {
            (b["version"], b["route"])
            for b in bodies
            if b.get("request_id") in ids and b.get("error") is None
        }
        time.sleep(0.2)
    return seen


def test_the_gateway_reply_listener_dead_letters_a_bad_awaited_reply_and_goes_on(cluster):
    """A reply the gateway waits for that is garbage, too big or from a newer schema goes to the
    DLQ; the next, valid reply for the same request completes it."""
    group = unique("gateway-replies")
    settings = SluiceSettings(kafka_bootstrap=cluster.kafka_bootstrap)
    tag = f"reply-{uuid.uuid4().hex[:10]}"
    request_id = f"{tag}-request"
    now = int(time.time() * 1000)
    reply = Prediction(
        request_id=request_id,
        model="m",
        version="1",
        route=Route.champion,
        entity_id="e",
        score=0.5,
        created_at_ms=now,
        scored_at_ms=now,
    )

    async def scenario() -> dict:
        listener = ReplyListener(settings, group)
        listener.start(asyncio.get_running_loop())
        try:
            deadline = time.monotonic() + 30
            while not listener.ready():
                assert time.monotonic() < deadline, "no reply partitions assigned"
                await asyncio.sleep(0.1)
            # a first reply proves the listener is fetching: it starts at the latest offset,
            # which it looks up only after the assignment
            partition = listener.partitions[0]
            probe = reply.model_copy(update={"request_id": f"{tag}-probe"})
            probed = listener.expect(probe.request_id)
            probe_headers = {"request_id": probe.request_id.encode()}
            while not probed.done():
                await asyncio.to_thread(
                    produce,
                    cluster.kafka_bootstrap,
                    PREDICTIONS.name,
                    [(b"e", encode(probe), probe_headers)],
                    partition,
                )
                await asyncio.wait([probed], timeout=1)
            waiting = listener.expect(request_id)
            headers = {"request_id": request_id.encode()}
            payloads = bad_payloads(tag, reply.model_dump(mode="json"))
            broken_header = {"request_id": b"\xff\xfe not utf-8"}
            items = [(b"e", p, headers) for p in payloads.values()]
            items += [(b"e", b"ignored", broken_header), (b"e", encode(reply), headers)]
            await asyncio.to_thread(
                produce, cluster.kafka_bootstrap, PREDICTIONS.name, items, partition
            )
            return await asyncio.wait_for(waiting, 60)
        finally:
            listener.close()

    answered = asyncio.run(scenario())
    assert answered.request_id == request_id and answered.score == 0.5

    def listeners(letters: list[DeadLetter]) -> set[tuple[str, str]]:
        # the monitor's predictions sink, if running, dead-letters the same records as well
        return {(x.source_topic, x.error.code) for x in letters if x.consumer_group == group}

    letters = dead_letters(cluster, tag, lambda ls: len(listeners(ls)) >= len(BAD_KINDS))
    assert listeners(letters) == {(PREDICTIONS.name, code) for code in BAD_KINDS}
