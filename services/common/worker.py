"""The one Kafka worker loop every consuming service runs: poll -> decode -> handle -> produce ->
commit.

Guarantees, in the order a batch goes through them:

1. A message that cannot be decoded or validated becomes a `DeadLetter` on `sluice.dlq` (reason
   and original bytes); the rest of the batch, and of the partition, keeps flowing.
2. The service's handler gets the decoded batch and returns its outputs. A `RetryableError`
   (an outage of Redis, ClickHouse, ...) retries the whole batch with backoff and never drops
   it; any other exception is isolated to the record that raised it, which goes to the DLQ.
3. Every output is produced and acknowledged by the broker before any offset is committed:
   at-least-once delivery. Effects must therefore be idempotent. A producer that fails fatally
   or gets nothing acknowledged for `delivery_stall_s` is replaced and the batch's outputs are
   produced again. The acknowledgements of batch N are awaited once batch N+1 was polled and
   handled, so the loop does not idle while the broker answers; batch N's outputs are all
   acknowledged, and its offsets committed, before any output of batch N+1 is produced, so
   outputs leave in batch order. Measured on the 2-core build machine, alternating rounds:
   inference at batch 512 +11-19% predictions/s, the features worker +17-24% events/s.
4. On SIGTERM/SIGINT the batch in hand finishes, its offsets are committed, and the worker
   leaves the group.

Batching is Triton-style "size or time" (`collect_batch`): a batch is handled once it is full or
`max_wait_s` after its first message arrived; a `BatchPolicy` chooses both per batch.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel

from schemas.messages import DeadLetter, ErrorBody
from schemas.messages import Message as SchemaMessage
from schemas.topics import BY_NAME, DLQ
from services.common.codec import DecodeError, decode, encode
from services.common.kafka import consumer_config, make_producer
from services.common.metrics import metric
from services.common.settings import SluiceSettings

log = logging.getLogger(__name__)


def tune_garbage_collector() -> None:
    """Collect young objects less often and never rescan what start-up built; call once a
    service is loaded, before its loop runs.

    A worker allocates a batch's worth of short-lived objects (records, requests, outputs) per
    poll and keeps long-lived ones (models, windows, routing tables); with CPython's default
    thresholds the collector rescans the long-lived ones over and over. Measured on the 2-core
    build machine: a third of the features stream's CPU, and 63 -> 47 us per request in the
    inference handler on 512-request batches.
    """
    gc.freeze()
    gc.set_threshold(50_000, 50, 1_000)


MAX_DLQ_ORIGINAL_BYTES = 256 * 1024
"""Originals larger than this are cut in the DLQ record (the cut is stated in the details)."""


_TRANSIENT_DELIVERY_ERRORS = (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT)


class RetryableError(Exception):
    """Raised by a handler when a dependency is down: the batch is retried, never dropped."""


class RecordError(Exception):
    """Raised by a handler for one record it refuses: that record goes to the DLQ with this
    code and message; the rest of the batch is retried without it."""

    def __init__(self, code: str, message: str, details: dict | list | None = None) -> None:
        super().__init__(message)
        self.body = ErrorBody(code=code, message=message, details=details)


@dataclass(slots=True)
class Record:
    """One consumed, decoded message."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, bytes]
    value: Any
    timestamp_ms: int
    raw: bytes | None = field(default=None, repr=False)


@dataclass(slots=True)
class Output:
    """One message a handler wants produced. `value` is bytes or a schema object."""

    topic: str
    value: bytes | BaseModel
    key: bytes | str | None = None
    headers: dict[str, str | bytes] | None = None
    partition: int | None = None


Handler = Callable[[list[Record]], Iterable[Output]]


class BatchPolicy(Protocol):
    """Chooses how many messages to wait for and for how long, from what it observed."""

    def next_poll(self) -> tuple[int, float]:
        """(max messages, max wait in seconds after the first message) for the next batch."""

    def observe(self, batch_size: int, handle_seconds: float) -> None:
        """Told after each non-empty batch how big it was and how long it took to handle."""


