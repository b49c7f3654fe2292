"""MorphServe's rule-based controller, with hysteresis so that it never chatters.

The paper's rule: quantize when the prefill at the head of the queue, or the running decodes,
do not fit in the free plus evictable KV; restore when the queue is empty and the KV segment a
restore would take back is unused. Taken literally it flips every time one request finishes, so
this version adds (1) a wait gate: memory pressure only counts once the head request has waited
a fraction of the TTFT SLO, and "queue empty" means no request has waited that long; (2) a
restore margin: the segment must be unused, with the head's prompt and room to spare; (3) an
idle time before restoring and (4) dwell times: a restore waits ``dwell_s`` after any
transition, quantizing again waits ``requantize_dwell_s`` after a restore (settable apart:
a shorter one lets a burst that meets a restore get its capacity back sooner, at the price of
more transitions). Escalating during a burst is not delayed.

The KV limit protects TPOT: when the decode iteration (the time per output token every running
request sees) exceeds the TPOT target while no request waits long for its first token, the
limit steps down one of ``KV_FRACTIONS`` (fewer concurrent decodes, shorter iterations); it
steps back up as soon as a request waits long or decodes run well inside the target. Changes
of the limit keep their own dwell time.
"""

from __future__ import annotations

import math

from rl_controller.observation import LoadSnapshot
from rl_controller.policy import KV_FRACTIONS, Action


class HeuristicPolicy:
    """Memory-pressure rule with hysteresis; O(1) arithmetic per decision (microseconds)."""

    name = "heuristic"

    def __init__(
        self,
        *,
        dwell_s: float = 2.0,
        requantize_dwell_s: float = 2.0,
        restore_idle_s: float = 3.0,
        step: int = 1,
        restore_margin: float = 0.5,
        decode_lookahead: int = 4,
        wait_frac: float = 0.25,
        tpot_high: float = 1.0,
        tpot_low: float = 0.6,
        kv_dwell_s: float = 2.0,
        whole_queue: bool = True,
    ) -> None:
        """
        dwell_s: least time after a transition before a restore.
        requantize_dwell_s: least time after a restore before quantizing again.
        restore_idle_s: how long the queue must have been empty with the segment unused.
        step: fewest layers quantized at once under pressure (more when the deficit needs it);
            restores always go one layer at a time.
        restore_margin: spare KV, in units of ``tokens_per_layer``, that must remain after a
            restore.
        decode_lookahead: KV tokens reserved per running request when judging whether the
            running decodes fit (one per step, a few steps ahead).
        wait_frac: the head request must have waited this fraction of the TTFT SLO before a
            memory shortfall counts as pressure; momentary shortfalls resolve as requests finish.
        tpot_high, tpot_low: the KV limit steps down when the decode iteration exceeds
            ``tpot_high`` x the TPOT target, and back up below ``tpot_low`` x (hysteresis).
        kv_dwell_s: least time between two changes of the KV limit.
        whole_queue: size an escalation to admit every waiting request (their prompts and
            promised decodes), not only the head: one step at a burst's onset instead of one
            per tick while the queue grows, each tick a queued request's TTFT spends waiting.
        """
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.dwell_s = dwell_s
        self.requantize_dwell_s = requantize_dwell_s
        self.restore_idle_s = restore_idle_s
        self.step = step
        self.restore_margin = restore_margin
        self.decode_lookahead = decode_lookahead
        self.wait_frac = wait_frac
        self._prev_since: float | None = None
        self._prev_layers: int | None = None
        self._last_direction = 0
        self._calm_s = 0.0
        self.tpot_high = tpot_high
        self.tpot_low = tpot_low
        self.kv_dwell_s = kv_dwell_s
        self.whole_queue = whole_queue
        self._kv_level = len(KV_FRACTIONS) - 1
        self._kv_since = math.inf

    def _elapsed(self, snap: LoadSnapshot) -> float:
        """Seconds since the previous call. The snapshot carries no clock, but
        ``seconds_since_transition`` advances with time and restarts at each transition, so its
        increments are elapsed time in any clock (wall or simulated)."""
        since, prev = snap.seconds_since_transition, self._prev_since
        self._prev_since = since
        if prev is None or not math.isfinite(since) or not math.isfinite(prev):
            return 0.0
        return since - prev if since >= prev else since

    def decide(self, snap: LoadSnapshot) -> Action:
        """Target layer count and KV limit for this tick (see the module docstring)."""
        elapsed = self._elapsed(snap)
        layers = self._layers(snap, elapsed)
        return Action(layers, self._kv_fraction(snap, elapsed))

    def _kv_fraction(self, snap: LoadSnapshot, elapsed: float) -> float:
        """The KV limit's fraction: one step down under TPOT pressure, one up when it eases."""
        self._kv_since += elapsed
        slow = snap.decode_iteration_s > self.tpot_high * snap.tpot_slo_s
        fast = snap.decode_iteration_s < self.tpot_low * snap.tpot_slo_s
        waited = snap.queue_len > 0 and snap.oldest_wait_s >= self.wait_frac * snap.ttft_slo_s
        level = self._kv_level
        if waited or fast:
            level = min(len(KV_FRACTIONS) - 1, level + 1)
        elif slow and snap.running_reqs > 1:
            level = max(0, level - 1)
        if level != self._kv_level and self._kv_since >= self.kv_dwell_s:
            self._kv_level, self._kv_since = level, 0.0
        return KV_FRACTIONS[self._kv_level]

    def _layers(self, snap: LoadSnapshot, elapsed: float) -> int:
        """Target layer count (the memory-pressure rule with hysteresis)."""
        k = snap.quantized_layers
        if self._prev_layers is not None and k != self._prev_layers:
            self._last_direction = 1 if k > self._prev_layers else -1
        self._prev_layers = k
        tpl = max(1, snap.tokens_per_layer)
        since = snap.seconds_since_transition

        reclaimable = snap.kv_free_tokens + snap.kv_evictable_tokens
        head = snap.head_prefill_tokens if snap.queue_len > 0 else 0
        lookahead = snap.running_reqs * self.decode_lookahead
        deficit = head + lookahead - reclaimable
        waited = snap.queue_len > 0 and snap.oldest_wait_s >= self.wait_frac * snap.ttft_slo_s
        decodes_short = snap.running_reqs > reclaimable
        if deficit > 0 and (waited or decodes_short):
            self._calm_s = 0.0
            recent_restore = self._last_direction < 0 and since < self.requantize_dwell_s
            if k >= snap.num_layers or recent_restore:
                return k
            queue = max(head, snap.queued_demand_tokens) if snap.queue_len > 0 else 0
            needed = max(deficit, queue + lookahead - reclaimable) if self.whole_queue else deficit
            return min(snap.num_layers, k + max(self.step, math.ceil(needed / tpl)))

        # Restorable when no request waits long and the head would still fit after giving
        # the segment back, with margin. (A literal "queue empty" never holds under steady
        # load: a request that arrived a moment ago is always there at some ticks.)
        segment_unused = snap.kv_used_tokens + head + self.restore_margin * tpl <= (
            snap.kv_capacity_tokens - tpl
        )
        if waited or not segment_unused:
            self._calm_s = 0.0
            return k
        self._calm_s += elapsed
        if k > 0 and self._calm_s >= self.restore_idle_s and since >= self.dwell_s:
            return k - 1
        return k
