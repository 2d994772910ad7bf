"""The status page end to end: real data in ClickHouse, the rollout service serving the page and
its JSON, headless Chromium rendering it.

The story, in compressed time (10-second monitor windows): a fraud model's v1 champion takes
demo card transactions; after a while the amounts drift (most of them triple), the
monitor's analyzer flags `amount` on v1, a retrain run registers v2 (trained on the new
amounts, so its reference profile has them), and a rollout of v2 started through the operator
API goes shadow -> canary 10% -> 50% -> 100% -> promoted while traffic keeps flowing.

Predictions are written with the monitor's own writer (`rows.prediction_columns` into
`Store.insert`, what the sink does), routed the way inference routes them (the routing table
the controller publishes to Redis, `services.common.routing`); health and drift rows come from
the monitor's analyzer over those predictions; decisions from the controller; retrain steps
through `retrain.RetrainLog`. Then Chromium loads `/status` with a viewer key in the URL
fragment and every chart must have drawn data.

`SLUICE_UPDATE_SCREENSHOT=1` also writes the screenshot to docs/img/status.png.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from itertools import islice
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from redis import Redis

from deploy.demo.generator import DemoConfig, generate
from schemas.messages import (
    ErrorBody,
    LatencyBreakdown,
    Prediction,
    Route,
    RouteRole,
    RoutingEntry,
    RoutingTable,
)
from schemas.topics import ROUTING
from services.common.codec import encode
from services.common.routing import route_for, shadows_for
from services.inference.manifest import FeatureSpec, Manifest, OutputSpec, build_profile
from services.monitor.app import build_analyzer
from services.monitor.rows import prediction_columns
from services.monitor.settings import MonitorSettings
from services.monitor.store import Store
from services.rollout import status
from services.rollout.api import create_api
from services.rollout.app import RolloutApp, build
from services.rollout.auth import ApiKeys
from services.rollout.publisher import routing_key
from services.rollout.retrain import RetrainLog, Step
from services.rollout.settings import RolloutSettings
from services.rollout.store import ClickHouse
from tests.support import produce_all, unique

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "img" / "status.png"
ADMIN, VIEWER = "admin-key-status", "viewer-key-status"
FEATURES = ("amount", "hour", "card_present")
WINDOW_S = 10
HISTORY_S = 200
DRIFT_AFTER_S = 50
RATE = 100.0
CHARTS = ("traffic", "latency", "drift", "timeline")
UPDATE_SCREENSHOT = os.environ.get("SLUICE_UPDATE_SCREENSHOT") == "1"
STEP_S = 20 if UPDATE_SCREENSHOT else 6
"""Least duration of a canary step: longer for the screenshot, so that the rollout fills more
of the traffic chart than a sliver."""
FINISHED = {"promoted", "rolled_back", "aborted", "paused"}


# -- the model and its traffic --------------------------------------------------------------------


@dataclass
class Pools:
    """Feature rows of demo transactions (amount, hour, card_present) and their cards; the
    drifted pool has the amounts of a fixed 70% of rows tripled."""

    matrix: np.ndarray
    drifted: np.ndarray
    cards: list[str]


def make_pools() -> Pools:
    items = list(islice(generate(DemoConfig(seed=31, cards=2000, merchants=200)), 8000))
    matrix = np.array(
        [[i.event.fields["amount"], i.event.fields["hour"], float(i.event.fields["card_present"])]
         for i in items]
    )  # fmt: skip
    drifted = matrix.copy()
    grown = np.random.default_rng(5).random(len(items)) < 0.7
    drifted[grown, 0] = np.round(drifted[grown, 0] * 3.0, 2)
    return Pools(matrix, drifted, [i.event.entities["card"] for i in items])


def score(version: str, x: np.ndarray) -> np.ndarray:
    """The versions' fraud scores: v2 is v1 refitted after amounts grew."""
    amount, hour, present = x[..., 0], x[..., 1], x[..., 2]
    if version == "1":
        z = -4.2 + 0.55 * np.log1p(amount) + 0.9 * (1 - present) + 0.6 * (hour < 6)
    else:
        z = -4.6 + 0.55 * np.log1p(amount) + 0.95 * (1 - present) + 0.6 * (hour < 6)
    return 1 / (1 + np.exp(-z))


