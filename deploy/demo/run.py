"""`sluice demo` (what `make run` runs): the whole system on the local cluster, with live traffic.

1. starts the local cluster (`sluice dev up`) unless it already runs;
2. registers the committed demo models (fraud v1 champion, v2 candidate) into the repository;
3. starts every service as a child process (logs in `<state>/logs/`);
4. plays the demo stream in compressed event time: each transaction is first scored (half
   through the gateway, synchronously, half straight onto `sluice.requests`), then its event
   goes to `sluice.events`, and its label follows after the stream's label delay; a drift is
   injected after `--drift-after` seconds;
5. starts a rollout of v2 from `deploy/demo/rollout.yaml` (shadow, then canary steps);
6. closes the loop: once no rollout is active, a drift or quality alert on the champion makes
   the rollout controller run `deploy/demo/retrain.py` (train on recent labelled traffic,
   register the next version) and roll that version out with the same plan;
7. shows a live view until Ctrl-C or `--minutes`, then stops everything it started.

Event time runs `speed` times faster than the wall clock (a demo day in a few minutes), so
windows, TTLs and label delays keep the meaning they had in training.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from deploy.demo.generator import DemoConfig, Drift, generate
from deploy.demo.train import request_features
from deploy.local.cluster import ClusterConfig, status, up
from deploy.local.cluster import down as cluster_down
from schemas.messages import RouteRole, RoutingEntry, RoutingTable
from schemas.topics import ALERTS, EVENTS, REQUESTS, ROUTING
from services.common.clickhouse import clickhouse_client
from services.common.codec import encode, encode_obj
from services.common.settings import SluiceSettings
from services.inference.registry import kafka_publisher, register, versions

HERE = Path(__file__).resolve().parent
DEMO_MODELS = HERE / "models"
ROLLOUT_PLAN = HERE / "rollout.yaml"
EVENTS_PER_DAY = DemoConfig().cards * DemoConfig().txns_per_card_per_day
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Ports:
    """Where the demo's services listen."""

    ingest: int = 8080
    features: int = 8081
    rollout: int = 8082
    inference_metrics: int = 9101
    monitor_metrics: int = 9102


@dataclass
class Service:
    name: str
    """Its log's name, and the package it runs (`services.<name>`) unless `module` says."""
    env: dict[str, str]
    ready_url: str
    process: subprocess.Popen | None = None
    module: str = ""
    """The service package under `services/` when `name` is an instance's (`inference-2`)."""


def ensure_models(settings: SluiceSettings) -> list[str]:
    """Register the committed demo versions that the repository does not hold yet."""
    root = Path(settings.model_repository)
    present = set(versions(root, "fraud")) if (root / "fraud").exists() else set()
    publish = kafka_publisher(settings)
    added = []
    for folder in sorted((DEMO_MODELS / "fraud").iterdir()):
        if folder.name not in present:
            register(root, folder / "model.onnx", folder / "manifest.json", publish=publish)
            added.append(folder.name)
    return added


