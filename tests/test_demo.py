"""`make run` end to end: the demo brings up every service on a private cluster, plays traffic,
starts the rollout and stops everything it started."""

from __future__ import annotations

import socket

import pytest

from deploy.demo.run import Ports, run
from deploy.local.cluster import ClusterConfig, status

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET_S = 10.0
FLOOR_MS = 100.0


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
    # Latency keeps its shape over the run: after the first bucket (the fresh broker's JIT
    # warm-up, up to ~1 core and p99 up to ~3 s here) no bucket's p99 over 500 ms, and the
    # last no more than twice the second's (or than 2 x 100 ms, under which a doubling is
    # scheduling noise). The 30-minute run of docs/benchmarks.md holds every 5-minute p99
    # under 250 ms; this 45 s run in a loaded suite missed that bound in 3 of 5 runs (p99
    # 209-360 ms in single 10 s buckets), so it asserts growth, not the absolute target.
    buckets = report.latency
    assert len(buckets) >= 3 and all(b.count > 0 for b in buckets), buckets
    _warmup, *settled = buckets
    assert all(b.p99_ms < 500 for b in settled), buckets
    assert settled[-1].p99_ms <= 2 * max(settled[0].p99_ms, FLOOR_MS), buckets
    assert all(b.broker_cores is not None for b in buckets), buckets
    assert not any(part.running for part in status(cluster)), "the demo stops what it started"