def write_manifest(root: Path, model: str, version: str, sample: np.ndarray) -> None:
    folder = root / model / version
    folder.mkdir(parents=True)
    Manifest(
        model=model,
        version=version,
        input_name="x",
        features=[
            FeatureSpec(name="amount"),
            FeatureSpec(name="hour", dtype="int64"),
            FeatureSpec(name="card_present", dtype="bool"),
        ],
        outputs=[OutputSpec(name="p")],
        score_output="p",
        reference=build_profile(sample, list(FEATURES), score(version, sample),
                                categorical={"card_present"}),
        created_at_ms=0,
    ).save(folder / "manifest.json")  # fmt: skip


class Requests:
    """Prediction requests of one model, scored per the routing table in force: the live
    version on its route and a copy per shadow, as inference would produce them."""

    def __init__(self, model: str, pools: Pools, drift_from_ms: int) -> None:
        self.model = model
        self.pools = pools
        self.drift_from_ms = drift_from_ms
        self.rng = np.random.default_rng(11)
        self.sequence = 0
        self.written: list[Prediction] = []

    def predictions(self, created_ms: int, table: RoutingTable) -> list[Prediction]:
        self.sequence += 1
        row = int(self.rng.integers(len(self.pools.cards)))
        pool = self.pools.drifted if created_ms >= self.drift_from_ms else self.pools.matrix
        x = pool[row]
        entity = self.pools.cards[row]
        request_id = f"{self.model}-r{self.sequence:06d}"
        version, route = route_for(entity, table)
        scored = [(version, route)] + [(v, Route.shadow) for v in shadows_for(request_id, table)]
        out = []
        for version, route in scored:
            total = float(self.rng.lognormal(math.log(9.0 if version == "1" else 13.0), 0.35))
            error = version == "1" and self.rng.random() < 0.01
            out.append(
                Prediction(
                    request_id=request_id, model=self.model, version=version, route=route,
                    entity_id=entity,
                    score=None if error else float(score(version, x)),
                    features={} if error else dict(zip(FEATURES, x.tolist(), strict=True)),
                    latency=LatencyBreakdown(queue_ms=total * 0.2, features_ms=total * 0.3,
                                             model_ms=total * 0.4, total_ms=total),
                    batch_size=8,
                    error=ErrorBody(code="features_unavailable", message="online store timeout")
                    if error else None,
                    created_at_ms=created_ms, scored_at_ms=created_ms + int(total),
                )
            )  # fmt: skip
        self.written += out
        return out


class LiveTraffic:
    """Requests at `RATE` per second from `from_s` on, routed by the table in Redis (the one the
    controller publishes), written in batches every 0.25 s."""

    def __init__(
        self, settings: MonitorSettings, requests: Requests, initial: RoutingTable, from_s: float
    ) -> None:
        self.from_s = from_s
        self.store = Store.from_settings(settings)
        self.redis = Redis.from_url(settings.redis_url)
        self.requests = requests
        self.initial = initial
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.failure: BaseException | None = None

    def table(self) -> RoutingTable:
        stored = self.redis.hget(routing_key(self.requests.model), "table")
        return RoutingTable.model_validate_json(stored) if stored else self.initial

    def run(self) -> None:
        started, sent = self.from_s, 0
        try:
            while not self.stopping.is_set():
                due = int((time.time() - started) * RATE)
                table = self.table()
                batch = []
                for i in range(sent, due):
                    created_ms = int((started + i / RATE) * 1000)
                    batch += self.requests.predictions(created_ms, table)
                sent = due
                self.store.insert("predictions", prediction_columns(batch))
                self.stopping.wait(0.25)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.failure = exc

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)
        assert self.failure is None, self.failure


# -- the rollout service --------------------------------------------------------------------------


