"""The inference service end to end on the local cluster: requests in, predictions out."""

from __future__ import annotations

import gc
import threading
import time
import uuid

import numpy as np
import onnxruntime as ort
import pytest
from confluent_kafka import Producer
from redis import Redis

from schemas.messages import (
    DeadLetter,
    Prediction,
    PredictionRequest,
    RouteRole,
    RoutingEntry,
    RoutingTable,
)
from schemas.topics import DLQ, PREDICTIONS, REQUESTS, ROUTING
from services.common.codec import decode, encode
from services.common.routing import route_for
from services.features.client import write_features
from services.inference.app import build, learn_partitions
from services.inference.settings import InferenceSettings
from tests.helpers.models import CARD_FEATURES, FEATURES, MERCHANT_FEATURES, write_version
from tests.support import body_of, json_bodies, produce_all, read_topic, unique

pytestmark = pytest.mark.integration

CARDS, MERCHANTS = 500, 50


@pytest.fixture(scope="module")
def online_store(cluster):
    """Seeded card and merchant features; returns the values by (entity, id)."""
    redis = Redis.from_url(cluster.redis_url)
    rng = np.random.default_rng(3)
    values: dict[tuple[str, str], dict[str, float]] = {}
    for entity, count, names in (
        ("card", CARDS, CARD_FEATURES),
        ("merchant", MERCHANTS, MERCHANT_FEATURES),
    ):
        for i in range(count):
            row = {
                name: float(np.float32(v))
                for name, v in zip(names, rng.normal(size=len(names)), strict=True)
            }
            write_features(redis, entity, f"{entity}-{i}", row, {n: 1_000 for n in names})
            values[(entity, f"{entity}-{i}")] = row
    return values


@pytest.fixture(scope="module")
def serving(cluster, online_store, tmp_path_factory):
    """An inference worker (in a thread) serving model versions 1 (GBDT) and 2 (MLP), 30% canary."""
    root = tmp_path_factory.mktemp("models")
    model = unique("fraud").replace(".", "-")
    write_version(root, model, "1", "gbdt")
    write_version(root, model, "2", "mlp")
    table = RoutingTable(
        model=model,
        entries=[
            RoutingEntry(version="1", role=RouteRole.champion, weight=0.7),
            RoutingEntry(version="2", role=RouteRole.canary, weight=0.3),
        ],
        revision=1,
        updated_at_ms=int(time.time() * 1000),
    )
    produce_all(cluster.kafka_bootstrap, ROUTING.name, [(model, encode(table))])
    settings = InferenceSettings(
        **{k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()},
        model_repository=root,
        inference_group_id=unique("inference"),
        inference_max_batch_size=128,
        metrics_port=0,
    )
    worker, service, control = build(settings)
    learn_partitions(worker, service)
    assert service.prediction_partitions == list(range(PREDICTIONS.partitions))
    assert service.load_repository(root) == 2
    control.start()
    assert control.caught_up.wait(30)
    assert service.tables[model].revision == 1
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    yield model, root, table
    worker.stop()
    thread.join(30)
    control.stop()


def request(model_name: str, i: int, **overrides) -> PredictionRequest:
    rng = np.random.default_rng(i)
    features = {f"req_f{j}": float(np.float32(v)) for j, v in enumerate(rng.normal(size=8))}
    features["merchant_id"] = f"merchant-{i % MERCHANTS}"
    fields = {
        "request_id": f"{model_name}-r{i}",
        "model": model_name,
        "entity_id": f"card-{i % CARDS}",
        "features": features,
        "created_at_ms": int(time.time() * 1000),
    }
    fields.update(overrides)
    return PredictionRequest(**fields)


def expected_vector(req: PredictionRequest, online) -> list[float]:
    card = online[("card", req.entity_id)]
    merchant = online[("merchant", req.features["merchant_id"])]
    return (
        [card[n] for n in CARD_FEATURES]
        + [merchant[n] for n in MERCHANT_FEATURES]
        + [req.features[f"req_f{j}"] for j in range(8)]
    )


def predictions_of(cluster, model: str, until) -> list[Prediction]:
    def mine(messages):
        return [p for p in json_bodies(messages) if p.get("model") == model]

    messages = read_topic(
        cluster.kafka_bootstrap, PREDICTIONS.name, lambda ms: until(mine(ms)), timeout_s=120
    )
    return [Prediction.model_validate(p) for p in mine(messages)]


