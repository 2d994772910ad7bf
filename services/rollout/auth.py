"""API keys of the operator API: a deliberately minimal scheme until the gateway's lands.

Keys come from settings (`rollout_admin_keys`, `rollout_viewer_keys`). With none configured
every request is allowed (local development). Otherwise a request presents its key as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; reading needs any known key, changing a
rollout needs an admin key. Keys are compared in constant time. No users, scopes or rotation:
the gateway's key scheme is meant to replace this module.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Literal

from fastapi import Request
from pydantic import SecretStr

Role = Literal["admin", "viewer"]


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
        self._admin = [key.get_secret_value().encode() for key in admin]
        self._viewer = [key.get_secret_value().encode() for key in viewer]

    @property
    def enabled(self) -> bool:
        return bool(self._admin or self._viewer)

    def role_of(self, presented: str) -> Role | None:
        """The role of a presented key, None if unknown."""
        raw = presented.encode()
        if any(hmac.compare_digest(raw, key) for key in self._admin):
            return "admin"
        if any(hmac.compare_digest(raw, key) for key in self._viewer):
            return "viewer"
        return None

    def require(self, role: Role) -> Callable[[Request], None]:
        """A dependency that raises `AuthError` unless the request's key has `role` (admin
        satisfies viewer)."""

        def check(request: Request) -> None:
            if not self.enabled:
                return
            presented = request.headers.get("x-api-key")
            authorization = request.headers.get("authorization", "")
            if presented is None and authorization.lower().startswith("bearer "):
                presented = authorization[7:].strip()
            if not presented:
                raise AuthError(401, "unauthorized", "an API key is required")
            found = self.role_of(presented)
            if found is None:
                raise AuthError(401, "unauthorized", "unknown API key")
            if role == "admin" and found != "admin":
                raise AuthError(403, "forbidden", "this operation needs an admin key")

        return check