class RolloutServer:
    """The controller's parts and its HTTP server (the operator API and the status page) in
    threads of this process, with keys on."""

    def __init__(self, env: dict[str, str]) -> None:
        settings = RolloutSettings(
            **env,
            rollout_eval_interval_s=1.0,
            rollout_admin_keys=[ADMIN],
            rollout_viewer_keys=[VIEWER],
        )
        self.app: RolloutApp = build(settings)
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

    def get(self, path: str, key: str | None = VIEWER) -> httpx.Response:
        return httpx.get(self.url + path, headers={"X-API-Key": key} if key else {}, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.app.stop()


# -- the scene ------------------------------------------------------------------------------------


@dataclass
class Scene:
    model: str
    service: RolloutServer
    clickhouse: ClickHouse
    written: list[Prediction]
    drift_from_s: int
    rollout_id: str
    run_id: str
    final_phase: str
    until_s: int
    minutes: int
    """The page's range: from just before the first prediction to `until_s`."""


def plan(model: str) -> str:
    return f"""
model: {model}
candidate: "2"
description: v1 refitted on the grown amounts (retrain run)
steps:
  - {{kind: shadow, sample_rate: 0.5, min_duration_s: {STEP_S + 2}, min_samples: 200}}
  - {{kind: canary, weight: 0.10, min_duration_s: {STEP_S}, min_samples: 40}}
  - {{kind: canary, weight: 0.50, min_duration_s: {STEP_S}, min_samples: 200}}
  - {{kind: canary, weight: 1.00, min_duration_s: {STEP_S}, min_samples: 300}}
gates:
  max_error_rate: 0.02
  max_p99_latency_ms: 250
  max_prediction_drift: 0.5   # JS distance on a few dozen scores is noisy
  min_shadow_agreement: 0.8
  min_samples: 30
"""


@pytest.fixture(scope="module")
def scene(cluster, tmp_path_factory) -> Scene:
    env = {k.removeprefix("SLUICE_").lower(): v for k, v in cluster.env().items()}
    model = unique("fraud").replace(".", "-")
    root = tmp_path_factory.mktemp("models")
    pools = make_pools()
    write_manifest(root, model, "1", pools.matrix)
    write_manifest(root, model, "2", pools.drifted)
    monitor = MonitorSettings(
        **env, model_repository=root, monitor_models=[model], monitor_interval_s=WINDOW_S,
        monitor_window_s=WINDOW_S, monitor_lateness_s=1, monitor_max_catchup_windows=60,
    )  # fmt: skip

    now = time.time()
    history_from_s = int(now) // WINDOW_S * WINDOW_S - HISTORY_S
    drift_from_s = history_from_s + DRIFT_AFTER_S
    requests = Requests(model, pools, drift_from_s * 1000)
    champion = RoutingTable(
        model=model, entries=[RoutingEntry(version="1", role=RouteRole.champion, weight=1.0)],
        revision=1, updated_at_ms=int(now * 1000),
    )  # fmt: skip
    store = Store.from_settings(monitor)
    history = [
        requests.predictions(int((history_from_s + i / RATE) * 1000), champion)
        for i in range(int((now - history_from_s) * RATE))
    ]
    store.insert("predictions", prediction_columns([p for ps in history for p in ps]))

    live = LiveTraffic(monitor, requests, champion, from_s=history_from_s + len(history) / RATE)
    live.thread.start()
    produce_all(cluster.kafka_bootstrap, ROUTING.name, [(model, encode(champion))])
    service = RolloutServer(env)
    try:
        started = httpx.post(
            f"{service.url}/v1/rollouts",
            json={"plan_yaml": plan(model), "source": "retrain.yaml", "actor": "retrainer"},
            headers={"X-API-Key": ADMIN},
            timeout=30,
        )
        assert started.status_code == 201, started.text
        rollout = started.json()["rollout"]
        deadline = time.monotonic() + 60 + 8 * STEP_S
        while (view := service.get(f"/v1/rollouts/{model}").json())["phase"] not in FINISHED:
            assert time.monotonic() < deadline, view["reason"]
            time.sleep(0.5)
        time.sleep(8)  # traffic on the new champion
    except BaseException:
        live.stop()
        service.stop()
        raise
    live.stop()

    run_id = unique("run").split(".")[1]
    alert = {"alert_kind": "drift", "alert_metric": "wasserstein", "feature": "amount"}
    retrains = RetrainLog(service.app.service.decisions.ch)
    for seq, (step, at_s, fields) in enumerate([
        ("triggered", drift_from_s + WINDOW_S + 2,
         {"detail": "drift wasserstein(amount) = 0.41 vs 0.1 on champion 1"}),
        ("trained", rollout["started_ms"] / 1000 - 40,
         {"detail": "auc_holdout 0.912 on 6000 rows"}),
        ("registered", rollout["started_ms"] / 1000 - 8, {"version": "2"}),
        ("rollout_started", rollout["started_ms"] / 1000,
         {"version": "2", "rollout_id": rollout["rollout_id"]}),
    ]):  # fmt: skip
        retrains.record(Step(run_id, model, seq, step, "ok", **alert, **fields,
                             at_ms=int(at_s * 1000)))  # fmt: skip

    # Every window holding traffic closes, then the monitor's analyzer measures them all.
    last_end = math.ceil(time.time() / WINDOW_S) * WINDOW_S
    time.sleep(max(0.0, last_end + monitor.monitor_lateness_s + 0.2 - time.time()))
    build_analyzer(monitor).run_cycle(time.time())
    until_s = int(time.time()) + 1
    minutes = math.ceil((until_s - history_from_s) / 60)
    assert minutes <= 10, f"the set-up took {minutes} minutes: buckets would not be 10 s"

    yield Scene(
        model=model,
        service=service,
        clickhouse=ClickHouse.from_settings(monitor),
        written=requests.written,
        drift_from_s=drift_from_s,
        rollout_id=rollout["rollout_id"],
        run_id=run_id,
        final_phase=view["phase"],
        until_s=until_s,
        minutes=minutes,
    )
    service.stop()


def model_status(scene: Scene) -> status.ModelStatus:
    return status.model_status(scene.clickhouse, scene.model, scene.until_s, scene.minutes)


# -- the page in Chromium -------------------------------------------------------------------------


class Charts(HTMLParser):
    """The data-* attributes of every chart container, and the timeline's items."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: dict[str, dict[str, str]] = {}
        self.actions: list[str] = []
        self.runs: list[str] = []
        self.steps: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if "data-chart" in found:
            self.charts[found["data-chart"]] = found
        if "data-action" in found:
            self.actions.append(found["data-action"])
        if "data-run" in found:
            self.runs.append(found["data-run"])
        if "data-step" in found:
            self.steps.append(found["data-step"])


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (deploy/local/apt-packages.txt lists it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def run_chromium(binary: str, tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--enable-logging=stderr", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=15000", *args, url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def png_colours(data: bytes) -> int:
    """Distinct RGB(A) pixel values of an 8-bit truecolour PNG, from its first rows (enough to
    tell a drawn page from a blank one)."""
    width, _height = png_size(data)
    depth, colour = data[24], data[25]
    assert depth == 8 and colour in (2, 6), (depth, colour)
    channels = 3 if colour == 2 else 4
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind = data[at + 4 : at + 8]
        if kind == b"IDAT":
            chunks.append(data[at + 8 : at + 8 + length])
        at += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous, colours = bytearray(stride), set()
    for row in range(min(600, len(raw) // (stride + 1))):
        kind = raw[row * (stride + 1)]
        line = bytearray(raw[row * (stride + 1) + 1 : (row + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                line[i] = (line[i] + predictor) & 255
        colours.update(bytes(line[i : i + 3]) for i in range(0, stride, channels))
        previous = line
    return len(colours)


def test_page_renders_every_chart_with_data_and_lists_the_decisions(scene, tmp_path):
    binary = chromium()
    url = f"{scene.service.url}/status#model={scene.model}&minutes={scene.minutes}&key={VIEWER}"
    dumped = run_chromium(binary, tmp_path, url, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    assert "Uncaught" not in dumped.stderr, dumped.stderr[-2000:]
    page = Charts()
    page.feed(dumped.stdout)

    for name in CHARTS:
        chart = page.charts.get(name)
        assert chart is not None, f"no {name} container in the page"
        assert chart.get("data-state") == "ready", (name, chart)
        assert int(chart.get("data-points", "0")) > 0, (name, chart)

    decisions = [
        d
        for d in scene.service.get(f"/v1/rollouts/{scene.model}/history?limit=500").json()
        if d["rollout_id"] == scene.rollout_id
    ]
    assert page.actions == [d["action"] for d in decisions], "newest first, every decision"
    assert {"start", "advance", "promote"} <= set(page.actions)
    assert page.runs == [scene.run_id]
    assert page.steps == ["triggered", "trained", "registered", "rollout_started"]
    assert int(page.charts["timeline"]["data-retrains"]) == 1
    assert "v2 canary" in dumped.stdout and scene.final_phase in dumped.stdout

    shot = tmp_path / "status.png"
    taken = run_chromium(binary, tmp_path, url, f"--screenshot={shot}", "--window-size=1400,1800")
    assert taken.returncode == 0, taken.stderr[-2000:]
    data = shot.read_bytes()
    assert png_size(data) == (1400, 1800)
    assert len(data) > 40_000 and png_colours(data) > 50, "a drawn page, not a blank one"
    if UPDATE_SCREENSHOT:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_page_of_a_model_without_data_shows_an_empty_state_in_every_chart(scene, tmp_path):
    binary = chromium()
    url = f"{scene.service.url}/status#model={unique('idle')}&key={VIEWER}"
    dumped = run_chromium(binary, tmp_path, url, "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    page = Charts()
    page.feed(dumped.stdout)
    for name in CHARTS:
        assert page.charts[name].get("data-state") == "empty", (name, page.charts[name])
        assert page.charts[name].get("data-points") == "0", (name, page.charts[name])
    assert "No rollout decisions or retrain runs in this range." in dumped.stdout
    assert "No rollout of this model has been recorded." in dumped.stdout


def test_page_and_assets_are_served_without_a_key_and_the_data_needs_one(scene):
    page = scene.service.get("/status", key=None)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assets = re.findall(r'(?:src|href)="(/status/static/[^"]+)"', page.text)
    assert len(assets) == 4 and not re.search(r'(?:src|href)="(?:https?:)?//', page.text)
    for asset in assets:
        assert scene.service.get(asset, key=None).status_code == 200, asset
    denied = scene.service.get(f"/v1/status/{scene.model}", key=None)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "unauthorized"
    assert scene.service.get("/v1/status", key=None).status_code == 401
    assert scene.model in scene.service.get("/v1/status").json()["models"]
    shown = scene.service.get(f"/v1/status/{scene.model}?minutes={scene.minutes}")
    assert shown.status_code == 200 and shown.json()["model"] == scene.model
    # Keys off (the default): the same routes answer without a key.
    open_api = create_api(scene.service.app.service, ApiKeys([], []), lambda: True,
                          scene.clickhouse)  # fmt: skip
    with TestClient(open_api) as client:
        answer = client.get(f"/v1/status/{scene.model}", params={"minutes": scene.minutes})
        assert answer.status_code == 200, answer.text
        assert answer.json()["timeline"] == shown.json()["timeline"]
        assert client.get("/status").status_code == 200


# -- the query functions on the same data ---------------------------------------------------------


def test_traffic_shares_of_live_routes_sum_to_one_in_every_bucket_with_traffic(scene):
    traffic = model_status(scene).traffic
    assert traffic.bucket_s == WINDOW_S
    assert scene.minutes * 6 <= len(traffic.times) <= scene.minutes * 6 + 1
    live = [s for s in traffic.series if s.route != "shadow"]
    busy = [i for i, n in enumerate(traffic.live) if n > 0]
    assert len(busy) >= (HISTORY_S + 30) // WINDOW_S
    for i in range(len(traffic.times)):
        shares = [s.share[i] for s in live]
        if i in busy:
            assert sum(shares) == pytest.approx(1.0)
        else:
            assert shares == [None] * len(live)


def test_traffic_counts_every_prediction_written_once_by_version_route_and_error(scene):
    traffic = model_status(scene).traffic
    written = Counter((p.version, p.route.value) for p in scene.written)
    errors = Counter((p.version, p.route.value) for p in scene.written if p.error)
    assert {(s.version, s.route): sum(s.requests) for s in traffic.series} == written
    assert {(s.version, s.route): sum(s.errors) for s in traffic.series if sum(s.errors)} == errors
    assert set(written) >= {("1", "champion"), ("2", "shadow"), ("2", "canary"), ("2", "champion")}


def test_latency_has_the_monitors_windows_per_version_and_route(scene):
    latency = model_status(scene).latency
    assert latency.times == sorted(latency.times)
    assert all(t % WINDOW_S == 0 for t in latency.times)
    series = {(s.version, s.route): s for s in latency.series}
    assert {("1", "champion"), ("2", "canary"), ("2", "champion")} <= set(series)
    for s in latency.series:
        for p50, p99 in zip(s.p50_ms, s.p99_ms, strict=True):
            assert (p50 is None) == (p99 is None)
            assert p50 is None or 0 < p50 <= p99
    v1, v2 = series[("1", "champion")], series[("2", "champion")]
    assert np.nanmedian([v for v in v2.p50_ms if v]) > np.nanmedian([v for v in v1.p50_ms if v])


def test_drift_heatmap_flags_amount_on_the_champion_from_the_first_window_after_the_drift(scene):
    drift = model_status(scene).drift
    assert drift.window_s == drift.column_s == WINDOW_S
    maps = {(m.version, m.route): m for m in drift.maps}
    v1 = {row.feature: row for row in maps[("1", "champion")].rows}
    assert set(v1) == {"score", *FEATURES}
    assert [row.feature for row in maps[("1", "champion")].rows][0] == "score"
    amount = {s: c for s, c in zip(drift.columns, v1["amount"].cells, strict=True) if c}
    assert all(c.windows == 1 and c.alerts == int(c.alert) for c in amount.values())
    before = [c for s, c in amount.items() if s < scene.drift_from_s]
    after = [c for s, c in amount.items() if s >= scene.drift_from_s and c.samples >= 500]
    assert len(before) >= 4 and len(after) >= 4
    assert not any(c.alert for c in before) and all(c.alert for c in after)
    assert all(c.method == "wasserstein" and c.value > c.threshold for c in after)
    assert all(c.value is not None and c.value >= 0 for c in amount.values())
    v2 = {row.feature: row for row in maps[("2", "shadow")].rows}
    assert not any(c and c.alert for c in v2["amount"].cells), "v2 learned the new amounts"


def test_longer_columns_fold_the_monitors_windows_keeping_the_worst_of_each(scene):
    since_s = scene.until_s - scene.minutes * 60
    args = (scene.clickhouse, scene.model, since_s, scene.until_s)
    fine, coarse = status.drift(*args, WINDOW_S), status.drift(*args, 60)
    assert coarse.column_s == 60 and all(c % 60 == 0 for c in coarse.columns)
    fine_rows = {(m.version, m.route, r.feature): r.cells for m in fine.maps for r in m.rows}
    folded = 0
    for m in coarse.maps:
        for row in m.rows:
            for column, cell in zip(coarse.columns, row.cells, strict=True):
                if cell is None:
                    continue
                parts = [
                    c
                    for start, c in zip(fine.columns, fine_rows[m.version, m.route, row.feature],
                                        strict=True)
                    if c is not None and column <= start < column + 60
                ]  # fmt: skip
                assert cell.windows == len(parts) <= 60 // WINDOW_S
                assert cell.alerts == sum(c.alerts for c in parts)
                assert cell.value == pytest.approx(max(c.value for c in parts))
                folded += cell.windows > 1
    assert folded > 0
    fine_latency, coarse_latency = status.latency(*args, WINDOW_S), status.latency(*args, 60)
    fine_p99 = {
        (s.version, s.route): dict(zip(fine_latency.times, s.p99_ms, strict=True))
        for s in fine_latency.series
    }
    for s in coarse_latency.series:
        for t, p99 in zip(coarse_latency.times, s.p99_ms, strict=True):
            ends = fine_p99[s.version, s.route]
            parts = [v for end, v in ends.items() if v is not None and end // 60 * 60 == t]
            assert (p99 is None) == (not parts)
            assert p99 is None or p99 == pytest.approx(max(parts))


def test_timeline_has_the_decisions_with_their_evidence_and_the_retrain_run(scene):
    timeline = model_status(scene).timeline
    mine = [d for d in timeline.decisions if d.rollout_id == scene.rollout_id]
    assert [d.at_ms for d in mine] == sorted((d.at_ms for d in mine), reverse=True)
    moves = [(d.action, d.state_after) for d in reversed(mine) if d.action != "wait"]
    assert moves[0] == ("start", "shadow[0]") and moves[-1] == ("promote", "promoted")
    advance = next(d for d in mine if d.action == "advance")
    gates = {e.name: e for e in advance.evidence}
    assert gates["error_rate"].status == "pass" and gates["error_rate"].threshold == 0.02
    assert mine[0].weights == {"2": 1.0}
    (run,) = timeline.retrains
    assert (run.run_id, run.status, run.version, run.rollout_id) == (
        scene.run_id, "ok", "2", scene.rollout_id,
    )  # fmt: skip
    assert [s.step for s in run.steps] == ["triggered", "trained", "registered", "rollout_started"]
    assert (run.alert_kind, run.feature) == ("drift", "amount")


def test_a_model_without_data_reads_as_empty_sections(scene):
    empty = status.model_status(scene.clickhouse, unique("none"), scene.until_s, scene.minutes)
    assert empty.traffic.series == [] and set(empty.traffic.live) == {0}
    assert empty.latency.series == [] and empty.drift.maps == []
    assert empty.timeline.decisions == [] and empty.timeline.retrains == []


@pytest.mark.parametrize(
    ("minutes", "bucket_s"), [(5, 10), (15, 15), (60, 60), (360, 600), (1440, 1800)]
)
def test_bucket_for_cuts_a_range_into_at_most_sixty_buckets(minutes, bucket_s):
    assert status.bucket_for(0, minutes * 60) == bucket_s
