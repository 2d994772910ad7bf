"""Sliding event-time windows per entity: the pure arithmetic shared by the stream and offline.

Semantics (the contract that online values, offline training sets and the skew check share):

- An entity instance (e.g. card `c1`) has a **clock**: the newest event time among the events
  that some feature of that entity accepted. Every feature of the entity is evaluated *as of the
  clock*: a feature with window `W` aggregates the accepted events with
  `clock - W < ts <= clock` (open at the start, closed at the end). The clock only moves forward;
  a value therefore describes "the entity as of its latest event", never "as of now".
- A feature **accepts** an observation when its event type is one the feature listens to, every
  `where` condition holds, the field it aggregates is usable (finite number for
  sum/mean/min/max/last, any value for distinct_count), and the observation's **lateness** is at
  most the feature's allowed lateness. Lateness is computed by the caller from the source
  partition's watermark (`lateness_ms`); this module only compares it.
- Observations are identified by `(event_type, event_id)`: a second copy of an observation the
  window already holds is ignored, so replays and producer duplicates never double count.
- Values do not depend on the order observations arrive in: sums are exact (integers in units of
  2**-1074, correctly rounded like `math.fsum`), min/max/distinct/count are order-free, and `last`
  picks the greatest `(ts, event_type, event_id)`. The stream (out of order) and the offline
  computation (in time order) therefore produce bit-identical floats.
- Empty windows: count, sum and distinct_count are 0.0; mean, min, max and last have no value
  (`None`), which readers replace by the feature's declared default.
- TTL: a value is expired (reads as missing) once `as_of - clock >= ttl` (`is_expired`).
"""

from __future__ import annotations

import math
from bisect import bisect_right, insort
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

Value = float | str
"""A canonical field value: numbers (and booleans) as float, text as str."""

ObservationKey = tuple[str, str]
"""`(event_type, event_id)`: the identity of an event, as in the ClickHouse `events` table."""


class Aggregation(StrEnum):
    """How a feature folds the values in its window into one number."""

    count = "count"
    sum = "sum"
    mean = "mean"
    min = "min"
    max = "max"
    last = "last"
    distinct_count = "distinct_count"


NUMERIC_AGGREGATIONS = frozenset(
    {Aggregation.sum, Aggregation.mean, Aggregation.min, Aggregation.max, Aggregation.last}
)
"""Aggregations that need a finite number in their field."""


class Op(StrEnum):
    """Comparison of a `where` condition."""

    eq = "eq"
    ne = "ne"
    in_ = "in"
    not_in = "not_in"
    lt = "lt"
    le = "le"
    gt = "gt"
    ge = "ge"


def canonical(value: object) -> Value | None:
    """The value as features compare and aggregate it: bool/int/float -> float, str -> str.

    Anything else (None, lists, objects) has no canonical form and reads as absent. This is also
    how the ClickHouse `events` table stores fields (`num_values` Float64, `str_values` String),
    so online and offline see the same values.
    """
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        return value
    return None


