"""Wiring of the rollout controller: settings -> ClickHouse, Redis, Kafka, the follower, the
service, its evaluation thread and the operator API. No logic here.

Start-up order matters: the decision table is ensured, the follower reads `sluice.routing` and
`sluice.alerts` to their end (so revisions and champions in force are known), the newest
recorded rollouts are restored (republishing routing the topic lacks), and only then does the
evaluation loop start and `/readyz` turn ready.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from redis import Redis

from services.common.logging import configure_logging
from services.monitor.client import MonitorClient
from services.rollout.api import create_api
from services.rollout.auth import ApiKeys
from services.rollout.evidence import MonitorEvidence
from services.rollout.publisher import ControlFollower, RoutingPublisher
from services.rollout.retrain import Retrainer, RetrainLog, RetrainPolicy, champions
from services.rollout.service import RolloutService
from services.rollout.settings import RolloutSettings
from services.rollout.store import ClickHouse, DecisionLog

log = logging.getLogger(__name__)


@dataclass
class RolloutApp:
    """The running parts of one controller process."""

    settings: RolloutSettings
    service: RolloutService
    follower: ControlFollower
    publisher: RoutingPublisher
    api: FastAPI | None = None
    retrainer: Retrainer | None = None
    restored: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self, catch_up_s: float = 30.0) -> int:
        """Ensure the table, catch up, restore, start evaluating; returns active rollouts."""
        added = self.service.decisions.ensure_table()
        if added:
            log.info("decision table migrated", extra={"added_columns": added})
        self.follower.start()
        if not self.follower.caught_up.wait(catch_up_s):
            raise TimeoutError(f"control topics not read to their end within {catch_up_s}s")
        active = self.service.restore()
        self.restored.set()
        self.thread = threading.Thread(target=self.service.run, name="rollout-loop", daemon=True)
        self.thread.start()
        if self.retrainer is not None:
            self.retrainer.start()
        log.info("rollout controller started", extra={"active_rollouts": active})
        return active

    def stop(self) -> None:
        """Finish the evaluation in hand, stop following, flush the producer."""
        self.service.stop()
        if self.retrainer is not None:
            self.retrainer.stop()
        if self.thread is not None:
            self.thread.join(30)
        self.follower.stop()
        self.publisher.close()

    def ready(self) -> bool:
        return self.restored.is_set()


def build(settings: RolloutSettings) -> RolloutApp:
    """Create every part (nothing started, nothing connected yet)."""
    redis = Redis.from_url(
        settings.redis_url,
        password=settings.redis_password.get_secret_value() if settings.redis_password else None,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )
    clickhouse = ClickHouse.from_settings(settings, settings.rollout_clickhouse_timeout_s)
    follower = ControlFollower(settings)
    publisher = RoutingPublisher(settings, redis)
    evidence = MonitorEvidence(
        MonitorClient.from_settings(settings, settings.rollout_clickhouse_timeout_s),
        clickhouse,
        follower.firing,
    )
    service = RolloutService(settings, DecisionLog(clickhouse), evidence, publisher, follower)
    follower.on_alert = service.on_alert
    app = RolloutApp(settings, service, follower, publisher)
    policy = RetrainPolicy.from_settings(settings)
    if policy is not None:
        app.retrainer = Retrainer(
            settings, policy, service, follower.firing, champions(lambda: dict(follower.tables)),
            RetrainLog(clickhouse),
        )  # fmt: skip
    keys = ApiKeys(settings.rollout_admin_keys, settings.rollout_viewer_keys)
    status_store = ClickHouse.from_settings(settings, settings.rollout_clickhouse_timeout_s)
    app.api = create_api(service, keys, app.ready, status_store)
    return app


def main() -> None:
    """Run until SIGTERM/SIGINT (uvicorn handles the signals, then the controller stops)."""
    settings = RolloutSettings()
    configure_logging("rollout", settings.log_level, settings.log_format)
    app = build(settings)
    app.start()
    try:
        uvicorn.run(
            app.api,
            host=settings.rollout_http_host,
            port=settings.rollout_http_port,
            log_level="warning",
        )
    finally:
        app.stop()
