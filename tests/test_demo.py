"""`make run` end to end: the demo brings up every service on a private cluster, plays traffic,
starts the rollout and stops everything it started."""

from __future__ import annotations

import socket

import pytest

from deploy.demo.run import Ports, run, shape_problems
from deploy.local.cluster import ClusterConfig, status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET_S = 10.0
REFERENCE_FLOOR_MS = 60.0
SANITY_P99_MS = 1000.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_runs_every_service_and_scores_live_traffic(tmp_path):
    cluster = ClusterConfig.with_free_ports(tmp_path / "state")
    ports = Ports(*(free_port() for _ in range(5)))
    report = run(
        minutes=0.75,
        rate=80,
        drift_after_s=20,
        view=False,
        cluster=cluster,
        ports=ports,
        root=tmp_path / "models",
        bucket_s=BUCKET_S,
    )
    traffic = report.traffic
    assert traffic.sent > 300  # the driver paces 80/s but slows down on a loaded machine
    assert traffic.sync_ok > 100 and traffic.sync_failed <= traffic.sync_ok * 0.01
    assert traffic.labels_sent > 0
    assert report.rollout_started == 201
    assert report.rollout_state.startswith(("shadow", "canary", "promoted")), (
        report.rollout_state,
        report.rollout_reason,
    )
    assert (tmp_path / "models" / "fraud" / "1" / "manifest.json").exists()
    # The shape the 30-minute run keeps (docs/benchmarks.md), over 10 s buckets: no p99 over
    # 2x the reference's. That the p99 stays under 250 ms is a performance target, measured by
    # the 30-minute run and printed by every demo, not asserted here: on CI's machine, under
    # the same 80/s, every bucket's p99 was 270-380 ms (2026-12-07), here 92-159 ms. What
    # broke the demo on Tansu was growth (p99 957 ms, then 5.7 s, then no answer), which the
    # ratio catches on any machine; SANITY_P99_MS only says the demo answers in time at all.
    # The first 10 s bucket is all start-up (p99 379 ms alone here, then 137-159), so the shape
    # is asked from the second on. A 10 s bucket's p99 is its ~15 slowest predictions: the
    # reference is at least REFERENCE_FLOOR_MS.
    buckets = report.latency
    assert len(buckets) >= 3 and all(b.count > 0 for b in buckets), buckets
    assert all(b.broker_cores is not None for b in buckets), buckets
    problems = shape_problems(buckets[1:], REFERENCE_FLOOR_MS, limit_ms=SANITY_P99_MS)
    assert not problems, (problems, buckets)
    assert not any(part.running for part in status(cluster)), "the demo stops what it started"
