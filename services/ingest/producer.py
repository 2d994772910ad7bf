"""An asyncio face for the confluent-kafka producer: `await produce(...)` returns once the broker
acknowledged the message (or raises with the broker's error).

librdkafka calls delivery callbacks on whichever thread polls the producer; a daemon thread
polls it continuously and hands each result to the event loop with one thread-safe call per
poll, so the request path never blocks on Kafka.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from services.common.kafka import make_producer, topic_partitions
from services.common.settings import SluiceSettings

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """The broker did not accept a message; `retriable` says whether trying again may help."""

    def __init__(self, error: KafkaError) -> None:
        super().__init__(str(error))
        self.retriable = bool(error.retriable())


class AsyncProducer:
    """Produce from asyncio code and await the acknowledgement.

    A producer that fails fatally, or holds messages but has had none acknowledged for
    `stall_s`, is replaced by a new one; what it held fails with `DeliveryError` (the caller
    answers 503 and the client may retry). That is how the gateway gets past a broker that
    lost its producer-id state (a topic deleted and re-created, say), which
    librdkafka's idempotent producer does not recover from by itself.
    """

    def __init__(self, settings: SluiceSettings, stall_s: float = 10.0, **overrides: Any) -> None:
        self._config = overrides
        self._settings = settings
        self.producer: Producer = make_producer(settings, **self._config)
        self.stall_s = stall_s
        self.replaced = 0
        self._last_progress = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled: deque[tuple[asyncio.Future[None], KafkaError | None]] = deque()
        """Delivery reports not yet handed to the event loop (any polling thread appends)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="producer-poll", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is queued (bounded), then stop polling."""
        self.producer.flush(timeout_s)
        self._stop.set()
        self._thread.join(5)
        self._hand_over()  # reports the flush collected after the thread's last hand-over

    def _poll(self) -> None:
        while not self._stop.is_set():
            producer = self.producer
            try:
                served = producer.poll(0.05)
            except KafkaException as exc:  # fatal, e.g. OUT_OF_ORDER_SEQUENCE_NUMBER
                self._replace(producer, f"fatal producer error: {exc.args[0].str()}")
                continue
            self._hand_over()
            if served > 0 or len(producer) == 0:
                self._last_progress = time.monotonic()
            elif time.monotonic() - self._last_progress > self.stall_s:
                self._replace(producer, f"nothing acknowledged for {self.stall_s} s")

    def _hand_over(self) -> None:
        """Settle the reports collected so far on the event loop, in one thread-safe call."""
        reports = []
        while self._settled:
            reports.append(self._settled.popleft())
        if reports and self._loop is not None:
            self._loop.call_soon_threadsafe(_settle_all, reports)

    def _replace(self, broken: Producer, reason: str) -> None:
        log.warning("replacing the producer", extra={"reason": reason, "queued": len(broken)})
        self.producer = make_producer(self._settings, **self._config)
        self.replaced += 1
        self._last_progress = time.monotonic()
        try:
            broken.purge()
            broken.flush(1.0)  # the purged messages' futures fail with DeliveryError
        except KafkaException:
            pass

    def produce_nowait(
        self,
        topic: str,
        value: bytes,
        key: str | bytes | None = None,
        headers: dict[str, str | bytes] | None = None,
        partition: int = -1,
    ) -> asyncio.Future[None]:
        """Queue one message (to `partition`, or by key when -1); the returned future completes
        when the broker acknowledged it."""
        assert self._loop is not None, "start() the producer first"
        loop = self._loop
        future: asyncio.Future[None] = loop.create_future()

        def on_delivery(error: KafkaError | None, _message) -> None:
            self._settled.append((future, error))

        while True:
            producer = self.producer
            try:
                producer.produce(
                    topic,
                    value,
                    key=key,
                    headers=headers,
                    partition=partition,
                    on_delivery=on_delivery,
                )
                if producer is not self.producer:  # replaced meanwhile: may never be polled again
                    _settle(future, KafkaError(KafkaError._PURGE_QUEUE))
                return future
            except BufferError:
                self.producer.poll(0.01)
            except KafkaException as exc:
                future.set_exception(DeliveryError(exc.args[0]))
                return future

    def partitions(self, topic: str, timeout_s: float = 5.0) -> list[int]:
        """The partitions of `topic` from the broker's metadata; [] when it does not answer in
        time or does not know the topic (blocking: run it in an executor)."""
        return topic_partitions(self.producer, topic, timeout_s)

    async def produce(self, topic: str, value: bytes, key=None, headers=None) -> None:
        """Produce one message and wait for the broker's acknowledgement."""
        await self.produce_nowait(topic, value, key, headers)


def _settle_all(reports: list[tuple[asyncio.Future[None], KafkaError | None]]) -> None:
    for future, error in reports:
        _settle(future, error)


def _settle(future: asyncio.Future[None], error: KafkaError | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(DeliveryError(error))
