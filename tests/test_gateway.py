"""The HTTP gateway against the local cluster, with a real inference consumer behind it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from redis import Redis

from schemas.topics import EVENTS, LABELS, PREDICTIONS
from services.common.apikeys import hash_key
from services.features.client import write_features
from tests.faults.support import metric_total
from tests.helpers.gateway import GatewayProcess, secured_gateway, serving
from tests.helpers.models import CARD_FEATURES, FEATURES, MERCHANT_FEATURES, write_version
from tests.support import body_of, json_bodies, read_topic, unique

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory):
    """A model repository, seeded online features, an inference worker and one gateway."""
    root = tmp_path_factory.mktemp("gateway-models")
    model = unique("fraud").replace(".", "-")
    write_version(root, model, "1", "gbdt")
    redis = Redis.from_url(cluster.redis_url)
    rng = np.random.default_rng(5)
    for entity, names, count in (("card", CARD_FEATURES, 200), ("merchant", MERCHANT_FEATURES, 20)):
        for i in range(count):
            values = dict(zip(names, rng.normal(size=len(names)).tolist(), strict=True))
            write_features(redis, entity, f"gw-{entity}-{i}", values, {n: 1 for n in names})

    def warm_up(gateway: GatewayProcess) -> None:
        response = httpx.post(
            f"{gateway.url}/v1/models/{model}/predict",
            json={**body(0), "timeout_ms": 30_000},
            timeout=40,
        )
        assert response.status_code == 200, response.text

    with serving(cluster, root, warm_up) as served:
        yield {"model": model, "root": root, **served}


def body(i: int, **extra) -> dict:
    rng = np.random.default_rng(i)
    features = {f"req_f{j}": float(v) for j, v in enumerate(rng.normal(size=8))}
    features["merchant_id"] = f"gw-merchant-{i % 20}"
    # requests meant to succeed get 5 s: the 1 s default is tight on a loaded 2-core machine
    return {"entity_id": f"gw-card-{i % 200}", "features": features, "timeout_ms": 5000, **extra}


def test_sync_predict_returns_the_score_logged_on_the_predictions_topic(cluster, stack):
    url, model = stack["gateway"].url, stack["model"]
    request_id = f"sync-{uuid.uuid4().hex[:8]}"
    response = httpx.post(
        f"{url}/v1/models/{model}/predict", json=body(1, request_id=request_id), timeout=10
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["request_id"] == request_id and answer["version"] == "1"
    assert answer["route"] == "champion" and 0.0 <= answer["score"] <= 1.0
    logged = read_topic(
        cluster.kafka_bootstrap,
        PREDICTIONS.name,
        lambda ms: any(body_of(m).get("request_id") == request_id for m in ms),
        30,
    )
    prediction = next(p for p in json_bodies(logged) if p["request_id"] == request_id)
    assert prediction["score"] == answer["score"]
    again = httpx.post(
        f"{url}/v1/models/{model}/predict", json=body(1, request_id=request_id), timeout=10
    )
    assert again.json()["score"] == answer["score"], "the idempotency key returns the same answer"


def test_batch_predict_answers_every_instance_in_order(stack):
    url, model = stack["gateway"].url, stack["model"]
    instances = [body(i, request_id=f"b-{uuid.uuid4().hex[:6]}-{i}") for i in range(20)]
    response = httpx.post(
        f"{url}/v1/models/{model}/predict:batch",
        json={"instances": instances, "timeout_ms": 5000},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["request_id"] for p in predictions] == [i["request_id"] for i in instances]
    assert all(0 <= p["score"] <= 1 for p in predictions)


def test_two_gateways_each_read_only_their_own_reply_partitions(cluster, stack):
    second = GatewayProcess({**stack["env"], "SLUICE_INGEST_REPLY_GROUP": stack["group"]})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait for the group to rebalance over both
            mine = httpx.get(f"{stack['gateway'].url}/readyz").json()["reply_partitions"]
            try:
                theirs = second.wait_ready(5)["reply_partitions"]
            except TimeoutError:
                continue
            if mine and theirs and len(mine) + len(theirs) == 8:
                break
            time.sleep(0.5)
        assert set(mine).isdisjoint(theirs) and len(mine) + len(theirs) == 8
        sent: dict[str, set[int]] = {}
        for gateway, partitions in ((stack["gateway"], mine), (second, theirs)):
            for i in range(10):
                rid = f"two-{uuid.uuid4().hex[:8]}"
                response = httpx.post(
                    f"{gateway.url}/v1/models/{stack['model']}/predict",
                    json=body(i, request_id=rid),
                    timeout=10,
                )
                assert response.status_code == 200, response.text
                sent[rid] = set(partitions)
        logged = read_topic(
            cluster.kafka_bootstrap,
            PREDICTIONS.name,
            lambda ms: sent.keys() <= {body_of(m).get("request_id") for m in ms},
            30,
        )
        for message in logged:
            rid = body_of(message).get("request_id")
            if rid in sent:
                assert message.partition() in sent[rid]
    finally:
        second.stop()


def owns_every_reply_partition(gateway: GatewayProcess, timeout_s: float = 30) -> None:
    """Wait until the rebalance after another gateway left has settled on this one."""
    deadline = time.monotonic() + timeout_s
    while len(gateway.wait_ready()["reply_partitions"]) < 8 and time.monotonic() < deadline:
        time.sleep(0.5)


def test_deadline_shorter_than_the_model_path_gives_504_and_the_server_stays_healthy(stack):
    owns_every_reply_partition(stack["gateway"])  # the previous test's second gateway left
    url, model = stack["gateway"].url, stack["model"]
    response = httpx.post(f"{url}/v1/models/{model}/predict?timeout_ms=1", json=body(3), timeout=10)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    assert httpx.get(f"{url}/healthz").status_code == 200
    healthy = httpx.post(
        f"{url}/v1/models/{model}/predict?timeout_ms=5000", json=body(4), timeout=10
    )
    assert healthy.status_code == 200, healthy.text


def test_in_flight_flood_gets_429_then_recovers(stack):
    flooded = GatewayProcess(
        {
            **stack["env"],
            "SLUICE_INGEST_REPLY_GROUP": unique("flood"),
            "SLUICE_INGEST_MAX_IN_FLIGHT": "4",
        }
    )
    try:
        flooded.wait_ready()
        url = f"{flooded.url}/v1/models/{stack['model']}/predict"

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                return await asyncio.gather(*(client.post(url, json=body(i)) for i in range(200)))

        statuses = [r.status_code for r in asyncio.run(flood())]
        assert statuses.count(429) > 0 and set(statuses) <= {200, 429}
        refused = next(r for r in asyncio.run(flood()) if r.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "overloaded"
        after = [httpx.post(url, json=body(i), timeout=10).status_code for i in range(20)]
        assert after == [200] * 20
    finally:
        flooded.stop()


def test_a_gateway_running_behind_sheds_with_429_then_recovers(stack):
    """Under a flood the gateway's own queue (sockets read, requests parsed, tasks waiting for
    their turn) grows before any in-flight limit is reached: past the allowed loop lag the
    excess is refused at once instead of waiting past its deadline."""
    max_lag_ms = 50
    lagging = GatewayProcess(
        {
            **stack["env"],
            "SLUICE_INGEST_REPLY_GROUP": unique("lag"),
            "SLUICE_INGEST_MAX_LOOP_LAG_MS": str(max_lag_ms),
        }
    )
    try:
        lagging.wait_ready()
        url = f"{lagging.url}/v1/models/{stack['model']}/predict?timeout_ms=5000"

        async def flood() -> list[tuple[int, dict, str | None]]:
            # aiohttp: httpx's per-request CPU and its pool's cost with hundreds of
            # connections made the client, not the gateway, the queue.
            connector = aiohttp.TCPConnector(limit=400)
            async with aiohttp.ClientSession(connector=connector) as session:

                async def one(i: int) -> tuple[int, dict, str | None]:
                    async with session.post(url, json=body(i)) as response:
                        payload = await response.json()
                        return response.status, payload, response.headers.get("retry-after")

                return await asyncio.gather(*(one(i) for i in range(1200)))

        answers = asyncio.run(flood())
        statuses = [status for status, _, _ in answers]
        assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
        assert set(statuses) <= {200, 429}
        _, refused, retry_after = next(a for a in answers if a[0] == 429)
        assert retry_after == "1"
        error = refused["error"]
        assert error["code"] == "overloaded"
        assert error["details"]["loop_lag_ms"] > max_lag_ms, error
        lag = metric_total(lagging.url, "sluice_ingest_loop_lag_seconds")
        assert 0 <= lag < max_lag_ms / 1000
        after = [httpx.post(url, json=body(i), timeout=10).status_code for i in range(20)]
        assert after == [200] * 20
    finally:
        lagging.stop()


def test_bad_requests_get_clear_4xx_errors(stack):
    url, model = stack["gateway"].url, stack["model"]
    unknown = httpx.post(f"{url}/v1/models/nope/predict", json=body(1))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_model"
    invalid = httpx.post(f"{url}/v1/models/{model}/predict", json={"features": {"a": [1]}})
    assert invalid.status_code == 422
    locs = {d["loc"] for d in invalid.json()["error"]["details"]}
    assert "body.entity_id" in locs
    missing_once = body(1, entity_id="gw-card-unknown", request_id=f"bad-{uuid.uuid4().hex}")
    missing, repeated = (
        httpx.post(
            f"{url}/v1/models/{model}/predict?timeout_ms=5000", json=missing_once, timeout=10
        )
        for _ in range(2)
    )
    assert missing.status_code == 422 and missing.json()["error"]["code"] == "missing_feature"
    assert (repeated.status_code, repeated.json()) == (422, missing.json()), "idempotent repeat"
    huge = httpx.post(f"{url}/v1/events", content=b"x" * (9 * 1024 * 1024))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    bad_timeout = httpx.post(f"{url}/v1/models/{model}/predict?timeout_ms=-5", json=body(1))
    assert bad_timeout.status_code == 422


def test_ten_thousand_ndjson_events_land_on_the_topic(cluster, stack):
    tag = uuid.uuid4().hex[:8]
    lines = [
        orjson.dumps(
            {
                "event_id": f"{tag}-{i}",
                "event_type": "transaction",
                "ts_ms": 1_000 + i,
                "entities": {"card": f"c{i % 50}"},
                "fields": {"amount": i * 1.5},
            }
        )
        for i in range(10_000)
    ]
    response = httpx.post(
        f"{stack['gateway'].url}/v1/events",
        content=b"\n".join(lines),
        headers={"content-type": "application/x-ndjson"},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 10_000, "rejected": []}

    def ours(messages):
        return {
            body_of(m).get("event_id", "")
            for m in messages
            if body_of(m).get("event_id", "").startswith(tag)
        }

    stored = read_topic(
        cluster.kafka_bootstrap, EVENTS.name, lambda ms: len(ours(ms)) >= 10_000, 60
    )
    assert len(ours(stored)) == 10_000
    assert sum(body_of(m).get("event_id", "").startswith(tag) for m in stored) == 10_000


def test_a_batch_with_three_bad_lines_names_exactly_those_lines(cluster, stack):
    tag = uuid.uuid4().hex[:8]
    lines = [
        orjson.dumps({"request_id": f"{tag}-{i}", "entity_id": "c1", "value": 1.0, "ts_ms": i})
        for i in range(10)
    ]
    lines[2] = b'{"request_id": "x", "entity_id": "c1", "value": "yes", "ts_ms": 1}'
    lines[5] = b"this is not json"
    lines[8] = b'{"entity_id": "c1", "value": 0.0, "ts_ms": 1}'
    response = httpx.post(f"{stack['gateway'].url}/v1/labels", content=b"\n".join(lines))
    assert response.status_code == 202
    answer = response.json()
    assert answer["accepted"] == 7
    assert [(r["line"], r["error"]["code"]) for r in answer["rejected"]] == [
        (3, "schema_invalid"),
        (6, "malformed_json"),
        (9, "schema_invalid"),
    ]
    assert answer["rejected"][0]["error"]["details"][0]["loc"] == "value"
    stored = read_topic(
        cluster.kafka_bootstrap,
        LABELS.name,
        lambda ms: sum(str(body_of(m).get("request_id")).startswith(tag) for m in ms) >= 7,
        30,
    )
    assert sum(str(body_of(m).get("request_id")).startswith(tag) for m in stored) == 7


def test_api_keys_enforce_roles(stack):
    predict_key, ingest_key = "k-predict-" + uuid.uuid4().hex, "k-ingest-" + uuid.uuid4().hex
    keys = f"app:{hash_key(predict_key)}:predict,loader:{hash_key(ingest_key)}:ingest"
    with secured_gateway(stack["env"], keys) as secured:
        url = f"{secured.url}/v1/models/{stack['model']}/predict?timeout_ms=5000"
        assert httpx.post(url, json=body(1)).status_code == 401
        assert httpx.post(url, json=body(1), headers={"x-api-key": "wrong"}).status_code == 401
        denied = httpx.post(url, json=body(1), headers={"authorization": f"Bearer {ingest_key}"})
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        allowed = httpx.post(
            url, json=body(1), timeout=10, headers={"authorization": f"Bearer {predict_key}"}
        )
        assert allowed.status_code == 200
        assert httpx.get(f"{secured.url}/healthz").status_code == 200


def direct_scores(root: Path, model: str, matrix: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(root / model / "1" / "model.onnx"))
    return session.run(None, {session.get_inputs()[0].name: matrix.astype(np.float32)})[1]


def test_open_inference_protocol_infer_matches_a_direct_onnx_run(stack):
    url, model, root = stack["gateway"].url, stack["model"], stack["root"]
    meta = httpx.get(f"{url}/v2/models/{model}").json()
    assert meta["name"] == model and meta["versions"] == ["1"]
    assert meta["inputs"] == [
        {"name": meta["inputs"][0]["name"], "datatype": "FP32", "shape": [-1, 20]}
    ]
    assert {o["name"]: o["datatype"] for o in meta["outputs"]} == {
        "label": "INT64",
        "probabilities": "FP32",
    }
    assert httpx.get(f"{url}/v2/models/{model}/ready").json() == {"name": model, "ready": True}
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}

    matrix = np.random.default_rng(9).normal(size=(3, 20)).astype(np.float32)
    request = {
        "id": "oip-1",
        "parameters": {"timeout_ms": 5000},
        "inputs": [
            {
                "name": meta["inputs"][0]["name"],
                "shape": [3, 20],
                "datatype": "FP32",
                "data": matrix.ravel().tolist(),
            }
        ],
    }
    response = httpx.post(f"{url}/v2/models/{model}/infer", json=request, timeout=10)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == model and answer["model_version"] == "1"
    assert answer["id"] == "oip-1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["probabilities"]["shape"] == [3, 2]
    assert outputs["label"] == {
        "name": "label",
        "datatype": "INT64",
        "shape": [3],
        "data": outputs["label"]["data"],
    }
    np.testing.assert_allclose(
        np.array(outputs["probabilities"]["data"]).reshape(3, 2),
        direct_scores(root, model, matrix),
        atol=1e-6,
    )

    per_feature = {
        "inputs": [
            {"name": name, "shape": [3], "datatype": "FP32", "data": matrix[:, j].tolist()}
            for j, name in enumerate(FEATURES)
        ],
        "outputs": [{"name": "probabilities"}],
        "parameters": {"timeout_ms": 5000},
    }
    response = httpx.post(f"{url}/v2/models/{model}/versions/1/infer", json=per_feature, timeout=10)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(
        np.array(response.json()["outputs"][0]["data"]).reshape(3, 2),
        direct_scores(root, model, matrix),
        atol=1e-6,
    )


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        (
            "/v2/models/nope/infer",
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]},
            404,
        ),
        (
            "/v2/models/{model}/infer",
            {"inputs": [{"name": "input", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]},
            400,
        ),
        (
            "/v2/models/{model}/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [1, 20], "datatype": "BYTES", "data": ["a"] * 20}
                ]
            },
            400,
        ),
        (
            "/v2/models/{model}/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [2, 20], "datatype": "FP32", "data": [1.0] * 20}
                ]
            },
            400,
        ),
        ("/v2/models/{model}/infer", {"inputs": []}, 400),
        (
            "/v2/models/{model}/versions/7/infer",
            {
                "inputs": [
                    {"name": "input", "shape": [1, 20], "datatype": "FP32", "data": [0.0] * 20}
                ]
            },
            404,
        ),
        ("/v2/models/nope", None, 404),
    ],
)
def test_open_inference_protocol_errors_use_the_protocol_error_body(stack, path, payload, status):
    url = stack["gateway"].url + path.format(model=stack["model"])
    response = httpx.post(url, json=payload) if payload is not None else httpx.get(url)
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and isinstance(response.json()["error"], str)


def test_schemathesis_finds_no_server_error_on_any_endpoint(stack, tmp_path):
    """Property-based requests from the gateway's own OpenAPI document: never a 5xx. Path
    parameters are pinned to the served model, so requests reach the model path instead of
    stopping at 404."""
    stack["gateway"].wait_ready()
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.model" = "{stack["model"]}"\n"path.version" = "1"\n')
    schemathesis = Path(sys.executable).parent / "schemathesis"
    command = [str(schemathesis)] if schemathesis.exists() else ["schemathesis"]
    result = subprocess.run(
        [
            *command,
            "--config-file",
            str(config),
            "run",
            f"{stack['gateway'].url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--generation-deterministic",
            "--phases",
            "examples,fuzzing",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