def declare_champion(settings: SluiceSettings, version: str = "1") -> None:
    """Publish the demo's starting routing table (v1 takes all traffic) unless one exists.

    Without a table, inference serves a model's newest version, which would put the candidate
    in front of traffic before its rollout starts."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"demo-routing-{os.getpid()}",
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(ROUTING.name, 0, OFFSET_BEGINNING)])
    exists, deadline = False, time.monotonic() + 10
    while time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error() is not None:
            break  # end of the partition
        exists = exists or message.key() == b"fraud"
    consumer.close()
    if exists:
        return
    table = RoutingTable(
        model="fraud",
        entries=[RoutingEntry(version=version, role=RouteRole.champion, weight=1.0)],
        revision=1,
        updated_at_ms=int(time.time() * 1000),
    )
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(ROUTING.name, encode(table), key="fraud")
    if producer.flush(10):
        raise RuntimeError("could not publish the demo's routing table")


def services(
    cluster: ClusterConfig, ports: Ports, root: Path, state_dir: Path, drift_window_s: int = 30
) -> list[Service]:
    """The five services, each pointed at the cluster, the repository and its port; the
    monitor's windows last `drift_window_s` (see `drift_window_s`)."""
    base = {
        **cluster.env(),
        "SLUICE_MODEL_REPOSITORY": str(root),
        "SLUICE_LOG_LEVEL": "INFO",
    }
    local = "http://127.0.0.1"
    return [
        Service(
            "features",
            {
                **base,
                "SLUICE_FEATURES_HTTP_PORT": str(ports.features),
                "SLUICE_FEATURES_DEFINITIONS": str(HERE / "features.yaml"),
                "SLUICE_FEATURES_DATA_DIR": str(state_dir / "features"),
            },
            f"{local}:{ports.features}/healthz",
        ),
        Service(
            "inference",
            {
                **base,
                "SLUICE_METRICS_PORT": str(ports.inference_metrics),
                "SLUICE_INFERENCE_ADAPTIVE": "true",
            },
            f"{local}:{ports.inference_metrics}/readyz",
        ),
        Service(
            "monitor",
            {
                **base,
                "SLUICE_METRICS_PORT": str(ports.monitor_metrics),
                "SLUICE_MONITOR_INTERVAL_S": "10",
                "SLUICE_MONITOR_WINDOW_S": str(drift_window_s),
                "SLUICE_MONITOR_MODELS": '["fraud"]',
            },
            f"{local}:{ports.monitor_metrics}/healthz",
        ),
        Service(
            "rollout",
            {
                **base,
                "SLUICE_ROLLOUT_HTTP_PORT": str(ports.rollout),
                "SLUICE_ROLLOUT_EVAL_INTERVAL_S": "2",
                # The closed loop: a drift or quality alert on the champion retrains it.
                "SLUICE_ROLLOUT_RETRAIN_HOOK": f"{sys.executable} -m deploy.demo.retrain",
                "SLUICE_ROLLOUT_RETRAIN_PLAN": str(ROLLOUT_PLAN),
                "SLUICE_ROLLOUT_RETRAIN_COOLDOWN_S": "300",
            },
            f"{local}:{ports.rollout}/healthz",
        ),
        Service(
            "ingest",
            {**base, "SLUICE_INGEST_PORT": str(ports.ingest)},
            f"{local}:{ports.ingest}/readyz",
        ),
    ]


