"""The online store against a real Redis: the read path inference uses, and the atomic commit
that keeps values, window state and offset markers together."""

from __future__ import annotations

import time

import orjson
import pytest
from redis import Redis

from schemas.messages import Event
from services.features.client import (
    UnknownFeature,
    encode_snapshot,
    feature_key,
    read_online,
    read_snapshots,
    snapshot_key,
    write_features,
)
from services.features.definitions import FeatureRegistry
from services.features.store import (
    LOAD_KEYS_PER_CALL,
    CommitBatch,
    CommitConflict,
    StateStore,
    encode_observation,
    marker_key,
    migrate_snapshots,
    observation_field,
)
from services.features.stream import Applier, Router, SourceRecord
from services.features.windows import Observation
from tests.support import unique
from tests.test_features_support import DEMO_DEFINITIONS

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


@pytest.fixture
def redis(cluster) -> Redis:
    return Redis.from_url(cluster.redis_url)


def store_values(redis: Redis, entity: str, entity_id: str, values: dict, clock: int) -> None:
    """What the features service writes for one entity (docs/features.md)."""
    state = {"@ts": clock, "~transaction\x1fe1": "[0,0,{}]"}
    redis.hset(feature_key(entity, entity_id), mapping=state)
    redis.set(snapshot_key(entity, entity_id), encode_snapshot(clock, values))


def test_read_online_serves_many_entities_with_defaults_freshness_and_ttl(redis):
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    now = int(time.time() * 1000)
    prefix = unique("read")
    names = registry.plan("card").names
    fresh, stale = f"{prefix}-fresh", f"{prefix}-stale"
    store_values(
        redis, "card", fresh, {"card_txn_count_1h": 3.0, "card_last_amount": 9.5}, now - 5000
    )
    store_values(redis, "card", stale, {"card_txn_count_1h": 7.0}, now - 8 * DAY_MS)
    store_values(redis, "merchant", f"{prefix}-m", {"merchant_txn_count_1h": 42.0}, now - 1000)
    wanted = [
        ("card", fresh, names),
        ("card", stale, ["card_txn_count_1h"]),
        ("card", f"{prefix}-nobody", ["card_txn_count_1h", "card_amount_mean_24h"]),
        ("merchant", f"{prefix}-m", ["merchant_txn_count_1h", "merchant_amount_mean_24h"]),
    ]
    found, expired, missing, merchant = read_online(redis, registry, wanted, now)
    assert found.values["card_txn_count_1h"] == 3.0
    assert found.values["card_last_amount"] == 9.5
    assert "card_txn_count_1h" not in found.defaulted
    assert set(found.defaulted) == set(names) - {"card_txn_count_1h", "card_last_amount"}
    assert found.freshness_s(now) == 5.0
    assert expired.values == {"card_txn_count_1h": 0.0} and expired.defaulted
    assert expired.as_of_ms is None, "past the entity TTL (7d) everything is defaulted"
    assert missing.defaulted == ("card_txn_count_1h", "card_amount_mean_24h")
    assert missing.freshness_s(now) is None
    assert merchant.values == {"merchant_txn_count_1h": 42.0, "merchant_amount_mean_24h": 0.0}


def test_read_online_refuses_unknown_names_before_touching_redis():
    registry = FeatureRegistry.load(DEMO_DEFINITIONS)
    offline = Redis(host="127.0.0.1", port=1)
    with pytest.raises(UnknownFeature, match="no features"):
        read_online(offline, registry, [("card", "c", ["card_mood"])], 0)
    with pytest.raises(UnknownFeature, match="entity"):
        read_online(offline, registry, [("planet", "p", ["size"])], 0)


