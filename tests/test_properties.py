"""Property-based specifications of the pure cores that every message, window and request goes
through: the JSON codec, the sliding-window arithmetic and the routing hash.

The codec's strategies are derived from the message models themselves (field types and their
constraints), so a message model added to `schemas/messages.py` is covered without a change here.
"""

from __future__ import annotations

import json
import math
import types
import typing
from enum import Enum

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas.messages import MESSAGE_MODELS, Message, RouteRole, RoutingEntry, RoutingTable
from services.common.codec import DecodeError, decode, encode
from services.common.routing import bucket, canary_ranges, route_for, shadows_for
from services.features.windows import (
    Aggregation,
    EntityWindow,
    Observation,
    WindowPlan,
    WindowSpec,
    lateness_ms,
    watermarks_before,
)

CODES = {"message_too_large", "malformed_json", "unsupported_schema_version", "schema_invalid"}
MODELS = sorted(MESSAGE_MODELS.values(), key=lambda model: model.__name__)
INT64 = (-(2**63), 2**63 - 1)

unhurried = settings(deadline=None)
"""No per-example deadline: on a loaded 2-core machine examples overrun the default 200 ms."""


# -- strategies derived from the message models ---------------------------------------------------


def constraints(metadata: typing.Iterable[object]) -> dict[str, object]:
    """min_length, max_length, ge, le and pattern from pydantic/annotated-types metadata."""
    found: dict[str, object] = {}
    for item in metadata:
        nested = getattr(item, "metadata", None)
        if isinstance(nested, list):  # a FieldInfo inside Annotated[...]
            found.update(constraints(nested))
        for name in ("min_length", "max_length", "ge", "le", "pattern"):
            value = getattr(item, name, None)
            if value is not None:
                found[name] = value
    return found


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(*INT64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)


def values_of(annotation: object, metadata: typing.Sequence[object] = ()) -> st.SearchStrategy:
    """Valid values of one field type, honouring its length, bound and pattern constraints."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return values_of(args[0], [*metadata, *annotation.__metadata__])
    limits = constraints(metadata)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(values_of(arg) for arg in args))
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is dict:
        return st.dictionaries(
            values_of(args[0]), values_of(args[1]), min_size=limits.get("min_length", 0), max_size=4
        )
    if origin is list:
        return st.lists(values_of(args[0]), min_size=limits.get("min_length", 0), max_size=4)
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        return st.integers(limits.get("ge", INT64[0]), limits.get("le", INT64[1]))
    if annotation is float:
        return st.floats(limits.get("ge"), limits.get("le"), allow_nan=False, allow_infinity=False)
    if annotation is str:
        if "pattern" in limits:
            return st.from_regex(limits["pattern"], fullmatch=True)
        return st.text(min_size=limits.get("min_length", 0), max_size=16)
    if annotation is bytes:
        return st.binary(max_size=48)
    if annotation is dict:
        return st.dictionaries(st.text(max_size=8), json_scalars, max_size=3)
    if annotation is list:
        return st.lists(json_scalars, max_size=3)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return st.sampled_from(list(annotation))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return instances_of(annotation)
    raise TypeError(f"no strategy for {annotation!r}: teach values_of about it")


def instances_of(model: type[BaseModel]) -> st.SearchStrategy:
    """Valid instances of `model` (a message at a supported schema_version)."""
    required, optional = {}, {}
    for name, field in model.model_fields.items():
        if name == "schema_version":
            strategy = st.integers(1, field.default)
        else:
            strategy = values_of(field.annotation, field.metadata)
        (required if field.is_required() else optional)[name] = strategy
    return st.fixed_dictionaries(required, optional=optional).map(lambda kw: model(**kw))


def message_and_model() -> st.SearchStrategy:
    return st.sampled_from(MODELS).flatmap(lambda m: st.tuples(st.just(m), instances_of(m)))


def as_dict(message: Message) -> dict:
    return message.model_dump(mode="json")


def decode_outcome(model: type[Message], data: bytes | None, **kwargs) -> Message | str:
    """The decoded message, or the DecodeError's code; any other exception fails the test."""
    try:
        return decode(model, data, **kwargs)
    except DecodeError as exc:
        assert exc.body.code in CODES, exc.body
        return exc.body.code


def required_fields(model: type[Message]) -> list[str]:
    return [name for name, field in model.model_fields.items() if field.is_required()]


# -- the codec ----------------------------------------------------------------------------------


@unhurried
@given(message_and_model())
def test_every_message_survives_an_encode_decode_round_trip(pair):
    model, message = pair
    assert decode(model, encode(message)) == message


