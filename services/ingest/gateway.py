"""The gateway's domain: synchronous predictions as Kafka request/reply, with deadlines,
idempotency keys and an in-flight limit. HTTP routes call into this and nothing else.

A prediction request is produced to `sluice.requests` (key = entity id) with headers
`request_id`, `deadline_ms` and `reply_partition`; the answer is the live prediction that the
inference consumer produces to that partition of `sluice.predictions`, which only this gateway
instance reads (`replies.py`).

Requests are not placed by their key: the partitions of `sluice.requests` take turns in short time
slices (`sticky_partition`), and so do this instance's reply partitions, so that requests sent
together travel in one produce batch each way instead of one batch per partition. Nothing on the
synchronous path depends on which partition a request takes.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from schemas.messages import Prediction
from schemas.topics import REQUESTS
from services.common.codec import encode_obj
from services.common.kafka import sticky_partition
from services.common.metrics import LATENCY_BUCKETS_S, metric
from services.inference.client import list_models
from services.ingest.limits import LoopLag
from services.ingest.producer import AsyncProducer, DeliveryError
from services.ingest.replies import ReplyListener

# Prediction error codes and the HTTP status each maps to on the synchronous path.
ERROR_STATUS = {
    "unknown_model": 404,
    "unknown_version": 404,
    "missing_feature": 422,
    "wrong_dtype": 422,
    "invalid_value": 422,
    "oversized_request": 413,
    "online_store_unavailable": 503,
}


_ID_COUNTER = itertools.count()


def _new_id_key() -> None:
    global _ID_KEY
    _ID_KEY = os.urandom(32)


_new_id_key()
os.register_at_fork(after_in_child=_new_id_key)  # a forked child must not repeat our ids


def new_request_id() -> str:
    """A request id for a caller that gave none: 32 hex digits, unguessable (a request id reads
    back a remembered answer), unique per process run. A keyed BLAKE2b of a counter rather than
    `uuid4().hex`: uuid4 cost 5.5 us here and `os.urandom` releases the GIL on every call, which
    hands the event loop's turn to the gateway's Kafka threads mid-request."""
    return hashlib.blake2b(
        next(_ID_COUNTER).to_bytes(8, "little"), key=_ID_KEY, digest_size=16
    ).hexdigest()


class GatewayError(Exception):
    """An error the caller can act on: HTTP status, stable code, message, details."""

    def __init__(self, status: int, code: str, message: str, details=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details = details
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


@dataclass(frozen=True, slots=True)
class PredictItem:
    """One entity to score."""

    entity_id: str
    features: dict = field(default_factory=dict)
    request_id: str | None = None
    version: str | None = None


class ModelCatalog:
    """Which models exist, from the model repository, re-read at most every `ttl_s`."""

    def __init__(self, root: Path, ttl_s: float = 2.0) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        self._models: dict[str, list[str]] = {}
        self._read_at = float("-inf")

    def models(self) -> dict[str, list[str]]:
        now = time.monotonic()
        if now - self._read_at > self.ttl_s:
            self._models = list_models(self.root) if self.root.exists() else {}
            self._read_at = now
        return self._models

    def require(self, model: str) -> list[str]:
        """The model's versions; raises a 404 GatewayError for an unknown model."""
        found = self.models().get(model)
        if not found:
            raise GatewayError(
                404, "unknown_model", f"no model named {model!r}", {"known": sorted(self.models())}
            )
        return found


class _Metrics:
    def __init__(self) -> None:
        self.requests = metric(
            Counter,
            "sluice_ingest_predictions_total",
            "Synchronous predictions answered, by outcome",
            ["outcome"],
        )
        self.seconds = metric(
            Histogram,
            "sluice_ingest_prediction_seconds",
            "Gateway latency of synchronous predictions",
            buckets=LATENCY_BUCKETS_S,
        )
        self.in_flight = metric(
            Gauge, "sluice_ingest_in_flight", "Synchronous predictions waiting for their reply"
        )
        self.loop_lag = metric(
            Gauge,
            "sluice_ingest_loop_lag_seconds",
            "How late the gateway's event loop runs what is due (requests wait this long "
            "before their handler starts)",
        )


