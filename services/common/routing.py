"""Which version serves a request: the sticky, monotone routing hash shared by inference and
rollout.

An entity key maps to a bucket in [0, 1) by a 64-bit BLAKE2b hash (stable across processes,
machines and languages: the first 8 bytes of `blake2b(key, digest_size=8)`, big-endian, / 2**64).
Canaries own the lowest buckets, in the order of their versions, and the champion owns the rest:
a canary at weight w serves buckets [0, w). Raising w only adds buckets, so a key on the canary at
10% stays on it at 30% (monotone), and a key never flips between versions while weights hold
(sticky). Shadow copies are sampled per request, with a hash salted by the version, independent of
the live split.
"""

from __future__ import annotations

import hashlib

from schemas.messages import Route, RouteRole, RoutingTable

_SCALE = float(2**64)


def bucket(key: str, salt: str = "") -> float:
    """The key's position in [0, 1); deterministic everywhere."""
    digest = hashlib.blake2b((salt + key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def champion_of(table: RoutingTable) -> str:
    """The version that serves whatever no canary claims."""
    for entry in table.entries:
        if entry.role is RouteRole.champion:
            return entry.version
    raise ValueError(f"routing table of {table.model} has no champion")


def canary_ranges(table: RoutingTable) -> list[tuple[float, str]]:
    """Cumulative upper bucket bounds of the canaries, ordered by version (numeric first)."""
    canaries = sorted(
        (e for e in table.entries if e.role is RouteRole.canary and e.weight > 0),
        key=lambda e: (
            not e.version.isdigit(),
            int(e.version) if e.version.isdigit() else 0,
            e.version,
        ),
    )
    bounds, upper = [], 0.0
    for entry in canaries:
        upper = min(1.0, upper + entry.weight)
        bounds.append((upper, entry.version))
    return bounds


def route_for(entity_key: str, table: RoutingTable) -> tuple[str, Route]:
    """The live (reply-path) version for `entity_key` and whether it is champion or canary."""
    position = bucket(entity_key)
    for upper, version in canary_ranges(table):
        if position < upper:
            return version, Route.canary
    return champion_of(table), Route.champion


def shadows_for(request_id: str, table: RoutingTable) -> list[str]:
    """Shadow versions that score a copy of this request (never on the reply path)."""
    return [
        entry.version
        for entry in table.entries
        if entry.role is RouteRole.shadow
        and entry.shadow_sample_rate > 0
        and bucket(request_id, salt=f"shadow:{entry.version}:") < entry.shadow_sample_rate
    ]