@unhurried
@given(message_and_model(), st.data())
def test_a_message_missing_a_required_field_is_schema_invalid_and_names_it(pair, data):
    model, message = pair
    missing = data.draw(st.sampled_from(required_fields(model)))
    body = as_dict(message)
    del body[missing]
    with pytest.raises(DecodeError) as caught:
        decode(model, json.dumps(body).encode())
    assert caught.value.body.code == "schema_invalid"
    assert missing in {detail["loc"] for detail in caught.value.body.details}


@unhurried
@given(message_and_model(), st.data())
def test_a_field_of_the_wrong_shape_is_schema_invalid_and_names_it(pair, data):
    model, message = pair
    field = data.draw(st.sampled_from([n for n in model.model_fields if n != "schema_version"]))
    body = {**as_dict(message), field: [[{"nested": "list"}]]}  # no field of ours takes this
    with pytest.raises(DecodeError) as caught:
        decode(model, json.dumps(body).encode())
    assert caught.value.body.code == "schema_invalid"
    locs = [detail["loc"] for detail in caught.value.body.details]
    assert any(loc == field or loc.startswith(f"{field}.") for loc in locs), locs


@unhurried
@given(
    message_and_model(),
    st.integers(1, 10**30),
    st.sampled_from(["int", "str", "float"]),
    st.booleans(),
)
def test_a_newer_schema_version_is_refused_however_it_is_spelt(pair, ahead, spelling, damaged):
    """A newer producer is told apart from a broken one, even when the newer message would not
    validate as the old schema (fields renamed or dropped)."""
    model, message = pair
    version = model.model_fields["schema_version"].default + ahead
    assume(spelling != "float" or version < 2**53)  # floats are exact only up to 2**53
    body = as_dict(message)
    body["schema_version"] = {"int": version, "str": str(version), "float": float(version)}[
        spelling
    ]
    if damaged:
        del body[required_fields(model)[0]]
    with pytest.raises(DecodeError) as caught:
        decode(model, json.dumps(body).encode())
    assert caught.value.body.code == "unsupported_schema_version"
    assert caught.value.body.details["received"] == version


@unhurried
@given(message_and_model(), st.data())
def test_a_cut_message_is_malformed_json(pair, data):
    model, message = pair
    raw = encode(message)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert decode_outcome(model, raw[:cut]) == "malformed_json"


@unhurried
@given(st.sampled_from(MODELS), st.recursive(json_scalars, lambda inner: st.lists(inner)))
def test_json_that_is_not_an_object_is_schema_invalid(model, value):
    assert decode_outcome(model, json.dumps(value).encode()) == "schema_invalid"


@unhurried
@given(message_and_model(), st.integers(0, 64))
def test_a_message_over_the_size_limit_is_refused_before_it_is_parsed(pair, over):
    model, message = pair
    raw = encode(message)
    padded = raw + b" " * (over + 1)  # still a valid message, just bigger
    assert decode_outcome(model, padded, max_bytes=len(raw) + over) == "message_too_large"
    assert decode(model, padded, max_bytes=None) == message
    assert decode(model, raw, max_bytes=len(raw)) == message


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(MODELS), st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_get_a_classified_error(model, data):
    outcome = decode_outcome(model, data)
    if not isinstance(outcome, str):
        assert decode(model, encode(outcome)) == outcome


def json_soup(model: type[Message], finite: bool) -> st.SearchStrategy:
    """JSON objects near `model`: its field names and others, with any JSON value, integers
    past 64 bits included, and (unless `finite`) what Python's json writes but strict JSON
    lacks: NaN and Infinity."""
    wild_scalars = st.one_of(
        json_scalars,
        st.floats(allow_nan=not finite, allow_infinity=not finite),
        st.integers(-(10**30), 10**30),
        st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**25]),
    )
    values = st.recursive(
        wild_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=8,
    )
    keys = st.sampled_from([*model.model_fields, "extra"]) | st.text(max_size=6)
    return st.dictionaries(keys, values, max_size=len(model.model_fields) + 2)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.booleans())
def test_any_json_object_decodes_to_something_encode_can_write_or_is_classified(data, finite):
    """Whatever `decode` accepts, `encode` writes (an integer beyond 64 bits used to decode and
    then stop the worker that re-encoded it), and with finite numbers it reads back the same.
    NaN and Infinity are written as null, which a float field then refuses."""
    model = data.draw(st.sampled_from(MODELS))
    body = data.draw(json_soup(model, finite))
    outcome = decode_outcome(model, json.dumps(body).encode())
    if not isinstance(outcome, str):
        written = encode(outcome)
        if finite:
            assert decode(model, written) == outcome


@unhurried
@given(message_and_model(), st.data(), st.integers(2**64, 10**30))
def test_integers_beyond_64_bits_round_trip(pair, data, huge):
    model, message = pair
    ints = [
        name
        for name, field in model.model_fields.items()
        if field.annotation is int and name != "schema_version"
    ]
    assume(ints)
    body = {**as_dict(message), data.draw(st.sampled_from(ints)): huge}
    decoded = decode(model, json.dumps(body).encode())
    assert decode(model, encode(decoded)) == decoded


