"""Batch policies of the inference consumer: fixed size-or-time, and adaptive to a p99 target.

The worker loop (`services.common.worker.collect_batch`) flushes a batch when it holds
`max_messages` or `max_wait_s` after its first message. A bigger wait fills bigger batches, which
ONNX Runtime scores far more cheaply per row, but every request may wait that long. The adaptive
policy spends exactly the latency budget it is given: it measures each request's latency from
the moment it was produced to the moment its batch was scored, and moves the wait with an
integral controller toward the point where the observed p99 meets the target.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.common.worker import FixedBatch

__all__ = ["AdaptiveBatch", "FixedBatch"]


@dataclass
class AdaptiveBatch:
    """Tunes `max_wait_s` so that the p99 of recent request latencies approaches `target_p99_s`.

    Each `observe` after `window` latency samples moves the wait by `gain` x (target - p99),
    clamped to [`min_wait_s`, `max_wait_s`]. Under light load p99 sits below target and the wait
    grows (bigger, cheaper batches); when p99 exceeds the target the wait shrinks. A batch that
    fills up returns at once, so under heavy load the wait costs nothing.
    """

    max_messages: int = 512
    target_p99_s: float = 0.020
    min_wait_s: float = 0.0
    max_wait_s: float = 0.010
    wait_s: float = 0.001
    gain: float = 0.25
    window: int = 200
    _latencies: deque[float] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        self._latencies = deque(maxlen=self.window)

    def next_poll(self) -> tuple[int, float]:
        return self.max_messages, self.wait_s

    def record_latencies(self, seconds: list[float] | np.ndarray) -> None:
        """Add per-request latencies (produce -> scored) measured by the handler."""
        self._latencies.extend(float(s) for s in seconds)

    def p99(self) -> float | None:
        """The p99 of the recent latency window, or None before any sample."""
        if not self._latencies:
            return None
        return float(np.quantile(np.fromiter(self._latencies, float), 0.99))

    def observe(self, batch_size: int, handle_seconds: float) -> None:
        p99 = self.p99()
        if p99 is None or len(self._latencies) < min(self.window, 20):
            return
        step = self.gain * (self.target_p99_s - p99)
        self.wait_s = min(self.max_wait_s, max(self.min_wait_s, self.wait_s + step))
