"""What drives the two stream stages against Kafka: a faust-streaming app (the default) or the
shared confluent-kafka worker loop. Both run the same `Router` and `Applier`, consume the source
topics and the repartition topic in one consumer group, and give the same Redis contents.

Measured on the 2-core build machine: faust's consumer creates two asyncio tasks per record
(`Consumer._drain_messages` awaits `wait_first` for every record), which caps a faust agent at
about 5,000 records/s per process before any work is done (plain aiokafka read the same topic at
300,000/s); with the features work on top, the worker loop runtime is ~3x faster per process
(`tests/bench/bench_features.py`). Neither needs faust tables: the window state lives in Redis
beside the values.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import faust
from aiokafka.codec import has_lz4
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from redis import Redis, RedisError

from schemas.messages import Event
from schemas.topics import DLQ
from services.common.codec import DecodeError, decode, encode
from services.common.kafka import client_config, replication_factor
from services.common.worker import FixedBatch, KafkaWorker, Output, Record, RetryableError
from services.common.worker import dead_letter as dead_letter_output
from services.features.definitions import FeatureRegistry
from services.features.settings import FeaturesSettings
from services.features.store import CommitConflict, StateStore
from services.features.stream import Applier, Router, SourceRecord

log = logging.getLogger(__name__)

REPARTITION_RETENTION_MS = 24 * 3600 * 1000
"""The repartition topic only needs to outlive a consumer outage; a day is plenty."""


class TopicLayoutError(RuntimeError):
    """The repartition topic exists with another partition count than the settings say."""


class Pipeline:
    """The two stages of one features app, bound to its registry and Redis."""

    def __init__(self, settings: FeaturesSettings, registry: FeatureRegistry, redis: Redis) -> None:
        self.settings = settings
        self.registry = registry
        self.sources = registry.sources()
        self.repartition_topic = settings.features_repartition_topic
        partitions = settings.features_repartition_partitions
        self.router = Router(registry, partitions)
        self.applier = Applier(
            registry,
            StateStore(redis, settings.features_app_id),
            partitions,
            cache_entities=settings.features_cache_entities,
            max_commit_observations=settings.features_commit_observations,
        )

    def ensure_topics(self) -> None:
        """Create the repartition topic with its explicit partition count if it is missing."""
        admin = AdminClient(client_config(self.settings))
        name, partitions = self.repartition_topic, self.settings.features_repartition_partitions
        metadata = admin.list_topics(timeout=10)
        existing = metadata.topics.get(name)
        if existing is None:
            config = {"cleanup.policy": "delete", "retention.ms": str(REPARTITION_RETENTION_MS)}
            replicas = replication_factor(len(metadata.brokers))
            topic = NewTopic(name, partitions, replicas, config=config)
            future = admin.create_topics([topic])[name]
            try:
                future.result(timeout=15)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
            self._wait_for_partitions(admin, name, partitions)
        elif len(existing.partitions) != partitions:
            raise TopicLayoutError(
                f"{name} has {len(existing.partitions)} partitions, settings say {partitions}; "
                "its markers in Redis are per partition, so the count cannot change"
            )

    @staticmethod
    def _wait_for_partitions(admin: AdminClient, name: str, partitions: int) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            topic = admin.list_topics(name, timeout=5).topics.get(name)
            if topic is not None and topic.error is None and len(topic.partitions) == partitions:
                return
            time.sleep(0.05)
        raise TopicLayoutError(f"topic {name} did not appear")


# -- the shared worker loop --------------------------------------------------------------------


def build_worker(pipeline: Pipeline) -> KafkaWorker:
    """Both stages as one `KafkaWorker` handler: source records are routed (outputs to the
    repartition topic, acked before the source offsets commit), repartition records applied."""
    settings = pipeline.settings
    repartition = pipeline.repartition_topic

    def handle(records: list[Record]) -> list[Output]:
        source = [
            SourceRecord(r.topic, r.partition, r.offset, r.value)
            for r in records
            if r.topic != repartition
        ]
        shuffled = [(r.partition, r.value) for r in records if r.topic == repartition]
        outputs: list[Output] = []
        if source:
            outputs = [
                Output(topic=repartition, value=payload, partition=partition)
                for partition, payload in pipeline.router.route(source)
            ]
        if shuffled:
            try:
                pipeline.applier.apply(shuffled)
            except (RedisError, CommitConflict) as exc:
                raise RetryableError(f"online store unavailable or contended: {exc}") from exc
        return outputs

    decoders: dict[str, type[Event] | None] = {topic: Event for topic in pipeline.sources}
    decoders[repartition] = None
    return KafkaWorker(
        settings,
        service="features",
        group_id=settings.features_app_id,
        topics=[*pipeline.sources, repartition],
        handler=handle,
        decoders=decoders,
        batch_policy=FixedBatch(
            settings.features_batch_size, settings.features_batch_wait_ms / 1000
        ),
    )


# -- faust ----------------------------------------------------------------------------------


class FaustRuntime:
    """The faust-streaming app: agent `route` on the source topics, agent `apply` on the
    repartition topic. Redis work runs on one helper thread so the event loop (heartbeats,
    fetches) never blocks on it."""

    def __init__(self, pipeline: Pipeline) -> None:
        if not has_lz4():
            raise RuntimeError(
                "faust (aiokafka) cannot read lz4-compressed records, which every Sluiceway "
                "producer writes: install `cramjam`, or run SLUICE_FEATURES_RUNTIME=worker"
            )
        self.pipeline = pipeline
        settings = pipeline.settings
        self.assigned = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="features-redis")
        self.app = faust.App(
            settings.features_app_id,
            broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
            broker_credentials=_faust_credentials(settings),
            broker_session_timeout=settings.features_broker_session_timeout_s,
            broker_rebalance_timeout=settings.features_broker_rebalance_timeout_s,
            broker_heartbeat_interval=min(3.0, settings.features_broker_session_timeout_s / 4),
            consumer_auto_offset_reset="earliest",
            datadir=str(settings.features_data_dir),
            web_enabled=False,
            topic_disable_leader=True,
            topic_allow_declare=False,
            producer_acks=-1,
            stream_buffer_maxsize=max(4 * settings.features_batch_size, 1000),
        )
        raw = {"value_serializer": "raw", "key_serializer": "raw"}
        self.source = self.app.topic(*pipeline.sources, **raw)
        self.repartition = self.app.topic(pipeline.repartition_topic, **raw)
        self.dlq = self.app.topic(DLQ.name, **raw)
        self.app.agent(self.source, name="route")(self._route)
        self.app.agent(self.repartition, name="apply")(self._apply)
        self.app.on_partitions_assigned.connect(self._on_assigned)

    def ready(self) -> bool:
        """True once the group assigned this process partitions."""
        return self.assigned.is_set()

    def run(self) -> None:
        """Run the app until SIGTERM/SIGINT (faust's worker handles the signals)."""
        worker = faust.Worker(self.app, quiet=True, override_logging=False, loglevel="warning")
        worker.execute_from_commandline()

    async def _on_assigned(self, _app, assigned, **_kwargs) -> None:
        if assigned:
            self.assigned.set()

    async def _route(self, stream) -> None:
        settings = self.pipeline.settings
        within = settings.features_batch_wait_ms / 1000
        async for events in stream.take_events(settings.features_batch_size, within=within):
            records: list[SourceRecord] = []
            letters = []
            for event in events:
                message = event.message
                try:
                    value = decode(Event, message.value, settings.kafka_max_message_bytes)
                except DecodeError as exc:
                    letters.append(self._dead_letter(message, exc))
                    continue
                records.append(
                    SourceRecord(message.topic, message.partition, message.offset, value)
                )
            deliveries = [await self.dlq.send(value=letter) for letter in letters]
            if records:
                for partition, payload in self.pipeline.router.route(records):
                    deliveries.append(
                        await self.repartition.send(value=payload, partition=partition)
                    )
            await asyncio.gather(*deliveries)

    def _dead_letter(self, message, exc: DecodeError) -> bytes:
        output = dead_letter_output(
            message.topic,
            message.partition,
            message.offset,
            message.key,
            message.value,
            exc.body,
            self.pipeline.settings.features_app_id,
        )
        return encode(output.value)  # type: ignore[arg-type]

    async def _apply(self, stream) -> None:
        settings = self.pipeline.settings
        within = settings.features_batch_wait_ms / 1000
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(settings.features_batch_size, within=within):
            messages = [(event.message.partition, event.value) for event in events]
            await _retrying(
                lambda m=messages: loop.run_in_executor(
                    self._executor, self.pipeline.applier.apply, m
                )
            )


async def _retrying(attempt: Callable[[], asyncio.Future], max_backoff_s: float = 5.0) -> None:
    """Await `attempt()` until it succeeds; Redis outages back off, never drop the batch."""
    delay = 0.05
    while True:
        try:
            await attempt()
            return
        except (RedisError, CommitConflict) as exc:
            log.warning(
                "online store unavailable or contended, retrying", extra={"error": str(exc)}
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_backoff_s)


def _faust_credentials(
    settings: FeaturesSettings,
) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """faust's credentials from the shared Kafka settings: SASL (with TLS for SASL_SSL), TLS
    alone for SSL, None for PLAINTEXT."""
    if settings.kafka_security_protocol == "SSL":
        return faust.SSLCredentials(
            ssl.create_default_context(cafile=settings.kafka_ssl_ca_location)
        )
    if not settings.kafka_security_protocol.startswith("SASL"):
        return None
    password = settings.kafka_sasl_password
    ssl_context = None
    if settings.kafka_security_protocol == "SASL_SSL":
        ssl_context = ssl.create_default_context(cafile=settings.kafka_ssl_ca_location)
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=password.get_secret_value() if password else None,
        mechanism=settings.kafka_sasl_mechanism or "PLAIN",
        ssl_context=ssl_context,
    )
