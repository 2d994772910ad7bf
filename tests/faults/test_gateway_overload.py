"""Gateway overload: far more concurrent synchronous predictions than its in-flight limit.

The excess is refused at once with 429 `overloaded` (and `Retry-After`), the admitted requests
are answered, memory stays bounded, the process survives, and once the flood stops the gateway
serves normally again.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from redis import Redis

from tests.faults.support import (
    Answer,
    metric_total,
    predictions_for,
    request_body,
    rss_bytes,
    seed_online_features,
    summary,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MAX_IN_FLIGHT = 100
FLOOD = 1500
"""Concurrent requests per wave."""
WAVES = 3
RSS_GROWTH_LIMIT = 96 * 1024 * 1024
"""The gateway's resident memory may grow by at most this much over the whole flood..."""
RSS_PLATEAU_LIMIT = 24 * 1024 * 1024
"""... and by at most this much after the first wave: it plateaus instead of growing per wave."""


async def wave(url: str, bodies: list[dict]) -> list[Answer]:
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(body: dict) -> Answer:
            sent = time.monotonic()
            try:
                response = await client.post(url, json=body)
                status, payload = response.status_code, response.json()
                if status == 429:
                    assert response.headers["retry-after"] == "1"
            except (httpx.HTTPError, ValueError) as exc:
                status, payload = 0, {"exception": repr(exc)}
            return Answer(body["request_id"], sent, time.monotonic() - sent, status, payload)

        return list(await asyncio.gather(*(one(body) for body in bodies)))


def test_overload_is_refused_with_429_in_bounded_memory_and_recovers(fault_cluster, stack):
    prefix = "flood-"
    seed_online_features(Redis.from_url(fault_cluster.redis_url), prefix)
    stack.add("inference")
    stack.add("ingest", SLUICE_INGEST_MAX_IN_FLIGHT=str(MAX_IN_FLIGHT))
    stack.start()
    gateway = stack.url("ingest")
    url = f"{gateway}/v1/models/fraud/predict"
    tag = uuid.uuid4().hex[:8]
    warm = [request_body(prefix, i, f"{tag}-w{i}", 5000) for i in range(50)]
    assert {a.status for a in asyncio.run(wave(url, warm))} == {200}
    rss_start = rss_bytes(stack.pid("ingest"))

    answers: list[Answer] = []
    rss_waves = []
    for w in range(WAVES):
        bodies = [request_body(prefix, i, f"{tag}-f{w}-{i}", 5000) for i in range(FLOOD)]
        answers += asyncio.run(wave(url, bodies))
        rss_waves.append(rss_bytes(stack.pid("ingest")))
    rss_end = rss_waves[-1]

    outcomes = summary(answers)
    assert stack.alive("ingest"), stack.log_tail("ingest")
    assert set(outcomes) <= {(200, None), (429, "overloaded")}, outcomes
    assert outcomes.get((429, "overloaded"), 0) > 0 and outcomes.get((200, None), 0) > 0
    assert rss_end - rss_start < RSS_GROWTH_LIMIT, (rss_start, rss_waves)
    assert rss_end - rss_waves[0] < RSS_PLATEAU_LIMIT, (rss_start, rss_waves)
    assert metric_total(gateway, "sluice_ingest_in_flight") == 0

    after = [request_body(prefix, i, f"{tag}-a{i}", 5000) for i in range(50)]
    recovered = asyncio.run(wave(url, after))
    assert [a.status for a in recovered] == [200] * len(after), summary(recovered)

    served = {a.request_id for a in answers + recovered if a.status == 200}
    refused = {a.request_id for a in answers if a.status == 429}
    time.sleep(1)
    logged = {p["request_id"] for p in predictions_for(fault_cluster.kafka_bootstrap, None)}
    assert served <= logged, "every 200 was scored and logged"
    assert refused.isdisjoint(logged), "a refused request never reaches Kafka"
    assert len(logged) == len(served) + len(warm)
    print(
        f"\n{WAVES} waves of {FLOOD}: {outcomes}; gateway RSS {rss_start / 2**20:.0f} MiB, "
        f"after each wave {[round(r / 2**20) for r in rss_waves]} MiB; 50/50 served after"
    )