def test_ten_thousand_requests_get_exact_scores_from_the_routed_version(
    cluster, serving, online_store
):
    model, root, table = serving
    requests = [request(model, i) for i in range(10_000)]
    produce_all(
        cluster.kafka_bootstrap, REQUESTS.name, ((r.entity_id, encode(r)) for r in requests)
    )
    predictions = predictions_of(cluster, model, lambda ps: len(ps) >= 10_000)

    assert len(predictions) == 10_000
    by_id = {p.request_id: p for p in predictions}
    assert set(by_id) == {r.request_id for r in requests}
    sessions = {v: ort.InferenceSession(str(root / model / v / "model.onnx")) for v in ("1", "2")}
    vectors = {v: [] for v in sessions}
    served = {v: [] for v in sessions}
    for req in requests:
        prediction = by_id[req.request_id]
        assert prediction.error is None
        assert (prediction.version, prediction.route) == route_for(req.entity_id, table)
        vector = expected_vector(req, online_store)
        assert [prediction.features[n] for n in FEATURES] == pytest.approx(vector, abs=1e-7)
        vectors[prediction.version].append(vector)
        served[prediction.version].append(prediction.score)
    for version, session in sessions.items():
        direct = session.run(
            None, {session.get_inputs()[0].name: np.array(vectors[version], dtype=np.float32)}
        )[1][:, 1]
        np.testing.assert_allclose(served[version], direct, atol=1e-6, rtol=0)
    canary_share = len(served["2"]) / len(requests)
    assert 0.2 < canary_share < 0.4


def test_bad_requests_get_error_predictions_and_the_consumer_keeps_going(cluster, serving):
    model, _root, _table = serving
    tag = uuid.uuid4().hex[:6]
    cases = {
        "unknown_model": request(model, 1, request_id=f"bad-{tag}-1", model=f"{model}-nope"),
        "missing_feature": request(model, 2, request_id=f"bad-{tag}-2", entity_id="card-unseen"),
        "wrong_dtype": request(
            model,
            3,
            request_id=f"bad-{tag}-3",
            features={**request(model, 3).features, "req_f0": "high"},
        ),
        "unknown_version": request(model, 4, request_id=f"bad-{tag}-4", version="9"),
        "oversized_request": request(
            model, 5, request_id=f"bad-{tag}-5", features={f"x{i}": 1.0 for i in range(2000)}
        ),
    }
    good = request(model, 6, request_id=f"good-{tag}")
    payloads = [(r.entity_id, encode(r)) for r in cases.values()]
    payloads.insert(2, (b"card-1", b'{"request_id": "broken'))
    payloads.append((good.entity_id, encode(good)))
    produce_all(cluster.kafka_bootstrap, REQUESTS.name, payloads, partition=0)

    wanted = {r.request_id for r in cases.values()} | {good.request_id}

    def everything_seen(messages):
        seen = {body_of(m).get("request_id") for m in messages}
        return wanted <= seen

    messages = read_topic(cluster.kafka_bootstrap, PREDICTIONS.name, everything_seen, 60)
    results = {p["request_id"]: p for p in json_bodies(messages) if p.get("request_id") in wanted}
    for code, req in cases.items():
        error = results[req.request_id]["error"]
        assert error and error["code"] == code, (code, results[req.request_id])
        assert results[req.request_id].get("score") is None
    assert results[cases["wrong_dtype"].request_id]["error"]["details"]["feature"] == "req_f0"
    assert results[cases["missing_feature"].request_id]["error"]["details"]["feature"] == "card_f0"
    assert results[good.request_id]["error"] is None
    assert 0.0 <= results[good.request_id]["score"] <= 1.0

    letters = read_topic(
        cluster.kafka_bootstrap,
        DLQ.name,
        lambda ms: any(
            decode(DeadLetter, m.value()).original == b'{"request_id": "broken' for m in ms
        ),
        30,
    )
    letter = next(
        decode(DeadLetter, m.value())
        for m in letters
        if decode(DeadLetter, m.value()).original == b'{"request_id": "broken'
    )
    assert letter.source_topic == REQUESTS.name and letter.error.code == "malformed_json"


