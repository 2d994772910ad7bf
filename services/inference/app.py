"""Wiring of the inference service: settings -> Redis, model repository, control plane,
request worker, health server. No logic of its own."""

from __future__ import annotations

import logging

from redis import Redis

from schemas.messages import PredictionRequest
from services.common.kafka import topic_partitions
from services.common.logging import configure_logging
from services.common.metrics import serve_health
from services.common.worker import FixedBatch, KafkaWorker, tune_garbage_collector
from services.inference.batcher import AdaptiveBatch
from services.inference.control import ControlPlane
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


def build(settings: InferenceSettings) -> tuple[KafkaWorker, InferenceService, ControlPlane]:
    """Create the service, its control plane and its request worker (nothing started yet)."""
    redis = Redis.from_url(
        settings.redis_url,
        password=settings.redis_password.get_secret_value() if settings.redis_password else None,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
    )
    policy = (
        AdaptiveBatch(
            max_messages=settings.inference_max_batch_size,
            target_p99_s=settings.inference_target_p99_ms / 1000,
            max_wait_s=settings.inference_target_p99_ms / 2000,
            wait_s=settings.inference_max_delay_ms / 1000,
        )
        if settings.inference_adaptive
        else FixedBatch(settings.inference_max_batch_size, settings.inference_max_delay_ms / 1000)
    )
    service = InferenceService(
        settings, redis, policy if isinstance(policy, AdaptiveBatch) else None
    )
    control = ControlPlane(settings, service)
    worker = KafkaWorker(
        settings,
        service="inference",
        group_id=settings.inference_group_id,
        topics=[settings.inference_requests_topic],
        decoders={settings.inference_requests_topic: PredictionRequest},
        handler=service,
        batch_policy=policy,
    )
    return worker, service, control


def learn_partitions(worker: KafkaWorker, service: InferenceService) -> None:
    """Tell the service the partitions of the predictions topic, for the predictions that
    answer no gateway (`InferenceService.prediction_partitions`); blocks up to 5 s on the
    broker's metadata and leaves them placed by key when it does not answer."""
    topic = service.settings.inference_predictions_topic
    service.prediction_partitions = topic_partitions(worker.producer, topic)


def main() -> None:
    """Run until SIGTERM: load the repository, follow the control topics, score requests."""
    settings = InferenceSettings()
    configure_logging("inference", settings.log_level, settings.log_format)
    worker, service, control = build(settings)
    learn_partitions(worker, service)
    loaded = service.load_repository(settings.model_repository)
    log.info("repository loaded", extra={"versions": loaded})
    control.start()
    control.caught_up.wait(30)
    if settings.metrics_port:
        serve_health(settings.metrics_port, lambda: worker.ready() and control.caught_up.is_set())
    tune_garbage_collector()
    try:
        worker.run()
    finally:
        control.stop()
