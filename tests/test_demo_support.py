"""The demo's latency-shape check (`deploy.demo.run.shape_problems`)."""

from deploy.demo.run import LatencyBucket, shape_problems


def buckets(*p99s: float) -> list[LatencyBucket]:
    return [LatencyBucket(i * 300.0, 1000, 10.0, p99, 0.35, 480.0) for i, p99 in enumerate(p99s)]


def test_the_thirty_minute_table_keeps_the_shape():
    assert shape_problems(buckets(217.3, 74.5, 137.1, 155.0, 181.8, 182.4)) == []


def test_a_bucket_at_the_limit_or_over_twice_the_first_misses_it():
    assert shape_problems(buckets(60.0, 250.0)) == ["300 s: p99 250.0 ms >= 250"]
    assert shape_problems(buckets(60.0, 121.0, 119.0)) == ["300 s: p99 121.0 ms > 2x 60.0"]


def test_the_reference_floor_stands_in_for_a_fast_first_bucket():
    assert shape_problems(buckets(20.0, 90.0)) == ["300 s: p99 90.0 ms > 2x 20.0"]
    assert shape_problems(buckets(20.0, 90.0), reference_floor_ms=60.0) == []
    assert shape_problems([]) == ["no bucket"]


def test_a_caller_may_set_its_own_limit():
    assert shape_problems(buckets(200.0, 300.0), limit_ms=1000.0) == []
    assert shape_problems(buckets(600.0, 1000.0), limit_ms=1000.0) == [
        "300 s: p99 1000.0 ms >= 1000"
    ]