def test_predictions_nobody_waits_for_take_turns_on_partitions_keeping_their_key(cluster, serving):
    """Asynchronous predictions are placed sticky (one partition per time slice, in turn) so a
    batch's predictions share a record batch; the key stays the entity id."""
    model, _root, _table = serving
    tag = uuid.uuid4().hex[:6]
    requests = [request(model, i, request_id=f"async-{tag}-{i}") for i in range(2_000)]
    produce_all(
        cluster.kafka_bootstrap, REQUESTS.name, ((r.entity_id, encode(r)) for r in requests)
    )
    wanted = {r.request_id: r.entity_id for r in requests}
    messages = read_topic(
        cluster.kafka_bootstrap,
        PREDICTIONS.name,
        lambda ms: sum(body_of(m).get("request_id") in wanted for m in ms) >= len(wanted),
        60,
    )
    mine = [m for m in messages if body_of(m).get("request_id") in wanted]
    assert len(mine) == len(wanted)
    assert all(m.key().decode() == wanted[body_of(m)["request_id"]] for m in mine)
    slice_ms = InferenceSettings.model_fields["inference_partition_slice_ms"].default
    partitions = PREDICTIONS.partitions
    turns = {(m.partition() - body_of(m)["scored_at_ms"] // slice_ms) % partitions for m in mine}
    assert len(turns) == 1, "each slice's partition follows from its scoring time"


def test_shadow_copies_are_scored_off_the_reply_path_after_a_routing_change(cluster, serving):
    model, _root, _table = serving
    table = RoutingTable(
        model=model,
        entries=[
            RoutingEntry(version="1", role=RouteRole.champion, weight=1.0),
            RoutingEntry(version="2", role=RouteRole.shadow, weight=0.0, shadow_sample_rate=1.0),
        ],
        revision=2,
        updated_at_ms=int(time.time() * 1000),
    )
    produce_all(cluster.kafka_bootstrap, ROUTING.name, [(model, encode(table))])
    tag = uuid.uuid4().hex[:6]
    requests = [request(model, i, request_id=f"shadow-{tag}-{i}") for i in range(50)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the control plane applies revision 2 asynchronously
        probe = request(model, 0, request_id=f"probe-{uuid.uuid4().hex[:6]}")
        produce_all(cluster.kafka_bootstrap, REQUESTS.name, [(probe.entity_id, encode(probe))])
        seen = predictions_of(
            cluster, model, lambda ps, rid=probe.request_id: any(p["request_id"] == rid for p in ps)
        )
        if any(p.request_id == probe.request_id and p.route == "shadow" for p in seen):
            break
    producer = Producer({"bootstrap.servers": cluster.kafka_bootstrap})
    for req in requests:
        producer.produce(
            REQUESTS.name, encode(req), key=req.entity_id, headers={"reply_partition": "3"}
        )
    assert producer.flush(10) == 0

    wanted = {r.request_id for r in requests}
    consumer_messages = read_topic(
        cluster.kafka_bootstrap,
        PREDICTIONS.name,
        lambda ms: sum(body_of(m).get("request_id") in wanted for m in ms) >= 100,
        60,
    )
    mine = [m for m in consumer_messages if body_of(m).get("request_id") in wanted]
    live = [m for m in mine if body_of(m).get("route") == "champion"]
    shadow = [m for m in mine if body_of(m).get("route") == "shadow"]
    assert len(live) == len(shadow) == 50
    assert all(m.partition() == 3 for m in live), "live replies go to the reply partition"
    assert all(dict(m.headers())["route"] == b"shadow" for m in shadow)
    assert {body_of(m).get("version") for m in shadow} == {"2"}


def test_a_routing_table_naming_a_version_this_repository_lacks_leaves_routing_as_it_was(
    tmp_path, caplog
):
    """Processes serving different repositories share `sluice.routing`: a table for a version
    that is not here is a warning, not an error with a traceback, and moves no traffic."""
    write_version(tmp_path, "fraud", "1", "gbdt")
    settings = InferenceSettings(
        kafka_bootstrap="127.0.0.1:1", model_repository=tmp_path, metrics_port=0
    )
    worker, service, control = build(settings)
    service.load_repository(tmp_path)
    tables = [
        RoutingTable(
            model="fraud",
            entries=[RoutingEntry(version=version, role=RouteRole.champion, weight=1.0)],
            revision=revision,
            updated_at_ms=1,
        )
        for revision, version in ((1, "1"), (2, "9"))
    ]
    try:
        control.apply(ROUTING.name, encode(tables[0]))
        with caplog.at_level("WARNING", logger="services.inference.control"):
            control.apply(ROUTING.name, encode(tables[1]))
    finally:  # clients of a broker that is not there: destroyed, not left reconnecting
        worker.close()
        control.consumer.close()
        control.dead_letters.close(0)
        del worker, control
        gc.collect()  # bound callbacks keep the clients in reference cycles
    assert service.tables["fraud"].revision == 1
    (record,) = [r for r in caplog.records if r.name == "services.inference.control"]
    assert record.levelname == "WARNING" and record.exc_info is None
    assert "not_found" in record.error