# -- window arithmetic --------------------------------------------------------------------------

MIN = 60_000
LATENESS = 2 * MIN


def specs_with_lateness(allowed: int) -> list[WindowSpec]:
    def spec(name: str, aggregation: Aggregation, window: int, field: str | None = "amount"):
        return WindowSpec(
            name=name,
            aggregation=aggregation,
            window_ms=window,
            lateness_ms=allowed,
            field=None if aggregation is Aggregation.count else field,
            event_types=frozenset({"tx"}),
        )

    return [
        spec("count_10m", Aggregation.count, 10 * MIN),
        spec("sum_1h", Aggregation.sum, 60 * MIN),
        spec("mean_30m", Aggregation.mean, 30 * MIN),
        spec("min_15m", Aggregation.min, 15 * MIN),
        spec("max_15m", Aggregation.max, 15 * MIN),
        spec("last_20m", Aggregation.last, 20 * MIN),
        spec("distinct_1h", Aggregation.distinct_count, 60 * MIN, field="country"),
    ]


events = st.lists(
    st.tuples(
        st.integers(0, 3 * 60 * MIN),
        st.floats(-1e6, 1e6, allow_nan=False),
        st.sampled_from(["FR", "DE", "US"]),
    ),
    max_size=60,
)


def arrive(items: list[tuple[int, float, str]], order: list[int]) -> list[Observation]:
    """Observations in arrival `order`, each with the lateness its partition's watermark gives."""
    arrived = [(i, items[i]) for i in order]
    watermarks = watermarks_before(ts for _, (ts, _, _) in arrived)
    return [
        Observation(ts, "tx", f"e{i}", lateness_ms(mark, ts), {"amount": amount, "country": c})
        for (i, (ts, amount, c)), mark in zip(arrived, watermarks, strict=True)
    ]


def values_after(specs: list[WindowSpec], observations: list[Observation]) -> dict:
    window = EntityWindow(WindowPlan(specs))
    for observation in observations:
        window.apply(observation)
    return window.values()


def brute_force(specs: list[WindowSpec], observations: list[Observation]) -> dict:
    """The documented semantics written directly: accepted events, clock, (clock - W, clock]."""
    accepted = {s.name: [o for o in observations if s.accepts(o)] for s in specs}
    every = [o for group in accepted.values() for o in group]
    if not every:
        return dict.fromkeys(s.name for s in specs)
    clock = max(o.ts for o in every)
    return {
        s.name: aggregate(s, [o for o in accepted[s.name] if clock - s.window_ms < o.ts <= clock])
        for s in specs
    }


def aggregate(spec: WindowSpec, inside: list[Observation]) -> float | None:
    """One feature's value over the observations inside its window."""
    picked = [o.values[spec.field] for o in inside] if spec.field else []
    if spec.aggregation is Aggregation.count:
        return float(len(inside))
    if spec.aggregation is Aggregation.sum:
        return math.fsum(picked)
    if spec.aggregation is Aggregation.mean:
        return math.fsum(picked) / len(picked) if picked else None
    if spec.aggregation is Aggregation.min:
        return min(picked, default=None)
    if spec.aggregation is Aggregation.max:
        return max(picked, default=None)
    if spec.aggregation is Aggregation.distinct_count:
        return float(len(set(picked)))
    newest = max(inside, key=lambda o: (o.ts, o.event_type, o.event_id), default=None)
    return newest.values[spec.field] if newest else None


@settings(max_examples=150, deadline=None)
@given(events, st.lists(st.integers(0, LATENESS), min_size=60, max_size=60))
def test_disorder_within_the_allowed_lateness_gives_the_in_order_values(items, jitter):
    """Events that arrive out of order, but never later than the lateness the features allow
    (as the partition watermark measures it), give exactly the values of time order."""
    specs = specs_with_lateness(LATENESS)
    in_time = sorted(range(len(items)), key=lambda i: (items[i][0], i))
    disordered = sorted(range(len(items)), key=lambda i: (items[i][0] + jitter[i], i))
    arrived = arrive(items, disordered)
    assert all(o.lateness_ms <= LATENESS for o in arrived)
    expected = values_after(specs, arrive(items, in_time))
    assert values_after(specs, arrived) == expected
    assert expected == brute_force(specs, arrive(items, in_time))


@settings(max_examples=150, deadline=None)
@given(events, st.randoms(use_true_random=False), st.sampled_from([0, MIN, LATENESS]))
def test_in_any_arrival_order_values_equal_brute_force_over_the_events_on_time(items, rng, allowed):
    """Too-late events are left out, never half counted: the result is the brute-force answer
    over exactly the events whose lateness was within the allowance."""
    specs = specs_with_lateness(allowed)
    order = list(range(len(items)))
    rng.shuffle(order)
    arrived = arrive(items, order)
    assert values_after(specs, arrived) == brute_force(specs, arrived)


