"""Wiring of the features service: settings -> definitions, Redis, the stream runtime and the
HTTP API. No logic of its own."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from redis import Redis

from services.common.apikeys import authorize, parse_keys
from services.common.logging import configure_logging
from services.common.worker import tune_garbage_collector
from services.features.api import create_api
from services.features.definitions import FeatureRegistry
from services.features.runtime import FaustRuntime, Pipeline, build_worker
from services.features.settings import FeaturesSettings

log = logging.getLogger(__name__)


def load_registry(settings: FeaturesSettings) -> FeatureRegistry:
    """The definitions file, with every source replaced when the settings say so."""
    registry = FeatureRegistry.load(settings.features_definitions)
    if settings.features_source_topic:
        registry = registry.with_source(settings.features_source_topic)
    return registry


def connect_redis(settings: FeaturesSettings) -> Redis:
    """A Redis client for the online store."""
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    return Redis.from_url(
        settings.redis_url, password=password, socket_timeout=5.0, socket_connect_timeout=2.0
    )


def http_api(
    settings: FeaturesSettings, registry: FeatureRegistry, redis: Redis, ready: Callable[[], bool]
) -> FastAPI:
    """The HTTP API, with the API keys of `SLUICE_FEATURES_API_KEYS` (none: open)."""
    keys = parse_keys(settings.features_api_keys)
    authorize_key = functools.partial(authorize, keys) if keys else None
    return create_api(registry, redis, ready, authorize=authorize_key)


def serve_http(
    settings: FeaturesSettings, registry: FeatureRegistry, redis: Redis, ready: Callable[[], bool]
) -> None:
    """Start the HTTP API on a daemon thread."""
    config = uvicorn.Config(
        http_api(settings, registry, redis, ready),
        host=settings.features_http_host,
        port=settings.features_http_port,
        log_level="warning",
        access_log=False,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="features-http", daemon=True).start()


def main() -> None:
    """Run the stream until SIGTERM, with the HTTP API beside it."""
    settings = FeaturesSettings()
    configure_logging("features", settings.log_level, settings.log_format)
    registry = load_registry(settings)
    redis = connect_redis(settings)
    pipeline = Pipeline(settings, registry, redis)
    pipeline.ensure_topics()
    tune_garbage_collector()
    log.info(
        "features starting",
        extra={
            "runtime": settings.features_runtime,
            "sources": pipeline.sources,
            "definitions": registry.fingerprint(),
            "features": len(registry.features),
        },
    )
    if settings.features_runtime == "faust":
        runtime = FaustRuntime(pipeline)
        if settings.features_http_port:
            serve_http(settings, registry, redis, runtime.ready)
        runtime.run()
    else:
        worker = build_worker(pipeline)
        if settings.features_http_port:
            serve_http(settings, registry, redis, worker.ready)
        worker.run()
