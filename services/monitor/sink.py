"""The sink: a `KafkaWorker` handler that writes one topic's batch to its ClickHouse table in one
columnar insert.

Delivery: the worker commits a batch's offsets only after this handler returned, and the handler
returns only after ClickHouse acknowledged the insert. When ClickHouse is unreachable (or
refuses the insert) the handler raises `RetryableError`; the worker retries the same batch, in
the same order, with backoff, and commits nothing meanwhile. A replay after a crash re-inserts
rows that may already be stored; the tables are ReplacingMergeTrees keyed on the message
identity, so the documented dedup form (`FINAL`) counts each message once.

The worker decodes and dead-letters undecodable messages before the handler sees them; messages
ClickHouse cannot represent (timestamps after 2106) become dead letters returned by the handler,
so one bad message never fails the batch's insert.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import Counter, Histogram

from schemas.messages import ErrorBody, Message
from schemas.topics import EVENTS, LABELS, PREDICTIONS
from services.common.metrics import metric
from services.common.worker import Output, Record, RetryableError, dead_letter
from services.monitor.rows import (
    MAX_DATETIME_MS,
    Columns,
    event_columns,
    label_columns,
    prediction_columns,
)
from services.monitor.store import Store, StoreUnavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SinkSpec:
    """Which topic fills which table with which column builder."""

    topic: str
    table: str
    columns: Callable[[Sequence[Message], Sequence[Record]], Columns]
    timestamps_ms: Callable[[Message], tuple[int, ...]]


SINKS: dict[str, SinkSpec] = {
    "predictions": SinkSpec(
        PREDICTIONS.name,
        "predictions",
        lambda messages, _records: prediction_columns(messages),
        lambda p: (p.created_at_ms,),
    ),
    "labels": SinkSpec(
        LABELS.name,
        "labels",
        lambda messages, _records: label_columns(messages),
        lambda label: (label.ts_ms,),
    ),
    "events": SinkSpec(
        EVENTS.name,
        "events",
        lambda messages, records: event_columns(
            messages, [r.partition for r in records], [r.offset for r in records]
        ),
        lambda event: (event.ts_ms,),
    ),
}
"""The three sinks, by table name (the values `monitor_sinks` takes)."""


class _SinkMetrics:
    def __init__(self) -> None:
        self.rows = metric(
            Counter, "sluice_monitor_rows_inserted_total", "Rows inserted into ClickHouse",
            ["table"],
        )  # fmt: skip
        self.rejected = metric(
            Counter,
            "sluice_monitor_rejected_total",
            "Messages the sink sent to the dead-letter topic",
            ["table", "code"],
        )
        self.insert_seconds = metric(
            Histogram,
            "sluice_monitor_insert_seconds",
            "Duration of one batched ClickHouse insert",
            ["table"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


class Sink:
    """Handler for `KafkaWorker`: insert a decoded batch, dead-letter what cannot be stored."""

    def __init__(self, store: Store, spec: SinkSpec, group_id: str) -> None:
        self.store = store
        self.spec = spec
        self.group_id = group_id
        self.metrics = _SinkMetrics()

    def __call__(self, records: list[Record]) -> list[Output]:
        """Insert the batch; returns dead letters for messages the table cannot hold."""
        messages: list[Message] = []
        kept: list[Record] = []
        letters: list[Output] = []
        for record in records:
            message = record.value
            if any(ts >= MAX_DATETIME_MS for ts in self.spec.timestamps_ms(message)):
                body = ErrorBody(
                    code="timestamp_out_of_range",
                    message="timestamp after 2106-02-07, beyond ClickHouse DateTime",
                )
                letters.append(self._dead_letter(record, body))
                continue
            messages.append(message)
            kept.append(record)
        if messages:
            started = time.perf_counter()
            try:
                self.store.insert(self.spec.table, self.spec.columns(messages, kept))
            except StoreUnavailable as exc:
                raise RetryableError(str(exc)) from exc
            self.metrics.insert_seconds.labels(self.spec.table).observe(
                time.perf_counter() - started
            )
            self.metrics.rows.labels(self.spec.table).inc(len(messages))
        return letters

    def _dead_letter(self, record: Record, body: ErrorBody) -> Output:
        self.metrics.rejected.labels(self.spec.table, body.code).inc()
        log.warning(
            "dead-lettered",
            extra={"topic": record.topic, "offset": record.offset, "code": body.code},
        )
        return dead_letter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.raw,
            body,
            self.group_id,
        )