@dataclass
class FixedBatch:
    """Flush on `max_messages` or after `max_wait_s`, whichever comes first."""

    max_messages: int = 500
    max_wait_s: float = 0.05

    def next_poll(self) -> tuple[int, float]:
        return self.max_messages, self.max_wait_s

    def observe(self, batch_size: int, handle_seconds: float) -> None:
        """A fixed policy learns nothing."""


class _Stopping(Exception):
    """Internal: a stop was requested while a batch was being retried; do not commit it."""


class _ProducerBroken(Exception):
    """Internal: the producer failed fatally or stalled; replace it and produce again."""


def _fatal(error: KafkaError) -> bool:
    """Whether a delivery error means the producer itself is broken."""
    return error.fatal() or error.code() == KafkaError._FATAL


def _describe(exc: BaseException) -> str:
    """An exception for a log line: its text, or its class when it has none (`_Stopping`)."""
    return str(exc) or type(exc).__name__


@dataclass(slots=True)
class _InFlight:
    """A batch whose outputs were produced but not yet acknowledged."""

    messages: list[Message]
    outputs: list[Output]
    errors: list[tuple[Output, KafkaError]]


@dataclass(frozen=True)
class _WorkerMetrics:
    consumed: Counter
    dead_lettered: Counter
    batch_size: Histogram
    handle_seconds: Histogram
    retries: Counter
    lag: Gauge

    @classmethod
    def for_service(cls, service: str) -> _WorkerMetrics:
        prefix = f"sluice_{service}"
        return cls(
            consumed=metric(Counter, f"{prefix}_consumed_total", "Messages consumed", ["topic"]),
            dead_lettered=metric(
                Counter,
                f"{prefix}_dead_letters_total",
                "Messages sent to the dead-letter topic",
                ["topic", "code"],
            ),
            batch_size=metric(
                Histogram,
                f"{prefix}_batch_size",
                "Messages per consumed batch",
                buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            ),
            handle_seconds=metric(
                Histogram,
                f"{prefix}_batch_seconds",
                "Time from a batch's arrival to its commit",
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            ),
            retries=metric(
                Counter, f"{prefix}_retries_total", "Batch retries after a retryable error"
            ),
            lag=metric(
                Gauge,
                f"{prefix}_consumer_lag",
                "Messages behind the partition's high watermark (librdkafka statistics)",
                ["topic", "partition"],
            ),
        )


def collect_batch(
    poll_one: Callable[[float], Message | None],
    poll_many: Callable[[int, float], list[Message]],
    max_messages: int,
    max_wait_s: float,
    idle_s: float,
) -> list[Message]:
    """One batch, Triton-style: wait up to `idle_s` for a first message, then at most
    `max_wait_s` more for the batch to reach `max_messages`.

    The delay is counted from the first message's arrival, so an idle consumer adds no latency
    beyond `max_wait_s`, and a full batch returns at once (librdkafka's `consume` returns as soon
    as it holds `max_messages`).
    """
    first = poll_one(idle_s)
    if first is None:
        return []
    if max_messages <= 1:
        return [first]
    return [first, *poll_many(max_messages - 1, max_wait_s)]


def lag_from_statistics(stats: dict) -> dict[tuple[str, int], int]:
    """Consumer lag per (topic, partition) from a librdkafka statistics document.

    librdkafka computes `consumer_lag` from the high watermark carried by fetch responses.
    Partitions not fetched by this member, or
    with no lag known yet, report -1 and are left out.
    """
    lags: dict[tuple[str, int], int] = {}
    for topic, topic_stats in stats.get("topics", {}).items():
        for partition, part_stats in topic_stats.get("partitions", {}).items():
            lag = part_stats.get("consumer_lag", -1)
            if int(partition) >= 0 and lag >= 0 and part_stats.get("fetch_state") == "active":
                lags[(topic, int(partition))] = lag
    return lags


def commit_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """The offsets to commit after `messages`: the highest offset + 1 per partition."""
    highest: dict[tuple[str, int], int] = {}
    for message in messages:
        offset = message.offset()
        if offset is None or offset < 0:
            continue
        key = (message.topic(), message.partition())
        if offset >= highest.get(key, -1):
            highest[key] = offset
    return [TopicPartition(topic, part, offset + 1) for (topic, part), offset in highest.items()]


