"""Where synchronous predictions come back: this gateway's own partitions of sluice.predictions.

All gateway instances join one consumer group on `sluice.predictions`, so the group protocol
gives each instance a disjoint set of partitions: its reply partitions. A request names one of
them in its `reply_partition` header and the inference consumer produces the live prediction
there; this instance reads only its partitions, never everyone's replies. Predictions that are
not awaited here (asynchronous traffic hashed to these partitions, shadow copies, replies to
requests that already timed out) are skipped after reading their headers. An awaited reply
that is not a valid `Prediction` (garbage, over `kafka_max_message_bytes`, a newer schema) goes
to `sluice.dlq` with the reason; its request then ends at its deadline (504). Skipped records are
not decoded here: the monitor's predictions sink reads every record and dead-letters bad ones.

A rebalance revokes partitions while requests wait on them. A partition this instance gets back
within `resume_window_s` (the longest deadline a caller may set) is read on from the offset it
had reached, so replies produced during the rebalance still complete their requests; a
partition moved to another instance leaves its waiters to end at their deadline (504, the
prediction still logged). Any other partition starts at its log end as of the assignment. Both
are explicit offsets set before the partition becomes one a request may name, so no
reply can land before the position is known. The consumer never commits: replies are only
useful to the instance that is waiting for them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

from confluent_kafka import OFFSET_END, Consumer, KafkaException, TopicPartition

from schemas.messages import Prediction
from schemas.topics import PREDICTIONS
from services.common.codec import DecodeError, decode
from services.common.kafka import DeadLetters, consumer_config, sticky_partition
from services.common.settings import SluiceSettings
from services.common.worker import collect_batch

log = logging.getLogger(__name__)


class ReplyListener:
    """Consumes this instance's reply partitions and completes the waiting futures."""

    def __init__(
        self,
        settings: SluiceSettings,
        group_id: str,
        topic: str = PREDICTIONS.name,
        resume_window_s: float = 30.0,
        partition_slice_ms: int = 20,
    ):
        self.topic = topic
        self.resume_window_s = resume_window_s
        self._next_offsets: dict[int, int] = {}
        """Per partition, the offset after the last record read (listener thread only)."""
        self._revoked_at: dict[int, float] = {}
        self.pending: dict[str, asyncio.Future[Prediction]] = {}
        self.partitions: list[int] = []
        self.partition_slice_ms = partition_slice_ms
        self._salt = random.randrange(1 << 16)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self.max_message_bytes = settings.kafka_max_message_bytes
        self.dead_letters = DeadLetters(settings, group_id)
        config = consumer_config(
            settings,
            group_id,
            **{"auto.offset.reset": "latest", "fetch.min.bytes": 1},
        )
        self.consumer = Consumer(config)
        self._thread = threading.Thread(target=self._loop_forever, name="replies", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.consumer.close()
        self.dead_letters.close()

    def ready(self) -> bool:
        """True once the group gave this instance at least one reply partition."""
        return bool(self.partitions)

    def reply_partition(self, now_ms: int) -> int:
        """The reply partition for a request sent at `now_ms`: ours take turns in time slices
        (`sticky_partition`), so the replies to requests sent together share a partition and
        leave the inference consumer in one produce batch rather than one per partition."""
        return sticky_partition(self.partitions, now_ms, self.partition_slice_ms, self._salt)

    def expect(self, request_id: str) -> asyncio.Future[Prediction]:
        """Register interest in a request's reply before producing the request."""
        future = self.pending.get(request_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self.pending[request_id] = future
        return future

    def forget(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def _on_assign(self, consumer, partitions: list[TopicPartition]) -> None:
        """Start every assigned partition at an explicit offset before any request can name it
        as its reply partition (they become reply partitions only here): a position the
        client resolved lazily could land after a reply that was already produced."""
        numbers = [tp.partition for tp in partitions]
        starts = start_offsets(
            numbers,
            self._next_offsets,
            self._revoked_at,
            self._log_ends(consumer, numbers),
            time.monotonic(),
            self.resume_window_s,
        )
        for tp in partitions:
            if tp.partition in starts:
                tp.offset = starts[tp.partition]
        consumer.assign(partitions)
        self.partitions = sorted({*self.partitions, *numbers})
        log.info(
            "reply partitions assigned",
            extra={"partitions": self.partitions, "starts": starts},
        )

    def _log_ends(self, consumer, partitions: list[int]) -> dict[int, int]:
        """The current end offset of each partition (one ListOffsets request); {} when the
        broker does not answer in time, leaving those partitions to `auto.offset.reset`."""
        if not partitions:
            return {}
        latest = [TopicPartition(self.topic, n, OFFSET_END) for n in partitions]
        try:
            ends = consumer.offsets_for_times(latest, timeout=5.0)
        except KafkaException as exc:
            log.warning("reply partition ends unknown", extra={"error": str(exc)})
            return {}
        return {tp.partition: tp.offset for tp in ends if tp.error is None and tp.offset >= 0}

    def _on_revoke(self, _consumer, partitions: list[TopicPartition]) -> None:
        revoked = {p.partition for p in partitions}
        now = time.monotonic()
        self._revoked_at.update(dict.fromkeys(revoked, now))
        self.partitions = [p for p in self.partitions if p not in revoked]

    def _loop_forever(self) -> None:
        while not self._stop.is_set():
            # wait for the first reply only; then take what else is already here, no waiting
            messages = collect_batch(self.consumer.poll, self.consumer.consume, 1000, 0.0, 0.05)
            replies = []
            for message in messages:
                if message.error() is not None:
                    continue
                self._next_offsets[message.partition()] = message.offset() + 1
                reply = self._awaited_reply(message)
                if reply is not None:
                    replies.append(reply)
            if replies and self._loop is not None:
                self._loop.call_soon_threadsafe(self._complete, replies)

    def _awaited_reply(self, message) -> tuple[str, Prediction] | None:
        """(request id, prediction) if someone here waits for `message`; a bad awaited reply
        is dead-lettered. Headers are anyone's bytes: nothing in them may stop this thread."""
        headers = dict(message.headers() or ())
        request_id = (headers.get("request_id") or b"").decode("utf-8", "replace")
        if headers.get("route") == b"shadow" or request_id not in self.pending:
            return None
        try:
            reply = decode(Prediction, message.value(), self.max_message_bytes)
        except DecodeError as exc:
            self.dead_letters.send(message, exc.body)
            return None
        return request_id, reply

    def _complete(self, replies: list[tuple[str, Prediction]]) -> None:
        for request_id, body in replies:
            future = self.pending.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(body)


def start_offsets(
    partitions: list[int],
    next_offsets: dict[int, int],
    revoked_at: dict[int, float],
    log_ends: dict[int, int],
    now: float,
    window_s: float,
) -> dict[int, int]:
    """Where each assigned partition starts. One this listener read before and lost at most
    `window_s` ago (a request may still wait on it) resumes where the listener stopped, or at
    the log end if the log is now shorter (a broker that lost its data); any other partition
    starts at the log end, which holds no reply anybody here waits for. A partition whose end
    is unknown and that cannot resume is left out (the consumer's `auto.offset.reset`)."""
    starts = {}
    for n in partitions:
        end = log_ends.get(n)
        if n in next_offsets and n in revoked_at and now - revoked_at[n] <= window_s:
            starts[n] = next_offsets[n] if end is None else min(next_offsets[n], end)
        elif end is not None:
            starts[n] = end
    return starts
