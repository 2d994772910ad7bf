"""The demo's card-transaction stream: seeded, reproducible, realistic enough to show fraud.

`generate(config)` yields `DemoItem`s in the order a payment network would emit them: each holds
a transaction `Event` (event type `transaction`, entities `card` and `merchant`) and the `Label`
that will reveal its outcome later (`label.ts_ms` = event time + label delay). Nothing here does
I/O; `deploy.demo.publish` sends items to Kafka.

The population:

- **Cards** have a home country, a typical amount (log-normal around their own level), a daily
  rate (gamma distributed, so a few cards are heavy users), an online share, and 3-8 favourite
  merchants in their home country that take most of their spending.
- **Merchants** have a category (grocery, fuel, restaurant, electronics, ...), a country, a
  channel (online or in-store) and a popularity; categories set the amount scale.
- **Time**: transactions arrive as a Poisson process whose rate follows the hour of the day (low
  at night, peaks at lunch and early evening), in event time; nothing sleeps.

Fraud comes in episodes started at random times on random cards:

- **card testing**: a burst of 5-15 small online payments (0.50-4.99) a few seconds to a minute
  apart, often at foreign digital-goods merchants;
- **account takeover**: 2-5 payments of 5-20x the card's usual amount at high-risk categories
  (electronics, jewelry, travel) in a country the card has never used, minutes apart.

Every transaction of an episode is labelled 1.0 (fraud), every other 0.0. Labels arrive after a
log-normal delay (median `label_delay_ms`). `disorder_ms` delays the emission of a share of
events (their event time is unchanged), which exercises out-of-order handling downstream.
`Drift` multiplies the amounts of a share of legitimate traffic after a given time, for the
monitor's drift detection.

Identical configs yield identical items, on any machine (numpy's PCG64 seeded generator).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from schemas.messages import Event, Label

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

HOME_COUNTRIES = {
    "FR": 0.30,
    "DE": 0.20,
    "GB": 0.15,
    "ES": 0.10,
    "IT": 0.10,
    "NL": 0.05,
    "US": 0.10,
}
"""Where cards are issued, with shares."""
FOREIGN_COUNTRIES = ("BR", "NG", "RU", "VN", "ID", "TR", "UA", "PH")
"""Countries no card is issued in: where takeovers and testing merchants are."""
CURRENCIES = {"FR": "EUR", "DE": "EUR", "ES": "EUR", "IT": "EUR", "NL": "EUR", "GB": "GBP",
              "US": "USD", "BR": "BRL", "NG": "NGN", "RU": "RUB", "VN": "VND", "ID": "IDR",
              "TR": "TRY", "UA": "UAH", "PH": "PHP"}  # fmt: skip
UTC_OFFSETS_H = {"FR": 1, "DE": 1, "ES": 1, "IT": 1, "NL": 1, "GB": 0, "US": -5, "BR": -3,
                 "NG": 1, "RU": 3, "VN": 7, "ID": 7, "TR": 3, "UA": 2, "PH": 8}  # fmt: skip


@dataclass(frozen=True)
class Category:
    """A merchant category: typical amount, how often it is online, how popular it is."""

    name: str
    median_amount: float
    online_share: float
    popularity: float
    high_risk: bool = False


CATEGORIES = (
    Category("grocery", 38.0, 0.10, 0.26),
    Category("restaurant", 27.0, 0.05, 0.18),
    Category("fuel", 55.0, 0.0, 0.10),
    Category("retail", 60.0, 0.35, 0.14),
    Category("pharmacy", 18.0, 0.10, 0.06),
    Category("transport", 12.0, 0.50, 0.08),
    Category("digital_goods", 9.0, 1.0, 0.08),
    Category("electronics", 240.0, 0.55, 0.04, high_risk=True),
    Category("jewelry", 420.0, 0.30, 0.02, high_risk=True),
    Category("travel", 380.0, 0.80, 0.04, high_risk=True),
)

HOURLY_ACTIVITY = np.array(
    [0.10, 0.06, 0.04, 0.03, 0.04, 0.08, 0.20, 0.45, 0.65, 0.70, 0.75, 0.90,
     1.00, 0.90, 0.75, 0.70, 0.75, 0.90, 0.95, 0.85, 0.65, 0.45, 0.30, 0.18]
)  # fmt: skip
"""Relative transaction rate per local hour of the day (peak = 1)."""


@dataclass(frozen=True)
class Drift:
    """From `start_ms` on, amounts of a `share` of legitimate transactions are multiplied."""

    start_ms: int
    share: float = 0.3
    amount_factor: float = 1.8


@dataclass(frozen=True)
class DemoConfig:
    """Everything that shapes the stream; equal configs give equal streams."""

    seed: int = 7
    cards: int = 5_000
    merchants: int = 400
    start_ms: int = 1_767_225_600_000
    """Event time of the stream's start (default 2026-01-01T00:00Z)."""
    txns_per_card_per_day: float = 3.0
    fraud_episodes_per_card_day: float = 0.008
    """Chance that a given card starts a fraud episode on a given day."""
    label_delay_ms: int = 2 * HOUR_MS
    """Median delay between a transaction and its label."""
    disorder_share: float = 0.0
    disorder_ms: int = 0
    """A `disorder_share` of events is emitted up to this much after its event time."""
    drift: Drift | None = None
    id_prefix: str = ""
    """Prepended to every card, merchant and event id (run several demo streams side by side)."""