def dead_letter(
    message_topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    original: bytes | None,
    error: ErrorBody,
    group: str,
) -> Output:
    """A DLQ output for one message; originals over the size cap are cut and say so."""
    original = original or b""
    if len(original) > MAX_DLQ_ORIGINAL_BYTES:
        details = error.details if isinstance(error.details, dict) else {"errors": error.details}
        details = {**details, "original_truncated_from_bytes": len(original)}
        error = error.model_copy(update={"details": details})
        original = original[:MAX_DLQ_ORIGINAL_BYTES]
    letter = DeadLetter(
        source_topic=message_topic,
        partition=partition,
        offset=offset,
        key=key,
        original=original,
        error=error,
        consumer_group=group,
        failed_at_ms=int(time.time() * 1000),
    )
    return Output(topic=DLQ.name, value=letter, key=key)


def dead_letter_of(message: Message, error: ErrorBody, group: str) -> Output:
    """The DLQ output for a consumed `message`, logged (without its content)."""
    log.warning(
        "dead-lettered",
        extra={
            "topic": message.topic(),
            "partition": message.partition(),
            "offset": message.offset(),
            "code": error.code,
        },
    )
    return dead_letter(
        message.topic(),
        message.partition(),
        message.offset(),
        message.key(),
        message.value(),
        error,
        group,
    )


