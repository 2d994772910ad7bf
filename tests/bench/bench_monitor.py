"""Monitor benchmarks: sink throughput (Kafka -> ClickHouse rows/s, target >= 100,000/s) and the
time to compute drift for one window of 1M predictions x 20 features (target <= 1 s).

Sink: 20-feature predictions are produced to `sluice.predictions` first (not timed); then one
sink worker (the real `KafkaWorker` + `Sink`, a fresh consumer group) consumes them, and the rows
stored after its first batch over the time from that batch to the last commit give rows/s (the
first batch is left out of both: its poll may include the group join). The stages are also timed
alone on the same messages: decoding (the codec), building columns, and the ClickHouse insert of
ready columns.

Drift: the rows of one window are inserted straight into ClickHouse (not timed), then the
analyzer's drift step for that window is timed: one ClickHouse query bins all 20 features and
the score, numpy computes every statistic. The statistics alone on an in-memory matrix (numpy
binning with `bin_index` + the same statistics) are timed as well.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from schemas.messages import Prediction, Route
from schemas.topics import PREDICTIONS
from services.common.codec import decode, encode
from services.inference.manifest import (
    FeatureSpec,
    Manifest,
    OutputSpec,
    bin_index,
    build_profile,
)
from services.monitor.analyzer import WindowOutput
from services.monitor.app import build_analyzer, sink_workers
from services.monitor.drift import reference_bins, verdicts
from services.monitor.policy import FeaturePolicy
from services.monitor.rows import prediction_columns
from services.monitor.settings import MonitorSettings
from services.monitor.store import Store
from services.monitor.windows import Window
from tests.bench.harness import BenchContext, BenchTable, service_gc
from tests.support import produce_all, unique

FEATURES = [f"f{i}" for i in range(20)]
SINK_TARGET_ROWS_S = 100_000
DRIFT_TARGET_S = 1.0


def _settings(ctx: BenchContext, **overrides) -> MonitorSettings:
    env = {k.removeprefix("SLUICE_").lower(): v for k, v in ctx.cluster.env().items()}
    return MonitorSettings(**{**env, "metrics_port": 0, **overrides})


def _prediction(model: str, i: int, rng: np.random.Generator) -> Prediction:
    values = rng.normal(size=len(FEATURES)).tolist()
    return Prediction(
        request_id=f"{model}-{i}", model=model, version="1", route=Route.champion,
        entity_id=f"card-{i % 5000}", score=float(rng.random()),
        outputs={"label": [0.0], "probabilities": [0.7, 0.3]},
        features=dict(zip(FEATURES, values, strict=True)), batch_size=64,
        created_at_ms=1_767_225_600_000 + i, scored_at_ms=1_767_225_600_002 + i,
    )  # fmt: skip


def _caught_up(worker, ends: dict[int, int]) -> bool:
    """Whether the worker's position reached `ends` on every partition we produced to."""
    positions = worker.consumer.position(worker.consumer.assignment())
    reached = {tp.partition: tp.offset for tp in positions}
    return all(reached.get(partition, -1) >= end for partition, end in ends.items())


def bench_sink(ctx: BenchContext) -> BenchTable:
    """The sink as the monitor service runs it (its garbage-collector tuning included)."""
    with service_gc():
        return _bench_sink(ctx)


def _bench_sink(ctx: BenchContext) -> BenchTable:
    rows = 60_000 if ctx.quick else 300_000
    model = unique("bench-sink")
    rng = np.random.default_rng(1)
    messages = [_prediction(model, i, rng) for i in range(rows)]
    raw = [encode(m) for m in messages]
    ends = produce_all(
        ctx.cluster.kafka_bootstrap,
        PREDICTIONS.name,
        ((m.entity_id, payload) for m, payload in zip(messages, raw, strict=True)),
    )
    table_rows: list[list[object]] = []
    for batch in (5000, 20_000):
        settings = _settings(
            ctx,
            monitor_group_id=unique("bench-monitor"),
            monitor_sinks=["predictions"],
            monitor_sink_batch_size=batch,
            monitor_sink_max_wait_ms=200,
        )
        (worker,) = sink_workers(settings)
        deadline = time.monotonic() + 600
        try:
            # The group join and the first batch (whose poll may include the join) are neither
            # timed nor counted: the clock starts once the first batch is stored.
            while not worker.poll_once() and time.monotonic() < deadline:
                pass
            consumed, started = 0, time.perf_counter()
            while not _caught_up(worker, ends) and time.monotonic() < deadline:
                consumed += worker.poll_once()
            elapsed = time.perf_counter() - started
        finally:
            worker.close()
        table_rows.append([f"end to end, batch {batch:,}", consumed, elapsed, consumed / elapsed])

    sample = raw[: min(rows, 50_000)]
    started = time.perf_counter()
    decoded = [decode(Prediction, payload) for payload in sample]
    decode_s = time.perf_counter() - started
    started = time.perf_counter()
    columns = prediction_columns(decoded)
    columns_s = time.perf_counter() - started
    store = Store.from_settings(_settings(ctx))
    started = time.perf_counter()
    store.insert("predictions", columns)
    insert_s = time.perf_counter() - started
    n = len(sample)
    table_rows += [
        ["stage: decode (codec)", n, decode_s, n / decode_s],
        ["stage: build columns", n, columns_s, n / columns_s],
        ["stage: ClickHouse insert", n, insert_s, n / insert_s],
    ]
    best = max(row[3] for row in table_rows[:2])
    return BenchTable(
        title="monitor sink: sluice.predictions -> ClickHouse (one worker, 20-feature rows)",
        columns=["what", "rows", "seconds", "rows/s"],
        rows=table_rows,
        notes=[
            f"best end-to-end: {best:,.0f} rows/s (target >= {SINK_TARGET_ROWS_S:,}/s): "
            f"{'met' if best >= SINK_TARGET_ROWS_S else 'NOT met'}",
            "one Python process; broker, ClickHouse and the worker share this machine's cores",
        ],
    )