def test_read_snapshots_sees_what_the_service_and_the_seeding_helper_wrote(redis):
    prefix = unique("compat")
    store_values(redis, "card", f"{prefix}-a", {"card_txn_count_1h": 2.0}, 1_000)
    write_features(
        redis,
        "card",
        f"{prefix}-b",
        {"card_txn_count_1h": 5.0, "card_txn_count_10m": 1.0},
        {"card_txn_count_1h": 2_000, "card_txn_count_10m": 1_500},
    )
    redis.set(snapshot_key("card", f"{prefix}-c"), b"not a snapshot")
    a, b, c, d = read_snapshots(
        redis,
        [("card", f"{prefix}-a"), ("card", f"{prefix}-b"), ("card", f"{prefix}-c"), ("card", "x")],
    )
    assert a == (1_000, {"card_txn_count_1h": 2.0})
    assert b == (2_000, {"card_txn_count_1h": 5.0, "card_txn_count_10m": 1.0}), "newest time"
    assert c is None and d is None, "unreadable or absent: missing, never an exception"
    assert read_snapshots(redis, []) == []


def test_a_commit_fenced_by_another_writer_writes_nothing(redis):
    app = unique("fence")
    store = StateStore(redis, app)
    key = feature_key("card", f"{app}-c1")
    first = CommitBatch()
    first.fence(marker_key(app, 0), 0)
    first.write(key, ["@ts", "5", "card_txn_count_1h", "1.0"], expire_at_ms=2**50)
    store.commit(first)
    stale = CommitBatch()
    stale.fence(marker_key(app, 0), 0)
    stale.write(key, ["card_txn_count_1h", "99.0"], ["@ts"])
    with pytest.raises(CommitConflict):
        store.commit(stale)
    assert redis.hgetall(key) == {b"@ts": b"5", b"card_txn_count_1h": b"1.0"}
    assert redis.hget(marker_key(app, 0), "version") == b"1"
    assert redis.pttl(key) > 0


def test_stored_windows_load_back_as_their_observations_only(redis):
    app = unique("load")
    store = StateStore(redis, app)
    count = LOAD_KEYS_PER_CALL * 2 + 7  # several script calls in one pipeline
    batch = CommitBatch()
    expected = {}
    for i in range(count):
        held = [
            Observation(1_000 + j, "transaction", f"{app}-e{i}-{j}", j % 2, {"amount": 1.5 * j})
            for j in range(i % 4)
        ]
        sets = ["@ts", "1003", "card_txn_count_1h", "3.0"]
        for observation in held:
            sets += [
                observation_field(observation.event_type, observation.event_id),
                encode_observation(observation),
            ]
        batch.write(feature_key("card", f"{app}-c{i}"), sets, expire_at_ms=2**50)
        expected[("card", f"{app}-c{i}")] = held
    store.commit(batch)
    wanted = [*expected, ("card", f"{app}-never-written")]
    loaded = store.load_observations(wanted)
    assert len(loaded) == len(wanted)
    for key, observations in zip(wanted, loaded, strict=True):
        assert sorted(observations) == expected.get(key, []), key
    assert store.load_observations([]) == []


def test_the_hash_holds_the_clock_and_window_state_and_the_snapshot_holds_the_values(redis):
    registry = FeatureRegistry.load(DEMO_DEFINITIONS).with_source("t")
    app = unique("layout")
    now = int(time.time() * 1000)  # the keys expire at clock + TTL
    events = [
        Event(
            event_id=f"{app}-e{i}",
            event_type="transaction",
            ts_ms=now + i,
            entities={"card": f"{app}-c", "merchant": f"{app}-m{i % 2}"},
            fields={"amount": 2.5 * i, "channel": "online", "country": "US"},
        )
        for i in range(4)
    ]
    records = [SourceRecord("t", 0, i, event) for i, event in enumerate(events)]
    router = Router(registry, 8)
    # Chunks of a few observations: an apply loads every window before its first commit.
    Applier(registry, StateStore(redis, app), 8, max_commit_observations=2).apply(
        router.route(records[:2])
    )
    # A second process carries on from what the first committed.
    Applier(registry, StateStore(redis, app), 8, max_commit_observations=2).apply(
        router.route(records[2:])
    )
    stored = redis.hgetall(feature_key("card", f"{app}-c"))
    assert stored.pop(b"@ts") == str(now + 3).encode()
    assert sorted(stored) == sorted(
        observation_field("transaction", event.event_id).encode() for event in events
    ), "no feature values in the hash"
    clock, values = orjson.loads(redis.get(snapshot_key("card", f"{app}-c")))
    assert clock == now + 3
    assert values["card_txn_count_1h"] == 4.0
    assert values["card_amount_sum_1h"] == 15.0
    assert values["card_last_amount"] == 7.5
    clock, values = orjson.loads(redis.get(snapshot_key("merchant", f"{app}-m1")))
    assert (clock, values["merchant_txn_count_1h"]) == (now + 3, 2.0)