@dataclass(frozen=True, slots=True)
class DemoItem:
    """One emitted transaction and its (later) label."""

    event: Event
    label: Label

    @property
    def is_fraud(self) -> bool:
        """Ground truth, for tests and notebooks (never sent with the event)."""
        return self.label.value == 1.0


@dataclass
class _Population:
    card_country: np.ndarray
    card_level: np.ndarray
    card_online: np.ndarray
    card_cumrate: np.ndarray
    card_favourites: list[np.ndarray]
    merchant_category: np.ndarray
    merchant_country: list[str]
    merchant_online: np.ndarray
    merchant_cumpop: np.ndarray
    foreign: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))


def _build_population(config: DemoConfig, rng: np.random.Generator) -> _Population:
    homes = list(HOME_COUNTRIES)
    home_p = np.array(list(HOME_COUNTRIES.values()))
    n_domestic = max(1, int(config.merchants * 0.85))
    m_category = rng.choice(
        len(CATEGORIES), size=config.merchants, p=_normalised([c.popularity for c in CATEGORIES])
    )
    m_country = [
        str(homes[rng.choice(len(homes), p=home_p)])
        if j < n_domestic
        else str(FOREIGN_COUNTRIES[rng.integers(len(FOREIGN_COUNTRIES))])
        for j in range(config.merchants)
    ]
    m_online = rng.random(config.merchants) < np.array(
        [CATEGORIES[c].online_share for c in m_category]
    )
    m_pop = rng.pareto(1.5, config.merchants) + 1.0
    m_pop[n_domestic:] *= 0.05
    c_country = rng.choice(len(homes), size=config.cards, p=home_p)
    favourites = []
    for country_index in c_country:
        local = [j for j in range(n_domestic) if m_country[j] == homes[country_index]]
        pool = np.array(local or range(n_domestic))
        weights = _normalised(m_pop[pool])
        size = min(len(pool), int(rng.integers(3, 9)))
        favourites.append(rng.choice(pool, size=size, replace=False, p=weights))
    rates = rng.gamma(2.0, config.txns_per_card_per_day / 2.0, config.cards)
    return _Population(
        card_country=c_country,
        card_level=rng.lognormal(0.0, 0.45, config.cards),
        card_online=rng.beta(2.0, 5.0, config.cards),
        card_cumrate=np.cumsum(rates) / rates.sum(),
        card_favourites=favourites,
        merchant_category=m_category,
        merchant_country=m_country,
        merchant_online=m_online,
        merchant_cumpop=np.cumsum(m_pop) / m_pop.sum(),
        foreign=np.arange(config.merchants) >= n_domestic,
    )


