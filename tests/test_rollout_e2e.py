"""Progressive delivery end to end on the local cluster, with the demo stream as live traffic.

Demo card transactions become prediction requests (request id = event id, so the demo's labels
join them) and flow through a real in-process inference worker; a real monitor sink writes
predictions and labels to ClickHouse; the rollout controller evaluates its gates from there
through the monitor's client, publishes routing to Redis and `sluice.routing`, and serves its
operator API over HTTP, which the CLI calls.

The model: a logistic regression over the transaction's amount, local hour and card-present
flag. Candidates: the same model as a new version (good), one that reads `amount_eur`, which only
EUR transactions carry (errors on ~25% of inputs), and one exported with the wrong score column
(its predictions drift: P(legit) instead of P(fraud)).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
import uvicorn
from clickhouse_driver import Client
from confluent_kafka import Producer
from redis import Redis
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from deploy.demo.generator import DemoConfig, DemoItem, generate
from schemas.messages import (
    Alert,
    AlertState,
    Label,
    PredictionRequest,
    RouteRole,
    RoutingEntry,
    RoutingTable,
)
from schemas.topics import ALERTS, LABELS, PREDICTIONS, REQUESTS, ROUTING
from services.common.codec import encode
from services.inference.app import build as build_inference
from services.inference.manifest import FeatureSpec, Manifest, OutputSpec, build_profile
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings
from services.monitor.app import sink_workers
from services.monitor.settings import MonitorSettings
from services.rollout import cli
from services.rollout.app import RolloutApp, build
from services.rollout.client import RolloutApiError, RolloutClient
from services.rollout.publisher import routing_key
from services.rollout.settings import RolloutSettings
from tests.support import json_bodies, produce_all, read_topic, unique

pytestmark = pytest.mark.integration

ADMIN, VIEWER = "admin-key-e2e", "viewer-key-e2e"
INTERVAL_S = 1.0
DEMO_FEATURES = ("amount", "hour", "card_present")


# -- models -------------------------------------------------------------------------------------


def demo_matrix(items: list[DemoItem]) -> tuple[np.ndarray, np.ndarray]:
    x = np.array(
        [[i.event.fields["amount"], i.event.fields["hour"], float(i.event.fields["card_present"])]
         for i in items],
        dtype=np.float32,
    )  # fmt: skip
    return x, np.array([int(i.is_fraud) for i in items])


@pytest.fixture(scope="module")
def trained() -> tuple[bytes, str, np.ndarray, np.ndarray]:
    """A fraud model over three demo fields: ONNX bytes, input name, sample, scores.

    Logistic regression rather than trees: its scores are continuous, where a small tree
    ensemble on rare fraud puts most rows on one leaf, and the monitor's score deciles (which
    prediction drift is binned on) would collapse into a single edge.
    """
    items = list(generate(DemoConfig(seed=21, cards=2000, merchants=200), limit=4000))
    x, y = demo_matrix(items)
    classifier = LogisticRegression()
    estimator = make_pipeline(StandardScaler(), classifier).fit(x, y)
    onnx_model = to_onnx(estimator, x[:1], options={id(classifier): {"zipmap": False}},
                         target_opset=15)  # fmt: skip
    return (
        onnx_model.SerializeToString(),
        onnx_model.graph.input[0].name,
        x,
        estimator.predict_proba(x)[:, 1],
    )


def write_demo_version(
    root: Path,
    model: str,
    version: str,
    trained: tuple[bytes, str, np.ndarray, np.ndarray],
    *,
    amount_field: str = "amount",
    score_index: int = 1,
) -> None:
    payload, input_name, x, scores = trained
    folder = root / model / version
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(payload)
    Manifest(
        model=model,
        version=version,
        framework="sklearn",
        input_name=input_name,
        features=[
            FeatureSpec(name="amount", field=amount_field),
            FeatureSpec(name="hour", dtype="int64"),
            FeatureSpec(name="card_present", dtype="bool"),
        ],
        outputs=[
            OutputSpec(name="label", meaning="predicted class", shape=[None]),
            OutputSpec(name="probabilities", meaning="P(class)", shape=[None, 2]),
        ],
        score_output="probabilities",
        score_index=score_index,
        sha256=hashlib.sha256(payload).hexdigest(),
        reference=build_profile(x, list(DEMO_FEATURES), scores),
        created_at_ms=int(time.time() * 1000),
    ).save(folder / "manifest.json")


# -- the running system ---------------------------------------------------------------------------


def settings_kwargs(cluster) -> dict[str, str]:
    return {k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()}


@pytest.fixture(scope="module")
def repository(tmp_path_factory, trained) -> tuple[Path, dict[str, str]]:
    """Models named by purpose, each with champion version 1 and a candidate version 2."""
    root = tmp_path_factory.mktemp("models")
    models = {purpose: unique(f"demo-{purpose}").replace(".", "-")
              for purpose in ("good", "errors", "drift", "alerts", "ab", "api")}  # fmt: skip
    for purpose, model in models.items():
        write_demo_version(root, model, "1", trained)
        write_demo_version(
            root, model, "2", trained,
            amount_field="amount_eur" if purpose == "errors" else "amount",
            score_index=0 if purpose == "drift" else 1,
        )  # fmt: skip
    return root, models


@dataclass
class Serving:
    """The models under test by purpose, and the in-process inference service."""

    models: dict[str, str]
    inference: InferenceService

    def wait_applied(self, model: str, revision: int, timeout_s: float = 10.0) -> int:
        """Epoch ms by which the inference worker has `revision` of `model`'s routing in force."""
        deadline = time.monotonic() + timeout_s
        while (table := self.inference.tables.get(model)) is None or table.revision < revision:
            assert time.monotonic() < deadline, f"revision {revision} of {model} not applied"
            time.sleep(0.01)
        return int(time.time() * 1000)


