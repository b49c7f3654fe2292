"""The controller's clock: request arrivals and layer transitions counted over time.

One definition for the live runtime (wall clock) and the simulator the policy is trained in
(simulated clock): each signal has one window, so ``arrival_rate`` and ``recent_transitions``
mean the same thing in training and in serving. Timestamps are seconds on any monotonic clock
and must not decrease.
"""

from __future__ import annotations

from collections import deque

RATE_WINDOW_S = 5.0
"""Window of ``arrival_rate``: long enough to smooth single arrivals, short enough to see a
burst start within a couple of controller ticks."""

TRANSITION_WINDOW_S = 10.0
"""Window of ``recent_transitions``: how far back the controller is reminded of its own churn."""

RESOLUTION_S = 0.001
"""Events closer than this to the previous recorded one share its entry, so a window holds at
most ``window / RESOLUTION_S`` entries however many events arrive (memory stays bounded under
any load); an event then leaves the window at most this much early."""


class WindowCount:
    """Events in the sliding window ``(now - window_s, now]``."""

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._entries: deque[list] = deque()  # [first timestamp, events], oldest first
        self._total = 0

    def record(self, t: float, n: int = 1) -> None:
        """Note ``n`` events at time ``t``."""
        if n <= 0:
            return
        entries = self._entries
        if entries and t - entries[-1][0] < RESOLUTION_S:
            entries[-1][1] += n
        else:
            entries.append([t, n])
        self._total += n
        self._forget(t)

    def count(self, now: float) -> int:
        """Events in ``(now - window_s, now]``; older ones are forgotten."""
        self._forget(now)
        return self._total

    def entries(self) -> int:
        """Stored entries (what memory the window holds)."""
        return len(self._entries)

    @property
    def max_entries(self) -> int:
        """The most entries the window can hold (one per ``RESOLUTION_S`` of its length)."""
        return int(self.window_s / RESOLUTION_S) + 1

    def _forget(self, now: float) -> None:
        cutoff = now - self.window_s
        entries = self._entries
        while entries and entries[0][0] <= cutoff:
            self._total -= entries.popleft()[1]


class LoadClock:
    """Arrivals and transitions of one replica, and the time since its last transition.

    The clock starts at ``start_s`` as if a transition had just happened there: a fresh replica
    has not been changed for zero seconds, in the runtime and the simulator alike.
    """

    def __init__(self, start_s: float = 0.0) -> None:
        self._arrivals = WindowCount(RATE_WINDOW_S)
        self._transitions = WindowCount(TRANSITION_WINDOW_S)
        self._last_transition_s = start_s

    def arrival(self, t: float, n: int = 1) -> None:
        """``n`` requests arrived at ``t``."""
        self._arrivals.record(t, n)

    def transition(self, t: float, layers: int = 1) -> None:
        """``layers`` layers changed format at ``t`` (each counts as one transition)."""
        if layers > 0:
            self._transitions.record(t, layers)
            self._last_transition_s = t

    def arrival_rate(self, now: float) -> float:
        """Arrivals per second over the window, divided by the whole window even at start-up
        (the first seconds read low rather than spiking on the first arrival)."""
        return self._arrivals.count(now) / RATE_WINDOW_S

    def recent_transitions(self, now: float) -> int:
        """Layer transitions in the last ``TRANSITION_WINDOW_S``."""
        return self._transitions.count(now)

    def entries(self) -> dict[str, int]:
        """Stored entries per signal (what memory the clock holds), for growth checks."""
        return {"arrivals": self._arrivals.entries(), "transitions": self._transitions.entries()}

    def max_entries(self) -> dict[str, int]:
        """The bound of each of ``entries``."""
        return {"arrivals": self._arrivals.max_entries,
                "transitions": self._transitions.max_entries}

    def seconds_since_transition(self, now: float) -> float:
        """Seconds since the last transition (or since the clock started)."""
        return now - self._last_transition_s
