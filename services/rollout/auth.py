"""API keys of the operator API: a deliberately minimal scheme until the gateway's lands.

Keys come from settings (`rollout_admin_keys`, `rollout_viewer_keys`). With none configured
every request is allowed (local development). Otherwise a request presents its key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; reading needs any known key, changing a
rollout needs an admin key. No users, scopes or rotation: the gateway's key scheme is meant to
replace this module.

A configured entry is either the SHA-256 of the key, written `sha256:<64 hex digits>` (what
belongs in an environment or a secret store: `printf %s "$KEY" | sha256sum`), or the key itself
(local development; a warning says so at start-up, without the key). Only digests are kept in
memory, and a presented key's digest is compared with every configured digest in constant time,
so neither the time taken nor an early exit reveals which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import Request
from pydantic import SecretStr

from services.common.apikeys import presented_key

Role = Literal["admin", "viewer"]

HASHED_ENTRY = re.compile(r"sha256:([0-9a-fA-F]{64})")
"""A configured key given as its digest."""

log = logging.getLogger(__name__)


def key_digest(key: str) -> bytes:
    """The SHA-256 digest of a key in clear."""
    return hashlib.sha256(key.encode()).digest()


def configured_digest(entry: str) -> tuple[bytes, bool]:
    """(digest, hashed) of one configured entry: `sha256:<hex>` or a key in clear."""
    hashed = HASHED_ENTRY.fullmatch(entry.strip())
    if hashed:
        return bytes.fromhex(hashed.group(1)), True
    return key_digest(entry), False


class AuthError(Exception):
    """A request without the role it needs; `status` is 401 (no valid key) or 403."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ApiKeys:
    """The configured keys and the FastAPI dependencies that check them."""

    def __init__(self, admin: list[SecretStr], viewer: list[SecretStr]) -> None:
        self._keys: list[tuple[bytes, Role]] = []
        in_clear = 0
        for role, entries in (("admin", admin), ("viewer", viewer)):
            for entry in entries:
                digest, hashed = configured_digest(entry.get_secret_value())
                self._keys.append((digest, role))
                in_clear += not hashed
        if in_clear:
            log.warning(
                "rollout API keys configured in clear; configure sha256:<hex> digests instead",
                extra={"keys_in_clear": in_clear},
            )

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def role_of(self, presented: str) -> Role | None:
        """The role of a presented key, None if unknown (admin wins if a key is both)."""
        digest = key_digest(presented)
        found: Role | None = None
        for configured, role in self._keys:  # every key, no early exit
            if hmac.compare_digest(digest, configured) and found != "admin":
                found = role
        return found

    def require(self, role: Role) -> Callable[[Request], Awaitable[None]]:
        """A dependency that raises `AuthError` unless the request's key has `role` (admin
        satisfies viewer). Async although it awaits nothing: FastAPI runs a plain `def`
        dependency in its thread pool."""

        async def check(request: Request) -> None:
            if not self.enabled:
                return
            headers = request.headers
            presented = presented_key(headers.get("authorization"), headers.get("x-api-key"))
            if not presented:
                raise AuthError(401, "unauthorized", "an API key is required")
            found = self.role_of(presented)
            if found is None:
                raise AuthError(401, "unauthorized", "unknown API key")
            if role == "admin" and found != "admin":
                raise AuthError(403, "forbidden", "this operation needs an admin key")

        return check