@dataclass(frozen=True, slots=True)
class Condition:
    """`field op value` on an observation's canonical field values."""

    field: str
    op: Op
    value: Value | tuple[Value, ...]

    def holds(self, values: Mapping[str, Value]) -> bool:
        """Whether the condition is true; a missing field makes every condition false."""
        actual = values.get(self.field)
        if actual is None:
            return False
        op, expected = self.op, self.value
        if op is Op.eq:
            return actual == expected
        if op is Op.ne:
            return actual != expected
        if op is Op.in_:
            return actual in expected  # type: ignore[operator]
        if op is Op.not_in:
            return actual not in expected  # type: ignore[operator]
        if not isinstance(actual, float) or not isinstance(expected, float):
            return False
        if op is Op.lt:
            return actual < expected
        if op is Op.le:
            return actual <= expected
        if op is Op.gt:
            return actual > expected
        return actual >= expected


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One feature as the window arithmetic sees it (compiled from a `FeatureDefinition`)."""

    name: str
    aggregation: Aggregation
    window_ms: int
    lateness_ms: int = 0
    field: str | None = None
    event_types: frozenset[str] = frozenset()
    conditions: tuple[Condition, ...] = ()

    def accepts(self, observation: Observation) -> bool:
        """Whether this feature counts `observation` (type, conditions, field, lateness)."""
        if observation.event_type not in self.event_types:
            return False
        if observation.lateness_ms > self.lateness_ms:
            return False
        values = observation.values
        for condition in self.conditions:
            if not condition.holds(values):
                return False
        if self.aggregation is Aggregation.count:
            return True
        value = values.get(self.field) if self.field else None
        if value is None:
            return False
        if self.aggregation is Aggregation.distinct_count:
            return True
        return isinstance(value, float) and math.isfinite(value)

    def rejects_as_late(self, observation: Observation) -> bool:
        """Whether `observation` would be accepted but for its lateness (for the late metric)."""
        if observation.lateness_ms <= self.lateness_ms:
            return False
        on_time = Observation(
            observation.ts, observation.event_type, observation.event_id, 0, observation.values
        )
        return self.accepts(on_time)


_NO_VALUES: Mapping[str, Value] = {}


class Observation(NamedTuple):
    """One event as seen by one entity: its time, identity, lateness and the fields needed.

    A named tuple rather than a frozen dataclass: the stream creates one per entity per event,
    and a frozen dataclass's `__init__` costs four times as much. `values` is never mutated.
    """

    ts: int
    event_type: str
    event_id: str
    lateness_ms: int = 0
    values: Mapping[str, Value] = _NO_VALUES

    @property
    def key(self) -> ObservationKey:
        """The identity that deduplicates copies of the same event."""
        return (self.event_type, self.event_id)


def lateness_ms(watermark: int | None, ts: int) -> int:
    """How far behind the watermark an event is (0 when at or ahead of it, or no watermark).

    The watermark of a source partition just before a record is the greatest event time of the
    records before it in that partition (offset order).
    """
    if watermark is None or ts >= watermark:
        return 0
    return watermark - ts


def watermarks_before(timestamps: Iterable[int]) -> Iterator[int | None]:
    """For a partition's event times in offset order, the watermark just before each one."""
    watermark: int | None = None
    for ts in timestamps:
        yield watermark
        if watermark is None or ts > watermark:
            watermark = ts


def is_expired(clock: int | None, as_of_ms: int, ttl_ms: int) -> bool:
    """Whether values computed at `clock` are past their TTL when read at `as_of_ms`."""
    return clock is None or as_of_ms - clock >= ttl_ms


_FIXED_POINT_BITS = 1074
_FIXED_POINT_SCALE = 1 << _FIXED_POINT_BITS


def fixed_point(x: float) -> int:
    """A finite float exactly, as an integer number of 2**-1074 (every double is one)."""
    numerator, denominator = x.as_integer_ratio()
    return numerator << (_FIXED_POINT_BITS + 1 - denominator.bit_length())


def from_fixed_point(total: int) -> float:
    """The float nearest to `total * 2**-1074`: correctly rounded, so a sum kept in fixed point
    equals `math.fsum` of the same values, whatever order they were added and removed in."""
    return total / _FIXED_POINT_SCALE


_COUNT, _SUM, _MEAN, _MIN, _MAX, _DISTINCT, _LAST = range(7)
_KIND = {
    Aggregation.count: _COUNT,
    Aggregation.sum: _SUM,
    Aggregation.mean: _MEAN,
    Aggregation.min: _MIN,
    Aggregation.max: _MAX,
    Aggregation.distinct_count: _DISTINCT,
    Aggregation.last: _LAST,
}


