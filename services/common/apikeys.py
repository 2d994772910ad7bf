"""API keys with roles, for the gateway (`SLUICE_INGEST_API_KEYS`) and the features API
(`SLUICE_FEATURES_API_KEYS`). Keys are configured as SHA-256 hashes (never in clear), presented
keys are hashed and compared with every configured hash in constant time, and no key is ever
logged.

Roles: `predict` (predictions, Open Inference Protocol), `ingest` (events, labels), `admin`
(everything, and reading features). With no keys configured, as on the local dev cluster, every
call is allowed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

ROLES = ("predict", "ingest", "admin")

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class ApiKey:
    """One configured key: who it is and what it may do (the secret itself is not kept)."""

    name: str
    sha256: str
    roles: frozenset[str]


def hash_key(secret: str) -> str:
    """The SHA-256 hex digest under which a key is configured."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_keys(setting: str) -> list[ApiKey]:
    """Parse `name:sha256:role+role, ...`; raises ValueError naming a malformed entry."""
    keys = []
    for entry in filter(None, (part.strip() for part in setting.split(","))):
        parts = entry.split(":")
        if len(parts) != 3 or not _SHA256_HEX.fullmatch(parts[1]):
            raise ValueError(f"API key entry {parts[0]!r} is not name:sha256:roles")
        roles = frozenset(filter(None, parts[2].split("+")))
        unknown = roles - set(ROLES)
        if unknown or not roles:
            raise ValueError(f"API key {parts[0]!r} has unknown roles {sorted(unknown)}")
        keys.append(ApiKey(parts[0], parts[1].lower(), roles))
    return keys


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request presents: `Authorization: Bearer <key>`, else `X-API-Key: <key>` (the
    two header values as received; every API of Sluiceway reads keys this way)."""
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return x_api_key


def authorize(keys: list[ApiKey], presented: str | None, role: str) -> tuple[int, str] | None:
    """None if the call may proceed, else (HTTP status, reason): 401 unknown, 403 wrong role."""
    if not keys:
        return None
    if not presented:
        return 401, "an API key is required (Authorization: Bearer <key> or X-API-Key)"
    digest = hash_key(presented)
    match = None
    for key in keys:  # compare with every key so timing does not reveal which one matched
        if hmac.compare_digest(digest, key.sha256):
            match = key
    if match is None:
        return 401, "unknown API key"
    if role not in match.roles and "admin" not in match.roles:
        return 403, f"key {match.name!r} lacks the {role!r} role"
    return None