def start_services(stack: list[Service], logs: Path, timeout_s: float = 90) -> None:
    """Start each service and wait until every one answers its health or readiness URL."""
    logs.mkdir(parents=True, exist_ok=True)
    for service in stack:
        log = (logs / f"{service.name}.log").open("ab")
        service.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{service.module or service.name}"],
            env={**os.environ, **service.env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout_s
    waiting = list(stack)
    while waiting and time.monotonic() < deadline:
        for service in list(waiting):
            if service.process.poll() is not None:
                raise RuntimeError(f"{service.name} exited; see {logs / service.name}.log")
            try:
                if httpx.get(service.ready_url, timeout=1).status_code == 200:
                    waiting.remove(service)
            except httpx.HTTPError:
                pass
        time.sleep(0.3)
    if waiting:
        raise RuntimeError(f"not ready after {timeout_s:.0f} s: {[s.name for s in waiting]}")


def stop_services(stack: list[Service]) -> None:
    """SIGTERM every service (they drain and commit), then wait; kill what hangs."""
    for service in stack:
        if service.process and service.process.poll() is None:
            service.process.send_signal(signal.SIGTERM)
    for service in stack:
        if service.process:
            try:
                service.process.wait(20)
            except subprocess.TimeoutExpired:
                service.process.kill()


@dataclass
class Traffic:
    """Plays the demo stream: first `history_s` of event time before now as plain events (a card
    network has history: the online features start warm, as they were in training), then live
    transactions, each scored, then sent as an event, then labelled later."""

    settings: SluiceSettings
    gateway_url: str
    rate: float
    drift_after_s: float
    features_metrics_url: str
    """Where the features service counts the events it routed; history waits for it."""
    history_s: float = 86_400.0
    seed: int = 7
    sent: int = 0
    sync_ok: int = 0
    sync_failed: int = 0
    labels_sent: int = 0
    history_events: int = 0
    history_wait_s: float = 0.0
    live: threading.Event = field(default_factory=threading.Event)
    """Set when the history is in the online features and live traffic begins."""
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def speed(self) -> float:
        """Event-time seconds per wall second."""
        return self.rate / (EVENTS_PER_DAY / 86_400)

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        producer = Producer({"bootstrap.servers": self.settings.kafka_bootstrap, "linger.ms": 5})
        start_ms = int(time.time() * 1000)
        config = DemoConfig(
            seed=self.seed,
            start_ms=start_ms - int(self.history_s * 1000),
            # half the legitimate amounts x5 (a pricing or currency bug): measured over the
            # model's reference bins, `amount` then reads Wasserstein 0.13 / PSI 0.38 once a
            # window is drifted; the generator's default (30% x1.8) reads 0.02 / 0.04, under
            # any default threshold
            drift=Drift(
                start_ms=start_ms + int(self.drift_after_s * self.speed * 1000),
                share=0.5,
                amount_factor=5.0,
            ),
        )
        stream = generate(config)
        first_live = self._play_history(producer, stream, start_ms)
        labels: list[tuple[float, int, bytes]] = []
        started = time.monotonic()
        # aiohttp, not httpx, for the traffic itself: 0.3 ms of CPU per request against 2.3-2.5
        # ms measured here, and on two cores the driver competes with the system it drives.
        # Idle connections go after 2 s, before the gateway's 5 s keep-alive timeout closes
        # them under a request.
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5),
            connector=aiohttp.TCPConnector(keepalive_timeout=2.0),
        ) as client:
            in_flight: set[asyncio.Task] = set()
            for item in itertools.chain([first_live], stream):
                if self._stop.is_set():
                    break
                event = item.event
                due = started + (event.ts_ms - start_ms) / 1000 / self.speed
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                self._request(producer, client, item, in_flight)
                producer.produce(EVENTS.name, encode(event), key=event.entities["card"])
                label_due = started + (item.label.ts_ms - start_ms) / 1000 / self.speed
                heapq.heappush(labels, (label_due, self.sent, encode(item.label)))
                await self._send_due_labels(client, labels)
                producer.poll(0)
                self.sent += 1
            if in_flight:
                await asyncio.wait(in_flight, timeout=5)
        producer.flush(10)

    def _play_history(self, producer: Producer, stream, now_ms: int):
        """Produce the stream's events before `now_ms` as fast as the broker takes them, wait
        until the features service routed them (bounded), and return the first live item."""
        for item in stream:
            if item.event.ts_ms >= now_ms or self._stop.is_set():
                break
            while True:
                try:
                    event = item.event
                    producer.produce(EVENTS.name, encode(event), key=event.entities["card"])
                    break
                except BufferError:
                    producer.poll(0.05)
            self.history_events += 1
            producer.poll(0)
        producer.flush(30)
        waited = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - waited < 120:
            if self._features_routed() >= self.history_events:
                break
            time.sleep(0.5)
        self.history_wait_s = time.monotonic() - waited
        self.live.set()
        return item

    def _features_routed(self) -> float:
        """Events the features service has routed since it started (0 when unknown)."""
        counts, _ = Scrape(self.features_metrics_url).sample()
        return total(counts, "sluice_features_events_total", topic=EVENTS.name)

    def _request(self, producer, client, item, in_flight: set[asyncio.Task]) -> None:
        event = item.event
        features = {**request_features(event.fields), "merchant_id": event.entities["merchant"]}
        body = {
            "entity_id": event.entities["card"],
            "features": features,
            "request_id": event.event_id,
        }
        if self.sent % 2 == 0 and len(in_flight) < 64:
            task = asyncio.ensure_future(self._sync(client, body))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            return
        request = {
            "schema_version": 1,
            "model": "fraud",
            "created_at_ms": int(time.time() * 1000),
            **body,
        }
        producer.produce(REQUESTS.name, encode_obj(request), key=body["entity_id"])

    async def _post(self, client: aiohttp.ClientSession, path: str, data: bytes, **kw) -> int:
        """POST to the gateway and read the answer; its status, 503 when none came."""
        try:
            async with client.post(f"{self.gateway_url}{path}", data=data, **kw) as response:
                await response.read()
                return response.status
        except (aiohttp.ClientError, TimeoutError):
            return 503

    async def _sync(self, client: aiohttp.ClientSession, body: dict) -> None:
        path = "/v1/models/fraud/predict"
        if await self._post(client, path, orjson.dumps(body), headers=JSON) == 200:
            self.sync_ok += 1
        else:
            self.sync_failed += 1

    async def _send_due_labels(self, client: aiohttp.ClientSession, labels: list) -> None:
        now = time.monotonic()
        due = []
        while labels and labels[0][0] <= now and len(due) < 1000:
            due.append(heapq.heappop(labels)[2])
        if len(due) >= 50 or (due and not labels):
            status = await self._post(client, "/v1/labels", b"\n".join(due))
            if status == 202:
                self.labels_sent += len(due)
                return
            if status < 500:  # refused for good; 5xx: the gateway or its broker is busy
                return
        for entry in due:  # due again at the next call
            heapq.heappush(labels, (now, 0, entry))