class Gateway:
    """Turns HTTP predictions into Kafka requests and waits for their replies."""

    def __init__(
        self,
        producer: AsyncProducer,
        replies: ReplyListener,
        catalog: ModelCatalog,
        *,
        default_timeout_ms: int,
        max_timeout_ms: int,
        max_in_flight: int,
        idempotency_ttl_s: float,
        request_partitions: list[int],
        partition_slice_ms: int,
        loop_lag: LoopLag,
        max_loop_lag_ms: float,
        requests_topic: str = REQUESTS.name,
    ) -> None:
        self.producer = producer
        self.replies = replies
        self.catalog = catalog
        self.default_timeout_ms = default_timeout_ms
        self.max_timeout_ms = max_timeout_ms
        self.max_in_flight = max_in_flight
        self.idempotency_ttl_s = idempotency_ttl_s
        self.requests_topic = requests_topic
        self.request_partitions = request_partitions
        """Partitions of the requests topic, learnt at start; [] = place requests by key."""
        self.partition_slice_ms = partition_slice_ms
        self.loop_lag = loop_lag
        self.max_loop_lag_s = max_loop_lag_ms / 1000
        """Predictions are refused (429) while `loop_lag` is over this; 0 = never."""
        self._salt = random.randrange(1 << 16)
        self.in_flight = 0
        self._recent: OrderedDict[str, tuple[float, dict]] = OrderedDict()
        self.metrics = _Metrics()
        self.metrics.in_flight.set_function(lambda: self.in_flight)  # read at scrape time
        self.metrics.loop_lag.set_function(loop_lag.current_s)

    def timeout_ms(self, asked: int | None) -> int:
        """The deadline to use: the caller's (capped) or the default; 422 if not positive."""
        if asked is None:
            return self.default_timeout_ms
        if asked <= 0:
            raise GatewayError(
                422, "invalid_timeout", "timeout_ms must be positive", {"timeout_ms": asked}
            )
        return min(asked, self.max_timeout_ms)

    async def predict(self, model: str, items: list[PredictItem], timeout_ms: int) -> list[dict]:
        """Score `items` with `model`; one result per item, in order.

        Raises GatewayError for what concerns the whole call (unknown model, overload, broker
        down). A single item's failure (its deadline, a model error) is that item's result,
        shaped `{"request_id": ..., "error": {...}, "status": N}`.
        """
        self.catalog.require(model)
        if self.in_flight + len(items) > self.max_in_flight:
            raise _overloaded(
                f"{self.in_flight} predictions in flight",
                {"max_in_flight": self.max_in_flight},
            )
        # Past the loop-lag limit the gateway is the queue: admitted work would wait behind
        # what it cannot keep up with, past its deadline. Refusing costs far less than serving.
        if self.max_loop_lag_s and (lag_s := self.loop_lag.current_s()) > self.max_loop_lag_s:
            raise _overloaded(
                f"the gateway runs {lag_s * 1000:.0f} ms behind",
                {
                    "loop_lag_ms": round(lag_s * 1000, 1),
                    "max_loop_lag_ms": self.max_loop_lag_s * 1000,
                },
            )
        if not self.replies.ready():
            raise GatewayError(
                503, "not_ready", "no reply partitions assigned yet", headers={"Retry-After": "1"}
            )
        started = time.perf_counter()
        self.in_flight += len(items)
        try:
            if len(items) == 1:  # the common case, without gather's task per item
                results = [await self._predict_one(model, items[0], timeout_ms, started)]
            else:
                results = await asyncio.gather(
                    *(self._predict_one(model, item, timeout_ms, started) for item in items)
                )
        finally:
            self.in_flight -= len(items)
        self.metrics.seconds.observe(time.perf_counter() - started)
        return results

    async def _predict_one(
        self, model: str, item: PredictItem, timeout_ms: int, started: float
    ) -> dict:
        request_id = item.request_id or new_request_id()
        remembered = self._remembered(request_id)
        if remembered is not None:
            return remembered
        awaiting = request_id in self.replies.pending
        reply = self.replies.expect(request_id)
        now_ms = int(time.time() * 1000)
        if not awaiting:
            body = {
                "schema_version": 1,
                "request_id": request_id,
                "model": model,
                "entity_id": item.entity_id,
                "features": item.features,
                "version": item.version,
                "created_at_ms": now_ms,
            }
            headers = {
                "request_id": request_id,
                "deadline_ms": str(now_ms + timeout_ms),
                "reply_partition": str(self.replies.reply_partition(now_ms)),
            }
            ack = self.producer.produce_nowait(
                self.requests_topic,
                encode_obj(body),
                key=item.entity_id,
                headers=headers,
                partition=self._request_partition(now_ms),
            )
        else:
            ack = None
        deadline = started + timeout_ms / 1000
        try:
            prediction = await _reply_or_failure(reply, ack, deadline)
        except DeliveryError as exc:
            self.replies.forget(request_id)
            self.metrics.requests.labels("broker_error").inc()
            return _item_error(
                request_id, 503, "broker_unavailable", f"the request could not be queued: {exc}"
            )
        except TimeoutError:
            if not awaiting:
                self.replies.forget(request_id)
            self.metrics.requests.labels("deadline_exceeded").inc()
            return _item_error(
                request_id,
                504,
                "deadline_exceeded",
                f"no prediction within {timeout_ms} ms; it is still logged when it completes",
                {"timeout_ms": timeout_ms},
            )
        result = self._result(prediction, started)
        self.metrics.requests.labels("error" if "error" in result else "ok").inc()
        self._remember(request_id, result)
        return result

    def _request_partition(self, now_ms: int) -> int:
        if not self.request_partitions:
            return -1  # partitions unknown: the producer places the request by its key
        return sticky_partition(
            self.request_partitions, now_ms, self.partition_slice_ms, self._salt
        )

    def _result(self, prediction: Prediction, started: float) -> dict:
        error = prediction.error
        if error is not None:
            return {
                "request_id": prediction.request_id,
                "model": prediction.model,
                "version": prediction.version,
                "status": ERROR_STATUS.get(error.code, 500),
                "error": error.model_dump(mode="json"),
            }
        latency = prediction.latency
        return {
            "request_id": prediction.request_id,
            "model": prediction.model,
            "version": prediction.version,
            "route": prediction.route.value,
            "score": prediction.score,
            "outputs": prediction.outputs,
            "defaulted": prediction.defaulted,
            "latency_ms": {
                "server": round((time.perf_counter() - started) * 1000, 3),
                "queue": latency.queue_ms,
                "features": latency.features_ms,
                "model": latency.model_ms,
            },
        }

    def _remembered(self, request_id: str) -> dict | None:
        entry = self._recent.get(request_id)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._recent[request_id]
            return None
        return entry[1]

    def _remember(self, request_id: str, result: dict) -> None:
        if self.idempotency_ttl_s <= 0:
            return
        now = time.monotonic()
        self._recent[request_id] = (now + self.idempotency_ttl_s, result)
        self._recent.move_to_end(request_id)
        while self._recent and (
            len(self._recent) > 100_000 or next(iter(self._recent.values()))[0] < now
        ):
            self._recent.popitem(last=False)