@pytest.fixture(scope="module")
def serving(cluster, repository) -> Iterator[Serving]:
    """An inference worker and the monitor's prediction and label sinks, in threads."""
    root, models = repository
    tables = [
        (model, encode(RoutingTable(
            model=model, entries=[RoutingEntry(version="1", role=RouteRole.champion, weight=1.0)],
            revision=1, updated_at_ms=int(time.time() * 1000),
        )))
        for model in models.values()
    ]  # fmt: skip
    produce_all(cluster.kafka_bootstrap, ROUTING.name, tables)
    base = settings_kwargs(cluster)
    inference = InferenceSettings(
        **base, model_repository=root, inference_group_id=unique("inference"), metrics_port=0
    )
    worker, service, control = build_inference(inference)
    service.load_repository(root)
    control.start()
    assert control.caught_up.wait(30)
    monitor = MonitorSettings(
        **base, monitor_group_id=unique("monitor"), monitor_sinks=["predictions", "labels"],
        monitor_sink_max_wait_ms=100, metrics_port=0,
    )  # fmt: skip
    workers = [worker, *sink_workers(monitor)]
    threads = [threading.Thread(target=w.run, daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not all(w.ready() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    yield Serving(models, service)
    for w in workers:
        w.stop()
    for thread in threads:
        thread.join(30)
    control.stop()


class Controller:
    """A rollout controller process's parts in threads: the app and its HTTP server."""

    def __init__(self, cluster, **overrides) -> None:
        fields = {
            **settings_kwargs(cluster),
            "rollout_eval_interval_s": INTERVAL_S,
            "rollout_record_wait_every_s": 60,
            "rollout_admin_keys": [ADMIN],
            "rollout_viewer_keys": [VIEWER],
            **overrides,
        }
        self.settings = RolloutSettings(**fields)
        self.app: RolloutApp = build(self.settings)
        self.app.start()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app.api, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.client = RolloutClient(self.url, api_key=ADMIN)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.client.close()
        self.app.stop()

    def cli(self, *args: str, key: str = ADMIN):
        return CliRunner().invoke(cli.app, ["--url", self.url, "--api-key", key, *args])

    def wait_for(self, model: str, phases: set[str], timeout_s: float = 40.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            view = self.client.status(model)
            if view.phase in phases:
                return view
            time.sleep(0.1)
        raise TimeoutError(f"{model} stayed {view.state}: {view.reason}")


@pytest.fixture
def controller(cluster) -> Iterator[Controller]:
    running = Controller(cluster)
    yield running
    running.stop()


class Traffic:
    """Demo transactions sent as prediction requests for one model, `rate` per second."""

    def __init__(self, bootstrap: str, model: str, rate: float = 250.0, seed: int = 5) -> None:
        self.model = model
        self.rate = rate
        self.items = generate(DemoConfig(seed=seed, cards=3000, merchants=300,
                                         id_prefix=f"{model}-"))  # fmt: skip
        self.sent: list[PredictionRequest] = []
        self.labels: list[Label] = []
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - started) * self.rate)
            while len(self.sent) < due:
                item = next(self.items)
                fields = item.event.fields
                features = {name: fields[name] for name in DEMO_FEATURES}
                if fields["currency"] == "EUR":
                    features["amount_eur"] = fields["amount"]
                request = PredictionRequest(
                    request_id=item.event.event_id, model=self.model,
                    entity_id=item.event.entities["card"], features=features,
                    created_at_ms=int(time.time() * 1000),
                )  # fmt: skip
                self.producer.produce(REQUESTS.name, encode(request), key=request.entity_id)
                self.sent.append(request)
                self.labels.append(item.label)
            self.producer.poll(0)
            time.sleep(0.005)

    def stop(self) -> list[PredictionRequest]:
        self._stop.set()
        self._thread.join(10)
        assert self.producer.flush(30) == 0
        return self.sent


def predictions_for(cluster, requests: list[PredictionRequest]) -> list[dict]:
    """Every prediction of `requests`, read back once each has its live (non-shadow) answer."""
    wanted = {r.request_id for r in requests}
    model = requests[0].model

    def mine(messages) -> list[dict]:
        return [
            b
            for b in json_bodies(messages)
            if b.get("model") == model and b.get("request_id") in wanted
        ]

    def answered(messages) -> bool:
        return {b["request_id"] for b in mine(messages) if b["route"] != "shadow"} == wanted

    return mine(read_topic(cluster.kafka_bootstrap, PREDICTIONS.name, answered, timeout_s=60))


def decisions_of(cluster, rollout_id: str) -> list[dict]:
    rows = Client(cluster.host, port=cluster.clickhouse_tcp_port).execute(
        "SELECT seq, action, state_before, state_after, evidence_names, evidence_values, "
        "thresholds, evidence_samples, gate_status, weight_versions, weights, revision, "
        "decided_at_ms, actor FROM sluice.rollout_decisions WHERE rollout_id = %(id)s "
        "ORDER BY seq",
        {"id": rollout_id},
    )
    keys = ("seq", "action", "before", "after", "names", "values", "thresholds", "samples",
            "status", "versions", "weights", "revision", "decided_at_ms", "actor")  # fmt: skip
    return [dict(zip(keys, row, strict=True)) for row in rows]


def waits_decided(controller: Controller) -> float:
    """The controller's `sluice_rollout_decisions_total{action="wait"}`, read from /metrics."""
    text = httpx.get(f"{controller.url}/metrics").text
    found = re.search(r'^sluice_rollout_decisions_total\{action="wait"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def write_plan(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


# -- tests ----------------------------------------------------------------------------------------


def test_good_candidate_goes_shadow_then_every_canary_step_to_promotion_surviving_a_restart(
    cluster, serving, tmp_path
):
    model = serving.models["good"]
    plan = write_plan(tmp_path, f"""
model: {model}
candidate: "2"
steps:
  - {{kind: shadow, sample_rate: 0.5, min_duration_s: 1, min_samples: 30}}
  - {{kind: canary, weight: 0.1, min_duration_s: 1, min_samples: 20}}
  - {{kind: canary, weight: 0.3, min_duration_s: 1, min_samples: 20}}
  - {{kind: canary, weight: 0.6, min_duration_s: 1, min_samples: 20}}
  - {{kind: canary, weight: 1.0, min_duration_s: 1, min_samples: 20}}
gates:
  max_error_rate: 0.01
  max_p99_latency_ms: 5000
  max_p99_latency_ratio: 10  # loose: measured against the champion route, not tuned here
  max_prediction_drift: 0.5  # JS on ~20-150 samples of different cards is noisy (up to ~0.3)
  min_shadow_agreement: 0.9
  min_samples: 20
""")  # fmt: skip
    traffic = Traffic(cluster.kafka_bootstrap, model)
    controller = Controller(cluster)
    try:
        started = controller.cli("start", str(plan))
        assert started.exit_code == 0, started.output
        assert "shadow[0]" in started.output
        rollout_id = controller.client.status(model).rollout_id

        deadline = time.monotonic() + 40
        while controller.client.status(model).step_index < 2:
            assert time.monotonic() < deadline, controller.client.status(model).reason
            time.sleep(0.1)
        controller.stop()  # the controller dies mid-rollout ...
        controller = Controller(cluster)  # ... and a new one resumes from the recorded state
        resumed = controller.client.status(model)
        assert resumed.rollout_id == rollout_id and resumed.step_index >= 2

        final = controller.wait_for(model, {"promoted", "rolled_back", "paused", "aborted"})
        assert final.phase == "promoted", final.reason
        promoted_at_ms = serving.wait_applied(model, final.revision)
        time.sleep(1.0)
        status = controller.cli("status", model, key=VIEWER)
    finally:
        controller.stop()
        requests = traffic.stop()

    assert status.exit_code == 0, status.output
    assert "promoted" in status.output and "v2 100%" in status.output

    predictions = predictions_for(cluster, requests)
    live = [p for p in predictions if p["route"] != "shadow"]
    assert len(live) == len({p["request_id"] for p in live}) == len(requests)
    assert [p for p in predictions if p["error"]] == []
    assert {(p["version"], p["route"]) for p in live} >= {("1", "champion"), ("2", "canary")}
    assert any(p["route"] == "shadow" for p in predictions)
    late = [p for p in live if p["created_at_ms"] > promoted_at_ms]
    assert late and {(p["version"], p["route"]) for p in late} == {("2", "champion")}

    decisions = decisions_of(cluster, rollout_id)
    moves = [(d["action"], d["after"]) for d in decisions if d["action"] != "wait"]
    assert moves == [
        ("start", "shadow[0]"),
        ("advance", "canary[1]"),
        ("advance", "canary[2]"),
        ("advance", "canary[3]"),
        ("advance", "canary[4]"),
        ("promote", "promoted"),
    ]
    assert [d["seq"] for d in decisions] == list(range(1, len(decisions) + 1))
    revisions = [d["revision"] for d in decisions if d["action"] != "wait"]
    assert revisions == sorted(set(revisions)), "every routing change has a higher revision"
    for d in decisions:
        if d["action"] in ("advance", "promote"):
            gates = dict(zip(d["names"], zip(d["values"], d["samples"], d["status"],
                                             strict=True), strict=True))  # fmt: skip
            assert gates["error_rate"][0] == 0.0 and gates["error_rate"][1] >= 20
            assert all(status in ("pass", "skipped") for _, _, status in gates.values())
            ratio, samples, status = gates["p99_latency_ratio"]
            if d["action"] == "advance":  # steps with champion traffic to compare with
                assert status == "pass" and ratio > 0 and samples >= 20, gates
            else:  # promoted from the canary at weight 1.0
                assert status == "skipped", gates
    assert dict(zip(decisions[-1]["versions"], decisions[-1]["weights"], strict=True)) == {"2": 1.0}


def test_candidate_erroring_on_a_share_of_inputs_is_rolled_back_at_the_first_failing_evaluation(
    cluster, serving, controller
):
    model = serving.models["errors"]
    traffic = Traffic(cluster.kafka_bootstrap, model)
    try:
        controller.client.start(f"""
model: {model}
candidate: "2"
steps:
  - {{kind: canary, weight: 0.2, min_duration_s: 30, min_samples: 1000}}
  - {{kind: canary, weight: 1.0, min_duration_s: 30}}
gates: {{max_error_rate: 0.01, min_samples: 50}}
failure_threshold: 1
""")  # fmt: skip
        final = controller.wait_for(model, {"rolled_back", "promoted", "aborted", "paused"})
        assert final.phase == "rolled_back", final.reason
        assert final.weights == {"1": 1.0}
        rolled_back_at_ms = serving.wait_applied(model, final.revision)
        time.sleep(1.0)
    finally:
        requests = traffic.stop()

    decisions = decisions_of(cluster, final.rollout_id)
    first_failure = next(d for d in decisions if "fail" in d["status"])
    assert first_failure["action"] == "rollback" and first_failure is decisions[-1]
    gates = dict(zip(first_failure["names"], first_failure["values"], strict=True))
    assert gates["error_rate"] > 0.01

    predictions = predictions_for(cluster, requests)
    assert len({p["request_id"] for p in predictions}) == len(requests)
    candidate_errors = [p for p in predictions if p["version"] == "2" and p["error"]]
    assert candidate_errors and {p["error"]["code"] for p in candidate_errors} == {
        "missing_feature"
    }
    first_error_ms = min(p["created_at_ms"] for p in candidate_errors)
    # The sink writes within ~0.1 s and the next evaluation comes within one interval.
    assert first_failure["decided_at_ms"] - first_error_ms < (INTERVAL_S + 1.5) * 1000
    late = [p for p in predictions if p["created_at_ms"] > rolled_back_at_ms]
    assert late and {(p["version"], p["route"]) for p in late} == {("1", "champion")}


def test_candidate_whose_predictions_drift_is_rolled_back_during_shadow(
    cluster, serving, controller
):
    model = serving.models["drift"]
    traffic = Traffic(cluster.kafka_bootstrap, model)
    try:
        controller.client.start(f"""
model: {model}
candidate: "2"
steps:
  - {{kind: shadow, sample_rate: 1.0, min_duration_s: 30, min_samples: 1000}}
  - {{kind: canary, weight: 0.5}}
gates: {{max_prediction_drift: 0.3, min_samples: 40}}
failure_threshold: 2
""")  # fmt: skip
        final = controller.wait_for(model, {"rolled_back", "promoted", "aborted", "paused"})
    finally:
        traffic.stop()

    assert final.phase == "rolled_back", final.reason
    decisions = decisions_of(cluster, final.rollout_id)
    failing = [d for d in decisions if "fail" in d["status"]]
    assert [d["action"] for d in failing] == ["hold", "rollback"]
    drift = dict(zip(failing[-1]["names"], failing[-1]["values"], strict=True))
    assert drift["prediction_drift"] > 0.3
    live_weights = [dict(zip(d["versions"], d["weights"], strict=True)) for d in decisions]
    assert all(w.get("2", 0.0) == 0.0 for w in live_weights), "shadow only, never live"


def test_a_critical_alert_on_the_candidate_rolls_back_without_waiting_for_the_interval(
    cluster, serving
):
    model = serving.models["alerts"]
    controller = Controller(cluster, rollout_eval_interval_s=60.0)
    try:
        controller.client.start(f"""
model: {model}
candidate: "2"
steps: [{{kind: canary, weight: 0.1, min_duration_s: 600}}]
""")  # fmt: skip
        time.sleep(0.5)
        now_ms = int(time.time() * 1000)
        alert = Alert(
            alert_id=unique("alert"), model=model, version="2", route="canary", kind="latency",
            metric="p99_ms", value=900.0, threshold=500.0, state=AlertState.firing,
            severity="critical", window_start_ms=now_ms - 60_000, window_end_ms=now_ms,
            ts_ms=now_ms,
        )  # fmt: skip
        sent = time.monotonic()
        produce_all(cluster.kafka_bootstrap, ALERTS.name, [(model, encode(alert))])
        final = controller.wait_for(model, {"rolled_back"}, timeout_s=10)
        reaction_s = time.monotonic() - sent
        redis_table = controller.app.publisher.stored(model)
    finally:
        controller.stop()
    assert reaction_s < 5, f"took {reaction_s:.1f}s with a 60 s interval"
    assert "alert_latency_p99_ms" in final.reason
    assert redis_table is not None and redis_table.revision == final.revision
    assert [(e.version, e.weight) for e in redis_table.entries] == [("1", 1.0)]


def test_ab_split_holds_until_the_sample_size_then_recommends_and_waits_for_the_operator(
    cluster, serving, controller
):
    model = serving.models["ab"]
    traffic = Traffic(cluster.kafka_bootstrap, model, rate=300)
    labelled = 0
    try:
        controller.client.start(f"""
model: {model}
candidate: "2"
steps: [{{kind: ab, weight: 0.5, min_samples: 150}}]
gates: {{max_error_rate: 0.01, min_samples: 20}}
ab: {{outcome: correct_rate, decide: manual}}
""")  # fmt: skip
        deadline = time.monotonic() + 40
        while controller.client.status(model).phase == "ab":
            assert time.monotonic() < deadline, controller.client.status(model).reason
            sent = len(traffic.labels)
            produce_all(cluster.kafka_bootstrap, LABELS.name,
                        [(label.entity_id, encode(label))
                         for label in traffic.labels[labelled:sent]])  # fmt: skip
            labelled = sent
            time.sleep(0.3)
        paused = controller.client.status(model)
        promoted = controller.cli("promote", model, "--reason", "A/B looks fine")
    finally:
        traffic.stop()

    assert paused.phase == "paused" and "recommend" in paused.reason
    assert paused.weights == {"1": 0.5, "2": 0.5}, "the split holds while the operator decides"
    gates = {g.name: g for g in paused.gates}
    assert gates["error_rate"].status == "pass"
    assert promoted.exit_code == 0, promoted.output
    assert "promote by" in promoted.output and "A/B looks fine" in promoted.output
    history = controller.client.history(model)
    conclusion = next(d for d in history if d.action == "pause")
    figures = {e.name: e for e in conclusion.evidence}
    assert (
        figures["ab_champion_mean"].samples >= 150 and figures["ab_candidate_mean"].samples >= 150
    )
    assert (
        figures["ab_ci_low"].value <= figures["ab_difference"].value <= figures["ab_ci_high"].value
    )
    assert 0.0 <= figures["ab_p_value"].value <= 1.0
    significant = figures["ab_p_value"].value < 0.05
    assert ("recommend inconclusive" in conclusion.reason) is not significant


def test_operator_api_and_cli_roles_overrides_conflicts_and_history(
    cluster, serving, controller, tmp_path
):
    model = serving.models["api"]
    bad = write_plan(tmp_path, f"model: {model}\ncandidate: two\nsteps: []\n")
    refused = controller.cli("start", str(bad))
    assert refused.exit_code == 2
    assert "invalid_plan" in refused.output
    assert "candidate:" in refused.output and "steps:" in refused.output

    plan = write_plan(tmp_path, f"""
model: {model}
candidate: "2"
steps:
  - {{kind: canary, weight: 0.05, min_duration_s: 600}}
  - {{kind: canary, weight: 1.0}}
gates: {{max_error_rate: 0.05, max_p99_latency_ms: 800}}
""")  # fmt: skip
    assert controller.cli("start", str(plan), key=VIEWER).exit_code == 2  # viewers cannot act
    started = controller.cli("start", str(plan))
    assert started.exit_code == 0, started.output
    again = controller.cli("start", str(plan))
    assert again.exit_code == 2 and "rollout_active" in again.output

    waits_before = waits_decided(controller)
    time.sleep(INTERVAL_S * 2.5)
    waits_evaluated = waits_decided(controller) - waits_before
    status = controller.cli("status", model, key=VIEWER)
    assert status.exit_code == 0, status.output
    for text in ("canary[0]", "v1 95%", "v2 5%", "error_rate", "p99_latency_ms", "0.05", "800"):
        assert text in status.output, (text, status.output)

    assert "forbidden" in controller.cli("pause", model, key=VIEWER).output
    with pytest.raises(RolloutApiError) as caught:
        RolloutClient(controller.url).status(model)
    assert (caught.value.status, caught.value.code) == (401, "unauthorized")
    with pytest.raises(RolloutApiError) as caught:
        controller.client.status("no-such-model")
    assert (caught.value.status, caught.value.code) == (404, "no_rollout")

    assert controller.cli("pause", model, "--reason", "incident 42").exit_code == 0
    assert controller.client.status(model).phase == "paused"
    assert "already_paused" in controller.cli("pause", model).output
    assert controller.cli("resume", model).exit_code == 0
    assert "not_paused" in controller.cli("resume", model).output
    aborted = controller.cli("rollback", model, "--reason", "changed our mind")
    assert aborted.exit_code == 0, aborted.output
    view = controller.client.status(model)
    assert view.phase == "aborted" and view.weights == {"1": 1.0}
    redis = Redis.from_url(cluster.redis_url)
    stored = RoutingTable.model_validate_json(redis.hget(routing_key(model), "table"))
    assert stored.revision == view.revision == int(redis.hget(routing_key(model), "revision"))

    history = controller.cli("history", model, "--json")
    rows = orjson.loads(history.output)
    actions = [(r["action"], r["actor"] != "controller") for r in reversed(rows) if
               r["action"] != "wait"]  # fmt: skip
    assert actions == [("start", True), ("pause", True), ("resume", True), ("abort", True)]
    assert any("incident 42" in r["reason"] for r in rows)
    # Repeated identical waits are evaluated every interval but recorded once a minute.
    first_waits = [r for r in rows if r["action"] == "wait" and r["state_before"] == "canary[0]"]
    assert waits_evaluated >= 2 and 1 <= len(first_waits) <= 2