@dataclass
class DemoReport:
    """What a demo run did: traffic counters and how far the rollout got."""

    traffic: Traffic
    rollout_started: int = 0
    """HTTP status of the rollout start (201 when it started)."""
    rollout_state: str = ""
    """The rollout's state when the demo stopped, e.g. `canary[1]` or `promoted`."""
    rollout_reason: str = ""
    """Why it is in that state (its last decision's reason)."""
    latency: list[LatencyBucket] = field(default_factory=list)
    """Per `bucket_s` of live traffic: predictions stored in ClickHouse, their `total_ms`
    quantiles and the broker's CPU and memory; only buckets that the run covered whole."""


@dataclass(frozen=True)
class LatencyBucket:
    """One stretch of the live traffic, from `sluice.predictions` as stored in ClickHouse."""

    start_s: float
    """Seconds after live traffic began."""
    count: int
    p50_ms: float
    p99_ms: float
    broker_cores: float | None
    """The broker process's CPU over the bucket, in cores; None when it was not sampled."""
    broker_rss_mib: float | None
    """The broker's resident memory at the bucket's end."""


class ProcessSampler(threading.Thread):
    """Samples one process's CPU time and resident memory from /proc every `interval_s`."""

    def __init__(self, pid: int, interval_s: float = 5.0) -> None:
        super().__init__(name="process-sampler", daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.samples: list[tuple[float, float, float]] = []
        """(wall seconds, CPU seconds, RSS MiB)."""
        self._stop = threading.Event()

    def run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.is_set():
            try:
                fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
                status_lines = Path(f"/proc/{self.pid}/status").read_text().splitlines()
            except OSError:
                return
            rss_kib = next((int(x.split()[1]) for x in status_lines if x.startswith("VmRSS:")), 0)
            cpu_s = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            self.samples.append((time.time(), cpu_s, rss_kib / 1024))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def over(self, start: float, end: float) -> tuple[float | None, float | None]:
        """(cores, RSS MiB at the end) between wall times `start` and `end`, from the samples
        nearest inside; (None, None) without two samples there."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None, None
        first, last = inside[0], inside[-1]
        return (last[1] - first[1]) / (last[0] - first[0]), last[2]


def latency_buckets(
    settings: SluiceSettings,
    live_start_s: float,
    live_end_s: float,
    bucket_s: float,
    broker: ProcessSampler | None = None,
) -> list[LatencyBucket]:
    """The predictions created in each whole `bucket_s` of live traffic between the wall times
    `live_start_s` and `live_end_s`, with count, p50 and p99 of `total_ms` (dedup by FINAL)."""
    start_ms, bucket_ms = int(live_start_s * 1000), int(bucket_s * 1000)
    whole = int((live_end_s - live_start_s) // bucket_s)
    if whole < 1:
        return []
    client = clickhouse_client(settings)
    try:
        rows = client.execute(
            f"SELECT intDiv(created_at_ms - %(start)s, %(bucket)s) AS b, count(), "
            "quantileExact(0.5)(total_ms), quantileExact(0.99)(total_ms) "
            f"FROM {settings.clickhouse_database}.predictions FINAL "
            "WHERE created_at_ms >= %(start)s AND created_at_ms < %(end)s "
            "GROUP BY b ORDER BY b",
            {"start": start_ms, "bucket": bucket_ms, "end": start_ms + whole * bucket_ms},
        )
    finally:
        client.disconnect()
    buckets = []
    for index, count, p50, p99 in rows:
        begin = live_start_s + index * bucket_s
        cores, rss = broker.over(begin, begin + bucket_s) if broker else (None, None)
        buckets.append(LatencyBucket(index * bucket_s, count, p50, p99, cores, rss))
    return buckets


def latency_table(buckets: list[LatencyBucket]) -> Table:
    """The buckets as the table docs/benchmarks.md shows."""
    table = Table("minutes", "predictions", "p50 ms", "p99 ms", "broker cores", "broker RSS MiB")
    for b in buckets:
        table.add_row(
            f"{b.start_s / 60:.1f}",
            str(b.count),
            f"{b.p50_ms:.1f}",
            f"{b.p99_ms:.1f}",
            "-" if b.broker_cores is None else f"{b.broker_cores:.2f}",
            "-" if b.broker_rss_mib is None else f"{b.broker_rss_mib:.0f}",
        )
    return table


P99_LIMIT_MS = 250.0
"""The latency shape [kafka] #21 asks of the demo: every bucket's p99 of `total_ms` under this,"""
P99_RATIO = 2.0
"""... and none more than this times the first bucket's."""


def shape_problems(
    buckets: list[LatencyBucket],
    reference_floor_ms: float = 0.0,
    limit_ms: float = P99_LIMIT_MS,
) -> list[str]:
    """How `buckets` miss the latency shape: a p99 at or over `limit_ms`, or over `P99_RATIO`
    times the first bucket's p99 (taken as at least `reference_floor_ms`); [] when they keep
    it."""
    if not buckets:
        return ["no bucket"]
    reference = max(buckets[0].p99_ms, reference_floor_ms)
    problems = []
    for b in buckets:
        if b.p99_ms >= limit_ms:
            problems.append(f"{b.start_s:.0f} s: p99 {b.p99_ms:.1f} ms >= {limit_ms:.0f}")
        elif b.p99_ms > P99_RATIO * reference:
            problems.append(
                f"{b.start_s:.0f} s: p99 {b.p99_ms:.1f} ms > {P99_RATIO:g}x {reference:.1f}"
            )
    return problems


class Scrape:
    """Rates and quantiles from successive Prometheus scrapes of one endpoint."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.previous: dict[tuple, float] = {}
        self.previous_at = time.monotonic()

    def sample(self) -> tuple[dict[tuple, float], float]:
        """(deltas of every counter/histogram sample since the last call, seconds elapsed)."""
        try:
            text = httpx.get(self.url, timeout=1).text
        except httpx.HTTPError:
            return {}, 0.0
        now = time.monotonic()
        current = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                current[(s.name, tuple(sorted(s.labels.items())))] = s.value
        deltas = {k: v - self.previous.get(k, 0.0) for k, v in current.items()}
        elapsed, self.previous, self.previous_at = now - self.previous_at, current, now
        return deltas, elapsed


def quantile_from_buckets(deltas: dict[tuple, float], name: str, q: float) -> float | None:
    """The q-quantile (upper bucket bound, seconds) of a histogram's observations in the deltas."""
    buckets = sorted(
        (float(dict(labels)["le"]), count)
        for (metric, labels), count in deltas.items()
        if metric == f"{name}_bucket"
    )
    total = buckets[-1][1] if buckets else 0
    if total <= 0:
        return None
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return None


def total(deltas: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(
        v
        for (metric, lab), v in deltas.items()
        if metric == name and all(dict(lab).get(k) == val for k, val in labels.items())
    )


class LiveView:
    """What `sluice demo` shows: traffic, latency, batching, features, drift, rollout, alerts."""

    def __init__(self, settings: SluiceSettings, ports: Ports, traffic: Traffic) -> None:
        self.settings, self.ports, self.traffic = settings, ports, traffic
        local = "http://127.0.0.1"
        self.gateway = Scrape(f"{local}:{ports.ingest}/metrics")
        self.inference = Scrape(f"{local}:{ports.inference_metrics}/metrics")
        self.features = Scrape(f"{local}:{ports.features}/metrics")
        self.alerts: deque[str] = deque(maxlen=6)
        self._client = None
        self._alert_consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"demo-view-{os.getpid()}",
                "auto.offset.reset": "latest",
            }
        )
        self._alert_consumer.subscribe([ALERTS.name])

    def render(self) -> Group:
        gateway, g_s = self.gateway.sample()
        inference, i_s = self.inference.sample()
        features, f_s = self.features.sample()
        for message in self._alert_consumer.consume(100, 0):
            if message.error() is None:
                alert = orjson.loads(message.value())
                self.alerts.appendleft(
                    f"{alert['state']:8} {alert['kind']:<17} v{alert['version']} "
                    f"{alert.get('feature') or alert['metric']} = {alert['value']:.3g} "
                    f"(threshold {alert['threshold']:.3g})"
                )
        traffic = Table(title="traffic", show_header=True)
        for column in (
            "gateway req/s",
            "p50 ms",
            "p99 ms",
            "scored rows/s",
            "mean batch",
            "events/s",
            "late events",
            "labels sent",
        ):
            traffic.add_column(column)
        p50 = quantile_from_buckets(gateway, "sluice_ingest_prediction_seconds", 0.5)
        p99 = quantile_from_buckets(gateway, "sluice_ingest_prediction_seconds", 0.99)
        batches = total(inference, "sluice_inference_batch_size_count")
        traffic.add_row(
            _rate(total(gateway, "sluice_ingest_predictions_total"), g_s),
            _ms(p50),
            _ms(p99),
            _rate(total(inference, "sluice_inference_rows_total"), i_s),
            f"{total(inference, 'sluice_inference_batch_size_sum') / batches:.1f}"
            if batches
            else "-",
            _rate(total(features, "sluice_features_events_total"), f_s),
            f"{total(features, 'sluice_features_late_events_total'):.0f}",
            str(self.traffic.labels_sent),
        )
        return Group(traffic, self._rollout(), self._drift(), self._alerts(), self._retrains())

    def _rollout(self) -> Table:
        table = Table(title="rollout of fraud")
        for column in ("candidate", "state", "step", "weights", "last decision"):
            table.add_column(column)
        try:
            view = httpx.get(
                f"http://127.0.0.1:{self.ports.rollout}/v1/rollouts/fraud", timeout=1
            ).json()
        except (httpx.HTTPError, ValueError):
            table.add_row("unreachable", "", "", "", "")
            return table
        step = f"{view['step_index'] + 1}/{view['steps']}" if "steps" in view else "-"
        table.add_row(
            f"v{view['candidate']}" if "candidate" in view else "-",
            str(view.get("state", "-")),
            step,
            ", ".join(f"v{v}: {w:.0%}" for v, w in view.get("weights", {}).items()),
            str(view.get("reason", ""))[:70],
        )
        return table

    def _drift(self) -> Table:
        table = Table(title="top drifting features (latest window, PSI)")
        table.add_column("version")
        table.add_column("feature")
        table.add_column("psi")
        try:
            rows = self._clickhouse().execute(
                f"SELECT version, feature, argMax(value, window_start) AS psi "
                f"FROM {self.settings.clickhouse_database}.drift "
                "WHERE model = 'fraud' AND kind = 'feature' AND method = 'psi' "
                "GROUP BY version, feature ORDER BY psi DESC LIMIT 5"
            )
        except Exception:  # noqa: BLE001 - the view shows what it can
            rows = []
        for version, feature, value in rows:
            table.add_row(version, feature, f"{value:.3f}")
        return table

    def _retrains(self) -> Table:
        table = Table(title="alert-triggered retraining (newest run)")
        for column in ("step", "status", "version", "detail"):
            table.add_column(column)
        try:
            rows = self._clickhouse().execute(
                f"SELECT step, status, version, detail FROM {self.settings.clickhouse_database}"
                ".retrains WHERE model = 'fraud' AND run_id = (SELECT argMax(run_id, at_ms) "
                f"FROM {self.settings.clickhouse_database}.retrains WHERE model = 'fraud') "
                "ORDER BY seq"
            )
        except Exception:  # noqa: BLE001 - the view shows what it can
            rows = []
        for step, outcome, version, detail in rows or [("none yet", "", "", "")]:
            table.add_row(step, outcome, version and f"v{version}", detail[:80])
        return table

    def _alerts(self) -> Table:
        table = Table(title="alerts (newest first)")
        table.add_column("alert")
        for line in self.alerts or ["none yet"]:
            table.add_row(line)
        return table

    def _clickhouse(self):
        if self._client is None:
            self._client = clickhouse_client(self.settings, timeout_s=2.0)
        return self._client

    def close(self) -> None:
        self._alert_consumer.close()


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "-"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def where_to_look(ports: Ports, cluster: ClusterConfig) -> str:
    return f"""
Where to look next:
  status page     http://127.0.0.1:{ports.rollout}/status#model=fraud
  rollout API     http://127.0.0.1:{ports.rollout}/v1/rollouts/fraud
  gateway docs    http://127.0.0.1:{ports.ingest}/docs
  predict         curl -s -XPOST http://127.0.0.1:{ports.ingest}/v1/models/fraud/predict \\
                    -H 'content-type: application/json' -d '{{"entity_id": "card-000042",
                    "features": {{"amount": 12.5, "hour": 14, "card_present": 1,
                    "high_risk_category": 0, "merchant_id": "merchant-00007"}}}}'
  open inference  curl -s http://127.0.0.1:{ports.ingest}/v2/models/fraud
  features        curl -s http://127.0.0.1:{ports.features}/v1/features/card/card-000042
  rollout         sluice rollout status fraud
  ClickHouse      clickhouse-client --port {cluster.clickhouse_tcp_port} --query \\
                    "SELECT version, route, count() FROM sluice.predictions FINAL
                     GROUP BY version, route"
  logs            {cluster.state_dir}/logs/
"""