def _normalised(weights) -> np.ndarray:
    array = np.asarray(weights, dtype=float)
    return array / array.sum()


class _Stream:
    """The stateful part of `generate`: the clock, pending fraud payments, emission order."""

    def __init__(self, config: DemoConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.population = _build_population(config, self.rng)
        self.homes = list(HOME_COUNTRIES)
        self.clock = float(config.start_ms)
        self.sequence = 0
        total_per_ms = config.cards * config.txns_per_card_per_day / DAY_MS
        mean_activity = float(HOURLY_ACTIVITY.mean())
        self.peak_rate_per_ms = total_per_ms / mean_activity
        self.episode_rate_per_ms = config.cards * config.fraud_episodes_per_card_day / DAY_MS
        self.next_episode = self._after(self.episode_rate_per_ms)
        self.fraud: list[tuple[int, int, int, int, float]] = []
        self.emission: list[tuple[int, int, DemoItem]] = []

    def _after(self, rate_per_ms: float) -> float:
        return self.clock + self.rng.exponential(1.0 / rate_per_ms) if rate_per_ms > 0 else math.inf

    def items(self) -> Iterator[DemoItem]:
        """Items in emission order, forever."""
        while True:
            candidate = self._after(self.peak_rate_per_ms)
            next_fraud = self.fraud[0][0] if self.fraud else math.inf
            if self.next_episode < min(candidate, next_fraud):
                self.clock = self.next_episode
                self._start_episode()
                self.next_episode = self._after(self.episode_rate_per_ms)
                continue
            if next_fraud <= candidate:
                ts, _seq, card, merchant, amount = heapq.heappop(self.fraud)
                self.clock = float(ts)
                yield from self._emit(self._transaction(ts, card, merchant, amount, fraud=True))
                continue
            self.clock = candidate
            card = int(np.searchsorted(self.population.card_cumrate, self.rng.random()))
            card = min(card, self.config.cards - 1)
            hour = self._local_hour(int(candidate), self.homes[self.population.card_country[card]])
            if self.rng.random() >= HOURLY_ACTIVITY[hour]:
                continue
            merchant = self._legit_merchant(card)
            amount = self._legit_amount(card, merchant, int(candidate))
            yield from self._emit(self._transaction(int(candidate), card, merchant, amount, False))

    def flush(self) -> Iterator[DemoItem]:
        """Items still held back by disorder, in emission order."""
        while self.emission:
            yield heapq.heappop(self.emission)[2]

    def _emit(self, item: DemoItem) -> Iterator[DemoItem]:
        config = self.config
        delay = 0
        if config.disorder_ms and self.rng.random() < config.disorder_share:
            delay = int(self.rng.integers(1, config.disorder_ms + 1))
        heapq.heappush(self.emission, (item.event.ts_ms + delay, self.sequence, item))
        while self.emission and self.emission[0][0] <= self.clock:
            yield heapq.heappop(self.emission)[2]

    @staticmethod
    def _local_hour(ts_ms: int, country: str) -> int:
        return (ts_ms // HOUR_MS + UTC_OFFSETS_H[country]) % 24

    def _legit_merchant(self, card: int) -> int:
        population = self.population
        if self.rng.random() < 0.7:
            favourites = population.card_favourites[card]
            return int(favourites[self.rng.integers(len(favourites))])
        merchant = int(np.searchsorted(population.merchant_cumpop, self.rng.random()))
        return min(merchant, self.config.merchants - 1)

    def _legit_amount(self, card: int, merchant: int, ts_ms: int) -> float:
        category = CATEGORIES[self.population.merchant_category[merchant]]
        amount = category.median_amount * self.population.card_level[card]
        amount *= self.rng.lognormal(0.0, 0.6)
        drift = self.config.drift
        if drift is not None and ts_ms >= drift.start_ms and self.rng.random() < drift.share:
            amount *= drift.amount_factor
        return amount

    def _start_episode(self) -> None:
        population, rng = self.population, self.rng
        card = min(
            int(np.searchsorted(population.card_cumrate, rng.random())), self.config.cards - 1
        )
        ts = self.clock
        if rng.random() < 0.5:
            for _ in range(int(rng.integers(5, 16))):
                ts += rng.uniform(3_000, 60_000)
                merchant = self._fraud_merchant({"digital_goods"})
                self._schedule(int(ts), card, merchant, round(rng.uniform(0.5, 4.99), 2))
        else:
            risky = {c.name for c in CATEGORIES if c.high_risk}
            level = population.card_level[card]
            for _ in range(int(rng.integers(2, 6))):
                ts += rng.uniform(120_000, 1_200_000)
                merchant = self._fraud_merchant(risky)
                amount = CATEGORIES[population.merchant_category[merchant]].median_amount
                self._schedule(int(ts), card, merchant, amount * level * rng.uniform(5, 20))

    def _fraud_merchant(self, categories: set[str]) -> int:
        """A foreign merchant of one of `categories`; a domestic one if there is none, any
        merchant as a last resort (tiny populations)."""
        population = self.population
        in_category = np.array(
            [CATEGORIES[c].name in categories for c in population.merchant_category]
        )
        for candidates in (in_category & population.foreign, in_category):
            indices = np.flatnonzero(candidates)
            if len(indices):
                return int(indices[self.rng.integers(len(indices))])
        return int(self.rng.integers(self.config.merchants))

    def _schedule(self, ts: int, card: int, merchant: int, amount: float) -> None:
        self.sequence += 1
        heapq.heappush(self.fraud, (ts, self.sequence, card, merchant, amount))

    def _transaction(
        self, ts_ms: int, card: int, merchant: int, amount: float, fraud: bool
    ) -> DemoItem:
        population, rng = self.population, self.rng
        self.sequence += 1
        country = population.merchant_country[merchant]
        category = CATEGORIES[population.merchant_category[merchant]]
        online = bool(population.merchant_online[merchant]) or (
            category.online_share > 0 and rng.random() < population.card_online[card] * 0.3
        )
        prefix = self.config.id_prefix
        event_id = f"{prefix}tx-{self.config.seed}-{self.sequence:010d}"
        card_id = f"{prefix}card-{card:06d}"
        event = Event(
            event_id=event_id,
            event_type="transaction",
            ts_ms=ts_ms,
            entities={"card": card_id, "merchant": f"{prefix}merchant-{merchant:05d}"},
            fields={
                "amount": round(float(amount), 2),
                "currency": CURRENCIES[country],
                "country": country,
                "merchant_category": category.name,
                "channel": "online" if online else "in_store",
                "card_present": not online,
                "hour": self._local_hour(ts_ms, country),
            },
        )
        delay = self.config.label_delay_ms * rng.lognormal(0.0, 0.5)
        label = Label(
            request_id=event_id,
            entity_id=card_id,
            value=1.0 if fraud else 0.0,
            ts_ms=ts_ms + int(delay),
        )
        return DemoItem(event, label)


def generate(
    config: DemoConfig, *, limit: int | None = None, until_ms: int | None = None
) -> Iterator[DemoItem]:
    """The demo stream: at most `limit` items, and only events before `until_ms` (event time).

    With neither bound it never ends. Items come in emission order: event time order except for
    the events `disorder_*` holds back.
    """
    stream = _Stream(config)
    produced = 0
    for item in stream.items():
        if until_ms is not None and stream.clock >= until_ms:
            break
        if limit is not None and produced >= limit:
            return
        produced += 1
        yield item
    for item in stream.flush():
        if limit is not None and produced >= limit:
            return
        if until_ms is None or item.event.ts_ms < until_ms:
            produced += 1
            yield item
