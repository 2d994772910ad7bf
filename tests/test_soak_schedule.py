"""The soak driver's schedule: a linear ramp to the rate, then steady."""

import math

from tests.soak import due_s


def test_without_a_ramp_requests_are_evenly_spaced():
    assert [due_s(i, 50, 0) for i in range(3)] == [0.0, 0.02, 0.04]


def test_the_ramp_sends_half_the_steady_count_and_then_the_full_rate():
    rate, ramp = 500, 30
    times = [due_s(i, rate, ramp) for i in range(rate * 60)]
    assert times == sorted(times)
    in_ramp = sum(t < ramp for t in times)
    assert in_ramp == rate * ramp // 2  # the area under the ramp
    assert sum(t < ramp / 2 for t in times) == math.ceil(rate * ramp / 8)  # a quarter of it
    steady = [b - a for a, b in zip(times[in_ramp:], times[in_ramp + 1 :], strict=False)]
    assert all(math.isclose(gap, 1 / rate) for gap in steady)