class WindowPlan:
    """The features of one entity compiled once, shared by all its `EntityWindow`s.

    `mask` gives the same answer as asking every `WindowSpec.accepts`, but evaluates each
    distinct filter (event types, lateness, conditions) and each field once; windows of equal
    length slide together.
    """

    __slots__ = ("specs", "names", "max_window_ms", "min_window_ms", "kinds", "_filters",
                 "_fields", "_always", "slides", "slide_windows", "_mask", "_folds",
                 "values", "fresh_state")  # fmt: skip

    def __init__(self, specs: Sequence[WindowSpec]) -> None:
        if not specs:
            raise ValueError("an entity window needs at least one feature")
        self.specs = tuple(specs)
        self.names = [spec.name for spec in self.specs]
        self.max_window_ms = max(spec.window_ms for spec in self.specs)
        self.kinds = [_KIND[spec.aggregation] for spec in self.specs]
        filters: dict[tuple, int] = {}
        numeric: dict[str, int] = {}
        present: dict[str, int] = {}
        self._always = 0
        slides: dict[int, list[tuple[int, int, str | None]]] = {}
        for i, spec in enumerate(self.specs):
            bit = 1 << i
            key = (spec.event_types, spec.lateness_ms, spec.conditions)
            filters[key] = filters.get(key, 0) | bit
            kind = self.kinds[i]
            if kind == _COUNT:
                self._always |= bit
            elif kind == _DISTINCT:
                present[spec.field] = present.get(spec.field, 0) | bit  # type: ignore[index]
            else:
                numeric[spec.field] = numeric.get(spec.field, 0) | bit  # type: ignore[index]
            if kind != _LAST:
                slides.setdefault(spec.window_ms, []).append((i, kind, spec.field))
        self._filters = [
            (types, late, conds, bits) for (types, late, conds), bits in filters.items()
        ]
        self._fields = [
            (name, numeric.get(name, 0), present.get(name, 0)) for name in {*numeric, *present}
        ]
        self.slides = sorted(slides.items())
        """`(window_ms, [(feature index, kind, field)])`: features whose state slides together."""
        self.slide_windows = tuple(window_ms for window_ms, _members in self.slides)
        self.min_window_ms = self.slides[0][0] if self.slides else self.max_window_ms
        self._mask = self._compile_mask()
        self._folds: dict[int, Fold] = {}
        self.values: Callable[[list[int], list, int], dict] = self._compile_values()
        """`values(counts, state, clock)`: every feature's value from an `EntityWindow`'s state,
        as one dict literal, generated once."""
        self.fresh_state: Callable[[], list] = self._compile_fresh_state()
        """A new empty state list: per feature `0` (exact sum), `[]` (sorted values), `{}`
        (value counts) or `None` (a count, which lives in the counts; no `last` yet), as one
        list display."""

    def mask(self, observation: Observation) -> int:
        """Bit `i` set when feature `i` accepts the observation (see `WindowSpec.accepts`)."""
        return self._mask(observation.values, observation.event_type, observation.lateness_ms)

    def fold(self, mask: int) -> Fold:
        """The generated code that adds (and, per slide group, removes) an observation whose
        accepting features are `mask`: compiled the first time the mask is seen."""
        found = self._folds.get(mask)
        if found is None:
            found = self._folds[mask] = self._compile_fold(mask)
        return found

    def _compile_fold(self, mask: int) -> Fold:
        """Straight-line `add` and `remove` bodies for one mask, so the stream never loops over
        features or branches on their aggregation per observation. `add(n, state, values, ts,
        clock, entry)` folds into each slide group whose window holds `ts` and into the `last`
        features it beats; `removes[g](n, state, values)` takes the observation out of slide
        group `g` (None when it feeds none). A `last` state is `(entry, value)` of the greatest
        observation its feature accepted (an `EntityWindow` entry, which orders by
        `(ts, event_type, event_id)`): it never slides, since once that one leaves
        the window every other accepted one has too (`values` then reads None)."""
        namespace: dict[str, object] = {
            "_fixed": fixed_point, "_insort": insort, "_bisect": bisect_right
        }  # fmt: skip
        fields: dict[str, str] = {}

        def field_var(name: str | None) -> str:
            if name not in fields:
                fields[name] = f"v{len(fields)}"
                namespace[f"F{len(fields) - 1}"] = name
            return fields[name]

        add_groups: list[list[str]] = []
        removes_source: list[tuple[list[str], list[str]] | None] = []  # per group: reads, lines
        fixed_needed: set[str] = set()
        for window_ms, members in self.slides:
            chosen = [member for member in members if mask >> member[0] & 1]
            if not chosen:
                add_groups.append([])
                removes_source.append(None)
                continue
            add, remove, reads = [], [], []
            for i, kind, name in chosen:
                if kind in (_COUNT, _MEAN):  # the only values that read a count
                    add.append(f"n[{i}] += 1")
                    remove.append(f"n[{i}] -= 1")
                if kind == _COUNT:
                    continue
                var = field_var(name)
                if var not in reads:
                    reads.append(var)
                if kind in (_SUM, _MEAN):
                    fixed_needed.add(var)
                    add.append(f"state[{i}] += x{var}")
                    remove.append(f"state[{i}] -= _fixed({var})")
                elif kind == _DISTINCT:
                    add += [f"c = state[{i}]", f"c[{var}] = c.get({var}, 0) + 1"]
                    remove += [
                        f"c = state[{i}]", f"left = c[{var}] - 1",
                        "if left:", f"    c[{var}] = left", "else:", f"    del c[{var}]",
                    ]  # fmt: skip
                else:
                    add.append(f"_insort(state[{i}], {var})")
                    remove += [f"s = state[{i}]", f"del s[_bisect(s, {var}) - 1]"]
            add_groups.append([f"    if ts > clock - {window_ms}:", *(f"        {a}" for a in add)])
            removes_source.append((reads, remove))
        for i, kind in enumerate(self.kinds):
            if kind == _LAST and mask >> i & 1:
                var = field_var(self.specs[i].field)
                add_groups.append([
                    f"    current = state[{i}]",
                    "    if current is None or entry > current[0]:",
                    f"        state[{i}] = (entry, {var})",
                ])  # fmt: skip
        reads = [f"    {var} = values[F{var[1:]}]" for var in fields.values()]
        lines = ["def add(n, state, values, ts, clock, entry):", *reads]
        lines += [f"    x{var} = _fixed({var})" for var in fields.values() if var in fixed_needed]
        lines += [line for group in add_groups for line in group] or ["    pass"]
        exec("\n".join(lines), namespace)  # noqa: S102 - generated from our own templates
        removes: list[Callable[[list[int], list, Mapping[str, Value]], None] | None] = []
        for g, source in enumerate(removes_source):
            if source is None:
                removes.append(None)
                continue
            reads, remove = source
            body = [f"def remove{g}(n, state, values):"]
            body += [f"    {var} = values[F{var[1:]}]" for var in reads]
            body += [f"    {line}" for line in remove]
            exec("\n".join(body), namespace)  # noqa: S102 - generated from our own templates
            removes.append(namespace[f"remove{g}"])  # type: ignore[arg-type]
        return Fold(namespace["add"], tuple(removes))  # type: ignore[arg-type]

    def _compile_mask(self) -> Callable[[Mapping[str, Value], str, int], int]:
        """Generate `mask(values, event_type, lateness)` as straight-line Python, once per
        entity.

        The stream evaluates it for every observation, so loops over features, fields and
        conditions are unrolled. User values never become source text: constants are passed in
        the function's namespace by name.
        """
        namespace: dict[str, object] = {"_finite": math.isfinite}
        lines = ["def mask(values, event_type, lateness):", f"    usable = {self._always}"]
        for n, (name, numeric_bits, present_bits) in enumerate(self._fields):
            namespace[f"F{n}"] = name
            lines += [
                f"    value = values.get(F{n})",
                "    if value is not None:",
                f"        usable |= {present_bits}",
                "        if value.__class__ is float and _finite(value):",
                f"            usable |= {numeric_bits}",
            ]
        lines.append("    bits = 0")
        for g, (types, allowed, conditions, bits) in enumerate(self._filters):
            namespace[f"T{g}"] = types
            tests = [f"event_type in T{g}", f"lateness <= {allowed}"]
            for c, condition in enumerate(conditions):
                field_name, constant = f"CF{g}_{c}", f"CV{g}_{c}"
                namespace[field_name] = condition.field
                namespace[constant] = condition.value
                tests.append(_condition_source(condition.op, f"values.get({field_name})", constant))
            lines += [f"    if {' and '.join(tests)}:", f"        bits |= {bits}"]
        lines.append("    return bits & usable")
        exec("\n".join(lines), namespace)  # noqa: S102 - generated from our own templates
        return namespace["mask"]  # type: ignore[return-value]

    def _compile_values(self) -> Callable[[list[int], list, int], dict]:
        """Generate `values` as one dict display: the commit builds it for every changed entity,
        and a loop over the features with a branch per aggregation cost twice as much. Feature
        names reach the source only as namespace constants."""
        namespace: dict[str, object] = {"_fixed": from_fixed_point}
        items = []
        for i, kind in enumerate(self.kinds):
            namespace[f"N{i}"] = self.names[i]
            window = self.specs[i].window_ms
            value = {
                _COUNT: f"float(n[{i}])",
                _SUM: f"_fixed(state[{i}])",  # 0.0 when empty
                _MEAN: f"(_fixed(state[{i}]) / n[{i}] if n[{i}] else None)",
                _DISTINCT: f"float(len(state[{i}]))",
                _MIN: f"(state[{i}][0] if state[{i}] else None)",
                _MAX: f"(state[{i}][-1] if state[{i}] else None)",
                _LAST: f"(state[{i}][1] if state[{i}] and state[{i}][0][0] > clock - {window}"
                " else None)",
            }[kind]
            items.append(f"        N{i}: {value},")
        source = "\n".join(["def values(n, state, clock):", "    return {", *items, "    }"])
        exec(source, namespace)  # noqa: S102 - generated from our own templates
        return namespace["values"]  # type: ignore[return-value]

    def _compile_fresh_state(self) -> Callable[[], list]:
        empty = {_COUNT: "None", _DISTINCT: "{}", _SUM: "0", _MEAN: "0", _LAST: "None"}
        items = ", ".join(empty.get(kind, "[]") for kind in self.kinds)
        namespace: dict[str, object] = {}
        exec(f"def fresh_state():\n    return [{items}]", namespace)  # noqa: S102 - our template
        return namespace["fresh_state"]  # type: ignore[return-value]


