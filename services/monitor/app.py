"""Wiring of the monitor: settings -> one sink worker per table, the analyzer, the alert
publisher and the health server, each sink and the analyzer in its own thread. No logic here.

One worker per table rather than one for all three topics: each table gets its own consumer
group (`<monitor_group_id>.<table>`), so a slow or failing insert into one table never holds
back the others, each can be scaled on its own (`monitor_sinks` picks the tables a process
fills), and a batch maps to exactly one insert.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from schemas.messages import Alert
from schemas.topics import ALERTS
from services.common.codec import DecodeError, decode, encode
from services.common.kafka import DeadLetters, consumer_config, make_producer
from services.common.logging import configure_logging
from services.common.metrics import serve_health
from services.common.worker import FixedBatch, KafkaWorker, tune_garbage_collector
from services.monitor.analyzer import Analyzer, Publish
from services.monitor.references import References
from services.monitor.settings import MonitorSettings
from services.monitor.sink import SINKS, Sink
from services.monitor.store import Store

log = logging.getLogger(__name__)


class AlertsNotPublished(Exception):
    """The broker did not acknowledge every alert in time."""


def alert_publisher(settings: MonitorSettings, timeout_s: float = 10.0) -> Publish:
    """A `Publish` that produces alerts to `sluice.alerts` (key = model) and waits for acks."""
    producer = make_producer(settings)

    def publish(alerts: Sequence[Alert]) -> None:
        failures: list[KafkaError] = []

        def on_delivery(error: KafkaError | None, _message: object) -> None:
            if error is not None:
                failures.append(error)

        for alert in alerts:
            producer.produce(ALERTS.name, encode(alert), key=alert.model, on_delivery=on_delivery)
        if producer.flush(timeout_s) > 0 or failures:
            reason = str(failures[0]) if failures else f"no ack within {timeout_s}s"
            raise AlertsNotPublished(f"{len(alerts)} alerts: {reason}")

    return publish


def published_alerts(settings: MonitorSettings, timeout_s: float = 30.0) -> list[Alert]:
    """Every alert on `sluice.alerts`, oldest first per partition, read up to its end.

    Reads by assignment (no group join, nothing committed) until each partition reports EOF,
    which librdkafka derives from the fetch response's high watermark. An
    alert that does not decode goes to `sluice.dlq` (again at every start, as it is read again).
    """
    group = f"{settings.monitor_group_id}.restore"
    config = consumer_config(settings, group, **{"enable.partition.eof": True})
    consumer = Consumer(config)
    dead_letters = DeadLetters(settings, group)
    try:
        topic = consumer.list_topics(ALERTS.name, timeout=10).topics[ALERTS.name]
        pending = set(topic.partitions)
        consumer.assign([TopicPartition(ALERTS.name, p, OFFSET_BEGINNING) for p in pending])
        alerts: list[Alert] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                continue
            try:
                alerts.append(decode(Alert, message.value(), settings.kafka_max_message_bytes))
            except DecodeError as exc:
                dead_letters.send(message, exc.body)
        if pending:
            log.warning("alerts not read to the end", extra={"partitions": sorted(pending)})
        return alerts
    finally:
        consumer.close()
        dead_letters.close()


def sink_workers(settings: MonitorSettings) -> list[KafkaWorker]:
    """One `KafkaWorker` per table in `monitor_sinks`, each with its own ClickHouse session."""
    workers = []
    for table in settings.monitor_sinks:
        spec = SINKS[table]
        group = f"{settings.monitor_group_id}.{table}"
        workers.append(
            KafkaWorker(
                settings,
                service="monitor",
                group_id=group,
                topics=[spec.topic],
                handler=Sink(Store.from_settings(settings), spec, group),
                batch_policy=FixedBatch(
                    settings.monitor_sink_batch_size, settings.monitor_sink_max_wait_ms / 1000
                ),
            )
        )
    return workers


def build_analyzer(settings: MonitorSettings, publish: Publish | None = None) -> Analyzer:
    """The analyzer with its own ClickHouse session and (by default) the Kafka publisher."""
    return Analyzer(
        settings,
        Store.from_settings(settings),
        References(settings.model_repository),
        publish or alert_publisher(settings),
    )


@dataclass
class Monitor:
    """The running parts of one monitor process."""

    workers: list[KafkaWorker]
    analyzer: Analyzer | None
    stopping: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Start every sink worker and the analyzer in daemon threads."""
        for worker in self.workers:
            self.threads.append(
                threading.Thread(target=worker.run, name=f"sink-{worker.topics[0]}", daemon=True)
            )
        if self.analyzer is not None:
            self.threads.append(
                threading.Thread(
                    target=self.analyzer.run, args=(self.stopping,), name="analyzer", daemon=True
                )
            )
        for thread in self.threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finish in-flight batches, commit, leave the groups; wait for every thread."""
        self.stopping.set()
        for worker in self.workers:
            worker.stop()
        for thread in self.threads:
            thread.join(timeout_s)

    def ready(self) -> bool:
        """Every sink has partitions assigned."""
        return all(worker.ready() for worker in self.workers)


def main() -> None:
    """Run until SIGTERM/SIGINT."""
    settings = MonitorSettings()
    configure_logging("monitor", settings.log_level, settings.log_format)
    Store.from_settings(settings).ensure_tables()
    analyzer = build_analyzer(settings) if settings.monitor_analyzer else None
    if analyzer is not None:
        firing = analyzer.book.restore(published_alerts(settings))
        log.info("alert states restored", extra={"firing": firing})
    monitor = Monitor(sink_workers(settings), analyzer)
    if settings.metrics_port:
        serve_health(settings.metrics_port, monitor.ready)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: monitor.stopping.set())
    tune_garbage_collector()
    monitor.start()
    log.info("monitor started", extra={"sinks": settings.monitor_sinks})
    monitor.stopping.wait()
    monitor.stop()