def _interrupt(_signum: int, _frame: object) -> None:
    """SIGTERM stops the demo the way Ctrl-C does: everything it started is stopped."""
    raise KeyboardInterrupt


def drift_window_s(speed: float) -> int:
    """Monitor windows that span one event-time day of a stream played at `speed` (100 s at
    150 transactions/s): the stream's rates and request hours follow the time of day and the
    models' reference profiles cover whole days, so a window over a few hours reads as drift."""
    return max(30, math.ceil(86_400 / speed))


def run(
    minutes: float | None = None,
    rate: float = 150.0,
    drift_after_s: float = 180.0,
    view: bool = True,
    cluster: ClusterConfig | None = None,
    ports: Ports | None = None,
    root: Path | None = None,
    bucket_s: float = 300.0,
) -> DemoReport:
    """Run the demo; reports what it did when it stops (Ctrl-C or `minutes`), with the latency
    of its predictions per `bucket_s` of live traffic."""
    cluster = cluster or ClusterConfig()
    ports = ports or Ports()
    root = Path(root or os.environ.get("SLUICE_MODEL_REPOSITORY", "models")).resolve()
    console = Console()
    started_cluster = not all(part.healthy for part in status(cluster))
    up(cluster)
    env = {k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()}
    settings = SluiceSettings(**env, model_repository=root)
    declare_champion(settings)
    added = ensure_models(settings)
    console.print(f"cluster up at {cluster.kafka_bootstrap}; models registered: {added or 'none'}")
    traffic = Traffic(
        settings,
        f"http://127.0.0.1:{ports.ingest}",
        rate,
        drift_after_s,
        features_metrics_url=f"http://127.0.0.1:{ports.features}/metrics",
    )
    stack = services(cluster, ports, root, cluster.state_dir, drift_window_s(traffic.speed))
    report = DemoReport(traffic)
    rollout_url = f"http://127.0.0.1:{ports.rollout}/v1/rollouts"
    live_view = None
    live_started = None
    kafka_pid = next(part.pid for part in status(cluster) if part.name == "kafka")
    broker = ProcessSampler(kafka_pid) if kafka_pid else None
    if broker:
        broker.start()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        start_services(stack, cluster.state_dir / "logs")
        console.print("services ready: " + ", ".join(s.name for s in stack))
        threading.Thread(target=traffic.run, name="traffic", daemon=True).start()
        console.print(f"playing {traffic.history_s / 3600:.0f} h of transaction history ...")
        traffic.live.wait(180)
        live_started = time.time()
        console.print(
            f"history: {traffic.history_events} events, in the online features after "
            f"{traffic.history_wait_s:.1f} s; live traffic at {rate:.0f}/s"
        )
        time.sleep(3)
        plan = ROLLOUT_PLAN.read_text()
        response = httpx.post(
            rollout_url, json={"plan_yaml": plan, "source": str(ROLLOUT_PLAN)}, timeout=10
        )
        report.rollout_started = response.status_code
        console.print(f"rollout of v2: HTTP {response.status_code} {response.text[:200]}")
        console.print(where_to_look(ports, cluster))
        deadline = time.monotonic() + minutes * 60 if minutes else float("inf")
        if view:
            live_view = LiveView(settings, ports, traffic)
            with Live(live_view.render(), console=console, refresh_per_second=1) as live:
                while time.monotonic() < deadline:
                    time.sleep(1)
                    live.update(live_view.render())
        else:
            while time.monotonic() < deadline:
                time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        traffic.stop()
        live_ended = time.time()
        time.sleep(1)
        try:
            view = httpx.get(f"{rollout_url}/fraud", timeout=5).json()
            report.rollout_state, report.rollout_reason = view["state"], view["reason"]
        except (httpx.HTTPError, ValueError, KeyError):
            report.rollout_state = "unknown"
        if live_view is not None:
            live_view.close()
        stop_services(stack)
        if broker:
            broker.stop()
        if live_started is not None:
            try:
                report.latency = latency_buckets(
                    settings, live_started, live_ended, bucket_s, broker
                )
            except Exception as exc:  # noqa: BLE001 - the report must not lose the stop
                console.print(f"latency per bucket not read from ClickHouse: {exc}")
            console.print(latency_table(report.latency))
            problems = shape_problems(report.latency)
            console.print(
                f"latency shape (p99 < {P99_LIMIT_MS:.0f} ms, <= {P99_RATIO:g}x the first "
                f"bucket's): {'; '.join(problems) if problems else 'kept'}"
            )
        if started_cluster:
            cluster_down(cluster)
        console.print(
            f"stopped: {traffic.sent} transactions, {traffic.sync_ok} synchronous predictions "
            f"({traffic.sync_failed} failed), {traffic.labels_sent} labels; rollout "
            f"{report.rollout_state}"
        )
    return report