class Fold(NamedTuple):
    """What `WindowPlan.fold` generates for one mask."""

    add: Callable[[list[int], list, Mapping[str, Value], int, int, tuple], None]
    removes: tuple[Callable[[list[int], list, Mapping[str, Value]], None] | None, ...]


def _condition_source(op: Op, value: str, constant: str) -> str:
    """A Python expression for `value op constant` that is false when the value is missing."""
    if op is Op.eq:
        return f"{value} == {constant}"
    if op is Op.ne:
        return f"({value} is not None and {value} != {constant})"
    if op is Op.in_:
        return f"{value} in {constant}"
    if op is Op.not_in:
        return f"({value} is not None and {value} not in {constant})"
    symbol = {Op.lt: "<", Op.le: "<=", Op.gt: ">", Op.ge: ">="}[op]
    return f"({value}.__class__ is float and {value} {symbol} {constant})"


class EntityWindow:
    """The sliding windows of every feature of one entity instance, updated incrementally.

    `apply` folds one observation in (out of order is fine) and returns whether anything
    changed; `values()` gives every feature's value as of `clock`. The observations still inside
    the largest window are kept, so the state can be persisted and rebuilt by re-applying them
    (`observations()`); `added`/`removed` record what changed since `clear_changes()`, for
    incremental persistence.

    Per feature, by aggregation: the number of values in its window (count, mean), the exact
    sum in fixed point (sum, mean), a sorted list (min, max), value counts (distinct_count), or
    for `last` the greatest accepted observation's entry and value.
    """

    __slots__ = ("plan", "clock", "_times", "_order", "_held", "_n", "_state", "added",
                 "removed")  # fmt: skip

    def __init__(self, plan: WindowPlan) -> None:
        self.plan = plan
        self.clock: int | None = None
        self._times: list[int] = []
        self._order: list[tuple[int, str, str, int, Mapping[str, Value], tuple]] = []
        """Per held observation, sorted by `(ts, event_type, event_id)` (an entry's first
        three items, unique among held ones): the observation's fields in `Observation`'s
        order, then its fold's `removes` (so sliding needs no lookups). An entry replaces the
        `Observation`, which is not kept: one object per held observation, not two."""
        self._held: set[ObservationKey] = set()
        self._n = [0] * len(plan.kinds)
        self._state: list = plan.fresh_state()
        self.added: dict[ObservationKey, Observation] = {}
        self.removed: list[ObservationKey] = []
        """Keys forgotten since `clear_changes()` that were persisted before it (each once: a
        forgotten key is never held again, short of a reused event id, which lands in
        `added`)."""

    def apply(self, observation: Observation) -> bool:
        """Fold `observation` into every feature that accepts it; False when it changes nothing
        (accepted by none, a duplicate, or older than the largest window)."""
        ts, event_type, event_id, lateness, values = observation
        key = (event_type, event_id)
        held = self._held
        if key in held:
            return False
        plan = self.plan
        mask = plan._mask(values, event_type, lateness)
        if not mask:
            return False
        clock = self.clock
        if clock is not None and ts <= clock - plan.max_window_ms:
            return False
        add, removes = plan._folds.get(mask) or plan.fold(mask)
        # The entry is its own order key: no two held entries share (ts, event_type, event_id),
        # so comparisons never reach the rest.
        entry = (ts, event_type, event_id, lateness, values, removes)
        if clock is None or ts > clock:
            if clock is not None and self._times[0] <= ts - plan.min_window_ms:
                self._slide(clock, ts)  # something leaves a window (the test is the cheap part)
            self.clock = clock = ts
            self._times.append(ts)
            self._order.append(entry)
        else:
            index = bisect_right(self._order, entry)
            self._times.insert(index, ts)
            self._order.insert(index, entry)
        held.add(key)
        self.added[key] = observation
        add(self._n, self._state, values, ts, clock, entry)
        if self._times[0] <= clock - plan.max_window_ms:  # anything to forget
            self._prune(clock - plan.max_window_ms)
        return True

    def _slide(self, old_clock: int, new_clock: int) -> None:
        """Remove from each feature what its window leaves as the clock advances."""
        times, order = self._times, self._order
        n, state = self._n, self._state
        for group, window_ms in enumerate(self.plan.slide_windows):
            edge = new_clock - window_ms
            if times[0] > edge:
                return  # nothing leaves this window, nor the longer ones after it
            start = bisect_right(times, old_clock - window_ms)
            for entry in order[start : bisect_right(times, edge)]:
                remove = entry[5][group]
                if remove is not None:
                    remove(n, state, entry[4])

    def _prune(self, horizon: int) -> None:
        """Forget observations at or before `horizon` (outside every window already)."""
        stop = bisect_right(self._times, horizon)
        if not stop:
            return
        for entry in self._order[:stop]:
            key = (entry[1], entry[2])
            self._held.remove(key)
            if self.added.pop(key, None) is None:
                self.removed.append(key)
        del self._times[:stop]
        del self._order[:stop]

    def values(self) -> dict[str, float | None]:
        """Every feature's value as of `clock`; `None` where the window has no value (all of
        them before any observation was accepted)."""
        if self.clock is None:
            return dict.fromkeys(self.plan.names)
        return self.plan.values(self._n, self._state, self.clock)

    def observations(self) -> list[Observation]:
        """The observations held (inside the largest window), oldest first."""
        return [Observation(*entry[:5]) for entry in self._order]

    def clear_changes(self) -> None:
        """Forget `added`/`removed` once they are persisted."""
        self.added = {}
        self.removed = []
