"""The adaptive batch policy moves its wait toward the p99 target."""

from __future__ import annotations

from services.inference.batcher import AdaptiveBatch


def simulate(policy: AdaptiveBatch, latency_of_wait, steps: int = 300) -> list[float]:
    waits = []
    for _ in range(steps):
        _, wait = policy.next_poll()
        policy.record_latencies([latency_of_wait(wait)] * 10)
        policy.observe(batch_size=10, handle_seconds=0.001)
        waits.append(policy.wait_s)
    return waits


def test_wait_grows_while_latency_is_below_target():
    policy = AdaptiveBatch(target_p99_s=0.020, max_wait_s=0.050, wait_s=0.0005)
    waits = simulate(policy, lambda wait: wait + 0.002)
    assert waits[-1] > 0.010
    assert abs((waits[-1] + 0.002) - 0.020) < 0.002, "p99 should settle near the target"


def test_wait_shrinks_when_latency_exceeds_target():
    policy = AdaptiveBatch(target_p99_s=0.010, max_wait_s=0.050, wait_s=0.040)
    waits = simulate(policy, lambda wait: wait + 0.004)
    assert waits[-1] < 0.008
    assert abs((waits[-1] + 0.004) - 0.010) < 0.002


def test_wait_stays_within_bounds_when_the_target_is_unreachable():
    policy = AdaptiveBatch(target_p99_s=0.005, min_wait_s=0.0, max_wait_s=0.01, wait_s=0.005)
    waits = simulate(policy, lambda wait: wait + 0.050)
    assert waits[-1] == 0.0
    assert all(0.0 <= w <= 0.01 for w in waits)


def test_no_change_before_enough_samples():
    policy = AdaptiveBatch(wait_s=0.003)
    policy.observe(batch_size=1, handle_seconds=0.001)
    assert policy.next_poll() == (512, 0.003)
