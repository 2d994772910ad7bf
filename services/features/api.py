"""The features service's HTTP API, for humans and debugging: one entity's online features, plus
`/healthz`, `/readyz` and `/metrics`. Routes are thin: parse, call `read_online`, return.

API keys: the wiring passes an `Authorize` check (the gateway's key scheme: hashed keys with
roles, `Authorization: Bearer <key>` or `X-API-Key`). With one, reading features needs the
`admin` role (they are per-entity data, served here for debugging); health and metrics stay
open. Without one every call is allowed, as on the local dev cluster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, Field
from redis import Redis, RedisError

from services.common.apikeys import presented_key
from services.features.client import UnknownFeature, read_online
from services.features.definitions import FeatureRegistry

Authorize = Callable[[str | None, str], tuple[int, str] | None]
"""Whether a presented API key (None when the request has none) may act in a role: None to
proceed, else (401 or 403, reason)."""

READ_ROLE = "admin"
"""The role that may read an entity's features."""


class FeatureValue(BaseModel):
    """One served value."""

    value: float
    defaulted: bool = Field(description="True when the declared default was served.")


class EntityFeatures(BaseModel):
    """An entity instance's online features as inference would be served them now."""

    entity: str
    entity_id: str
    as_of_ms: int | None = Field(description="Event time the values are computed as of.")
    freshness_s: float | None = Field(description="Age of the newest contributing event.")
    features: dict[str, FeatureValue]


class ApiError(Exception):
    """An error with an HTTP status and the project's error body."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def now_ms() -> int:
    """Wall-clock time in epoch milliseconds."""
    return int(time.time() * 1000)


def create_api(
    registry: FeatureRegistry,
    redis: Redis,
    ready: Callable[[], bool],
    clock: Callable[[], int] = now_ms,
    authorize: Authorize | None = None,
) -> FastAPI:
    """The FastAPI app; `ready` answers `/readyz` (e.g. "the stream has partitions");
    `authorize` checks API keys (None: no keys, every call allowed)."""
    api = FastAPI(title="Sluiceway features", version="1")

    def role(name: str):
        async def check(  # async: a plain `def` dependency costs a thread-pool hop per request
            authorization: Annotated[str | None, Header()] = None,
            x_api_key: Annotated[str | None, Header()] = None,
        ) -> None:
            if authorize is None:
                return
            denied = authorize(presented_key(authorization, x_api_key), name)
            if denied is not None:
                code = "unauthorized" if denied[0] == 401 else "forbidden"
                raise ApiError(denied[0], code, denied[1])

        return Depends(check)

    @api.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        body = {"error": {"code": exc.code, "message": exc.message, "details": None}}
        return JSONResponse(body, status_code=exc.status)

    @api.get(
        "/v1/features/{entity}/{entity_id}",
        response_model=EntityFeatures,
        dependencies=[role(READ_ROLE)],
    )
    def get_features(
        entity: str,
        entity_id: str,
        names: str | None = Query(None, description="Comma-separated features (default: all)."),
    ) -> EntityFeatures:
        return entity_features(registry, redis, entity, entity_id, names, clock())

    @api.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz() -> JSONResponse:
        ok = ready()
        return JSONResponse(
            {"status": "ready" if ok else "not_ready"}, status_code=200 if ok else 503
        )

    @api.get("/metrics")
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return api


def entity_features(
    registry: FeatureRegistry,
    redis: Redis,
    entity: str,
    entity_id: str,
    names: str | None,
    at_ms: int,
) -> EntityFeatures:
    """Read one entity's features (all of them, or the comma-separated `names`)."""
    if entity not in registry.plans:
        raise ApiError(404, "unknown_entity", f"no features are defined for entity {entity!r}")
    wanted = (
        [name.strip() for name in names.split(",") if name.strip()]
        if names
        else registry.plan(entity).names
    )
    try:
        (vector,) = read_online(redis, registry, [(entity, entity_id, wanted)], at_ms)
    except UnknownFeature as exc:
        raise ApiError(404, "unknown_feature", str(exc.args[0])) from None
    except RedisError as exc:
        raise ApiError(503, "store_unavailable", f"online store unavailable: {exc}") from None
    defaulted = set(vector.defaulted)
    return EntityFeatures(
        entity=entity,
        entity_id=entity_id,
        as_of_ms=vector.as_of_ms,
        freshness_s=vector.freshness_s(at_ms),
        features={
            name: FeatureValue(value=value, defaulted=name in defaulted)
            for name, value in vector.values.items()
        },
    )