def test_an_event_id_used_again_after_its_first_copy_left_the_windows_stays_stored(redis):
    """Reused ids (a producer bug) must not break crash consistency: the commit that forgets
    the first copy and holds the second deletes the field before it writes it again, so a
    reload holds what the running process holds."""
    registry = FeatureRegistry.load(DEMO_DEFINITIONS).with_source("t")
    app = unique("reuse")
    now = int(time.time() * 1000)
    day = 24 * 3_600_000  # the card's largest window

    def event(event_id: str, ts: int, amount: float) -> Event:
        return Event(
            event_id=f"{app}-{event_id}",
            event_type="transaction",
            ts_ms=ts,
            entities={"card": f"{app}-c", "merchant": f"{app}-m"},
            fields={"amount": amount},
        )

    events = [event("r", now - day - 60_000, 1.0), event("b", now, 2.0), event("r", now + 1, 4.0)]
    records = [SourceRecord("t", 0, i, e) for i, e in enumerate(events)]
    router = Router(registry, 8)
    running = Applier(registry, StateStore(redis, app), 8)
    running.apply(router.route(records[:1]))
    running.apply(router.route(records[1:]))  # forgets the first "r", holds the second
    field = observation_field("transaction", f"{app}-r").encode()
    stored = redis.hgetall(feature_key("card", f"{app}-c"))
    assert orjson.loads(stored[field])[0] == now + 1
    (reloaded,) = StateStore(redis, app).load_observations([("card", f"{app}-c")])
    assert [(o.ts, o.event_id, o.values["amount"]) for o in sorted(reloaded)] == [
        (now, f"{app}-b", 2.0),
        (now + 1, f"{app}-r", 4.0),
    ]
    _clock, values = orjson.loads(redis.get(snapshot_key("card", f"{app}-c")))
    assert values["card_txn_count_24h"] == 2.0


def test_migrate_snapshots_fills_in_what_an_older_build_wrote_and_keeps_what_exists(redis):
    prefix = unique("migrate")
    service = feature_key("card", f"{prefix}-service")
    redis.hset(
        service,
        mapping={
            "card_txn_count_1h": "3.0",
            "@values": '{"card_txn_count_1h":3.0}',
            "@ts": "1000",
            "~transaction\x1fe1": "[1000,0,{}]",
        },
    )
    redis.pexpire(service, 60_000)
    seeded = feature_key("card", f"{prefix}-seeded")
    redis.hset(
        seeded,
        mapping={
            "card_txn_count_1h": "5.0",
            "card_txn_count_1h@ts": "2000",
            "card_txn_count_10m": "1.0",
            "card_txn_count_10m@ts": "1500",
        },
    )
    store_values(redis, "card", f"{prefix}-current", {"card_txn_count_1h": 9.0}, 3_000)
    redis.set(snapshot_key("card", f"{prefix}-current"), encode_snapshot(3_000, {"x": 1.0}))

    assert migrate_snapshots(redis) >= 2
    keys = [("card", f"{prefix}-{name}") for name in ("service", "seeded", "current")]
    service_snapshot, seeded_snapshot, current = read_snapshots(redis, keys)
    assert service_snapshot == (1_000, {"card_txn_count_1h": 3.0})
    assert 0 < redis.pttl(snapshot_key("card", f"{prefix}-service")) <= 60_000, "hash's expiry"
    assert seeded_snapshot == (2_000, {"card_txn_count_1h": 5.0, "card_txn_count_10m": 1.0})
    assert redis.pttl(snapshot_key("card", f"{prefix}-seeded")) == -1, "the hash had none"
    assert current == (3_000, {"x": 1.0}), "an existing snapshot is never replaced"
    redis.hset(service, "@values", '{"card_txn_count_1h":4.0}')
    migrate_snapshots(redis)
    assert read_snapshots(redis, keys)[:2] == [service_snapshot, seeded_snapshot], "idempotent"
