"""The sink end to end: topics -> ClickHouse through the shared worker loop, dead letters, a
replay counted once by the documented dedup queries, and a ClickHouse outage survived without
losing or committing anything early."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from schemas.messages import ErrorBody, Event, Label, LatencyBreakdown, Prediction, Route
from schemas.topics import DLQ, EVENTS, LABELS, PREDICTIONS
from services.common.codec import encode
from services.monitor.app import Monitor, sink_workers
from services.monitor.settings import MonitorSettings
from services.monitor.store import Store
from tests.support import produce_all, read_topic, unique

pytestmark = pytest.mark.integration

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
REPO = Path(__file__).resolve().parents[1]


def settings_for(cluster, **overrides) -> MonitorSettings:
    env = {k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()}
    return MonitorSettings(
        **{
            **env,
            "monitor_group_id": unique("monitor"),
            "monitor_analyzer": False,
            "monitor_sink_batch_size": 500,
            "monitor_sink_max_wait_ms": 50,
            "metrics_port": 0,
            **overrides,
        }
    )


def prediction(model: str, i: int, error: bool = False) -> Prediction:
    return Prediction(
        request_id=f"req-{i}",
        model=model,
        version="2" if i % 3 == 0 else "1",
        route=Route.canary if i % 3 == 0 else Route.champion,
        entity_id=f"card-{i}",
        score=None if error else i / 1000,
        outputs={} if error else {"label": [float(i % 2)], "probabilities": [0.25, 0.75]},
        features={} if error else {"amount": float(i), "velocity": 2.5},
        defaulted=[] if error else ["velocity"],
        latency=LatencyBreakdown(queue_ms=1, features_ms=2, model_ms=3, total_ms=6 + i % 7),
        batch_size=32,
        error=ErrorBody(code="missing_feature", message="no amount") if error else None,
        created_at_ms=BASE_MS + i,
        scored_at_ms=BASE_MS + i + 6,
    )


def wait_for(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.1)


def count(store: Store, sql: str, **params) -> int:
    return int(store.query(sql, params)[0][0])


def run_until_ready(monitor: Monitor) -> None:
    monitor.start()
    wait_for(monitor.ready, 20)


@pytest.fixture(scope="module")
def written(cluster):
    """Predictions, labels and events produced and sunk by a running monitor."""
    model = unique("sink")
    predictions = [prediction(model, i, error=i % 50 == 49) for i in range(300)]
    labels = [
        Label(request_id=f"req-{i}", model=None if i % 2 else model, entity_id=f"card-{i}",
              value=float(i % 2), ts_ms=BASE_MS + 60_000 + i)
        for i in range(100)
    ]  # fmt: skip
    events = [
        Event(event_id=f"{model}-ev-{i}", event_type=f"{model}.txn", ts_ms=BASE_MS + i,
              entities={"card": f"card-{i}", "merchant": "m-1"},
              fields={"amount": 12.5, "online": True, "currency": "EUR", "note": None})
        for i in range(50)
    ]  # fmt: skip
    bad_key, late_key = unique("bad").encode(), unique("late").encode()
    too_late = prediction(model, 10_000).model_copy(update={"created_at_ms": 2**32 * 1000})
    ends = produce_all(
        cluster.kafka_bootstrap,
        PREDICTIONS.name,
        [(p.entity_id, encode(p)) for p in predictions]
        + [(bad_key, b"{not json"), (late_key, encode(too_late))],
    )
    produce_all(cluster.kafka_bootstrap, LABELS.name, [(x.entity_id, encode(x)) for x in labels])
    produce_all(cluster.kafka_bootstrap, EVENTS.name, [(e.event_id, encode(e)) for e in events])
    settings = settings_for(cluster)
    store = Store.from_settings(settings)
    monitor = Monitor(sink_workers(settings), None)
    run_until_ready(monitor)
    try:
        wait_for(
            lambda: count(store, "SELECT count() FROM {db}.predictions FINAL WHERE model = %(m)s",
                          m=model) == 300
            and count(store, "SELECT count() FROM {db}.labels FINAL WHERE request_id IN "
                             "(SELECT request_id FROM {db}.predictions WHERE model = %(m)s) "
                             "AND model IN (%(m)s, '')", m=model) >= 100
            and count(store, "SELECT count() FROM {db}.events FINAL WHERE event_type = %(t)s",
                      t=f"{model}.txn") == 50
        )  # fmt: skip
    finally:
        monitor.stop()
    return model, store, ends, bad_key, late_key


def test_predictions_are_stored_with_their_arrays_and_errors(written):
    model, store, *_ = written
    ok, failed = store.query(
        "SELECT request_id, version, route, score, output_names, output_values, feature_names, "
        "feature_values, defaulted, error_code, total_ms, created_at, created_at_ms "
        "FROM {db}.predictions FINAL WHERE model = %(m)s AND request_id IN ('req-3', 'req-49') "
        "ORDER BY request_id",
        {"m": model},
    )
    assert ok[:4] == ("req-3", "2", "canary", 0.003)
    assert ok[4] == ["label[0]", "probabilities[0]", "probabilities[1]"]
    assert ok[5] == [1.0, 0.25, 0.75]
    assert (ok[6], ok[7], ok[8], ok[9]) == (["amount", "velocity"], [3.0, 2.5], ["velocity"], "")
    assert ok[10] == 6 + 3 and int(ok[11].timestamp()) == BASE_MS // 1000 and ok[12] == BASE_MS + 3
    assert failed[3] is None and failed[6] == [] and failed[9] == "missing_feature"


def test_labels_without_a_model_are_stored_for_any_model(written):
    model, store, *_ = written
    rows = store.query(
        "SELECT model, count() FROM {db}.labels FINAL WHERE request_id IN "
        "(SELECT request_id FROM {db}.predictions WHERE model = %(m)s) AND model IN (%(m)s, '') "
        "AND ts_ms >= %(since)s GROUP BY model ORDER BY model",
        {"m": model, "since": BASE_MS + 60_000},
    )
    assert rows == [("", 50), (model, 50)]


def test_event_fields_are_split_by_type(written):
    model, store, *_ = written
    (row,) = store.query(
        "SELECT entity_names, entity_ids, num_names, num_values, str_names, str_values "
        "FROM {db}.events FINAL WHERE event_type = %(t)s AND event_id = %(id)s",
        {"t": f"{model}.txn", "id": f"{model}-ev-7"},
    )
    assert row == (
        ["card", "merchant"], ["card-7", "m-1"], ["amount", "online"], [12.5, 1.0],
        ["currency"], ["EUR"],
    )  # fmt: skip


def test_unstorable_messages_go_to_the_dead_letter_topic(written, cluster):
    _, _, _, bad_key, late_key = written

    def ours(messages) -> dict[bytes, str]:
        found = {}
        for message in messages:
            if message.key() in (bad_key, late_key):
                found[message.key()] = orjson.loads(message.value())["error"]["code"]
        return found

    messages = read_topic(cluster.kafka_bootstrap, DLQ.name, lambda ms: len(ours(ms)) == 2)
    assert ours(messages) == {bad_key: "malformed_json", late_key: "timestamp_out_of_range"}


def test_replayed_predictions_are_counted_once_by_the_dedup_queries(written, cluster):
    model, store, ends, *_ = written
    by_version = "SELECT version, count() FROM {db}.predictions FINAL WHERE model = %(m)s " \
                 "GROUP BY version ORDER BY version"  # fmt: skip
    unique_ids = "SELECT uniqExact(version, route, request_id) FROM {db}.predictions " \
                 "WHERE model = %(m)s"  # fmt: skip
    before = store.query(by_version, {"m": model})
    settings = settings_for(cluster, monitor_sinks=["predictions"])
    (replay,) = sink_workers(settings)  # a new group: consumes the topic again from the start
    deadline = time.monotonic() + 30
    try:
        while True:
            replay.poll_once()
            positions = replay.consumer.position(
                [TopicPartition(PREDICTIONS.name, p) for p in ends]
            )
            if all(tp.offset >= ends[tp.partition] for tp in positions):
                break
            assert time.monotonic() < deadline, "replay did not reach the end of the topic"
    finally:
        replay.close()
    assert before == [("1", 200), ("2", 100)]
    assert store.query(by_version, {"m": model}) == before
    assert count(store, unique_ids, m=model) == 300


class Relay:
    """A TCP relay to a local port that can be cut, to play a ClickHouse outage for real."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.connections += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()

    def cut(self) -> None:
        self.open.clear()
        for connection in self.connections:
            connection.close()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_clickhouse_outage_is_retried_without_loss_or_early_commit(cluster):
    model = unique("outage")
    ends = produce_all(
        cluster.kafka_bootstrap,
        PREDICTIONS.name,
        [(f"card-{i}", encode(prediction(model, i))) for i in range(200)],
    )
    relay = Relay(cluster.clickhouse_tcp_port)
    settings = settings_for(cluster, clickhouse_port=relay.port, monitor_sinks=["predictions"])
    direct = Store.from_settings(settings_for(cluster))
    monitor = Monitor(sink_workers(settings), None)
    retries = "sluice_monitor_retries_total"
    retries_before = REGISTRY.get_sample_value(retries) or 0.0
    stored = "SELECT count() FROM {db}.predictions WHERE model = %(m)s"
    probe = Consumer({"bootstrap.servers": cluster.kafka_bootstrap,
                      "group.id": settings.monitor_group_id + ".predictions"})  # fmt: skip
    partitions = [TopicPartition(PREDICTIONS.name, p) for p in sorted(ends)]
    try:
        run_until_ready(monitor)
        wait_for(lambda: (REGISTRY.get_sample_value(retries) or 0.0) >= retries_before + 2)
        assert count(direct, stored, m=model) == 0
        assert all(tp.offset < 0 for tp in probe.committed(partitions, timeout=10))
        relay.open.set()
        wait_for(lambda: count(direct, stored, m=model) == 200)
        wait_for(lambda: all(tp.offset >= ends[tp.partition]
                             for tp in probe.committed(partitions, timeout=10)))  # fmt: skip
    finally:
        monitor.stop()
        probe.close()
        relay.close()
    assert count(direct, "SELECT count() FROM {db}.predictions FINAL WHERE model = %(m)s",
                 m=model) == 200  # fmt: skip


def test_the_service_starts_serves_metrics_and_stops_on_sigterm(cluster):
    """`python -m services.monitor` as a user runs it: ready, /metrics, clean exit."""
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        port = probe_socket.getsockname()[1]
    env = {
        **os.environ,
        **cluster.env(),
        "SLUICE_METRICS_PORT": str(port),
        "SLUICE_MONITOR_GROUP_ID": unique("monitor"),
        "SLUICE_MONITOR_MODELS": orjson.dumps([unique("nothing")]).decode(),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "services.monitor"], env=env, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 30)
        metrics_text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "sluice_monitor_consumed_total" in metrics_text
        assert "sluice_monitor_last_window_end_timestamp_seconds" in metrics_text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
