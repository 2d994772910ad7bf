"""The inference handler: a batch of `PredictionRequest` records in, one `Prediction` per
(request, version) out, with online features joined in one Redis round trip and one ONNX
Runtime run per version.

Loaded versions and routing tables are swapped as whole dictionaries by the control thread
(`control.py`), so a batch always sees one consistent state and a reload never fails a request.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from redis import Redis
from redis.exceptions import RedisError

from schemas.messages import ErrorBody, PredictionRequest, RoutingTable
from services.common.codec import encode_obj
from services.common.kafka import sticky_partition
from services.common.metrics import LATENCY_BUCKETS_S, metric
from services.common.worker import Output, Record
from services.features.client import read_snapshots
from services.inference.batcher import AdaptiveBatch
from services.inference.engine import Engine
from services.inference.manifest import Manifest
from services.inference.registry import validate_version
from services.inference.scoring import (
    FeaturePlan,
    Job,
    feature_matrix,
    online_keys,
    output_rows,
    plan_jobs,
    score_column,
)
from services.inference.settings import InferenceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedVersion:
    """A version ready to serve: its manifest and its ONNX Runtime engine."""

    manifest: Manifest
    engine: Engine
    plan: FeaturePlan


class _Metrics:
    def __init__(self) -> None:
        stage = metric(
            Histogram,
            "sluice_inference_stage_seconds",
            "Latency of each stage of a prediction: queue (produce -> consumed), features (Redis "
            "read of the batch), model (ONNX run), total (produce -> scored)",
            ["stage"],
            buckets=LATENCY_BUCKETS_S,
        )
        self.queue_seconds = stage.labels("queue")
        self.features_seconds = stage.labels("features")
        self.model_seconds = stage.labels("model")
        self.total_seconds = stage.labels("total")
        self.rows = metric(
            PromCounter, "sluice_inference_rows_total", "Rows scored", ["model", "version", "route"]
        )
        self.errors = metric(
            PromCounter, "sluice_inference_errors_total", "Error predictions by code", ["code"]
        )
        self.run_rows = metric(
            Histogram,
            "sluice_inference_run_rows",
            "Rows per ONNX Runtime run",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
        )
        self.loaded = metric(
            Gauge, "sluice_inference_loaded_versions", "Versions loaded", ["model", "device"]
        )
        self.store_errors = metric(
            PromCounter,
            "sluice_inference_online_store_errors_total",
            "Batches whose online features could not be read (Redis down or timing out)",
        )
        self.degraded = metric(
            PromCounter,
            "sluice_inference_degraded_total",
            "Predictions scored with defaults because the online store was unavailable",
        )


class InferenceService:
    """Scores batches of requests; holds the loaded versions and routing tables."""

    def __init__(
        self,
        settings: InferenceSettings,
        redis: Redis,
        batch_policy: AdaptiveBatch | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.batch_policy = batch_policy
        self.versions: dict[str, dict[str, LoadedVersion]] = {}
        self.tables: dict[str, RoutingTable] = {}
        self.metrics = _Metrics()
        self._store_error_logged_at = float("-inf")
        self.prediction_partitions: list[int] = []
        """Partitions of the predictions topic, learnt at start; [] = place by key."""
        self._salt = random.randrange(1 << 16)

    # -- state changes (control thread) -------------------------------------------------------

    def load_version(self, folder: Path) -> LoadedVersion:
        """Validate and load one version folder, then publish it atomically to the batch path."""
        manifest = validate_version(folder)
        engine = Engine.load(
            folder / "model.onnx",
            self.settings.inference_provider,
            self.settings.inference_intra_op_threads,
        )
        loaded = LoadedVersion(manifest, engine, FeaturePlan.of(manifest))
        model_versions = {**self.versions.get(manifest.model, {}), manifest.version: loaded}
        self.versions = {**self.versions, manifest.model: model_versions}
        self.metrics.loaded.labels(manifest.model, engine.device).set(len(model_versions))
        log.info(
            "version loaded",
            extra={"model": manifest.model, "version": manifest.version, "device": engine.device},
        )
        return loaded

    def unload_version(self, model: str, version: str) -> None:
        """Stop serving a version (requests for it get `unknown_version` afterwards)."""
        remaining = {v: lv for v, lv in self.versions.get(model, {}).items() if v != version}
        self.versions = {**self.versions, model: remaining}

    def apply_routing(self, table: RoutingTable) -> bool:
        """Adopt `table` unless an equal or newer revision is already in force."""
        current = self.tables.get(table.model)
        if current is not None and current.revision >= table.revision:
            return False
        self.tables = {**self.tables, table.model: table}
        log.info("routing applied", extra={"model": table.model, "revision": table.revision})
        return True

    def load_repository(self, root: Path) -> int:
        """Load every valid version under `root`; invalid ones are logged and skipped."""
        count = 0
        for manifest_path in sorted(root.glob("*/*/manifest.json")):
            try:
                self.load_version(manifest_path.parent)
                count += 1
            except Exception:  # noqa: BLE001 - one bad version must not keep the others down
                log.exception("version not loaded", extra={"folder": str(manifest_path.parent)})
        return count

    # -- the batch path -------------------------------------------------------------------------

    def __call__(self, records: list[Record]) -> list[Output]:
        """Score a batch; outputs come in request order, live job before its shadows."""
        consumed_ms = time.time() * 1000
        versions, tables = self.versions, self.tables  # one consistent view for the batch
        requests: list[PredictionRequest] = [r.value for r in records]
        jobs = plan_jobs(
            requests,
            tables,
            versions,
            max_request_features=self.settings.inference_max_request_features,
            shadows=self.settings.inference_shadow_enabled,
        )
        loaded_for = {
            (job.request.model, job.version): versions[job.request.model][job.version]
            for job in jobs
            if job.error is None
        }
        plans = {key: loaded.plan for key, loaded in loaded_for.items()}
        features_started = time.perf_counter()
        online, store_unavailable = self._read_online(jobs, plans)
        features_ms = (time.perf_counter() - features_started) * 1000

        by_version: dict[tuple[str, str], list[Job]] = defaultdict(list)
        for job in jobs:
            if job.error is None:
                by_version[(job.request.model, job.version)].append(job)

        results: dict[int, tuple[float, dict, float, int]] = {}
        for key, version_jobs in by_version.items():
            scored, matrix = feature_matrix(version_jobs, plans[key], online, store_unavailable)
            if scored:
                self._run(loaded_for[key], scored, matrix, results)

        scored_ms = time.time() * 1000
        outputs = self._predictions(
            records, jobs, results, plans, features_ms, consumed_ms, scored_ms, store_unavailable
        )
        self._observe(jobs, results, features_ms, consumed_ms, scored_ms)
        if self.batch_policy is not None:
            self.batch_policy.record_latencies(
                [(scored_ms - r.value.created_at_ms) / 1000 for r in records]
            )
        return outputs

    def _observe(self, jobs, results, features_ms, consumed_ms, scored_ms) -> None:
        """Metrics of one batch: per-request queue/total latency, per-batch stage times."""
        queue, total = self.metrics.queue_seconds, self.metrics.total_seconds
        scored: Counter[tuple[str, str, str]] = Counter()
        for job in jobs:
            created = job.request.created_at_ms
            queue.observe(max(0.0, consumed_ms - created) / 1000)
            total.observe(max(0.0, scored_ms - created) / 1000)
            if id(job) in results:
                scored[(job.request.model, job.version, job.route.value)] += 1
            else:
                code = job.error.code if job.error else "internal"
                self.metrics.errors.labels(code).inc()
        for labels, count in scored.items():
            self.metrics.rows.labels(*labels).inc(count)
        if scored:
            self.metrics.features_seconds.observe(features_ms / 1000)
            for model_ms in {result[2] for result in results.values()}:
                self.metrics.model_seconds.observe(model_ms / 1000)

    def _read_online(
        self, jobs, plans
    ) -> tuple[dict[tuple[str, str], dict[str, float | None]], bool]:
        """The batch's online values in one round trip, and whether the store was unavailable.

        An outage is not retried: waiting would hold every request of the batch past its
        deadline. The batch is answered now instead, each request degraded to its features'
        defaults or failed with `online_store_unavailable` (`fill_row`), and the next batch
        tries the store again (the client reconnects by itself once Redis is back).
        """
        keys = online_keys(jobs, plans)
        if not keys:
            return {}, False
        try:
            snapshots = read_snapshots(self.redis, keys)
        except RedisError as exc:
            self.metrics.store_errors.inc()
            now = time.monotonic()
            if now - self._store_error_logged_at > 5.0:  # one line per outage, not per batch
                self._store_error_logged_at = now
                log.warning("online store unavailable", extra={"error": str(exc)})
            return {}, True
        return {
            key: snapshot[1] for key, snapshot in zip(keys, snapshots, strict=True) if snapshot
        }, False

    def _run(
        self, loaded: LoadedVersion, jobs: Sequence[Job], matrix: np.ndarray, results: dict
    ) -> None:
        limit = self.settings.inference_max_batch_size
        for start in range(0, len(jobs), limit):
            chunk = jobs[start : start + limit]
            inputs = matrix[start : start + limit].astype(np.float32)
            started = time.perf_counter()
            outputs = loaded.engine.run(inputs)
            model_ms = (time.perf_counter() - started) * 1000
            scores = score_column(outputs, loaded.manifest)
            rows = output_rows(outputs)
            self.metrics.run_rows.observe(len(chunk))
            for job, score, row_outputs in zip(chunk, scores.tolist(), rows, strict=True):
                results[id(job)] = (score, row_outputs, model_ms, len(chunk))

    def _predictions(
        self,
        records: list[Record],
        jobs: list[Job],
        results: dict[int, tuple[float, dict, float, int]],
        plans: dict[tuple[str, str], FeaturePlan],
        features_ms: float,
        consumed_ms: float,
        scored_ms: float,
        store_unavailable: bool,
    ) -> list[Output]:
        """One `Prediction` message per job, written as JSON straight from dictionaries: what is
        the same for the whole batch (topic, time, the partition of predictions nobody waits
        for) is worked out once."""
        topic = self.settings.inference_predictions_topic
        scored_at_ms = int(scored_ms)
        # Nobody waits on these: sticky, so a batch's such predictions share one record batch
        # (fewer, fuller batches cost the broker and the readers less).
        unawaited = (
            sticky_partition(
                self.prediction_partitions,
                scored_at_ms,
                self.settings.inference_partition_slice_ms,
                self._salt,
            )
            if self.prediction_partitions
            else None
        )
        names = {key: plan.names for key, plan in plans.items()}
        outputs: list[Output] = []
        for job in jobs:
            request = job.request
            created = request.created_at_ms
            route = job.route.value
            body: dict = {
                "schema_version": 1,
                "request_id": request.request_id,
                "model": request.model,
                "version": job.version or "",
                "route": route,
                "entity_id": request.entity_id,
                "created_at_ms": created,
                "scored_at_ms": scored_at_ms,
                "error": None,
            }
            result = results.get(id(job))
            headers = {"request_id": request.request_id, "route": route}
            if result is None:
                error = job.error or ErrorBody(code="internal", message="request was not scored")
                body["error"] = error.model_dump()
                model_ms = job_features_ms = 0.0
            else:
                body["score"], body["outputs"], model_ms, body["batch_size"] = result
                columns = names[(request.model, job.version)]
                body["features"] = dict(zip(columns, job.row, strict=True))
                body["defaulted"] = job.defaulted
                job_features_ms = features_ms
                if store_unavailable and job.defaulted:
                    headers["degraded"] = "online_store_unavailable"
                    self.metrics.degraded.inc()
            body["latency"] = {
                "queue_ms": max(0.0, consumed_ms - created),
                "features_ms": job_features_ms,
                "model_ms": model_ms,
                "total_ms": max(0.0, scored_ms - created),
            }
            partition = unawaited
            reply = records[job.index].headers.get("reply_partition")
            if reply is not None and route != "shadow":
                try:
                    partition = int(reply)
                except ValueError:
                    log.warning("bad reply_partition header", extra={"value": repr(reply)})
            outputs.append(Output(topic, encode_obj(body), request.entity_id, headers, partition))
        return outputs
