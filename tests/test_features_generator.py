"""The demo transaction generator: reproducible, realistic, with fraud, labels and drift."""

from __future__ import annotations

import statistics
from collections import Counter, defaultdict
from dataclasses import replace

from deploy.demo.generator import (
    CATEGORIES,
    DAY_MS,
    FOREIGN_COUNTRIES,
    HOUR_MS,
    DemoConfig,
    Drift,
    generate,
)

CONFIG = DemoConfig(seed=3, cards=600, merchants=80, fraud_episodes_per_card_day=0.02)


def test_equal_configs_give_equal_streams_and_seeds_change_them():
    first = [item.event for item in generate(CONFIG, limit=500)]
    again = [item.event for item in generate(CONFIG, limit=500)]
    other = [item.event for item in generate(DemoConfig(seed=4), limit=500)]
    assert first == again
    assert first != other


def test_events_are_card_transactions_with_the_documented_fields():
    items = list(generate(CONFIG, limit=300))
    for item in items:
        event = item.event
        assert event.event_type == "transaction"
        assert set(event.entities) == {"card", "merchant"}
        assert set(event.fields) == {
            "amount",
            "currency",
            "country",
            "merchant_category",
            "channel",
            "card_present",
            "hour",
        }
        assert event.fields["channel"] in {"online", "in_store"}
        assert event.fields["card_present"] == (event.fields["channel"] == "in_store")
        assert 0 <= event.fields["hour"] < 24
        assert event.fields["amount"] > 0
    assert len({item.event.event_id for item in items}) == len(items)


def test_without_disorder_events_come_in_event_time_order_within_the_bounds():
    until = CONFIG.start_ms + 6 * HOUR_MS
    times = [item.event.ts_ms for item in generate(CONFIG, until_ms=until)]
    assert times == sorted(times)
    assert CONFIG.start_ms <= times[0] and times[-1] < until
    assert len(list(generate(CONFIG, limit=7))) == 7


def test_disorder_delays_some_events_by_at_most_its_bound_and_loses_none():
    config = DemoConfig(seed=3, cards=600, merchants=80, disorder_share=0.1, disorder_ms=60_000)
    emitted = [item.event for item in generate(config, limit=3000)]
    newest, behind = 0, []
    for event in emitted:
        if event.ts_ms < newest:
            behind.append(newest - event.ts_ms)
        newest = max(newest, event.ts_ms)
    assert behind, "some events should be emitted late"
    assert max(behind) <= 60_000
    assert len({event.event_id for event in emitted}) == 3000


def test_activity_follows_the_hour_of_the_day():
    events = [item.event for item in generate(CONFIG, until_ms=CONFIG.start_ms + 2 * DAY_MS)]
    by_hour = Counter(e.fields["hour"] for e in events if e.fields["country"] == "FR")
    assert by_hour[13] > 4 * by_hour[3]


def test_labels_arrive_later_and_mark_fraud_patterns():
    items = list(generate(CONFIG, until_ms=CONFIG.start_ms + DAY_MS))
    delays = [item.label.ts_ms - item.event.ts_ms for item in items]
    assert all(item.label.request_id == item.event.event_id for item in items)
    assert all(item.label.entity_id == item.event.entities["card"] for item in items)
    assert min(delays) > 0
    assert 0.5 * CONFIG.label_delay_ms < statistics.median(delays) < 2 * CONFIG.label_delay_ms
    fraud = [item.event for item in items if item.is_fraud]
    assert 0.002 < len(fraud) / len(items) < 0.1
    testing = [e for e in fraud if e.fields["amount"] < 5]
    takeover = [e for e in fraud if e.fields["amount"] >= 5]
    assert testing and takeover
    bursts = defaultdict(list)
    for event in testing:
        bursts[event.entities["card"]].append(event.ts_ms)
    assert max(len(times) for times in bursts.values()) >= 5
    assert all(e.fields["channel"] == "online" for e in testing)
    risky = {c.name for c in CATEGORIES if c.high_risk}
    assert all(e.fields["merchant_category"] in risky for e in takeover)
    foreign = sum(e.fields["country"] in FOREIGN_COUNTRIES for e in takeover)
    assert foreign / len(takeover) > 0.5
    legit = [item.event.fields["amount"] for item in items if not item.is_fraud]
    assert statistics.median(e.fields["amount"] for e in takeover) > 5 * statistics.median(legit)


def test_drift_raises_amounts_of_a_share_of_traffic_after_its_start():
    start = CONFIG.start_ms + 12 * HOUR_MS
    drifted = replace(CONFIG, drift=Drift(start, 0.5, 3.0))
    until = CONFIG.start_ms + DAY_MS

    def medians(config):
        items = [i for i in generate(config, until_ms=until) if not i.is_fraud]
        before = [i.event.fields["amount"] for i in items if i.event.ts_ms < start]
        after = [i.event.fields["amount"] for i in items if i.event.ts_ms >= start]
        return statistics.median(before), statistics.median(after)

    base_before, base_after = medians(CONFIG)
    drift_before, drift_after = medians(drifted)
    assert drift_before == base_before
    assert drift_after > 1.4 * base_after


def test_id_prefix_namespaces_every_id():
    item = next(iter(generate(DemoConfig(id_prefix="run7-"), limit=1)))
    assert item.event.event_id.startswith("run7-")
    assert all(value.startswith("run7-") for value in item.event.entities.values())
