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

The window alone still learns from its own mistakes: from a cold start under a steady load it
restores, regrets, doubles, and repeats until it is long enough. The load says sooner whether the
layers are still needed: a restore also waits until the smoothed arrival rate (an exponential
average of the snapshot's rate over ``load_tau_s``) has fallen ``load_drop`` below its peak since
the layers were last quantized. Under a load that does not fall, one probe restore per
``max_window_s`` still goes through, so layers quantized for a burst of long prompts (the
request rate unchanged) come back in time.

It applies to every policy, after the safety clips, in the runtime and in the environment the
RL policy is trained in, both given one ``RestoreRule`` (whose fields the names above are), so
a policy learns under the rule it will serve under. Raising a
restore target back toward the current depth is always safe (it keeps memory where it is).
"""

from __future__ import annotations

import math
from collections import deque

from sglang_morph.config import DEFAULT_RESTORE_RULE, RestoreRule


class RestoreStabilizer:
    """The highest recommended depth of the current window, applied to restores, which also
    wait for the load to fall.

    Timestamps are seconds on any clock that does not go backwards (wall or simulated). The
    window keeps only recommendations that could still be its maximum (a monotonic queue), so
    memory stays bounded by the recommendations of one window however often it is asked.
    """

    def __init__(self, rule: RestoreRule = DEFAULT_RESTORE_RULE) -> None:
        """``rule``: the windows and load drop to apply (its values were checked when it was
        built)."""
        self.rule = rule
        self.window_s = rule.window_s
        """The window in force now (between ``rule.window_s`` and ``rule.max_window_s``)."""
        self._peaks: deque[tuple[float, int]] = deque()  # (time, target), targets decreasing
        self._restored_s: float | None = None  # when the last restore was applied, if pending
        self.rate: float | None = None
        """Smoothed arrival rate, requests/s (None before the first decision)."""
        self._rate_s = 0.0  # when ``rate`` was last updated
        self.peak = 0.0
        """Highest ``rate`` since the layers were last quantized (or probed)."""
        self._gate_s = -math.inf  # last quantization or probe restore
        self.held = 0
        """Ticks at which a restore was held back (for ``/morph/state`` and episode stats)."""

    def apply(self, target: int, current: int, now: float,
              arrival_rate: float | None = None) -> int:
        """The depth to apply at ``now`` when the policy (after clipping) asks for ``target``,
        ``current`` layers are quantized and requests arrive at ``arrival_rate`` per second:
        ``target`` unless it restores layers that some recommendation of the window still
        wanted quantized, or the load has not fallen (and no probe is due). The rate may be
        left out only without a load drop: a gate fed nothing would open on every tick."""
        if arrival_rate is None:
            if self.rule.load_drop > 0:
                raise ValueError(f"a stabilizer with load_drop {self.rule.load_drop:g} needs the "
                                 "arrival rate at every decision")
            arrival_rate = 0.0
        quantizing = target > current
        self._judge_last_restore(quantizing, now)
        self._track_load(arrival_rate, now, quantizing)
        peaks = self._peaks
        while peaks and peaks[-1][1] <= target:
            peaks.pop()
        peaks.append((now, target))
        while len(peaks) > 1 and peaks[0][0] <= now - self.window_s:  # now's entry stays
            peaks.popleft()
        if target >= current:
            return target
        applied = max(target, min(current, peaks[0][1]))
        if applied < current and not self._load_allows_restore(now):
            applied = current
        if applied < current:
            self._restored_s = now
        self.held += applied != target
        return applied

    def _judge_last_restore(self, quantizing: bool, now: float) -> None:
        """Grow the window when the last restore is undone within ``rule.max_window_s``,
        shrink it when the restore held that long."""
        if self._restored_s is None:
            return
        if quantizing:
            self.window_s = min(self.rule.max_window_s, max(2.0 * self.window_s, 1.0))
            self._restored_s = None
        elif now - self._restored_s >= self.rule.max_window_s:
            self.window_s = max(self.rule.window_s, self.window_s / 2.0)
            self._restored_s = None

    def _track_load(self, arrival_rate: float, now: float, quantizing: bool) -> None:
        """Advance the smoothed rate to ``now``; a quantization restarts its peak."""
        if self.rate is None:
            self.rate = arrival_rate
        else:
            weight = 1.0 - math.exp(-max(0.0, now - self._rate_s) / self.rule.load_tau_s)
            self.rate += weight * (arrival_rate - self.rate)
        self._rate_s = now
        if quantizing:
            self.peak, self._gate_s = self.rate, now
        else:
            self.peak = max(self.peak, self.rate)

    def _load_allows_restore(self, now: float) -> bool:
        """The load fell ``rule.load_drop`` below its peak, or a probe is due (one per
        ``rule.max_window_s`` since the last quantization or probe)."""
        assert self.rate is not None
        if self.rule.load_drop <= 0 or self.rate <= (1.0 - self.rule.load_drop) * self.peak:
            return True
        if now - self._gate_s >= self.rule.max_window_s:
            self._gate_s = now
            return True
        return False

    def entries(self) -> int:
        """Recommendations held (what memory the window takes)."""
        return len(self._peaks)
