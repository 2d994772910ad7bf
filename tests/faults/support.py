"""What the fault tests share: services as real subprocesses, a steady synchronous load through
the gateway, asynchronous requests straight onto Kafka, and reading back what came out.

Services are started with the demo's launcher (`deploy.demo.run.Service` / `start_services`):
`python -m services.<name>` with the cluster's environment, logs under the test's folder.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis

from deploy.demo.generator import DemoItem
from deploy.demo.publish import publish
from deploy.demo.run import Service, start_services, stop_services
from deploy.local.cluster import ClusterConfig, down, up
from schemas.messages import PredictionRequest
from schemas.topics import EVENTS, PREDICTIONS, REQUESTS
from services.common.codec import encode
from services.common.kafka import make_producer
from services.common.settings import SluiceSettings
from services.features.client import write_features
from tests.helpers.models import CARD_FEATURES, MERCHANT_FEATURES
from tests.support import json_bodies, produce_all, read_topic
from tests.test_features_support import Positioned

REPO = Path(__file__).resolve().parents[2]
DEMO_FEATURES = REPO / "deploy" / "demo" / "features.yaml"
CARDS, MERCHANTS = 200, 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running_cluster(state_dir: Path, brokers: int = 1) -> Iterator[ClusterConfig]:
    """A private cluster on free ports (durable Redis) with every catalog topic and table, up
    while the generator is; for module fixtures."""
    config = replace(ClusterConfig.with_free_ports(state_dir, brokers=brokers), redis_durable=True)
    try:
        up(config, auto_install=False, stop_with_caller=True)
        yield config
    finally:
        down(config, wipe=True)


class Stack:
    """The services of one fault test, each `python -m services.<name>` on free ports."""

    def __init__(self, cluster: ClusterConfig, workdir: Path, models: Path) -> None:
        self.cluster = cluster
        self.logs = workdir / "logs"
        self.base = {
            **cluster.env(),
            "SLUICE_MODEL_REPOSITORY": str(models),
            "SLUICE_LOG_FORMAT": "text",
        }
        self.data_dir = workdir / "features-data"
        self.services: dict[str, Service] = {}
        self.urls: dict[str, str] = {}

    def add(self, name: str, *, instance: str | None = None, **env: str) -> Service:
        """Declare service `name` (ingest, inference, features, monitor) with extra settings;
        `instance` names a second process of the same service (`inference-2`)."""
        port = free_port()
        local = f"http://127.0.0.1:{port}"
        own = {
            "ingest": {"SLUICE_INGEST_PORT": str(port)},
            "inference": {"SLUICE_METRICS_PORT": str(port)},
            "monitor": {"SLUICE_METRICS_PORT": str(port), "SLUICE_MONITOR_ANALYZER": "false"},
            "features": {
                "SLUICE_FEATURES_HTTP_PORT": str(port),
                "SLUICE_FEATURES_HTTP_HOST": "127.0.0.1",
                "SLUICE_FEATURES_DEFINITIONS": str(DEMO_FEATURES),
                "SLUICE_FEATURES_DATA_DIR": str(self.data_dir),
                "SLUICE_FEATURES_BROKER_SESSION_TIMEOUT_S": "6",
                "SLUICE_FEATURES_BROKER_REBALANCE_TIMEOUT_S": "6",
            },
        }[name]
        key = instance or name
        service = Service(key, {**self.base, **own, **env}, f"{local}/readyz", module=name)
        self.services[key] = service
        self.urls[key] = local
        return service

    def url(self, name: str) -> str:
        """`http://127.0.0.1:PORT` of the service's HTTP server (API or metrics)."""
        return self.urls[name]

    def start(self, *names: str, timeout_s: float = 60) -> None:
        """Start the named services (all declared ones by default) and wait until ready."""
        try:
            start_services([self.services[n] for n in names or self.services], self.logs, timeout_s)
        except RuntimeError as exc:
            tails = "\n".join(f"--- {n}.log\n{self.log_tail(n)}" for n in names or self.services)
            raise RuntimeError(f"{exc}\n{tails}") from exc

    def kill(self, name: str) -> int:
        """SIGKILL one service: no drain, no commit, no goodbye to its consumer group."""
        process = self.services[name].process
        assert process is not None and process.poll() is None, f"{name} is not running"
        process.kill()
        process.wait(10)
        return process.pid

    def pid(self, name: str) -> int:
        process = self.services[name].process
        assert process is not None
        return process.pid

    def alive(self, name: str) -> bool:
        process = self.services[name].process
        return process is not None and process.poll() is None

    def stop(self) -> None:
        stop_services(list(self.services.values()))

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def metric_total(url: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`, from `url`/metrics."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found += sample.value
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `condition` every 0.2 s; returns the seconds it took, raises TimeoutError after."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)
    return time.monotonic() - started


# -- the test model's online features ------------------------------------------------------------


def seed_online_features(redis: Redis, prefix: str) -> None:
    """Card and merchant features for `{prefix}card-{i}` / `{prefix}merchant-{i}`."""
    rng = np.random.default_rng(11)
    for entity, names, count in (("card", CARD_FEATURES, CARDS), ("merchant", MERCHANT_FEATURES,
                                                                   MERCHANTS)):  # fmt: skip
        for i in range(count):
            values = dict(zip(names, rng.normal(size=len(names)).tolist(), strict=True))
            write_features(redis, entity, f"{prefix}{entity}-{i}", values, {n: 1 for n in names})


def request_body(prefix: str, i: int, request_id: str, timeout_ms: int) -> dict:
    """A synchronous predict body for the test model (`tests.helpers.models`)."""
    rng = np.random.default_rng(i)
    features: dict = {f"req_f{j}": float(v) for j, v in enumerate(rng.normal(size=8))}
    features["merchant_id"] = f"{prefix}merchant-{i % MERCHANTS}"
    return {
        "entity_id": f"{prefix}card-{i % CARDS}",
        "features": features,
        "request_id": request_id,
        "timeout_ms": timeout_ms,
    }


def encoded_requests(model: str, prefix: str, ids: Iterable[str]) -> list[tuple[str, bytes]]:
    """Asynchronous requests (no reply partition) as (key, value) pairs for `sluice.requests`;
    encode them before a load starts: the driver shares this process's interpreter."""
    items = []
    for i, request_id in enumerate(ids):
        body = request_body(prefix, i, request_id, 0)
        request = PredictionRequest(
            request_id=request_id,
            model=model,
            entity_id=body["entity_id"],
            features=body["features"],
            created_at_ms=int(time.time() * 1000),
        )
        items.append((request.entity_id, encode(request)))
    return items


def produce_requests(bootstrap: str, items: list[tuple[str, bytes]]) -> None:
    """Produce `encoded_requests` straight onto `sluice.requests` and wait for the acks."""
    produce_all(bootstrap, REQUESTS.name, items)


def predictions_for(bootstrap: str, wanted: set[str] | None, timeout_s: float = 60) -> list[dict]:
    """Predictions on `sluice.predictions` whose request id is in `wanted`, read from the
    beginning until each of them has at least one and every partition was read to its end
    (`wanted=None`: every prediction there is). Each message is parsed once: the load driver
    shares this process, and re-parsing a growing topic would starve it."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"faults-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.wait.max.ms": 10,
        }
    )
    topic = consumer.list_topics(PREDICTIONS.name, timeout=10).topics[PREDICTIONS.name]
    consumer.assign(
        [TopicPartition(PREDICTIONS.name, p, OFFSET_BEGINNING) for p in topic.partitions]
    )
    found: list[dict] = []
    missing = set(wanted or ())
    not_at_end = set(topic.partitions)
    deadline = time.monotonic() + timeout_s
    try:
        while missing or not_at_end:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} requests have no prediction yet")
            for message in consumer.consume(10_000, 0.2):
                error = message.error()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        not_at_end.discard(message.partition())
                    continue
                not_at_end.add(message.partition())
                for body in json_bodies([message]):
                    if wanted is None or body.get("request_id") in wanted:
                        found.append(body)
                        missing.discard(body.get("request_id"))
    finally:
        consumer.close()
    return found


# -- synchronous load through the gateway --------------------------------------------------------


@dataclass
class Answer:
    """One synchronous request as the client saw it."""

    request_id: str
    sent_at: float
    """Monotonic seconds when the request was sent."""
    elapsed_s: float
    status: int
    """HTTP status; 0 when no answer came (connection refused, client timeout)."""
    body: dict = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None


def late_answers(answers: list[Answer], deadline_ms: int, slack_s: float) -> list[Answer]:
    """Answers later than the deadline plus `slack_s`. A prediction (200) is timed by the
    gateway itself (`latency_ms.server`: from its handler's start to the answer), the deadline
    it promises; the client-side time of a 200 also holds how this interpreter and the OS
    scheduled the load thread, which stalled for seconds on the shared 2-core machine while a
    restarting service took a core (its server time was 15 ms). Other answers (504 at the
    deadline, 503) are timed by the client."""
    limit_s = deadline_ms / 1000 + slack_s
    late = []
    for answer in answers:
        server_ms = (answer.body.get("latency_ms") or {}).get("server")
        elapsed_s = server_ms / 1000 if answer.status == 200 and server_ms is not None else None
        if (answer.elapsed_s if elapsed_s is None else elapsed_s) > limit_s:
            late.append(answer)
    return late


class SyncLoad:
    """Synchronous predictions at a steady rate through the gateway, from a background thread.

    `body_for(i, request_id)` makes request `i`'s body; each request's client-side timeout is
    its deadline plus `grace_s`, so a request the gateway leaves hanging shows up as status 0.
    """

    def __init__(
        self,
        url: str,
        model: str,
        body_for: Callable[[int, str], dict],
        rate: float,
        deadline_ms: int,
        grace_s: float = 5.0,
        tag: str | None = None,
    ) -> None:
        self.endpoint = f"{url}/v1/models/{model}/predict"
        self.body_for = body_for
        self.rate = rate
        self.deadline_ms = deadline_ms
        self.grace_s = grace_s
        self.tag = tag or uuid.uuid4().hex[:8]
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> SyncLoad:
        self._thread.start()
        return self

    def stop(self) -> list[Answer]:
        """Stop sending, wait for every answer (or its client timeout), return them all."""
        self._stop.set()
        self._thread.join(self.deadline_ms / 1000 + self.grace_s + 30)
        assert not self._thread.is_alive(), "the load driver did not finish"
        return sorted(self.answers, key=lambda a: a.sent_at)

    def since(self, moment: float) -> list[Answer]:
        """Answers to requests sent at or after the monotonic time `moment`."""
        return [a for a in list(self.answers) if a.sent_at >= moment]

    async def _run(self) -> None:
        # Idle connections are dropped after 2 s, before the gateway's own 5 s keep-alive
        # timeout (uvicorn's default) closes them: reusing one the server is closing at that
        # moment fails with a ReadError that no server answer caused.
        limits = httpx.Limits(
            max_connections=256, max_keepalive_connections=256, keepalive_expiry=2.0
        )
        timeout = self.deadline_ms / 1000 + self.grace_s
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            tasks: set[asyncio.Task] = set()
            started = time.monotonic()
            i = 0
            while not self._stop.is_set():
                due = started + i / self.rate
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                request_id = f"{self.tag}-s{i}"
                task = asyncio.ensure_future(self._one(client, self.body_for(i, request_id)))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            if tasks:
                await asyncio.wait(tasks)

    async def _one(self, client: httpx.AsyncClient, body: dict) -> None:
        sent = time.monotonic()
        try:
            response = await client.post(self.endpoint, json=body)
            status, payload = response.status_code, response.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, payload = 0, {"exception": repr(exc)}
        self.answers.append(
            Answer(body["request_id"], sent, time.monotonic() - sent, status, payload)
        )


def summary(answers: list[Answer]) -> dict[tuple[int, str | None], int]:
    """How many answers had each (status, error code)."""
    counts: dict[tuple[int, str | None], int] = {}
    for answer in answers:
        key = (answer.status, answer.code)
        counts[key] = counts.get(key, 0) + 1
    return counts


def paced(items: Iterator, rate: float, stop: threading.Event) -> Iterator:
    """`items` at `rate` per second until `stop` is set."""
    started = time.monotonic()
    for i, item in enumerate(items):
        if stop.is_set():
            return
        if (delay := started + i / rate - time.monotonic()) > 0:
            time.sleep(delay)
        yield item


class AsyncRequests(threading.Thread):
    """Produces asynchronous requests at a steady rate; records which the broker acknowledged
    (delivery report without error) and when."""

    def __init__(
        self, bootstrap: str, items: list[tuple[str, bytes]], ids: list[str], rate: float
    ) -> None:
        super().__init__(daemon=True)
        self.items, self.ids, self.rate = items, ids, rate
        self.producer = make_producer(SluiceSettings(kafka_bootstrap=bootstrap))
        self.acked: dict[str, float] = {}
        self.failed: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        for (key, value), request_id in paced(
            iter(zip(self.items, self.ids, strict=True)), self.rate, self.stop
        ):
            self.producer.produce(
                REQUESTS.name, value, key, on_delivery=self._delivered(request_id)
            )
            self.producer.poll(0)
        if self.producer.flush(120) > 0:
            self.failed.append("requests still unacknowledged 120 s after the last was sent")

    def _delivered(self, request_id: str):
        def report(error: KafkaError | None, _message: Message) -> None:
            if error is None:
                self.acked[request_id] = time.monotonic()
            else:
                self.failed.append(f"{request_id}: {error}")

        return report


class Events(threading.Thread):
    """Publishes a demo stream's events at a steady rate; records each acknowledged one with
    its partition and offset.

    An acknowledgement can come without an offset (None): when a retried batch was already
    written before a leader moved, the broker answers the idempotent producer's duplicate
    sequence with success but no offset. `placed` then looks those up on the topic at the
    end of `run`."""

    def __init__(self, bootstrap: str, items: list[DemoItem], rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap = bootstrap
        self.items, self.rate = items, rate
        self.unplaced = 0
        """Acknowledgements that came without an offset."""
        self.producer = make_producer(SluiceSettings(kafka_bootstrap=bootstrap))
        self.placed: list[Positioned] = []
        self.error: Exception | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._publish()
            self._place_unplaced()
        except Exception as exc:  # noqa: BLE001 - the test reads it
            self.error = exc

    def _place_unplaced(self) -> None:
        missing = {p.event.event_id: p for p in self.placed if p.offset is None}
        self.unplaced = len(missing)
        if not missing:
            return
        found: dict[str, Positioned] = {}

        def all_found(messages: list) -> bool:
            for message in messages[len(seen) :]:
                seen.append(message)
                try:
                    event_id = orjson.loads(message.value()).get("event_id")
                except (orjson.JSONDecodeError, AttributeError):
                    continue
                if event_id in missing:
                    found[event_id] = Positioned(
                        missing[event_id].event, message.partition(), message.offset()
                    )
            return len(found) == len(missing)

        seen: list = []
        read_topic(self.bootstrap, EVENTS.name, all_found, 60)
        self.placed = [found.get(p.event.event_id, p) for p in self.placed]

    def _publish(self) -> None:
        publish(
            self.producer,
            paced(iter(self.items), self.rate, self.stop),
            labels_topic=None,
            on_delivered=lambda event, partition, offset: self.placed.append(
                Positioned(event, partition, offset)
            ),
        )
