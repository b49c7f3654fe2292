"""Durations of recurring events (swap commits, controller decisions, decode forwards) kept in
constant memory for ``/morph/state``."""

from __future__ import annotations

from collections import deque


class Timings:
    """Durations of recent events (a bounded window for the median) plus the last and the
    largest ever seen, so a long-running server keeps constant memory without forgetting its
    worst case."""

    def __init__(self, window: int = 256) -> None:
        self.recent: deque[float] = deque(maxlen=window)
        self.last = 0.0
        self.max = 0.0

    @property
    def bound(self) -> int:
        """The most durations ``recent`` holds."""
        return self.recent.maxlen or 0

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)
        self.last = seconds
        self.max = max(self.max, seconds)

    def median(self) -> float | None:
        """Median of the recent window (the upper one for an even count); None when empty."""
        if not self.recent:
            return None
        ordered = sorted(self.recent)
        return ordered[len(ordered) // 2]