def _overloaded(why: str, details: dict) -> GatewayError:
    """429 `overloaded`, with `Retry-After`: the gateway refuses more work for now."""
    return GatewayError(
        429, "overloaded", f"{why}; try again shortly", details, {"Retry-After": "1"}
    )


async def _reply_or_failure(
    reply: asyncio.Future[Prediction], ack: asyncio.Future[None] | None, deadline: float
) -> Prediction:
    """The reply, without waiting for the request's acknowledgement first (a reply proves
    delivery); raises DeliveryError if the broker refused the request, TimeoutError at the
    deadline. Neither future is cancelled: others may wait on the same reply."""
    if ack is not None:
        ack.add_done_callback(lambda done: done.exception())  # retrieved even if unused
        remaining = max(0.0, deadline - time.perf_counter())
        await asyncio.wait({ack, reply}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        if ack.done() and ack.exception() is not None and not reply.done():
            raise ack.exception()
    if not reply.done():
        remaining = max(0.0, deadline - time.perf_counter())
        await asyncio.wait({reply}, timeout=remaining)  # unlike wait_for, never cancels it
        if not reply.done():
            raise TimeoutError
    return reply.result()


def _item_error(request_id: str, status: int, code: str, message: str, details=None) -> dict:
    return {
        "request_id": request_id,
        "status": status,
        "error": {"code": code, "message": message, "details": details},
    }
