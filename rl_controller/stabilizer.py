"""Restores wait for the load to have stayed low: the controller's guard against chattering.

A controller that restores as soon as one tick looks calm meets the next Poisson clump a few
seconds later and quantizes again; under a steady load it swaps layers back and forth for
nothing, paying swap stalls and quality (an independent reproduction of MorphServe found its
controller doing exactly that). Kubernetes' horizontal autoscaler meets the same problem with
replicas and answers with a scale-down stabilization window; this is that rule for layers: the
depth applied is the highest any recommendation asked for within the last window whenever that
is above the recommended one, so a restore happens only after every tick of a whole window
asked for it. Quantizing is never delayed (a burst gets its memory at once).

One fixed window cannot serve both ends: a short one still chatters under a steady load that
needs the layers now and then, a long one keeps layers in int4 for minutes after a burst. So
the window adapts to what restores turned out to be (multiplicative increase, multiplicative
decrease): a restore undone by a quantization within ``max_window_s`` was a waste and doubles
the window, up to ``max_window_s``; a restore that held that long halves it, down to
``window_s``. After a lone burst the layers come back one window apart; under a load that
keeps needing them, restores become rare.

It applies to every policy, after the safety clips, in the runtime and in the environment the
RL policy is trained in, so a policy learns under the rule it will serve under. Raising a
restore target back toward the current depth is always safe (it keeps memory where it is).
"""

from __future__ import annotations

import math
from collections import deque

from sglang_morph.config import RESTORE_MAX_WINDOW_S, RESTORE_WINDOW_S


class RestoreStabilizer:
    """The highest recommended depth of the current window, applied to restores.

    Timestamps are seconds on any clock that does not go backwards (wall or simulated). The
    window keeps only recommendations that could still be its maximum (a monotonic queue), so
    memory stays bounded by the recommendations of one window however often it is asked.
    """

    def __init__(
        self, window_s: float = RESTORE_WINDOW_S, max_window_s: float = RESTORE_MAX_WINDOW_S
    ) -> None:
        """``window_s``: the shortest window (0: restores are never held); ``max_window_s``:
        the longest it grows to under repeated regretted restores (at least ``window_s``)."""
        if not 0 <= window_s < math.inf:
            raise ValueError(f"window_s must be 0 or more seconds, got {window_s}")
        if not window_s <= max_window_s < math.inf:
            raise ValueError(f"max_window_s must be at least window_s ({window_s} s), got "
                             f"{max_window_s}")
        self.base_s = window_s
        self.max_s = max_window_s
        self.window_s = window_s
        """The window in force now (between ``base_s`` and ``max_s``)."""
        self._peaks: deque[tuple[float, int]] = deque()  # (time, target), targets decreasing
        self._restored_s: float | None = None  # when the last restore was applied, if pending
        self.held = 0
        """Ticks at which a restore was held back (for ``/morph/state`` and episode stats)."""

    def apply(self, target: int, current: int, now: float) -> int:
        """The depth to apply at ``now`` when the policy (after clipping) asks for ``target``
        and ``current`` layers are quantized: ``target`` unless it restores layers that some
        recommendation of the window still wanted quantized."""
        self._judge_last_restore(target > current, now)
        peaks = self._peaks
        while peaks and peaks[-1][1] <= target:
            peaks.pop()
        peaks.append((now, target))
        while len(peaks) > 1 and peaks[0][0] <= now - self.window_s:  # now's entry stays
            peaks.popleft()
        if target >= current:
            return target
        applied = max(target, min(current, peaks[0][1]))
        if applied < current:
            self._restored_s = now
        self.held += applied != target
        return applied

    def _judge_last_restore(self, quantizing: bool, now: float) -> None:
        """Grow the window when the last restore is undone within ``max_s``, shrink it when
        the restore held that long."""
        if self._restored_s is None:
            return
        if quantizing:
            self.window_s = min(self.max_s, max(2.0 * self.window_s, 1.0))
            self._restored_s = None
        elif now - self._restored_s >= self.max_s:
            self.window_s = max(self.base_s, self.window_s / 2.0)
            self._restored_s = None

    def entries(self) -> int:
        """Recommendations held (what memory the window takes)."""
        return len(self._peaks)