@settings(max_examples=100, deadline=None)
@given(events, st.randoms(use_true_random=False))
def test_replayed_events_are_counted_once(items, rng):
    specs = specs_with_lateness(3 * 60 * MIN)
    once = arrive(items, list(range(len(items))))
    replayed = once + [o for o in once if rng.random() < 0.5]
    rng.shuffle(replayed)
    assert values_after(specs, replayed) == values_after(specs, once)


# -- routing --------------------------------------------------------------------------------------

KEYS = [f"entity-{i}" for i in range(3000)]


@st.composite
def tables(draw, canaries: int | None = None) -> RoutingTable:
    """A champion, up to three canaries whose weights sum to at most 1, and maybe a shadow."""
    count = draw(st.integers(0, 3)) if canaries is None else canaries
    weights = draw(st.lists(st.floats(0.0, 1.0), min_size=count, max_size=count))
    scale = max(1.0, sum(weights))
    entries = [
        RoutingEntry(version=str(2 + i), role=RouteRole.canary, weight=w / scale)
        for i, w in enumerate(weights)
    ]
    rest = max(0.0, 1 - sum(e.weight for e in entries))
    entries.append(RoutingEntry(version="1", role=RouteRole.champion, weight=rest))
    if draw(st.booleans()):
        rate = draw(st.floats(0.0, 1.0))
        entries.append(
            RoutingEntry(version="9", role=RouteRole.shadow, weight=0.0, shadow_sample_rate=rate)
        )
    order = draw(st.permutations(entries))
    return RoutingTable(model="m", entries=list(order), revision=1, updated_at_ms=0)


@unhurried
@given(tables())
def test_each_canary_serves_exactly_its_weight_of_the_hash_space(table):
    """Canary v serves the keys whose bucket lies in its own interval of width `weight`; the
    buckets are uniform (see the share test below), so it serves that share of keys."""
    lower = 0.0
    for upper, version in canary_ranges(table):
        weight = next(e.weight for e in table.entries if e.version == version)
        assert upper - lower == pytest.approx(weight, abs=1e-12)
        lower = upper
    for key in KEYS[:500]:
        version, _route = route_for(key, table)
        inside = [v for up, v in canary_ranges(table) if bucket(key) < up]
        assert version == (inside[0] if inside else "1")


@settings(max_examples=20, deadline=None)
@given(st.floats(0.01, 0.99))
def test_the_share_of_keys_on_a_canary_is_its_weight(weight):
    table = RoutingTable(
        model="m",
        entries=[
            RoutingEntry(version="1", role=RouteRole.champion, weight=1 - weight),
            RoutingEntry(version="2", role=RouteRole.canary, weight=weight),
        ],
        revision=1,
        updated_at_ms=0,
    )
    share = sum(route_for(k, table)[0] == "2" for k in KEYS) / len(KEYS)
    assert abs(share - weight) < 0.04  # 3000 keys: five standard deviations at worst


@unhurried
@given(tables())
def test_routing_is_sticky_whatever_the_entry_order_revision_or_shadows(table):
    live = [e for e in table.entries if e.role is not RouteRole.shadow]
    same = RoutingTable(
        model="m", entries=list(reversed(live)), revision=table.revision + 7, updated_at_ms=99
    )
    for key in KEYS[:300]:
        assert route_for(key, table) == route_for(key, same) == route_for(key, table)


@unhurried
@given(tables(canaries=1), st.floats(0.0, 1.0))
def test_a_growing_canary_keeps_its_keys_and_takes_only_from_the_champion(table, grow):
    canary = next(e for e in table.entries if e.role is RouteRole.canary)
    wider = canary.weight + (1 - canary.weight) * grow
    grown = table.model_copy(
        update={
            "entries": [
                e.model_copy(
                    update={"weight": wider if e is canary else 1 - wider}
                    if e.role is not RouteRole.shadow
                    else {}
                )
                for e in table.entries
            ]
        }
    )
    for key in KEYS:
        before, after = route_for(key, table)[0], route_for(key, grown)[0]
        if before == canary.version:
            assert after == canary.version
        else:
            assert after in (before, canary.version)


@unhurried
@given(tables())
def test_shadow_copies_never_change_the_live_route(table):
    without = RoutingTable(
        model="m",
        entries=[e for e in table.entries if e.role is not RouteRole.shadow],
        revision=1,
        updated_at_ms=0,
    )
    for i, key in enumerate(KEYS[:300]):
        assert route_for(key, table) == route_for(key, without)
        assert set(shadows_for(f"req-{i}", table)) <= {
            e.version for e in table.entries if e.role is RouteRole.shadow
        }