class KafkaWorker:
    """Consumes `topics` as member of `group_id` and runs `handler` on decoded batches.

    `decoders` maps a topic to its schema class (default: the catalog's), or to None to pass raw
    bytes through. Call `run()` to loop until SIGTERM or `stop()`; `poll_once()` runs one batch.
    """

    def __init__(
        self,
        settings: SluiceSettings,
        *,
        service: str,
        group_id: str,
        topics: Sequence[str],
        handler: Handler,
        decoders: dict[str, type[SchemaMessage] | None] | None = None,
        batch_policy: BatchPolicy | None = None,
        consumer_overrides: dict[str, Any] | None = None,
        producer: Producer | None = None,
        statistics_interval_ms: int = 5000,
        max_backoff_s: float = 5.0,
        idle_poll_s: float = 0.1,
        delivery_stall_s: float = 10.0,
    ) -> None:
        self.service = service
        self.group_id = group_id
        self.topics = list(topics)
        self.handler = handler
        self.decoders = {
            topic: (decoders or {}).get(topic, BY_NAME[topic].schema if topic in BY_NAME else None)
            for topic in self.topics
        }
        self.batch_policy = batch_policy or FixedBatch()
        self.max_backoff_s = max_backoff_s
        self.idle_poll_s = idle_poll_s
        self.delivery_stall_s = delivery_stall_s
        self._in_flight: _InFlight | None = None
        self.settings = settings
        self.metrics = _WorkerMetrics.for_service(service)
        self.assigned: set[tuple[str, int]] = set()
        self._stopping = threading.Event()
        self._delivery_errors: list[tuple[Output, KafkaError]] = []
        self._last_offsets: dict[tuple[str, int], int] = {}
        self.producer = producer or make_producer(settings)
        config = consumer_config(settings, group_id, **(consumer_overrides or {}))
        if statistics_interval_ms > 0:
            config["statistics.interval.ms"] = statistics_interval_ms
            config["stats_cb"] = self._on_statistics
        config["error_cb"] = self._on_client_error
        self.consumer = Consumer(config)
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    # -- lifecycle ------------------------------------------------------------------------------

    def run(self) -> None:
        """Process batches until `stop()` or SIGTERM/SIGINT, then commit and leave the group."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stop())
        log.info("worker started", extra={"group": self.group_id, "topics": self.topics})
        try:
            while not self._stopping.is_set():
                self.poll_once()
        finally:
            self.close()

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and exit; safe from any thread."""
        self._stopping.set()

    def close(self) -> None:
        """Deliver the batch in flight, flush the producer and leave the consumer group."""
        try:
            self._settle()
        except Exception as exc:  # noqa: BLE001 - leave the group whatever happened; not committed
            log.warning(
                "batch in flight not delivered before close; it will be redelivered",
                extra={"error": _describe(exc)},
            )
        self.producer.flush(10)
        if self._last_offsets:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._last_offsets.items()]
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("final commit failed", extra={"error": str(exc)})
        self.consumer.close()
        log.info("worker stopped", extra={"group": self.group_id})

    def ready(self) -> bool:
        """True once the group has assigned this member at least one partition."""
        return bool(self.assigned)

    # -- one batch ----------------------------------------------------------------------------

    def poll_once(self) -> int:
        """Consume and handle one batch, finish the previous one (wait for its outputs'
        acknowledgements, commit its offsets), then produce this one's outputs, which the next
        call (or `close`) finishes; returns the messages it consumed."""
        max_messages, max_wait_s = self.batch_policy.next_poll()
        messages = collect_batch(
            self.consumer.poll, self.consumer.consume, max_messages, max_wait_s, self.idle_poll_s
        )
        try:
            self.producer.poll(0)
        except KafkaException as exc:  # fatal: _deliver replaces the producer when it next fails
            log.warning("producer error", extra={"error": str(exc)})
        if not messages:
            try:
                self._settle()  # idle: do not hold the batch in flight's commit back
            except _Stopping:
                log.warning("stopped before the batch was delivered; it will be redelivered")
            return 0
        started = time.perf_counter()
        records: list[Record] = []
        outputs: list[Output] = []
        consumed: dict[str, int] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("consume error", extra={"error": str(error)})
                continue
            topic = message.topic()
            consumed[topic] = consumed.get(topic, 0) + 1
            record_or_letter = self._decode(topic, message)
            if isinstance(record_or_letter, Output):
                outputs.append(record_or_letter)
            else:
                records.append(record_or_letter)
        for topic, count in consumed.items():
            self.metrics.consumed.labels(topic).inc(count)
        try:
            if records:
                outputs.extend(self._handle(records))
            self._settle()
            self._send(messages, outputs)
        except _Stopping:
            log.warning("stopped before the batch was delivered; it will be redelivered")
            return 0
        elapsed = time.perf_counter() - started
        self.batch_policy.observe(len(messages), elapsed)
        self.metrics.batch_size.observe(len(messages))
        self.metrics.handle_seconds.observe(elapsed)
        return len(messages)

    def _decode(self, topic: str, message: Message) -> Record | Output:
        raw = message.value()
        schema = self.decoders.get(topic)
        try:
            value = (
                decode(schema, raw, self.settings.kafka_max_message_bytes)
                if schema is not None
                else raw
            )
        except DecodeError as exc:
            return self._dead_letter_for(message, exc.body)
        headers = message.headers()
        return Record(  # positional: keywords double the cost of this call, made per message
            topic,
            message.partition(),
            message.offset(),
            message.key(),
            dict(headers) if headers else {},
            value,
            message.timestamp()[1],
            raw,
        )

    def _dead_letter_for(self, message: Message, error: ErrorBody) -> Output:
        self.metrics.dead_lettered.labels(message.topic(), error.code).inc()
        return dead_letter_of(message, error, self.group_id)

    def _record_dead_letter(self, record: Record, error: ErrorBody) -> Output:
        self.metrics.dead_lettered.labels(record.topic, error.code).inc()
        log.warning(
            "dead-lettered",
            extra={"topic": record.topic, "offset": record.offset, "code": error.code},
        )
        return dead_letter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.raw,
            error,
            self.group_id,
        )

    def _handle(self, records: list[Record]) -> list[Output]:
        """Run the handler; retry on RetryableError, isolate any other failure to its record."""
        try:
            return self._with_retries(records)
        except (_Stopping, KeyboardInterrupt):
            raise
        except RecordError as exc:
            if len(records) == 1:
                return [self._record_dead_letter(records[0], exc.body)]
        except Exception as exc:  # noqa: BLE001 - a handler bug must not stop the partition
            if len(records) == 1:
                body = ErrorBody(code="handler_error", message=f"{type(exc).__name__}: {exc}")
                log.exception("handler failed on a record")
                return [self._record_dead_letter(records[0], body)]
        outputs: list[Output] = []
        for record in records:
            outputs.extend(self._handle([record]))
        return outputs

    def _with_retries(self, records: list[Record]) -> list[Output]:
        delay = 0.05
        while True:
            try:
                return list(self.handler(records))
            except RetryableError as exc:
                self.metrics.retries.inc()
                log.warning("retryable handler error", extra={"error": str(exc), "wait_s": delay})
                self._wait_or_stop(delay)
                delay = min(delay * 2, self.max_backoff_s)

    def _wait_or_stop(self, seconds: float) -> None:
        if self._stopping.wait(seconds):
            raise _Stopping

    # -- delivery -------------------------------------------------------------------------------

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        """One callback for every output: a failed message is rebuilt from the report itself,
        so the hot path creates no closure per message."""
        if error is not None:
            output = Output(
                topic=message.topic(),
                value=message.value(),
                key=message.key(),
                headers=dict(message.headers() or ()),
                partition=message.partition() if message.partition() >= 0 else None,
            )
            self._delivery_errors.append((output, error))

    def _produce(self, output: Output) -> None:
        value = output.value if isinstance(output.value, bytes) else encode(output.value)
        produce = self.producer.produce
        while True:
            try:
                if output.partition is None:
                    produce(
                        output.topic,
                        value,
                        output.key,
                        headers=output.headers,
                        on_delivery=self._on_delivery,
                    )
                else:
                    produce(
                        output.topic,
                        value,
                        output.key,
                        output.partition,
                        headers=output.headers,
                        on_delivery=self._on_delivery,
                    )
                return
            except BufferError:
                self.producer.poll(0.05)

    def _send(self, messages: list[Message], outputs: list[Output]) -> None:
        """Produce a batch's outputs and leave them in flight: `_settle` (in the next
        `poll_once`, or `close`) waits for them and commits `messages`.

        A 1 ms flush sends them now rather than after `linger.ms` (librdkafka counts in
        milliseconds: `flush(0)` does not wake its sender). A producer that fails here is
        replaced and the batch delivered the synchronous way."""
        self._delivery_errors = []
        try:
            self._produce_all(outputs)
            self.producer.flush(0.001)
        except (_ProducerBroken, KafkaException) as exc:
            self._replace_producer(str(exc))
            self._deliver(outputs)
            self._commit(messages)
            return
        self._in_flight = _InFlight(messages, outputs, self._delivery_errors)

    def _settle(self) -> None:
        """Wait for the batch in flight to be acknowledged (producing again what failed, as
        `_deliver` does), then commit it; nothing to do without one."""
        batch = self._in_flight
        if batch is None:
            return
        self._delivery_errors = batch.errors
        self._deliver(batch.outputs, produced=True)
        self._in_flight = None
        self._commit(batch.messages)

    def _deliver(self, outputs: list[Output], produced: bool = False) -> None:
        """Produce `outputs` (unless `produced`: they were, and their failures so far are in
        `_delivery_errors`) and wait until the broker acknowledged every one of them."""
        pending = outputs
        delay = 0.1
        while pending:
            try:
                if not produced:
                    self._delivery_errors = []
                    self._produce_all(pending)
                produced = False
                self._await_acknowledgements()
                if any(_fatal(error) for _, error in self._delivery_errors):
                    # The producer went fatal while the round was in flight and that error was
                    # raised elsewhere (`poll`): its messages only report it.
                    raise _ProducerBroken("fatal producer error reported on delivery")
            except _ProducerBroken as exc:  # the whole round again, acked or not: at least once
                self._replace_producer(str(exc))
                continue
            pending = self._reroute_permanent_failures(self._delivery_errors)
            if pending:
                log.warning("delivery failed, retrying", extra={"messages": len(pending)})
                self._wait_or_stop(delay)
                delay = min(delay * 2, self.max_backoff_s)

    def _produce_all(self, outputs: list[Output]) -> None:
        """Produce a round of `_deliver`: refusals that are not fatal go to
        `_delivery_errors`; raises `_ProducerBroken` on a fatal producer error."""
        try:
            for output in outputs:
                try:
                    self._produce(output)
                except KafkaException as exc:
                    if exc.args[0].fatal():
                        raise
                    self._delivery_errors.append((output, exc.args[0]))
        except KafkaException as exc:
            raise _ProducerBroken(f"fatal producer error: {exc.args[0].str()}") from exc

    def _await_acknowledgements(self) -> None:
        """Wait until the producer holds nothing unacknowledged; raises `_ProducerBroken` on a
        fatal producer error or when nothing was acknowledged for `delivery_stall_s`."""
        try:
            progress_at, waiting = time.monotonic(), len(self.producer)
            while (left := self.producer.flush(1.0)) > 0:
                if self._stopping.is_set() and self.producer.flush(10.0) > 0:
                    raise _Stopping
                if left < waiting:
                    progress_at, waiting = time.monotonic(), left
                elif time.monotonic() - progress_at > self.delivery_stall_s:
                    raise _ProducerBroken(f"nothing acknowledged for {self.delivery_stall_s} s")
        except KafkaException as exc:
            if not exc.args[0].fatal():
                raise
            raise _ProducerBroken(f"fatal producer error: {exc.args[0].str()}") from exc

    def _replace_producer(self, reason: str) -> None:
        """Drop a broken producer (a fatal error, or nothing acknowledged for
        `delivery_stall_s`) and start a new one; the caller produces its round again.

        A broker that lost its producer-id state (a topic deleted and re-created, or a producer id
        expired after `transactional.id.expiration.ms`) makes librdkafka's idempotent producer
        either fail fatally (OUT_OF_ORDER_SEQUENCE_NUMBER) or retry UNKNOWN_PRODUCER_ID forever with
        epochs it bumps locally; a new producer gets a new id. Against a broker that is simply down,
        replacing is harmless.
        """
        log.warning("replacing the producer", extra={"reason": reason})
        broken = self.producer
        self.producer = make_producer(self.settings)
        try:
            broken.purge()
            broken.flush(1.0)  # its reports are moot: the caller produces the round again
        except KafkaException:
            pass

    def _reroute_permanent_failures(
        self, failures: list[tuple[Output, KafkaError]]
    ) -> list[Output]:
        """Outputs to try again: retriable failures as they were, permanent ones (too large,
        unknown topic) as DLQ records; a DLQ record that fails permanently is a bug and raises."""
        retry: list[Output] = []
        for output, error in failures:
            if error.retriable() or error.code() in _TRANSIENT_DELIVERY_ERRORS:
                retry.append(output)
                continue
            if output.topic == DLQ.name:
                raise KafkaException(error)
            value = output.value if isinstance(output.value, bytes) else encode(output.value)
            key = output.key.encode() if isinstance(output.key, str) else output.key
            body = ErrorBody(code="output_rejected", message=f"broker refused output: {error}")
            retry.append(dead_letter(output.topic, -1, -1, key, value, body, self.group_id))
        return retry

    def _commit(self, messages: Sequence[Message]) -> None:
        """Commit after the batch's outputs were acknowledged. Asynchronous: the next batch
        does not wait for the broker's answer (librdkafka keeps commits in order), and a lost
        commit only means a replay; `close` commits the last offsets synchronously."""
        offsets = commit_offsets(messages)
        if not offsets:
            return
        for tp in offsets:
            self._last_offsets[(tp.topic, tp.partition)] = tp.offset
        try:
            self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            # Typically a rebalance took the partition: its new owner replays from the last
            # committed offset, so nothing is lost (at least once).
            log.warning("commit failed", extra={"error": str(exc)})

    # -- callbacks ----------------------------------------------------------------------------

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(p.topic, p.partition) for p in partitions}
        log.info("partitions assigned", extra={"partitions": len(self.assigned)})

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        try:  # commit the batch in flight while its partitions are still ours
            self._settle()
        except Exception as exc:  # noqa: BLE001 - its new owner replays it: at least once
            log.warning(
                "batch in flight not settled before revocation", extra={"error": _describe(exc)}
            )
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        for p in partitions:
            self._last_offsets.pop((p.topic, p.partition), None)

    def _on_statistics(self, stats_json: str) -> None:
        for (topic, partition), lag in lag_from_statistics(orjson.loads(stats_json)).items():
            self.metrics.lag.labels(topic, str(partition)).set(lag)

    def _on_client_error(self, error: KafkaError) -> None:
        log.warning("kafka client error", extra={"error": str(error)})
