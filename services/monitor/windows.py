"""The rolling-window grid: which windows are due, pure.

A window ends on every multiple of the interval (epoch-aligned, so every replica and restart
agrees on the grid) and covers `[end − window, end)`; with `window > interval` windows slide
and overlap. A window is due once `lateness` has passed after its end, so rows that reach
ClickHouse a little late are still in it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Window:
    """A half-open span of prediction time, `[start_s, end_s)`, in epoch seconds."""

    start_s: int
    end_s: int

    @property
    def start_ms(self) -> int:
        return self.start_s * 1000

    @property
    def end_ms(self) -> int:
        return self.end_s * 1000

    def params(self) -> dict[str, int]:
        """The `%(start_s)s`/`%(end_s)s` parameters of sql.WINDOW."""
        return {"start_s": self.start_s, "end_s": self.end_s}


def due_windows(
    last_end_s: int | None,
    now_s: float,
    *,
    interval_s: int,
    window_s: int,
    lateness_s: int,
    max_catchup: int,
) -> list[Window]:
    """Windows to compute now, oldest first: those ending after `last_end_s` and at least
    `lateness_s` ago, at most `max_catchup` of them (the newest ones: after a long pause the
    oldest missed windows are skipped rather than delaying fresh ones)."""
    newest_end = int((now_s - lateness_s) // interval_s) * interval_s
    oldest_end = newest_end - (max_catchup - 1) * interval_s
    if last_end_s is not None:
        oldest_end = max(oldest_end, (last_end_s // interval_s + 1) * interval_s)
    return [Window(end - window_s, end) for end in range(oldest_end, newest_end + 1, interval_s)]


def tumbling(start_ms: int, length_s: int) -> Window:
    """The tumbling window of `length_s` seconds that starts at `start_ms`."""
    start_s = start_ms // 1000
    return Window(start_s, start_s + length_s)