def _write_manifest(root: Path, model: str, rng: np.random.Generator) -> Manifest:
    matrix = rng.normal(size=(20_000, len(FEATURES)))
    manifest = Manifest(
        model=model, version="1", input_name="x",
        features=[FeatureSpec(name=name) for name in FEATURES],
        outputs=[OutputSpec(name="p")], score_output="p",
        reference=build_profile(matrix, FEATURES, rng.random(20_000)), created_at_ms=0,
    )  # fmt: skip
    (root / model / "1").mkdir(parents=True)
    manifest.save(root / model / "1" / "manifest.json")
    return manifest


def bench_drift(ctx: BenchContext) -> BenchTable:
    rows = 100_000 if ctx.quick else 1_000_000
    model = unique("bench-drift").replace(".", "-")
    rng = np.random.default_rng(2)
    manifest = _write_manifest(ctx.workdir, model, rng)
    window = Window(1_767_225_600, 1_767_225_600 + 300)
    store = Store.from_settings(_settings(ctx))
    matrix = rng.normal(0.1, 1.0, size=(rows, len(FEATURES)))
    scores = rng.random(rows)
    chunk = 100_000
    for start in range(0, rows, chunk):
        part = matrix[start : start + chunk]
        count = len(part)
        created = window.start_s * 1000 + (np.arange(start, start + count) * 300_000 // rows)
        store.insert(
            "predictions",
            {
                "request_id": [f"{model}-{i}" for i in range(start, start + count)],
                "model": [model] * count, "version": ["1"] * count,
                "route": ["champion"] * count, "entity_id": ["e"] * count,
                "score": scores[start : start + count].tolist(),
                "feature_names": [FEATURES] * count, "feature_values": part.tolist(),
                "created_at": (created // 1000).tolist(), "created_at_ms": created.tolist(),
                "scored_at_ms": created.tolist(),
            },
        )  # fmt: skip
    settings = _settings(ctx, model_repository=ctx.workdir, monitor_models=[model])
    analyzer = build_analyzer(settings, publish=lambda alerts: None)
    timings = []
    for _ in range(3):
        out = WindowOutput()
        started = time.perf_counter()
        analyzer.drift(window, model, "1", manifest, out)
        timings.append(time.perf_counter() - started)
    statistics_rows = len(out.drift)

    columns = [reference_bins(manifest.reference.features[name]) for name in FEATURES]
    thresholds = settings.monitor_drift_thresholds
    started = time.perf_counter()
    for i, column in enumerate(columns):
        edges = np.r_[-np.inf, column.interior_edges, np.inf]
        counts = np.bincount(bin_index(edges, matrix[:, i]), minlength=column.bins)
        verdicts(column, counts.astype(float), FeaturePolicy(), thresholds, 1000)
    in_memory = time.perf_counter() - started

    started = time.perf_counter()
    analyzer.analyze_window(window, window.end_s + 1)
    whole_window = time.perf_counter() - started
    best = min(timings)
    return BenchTable(
        title=f"drift of one window: {rows:,} predictions x {len(FEATURES)} features + score",
        columns=["what", "seconds"],
        rows=[
            ["drift step: ClickHouse binning + statistics (best of 3)", best],
            ["drift step, median of 3", float(np.median(timings))],
            ["statistics alone on an in-memory matrix (numpy binning)", in_memory],
            ["whole window (health with FINAL, error codes, drift)", whole_window],
        ],
        notes=[
            f"{statistics_rows} drift rows per window; drift step {best:.2f} s for {rows:,} "
            f"rows (target <= {DRIFT_TARGET_S:.0f} s for 1,000,000): "
            f"{'met' if rows < 1_000_000 or best <= DRIFT_TARGET_S else 'NOT met'}",
        ],
    )


def run(ctx: BenchContext) -> list[BenchTable]:
    """Both monitor benchmarks."""
    return [bench_sink(ctx), bench_drift(ctx)]
