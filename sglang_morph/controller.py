"""The per-tick controller of the live runtime: scheduler -> LoadSnapshot -> policy -> target.

The snapshot type and its features are defined once in ``rl_controller.observation`` and shared
with the simulator and training, so the policy sees here exactly what it was trained on.
"""

from __future__ import annotations

import time

from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import ArrivalRateMeter, LoadSnapshot
from rl_controller.policy import clip_action
from rl_controller.rl_policy import FallbackPolicy
from sglang_morph.data import REPO_ROOT

DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "morph-ppo.zip"


class Controller:
    """Decides, every ``tick_interval_s``, how many layers the runtime should quantize."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        cfg = runtime.cfg
        if cfg.policy == "rl":
            self.policy = FallbackPolicy.from_checkpoint(cfg.checkpoint_path or DEFAULT_CHECKPOINT)
        else:
            self.policy = HeuristicPolicy()
        self.arrivals = ArrivalRateMeter()
        self.transitions = ArrivalRateMeter()
        self.last_decision = 0.0
        self.last_transition = time.perf_counter()
        self.seen_transitions = 0
        self.decide_s: list[float] = []

    def fallbacks(self) -> int:
        return getattr(self.policy, "fallbacks", 0)

    def maybe_decide(self) -> None:
        now = time.perf_counter()
        rt = self.runtime
        for t in rt.arrivals:
            self.arrivals.record(t)
        rt.arrivals.clear()
        if rt.transitions > self.seen_transitions:
            self.transitions.record(now, rt.transitions - self.seen_transitions)
            self.seen_transitions = rt.transitions
            self.last_transition = now
        if now - self.last_decision < rt.cfg.tick_interval_s:
            return
        self.last_decision = now
        start = time.perf_counter()
        snap = self.snapshot(now)
        target, clipped = clip_action(self.policy.decide(snap), snap)
        self.decide_s.append(time.perf_counter() - start)
        del self.decide_s[:-256]
        rt.clipped_actions += int(clipped)
        if target != sum(f != "fp" for f in rt.desired):
            rt.set_target_quantized(target)

    def snapshot(self, now: float) -> LoadSnapshot:
        """The scheduler's load and memory at this tick."""
        rt = self.runtime
        s = rt.scheduler
        waiting = list(s.waiting_queue)
        capacity = rt.kv_capacity_tokens()
        free = s.token_to_kv_pool_allocator.available_size()
        evictable = int(s.tree_cache.evictable_size())
        used = rt.kv_committed_tokens() - free - evictable
        oldest = min((r.time_stats.scheduler_recv_time for r in waiting), default=now)
        return LoadSnapshot(
            queue_len=len(waiting),
            queued_prompt_tokens=sum(len(r.origin_input_ids) for r in waiting),
            head_prefill_tokens=len(waiting[0].origin_input_ids) if waiting else 0,
            running_reqs=len(s.running_batch.reqs) if s.running_batch is not None else 0,
            kv_capacity_tokens=capacity,
            kv_used_tokens=used,
            kv_free_tokens=free,
            kv_evictable_tokens=evictable,
            arrival_rate=self.arrivals.rate(now),
            oldest_wait_s=max(0.0, now - oldest),
            ttft_slo_s=rt.cfg.ttft_slo_s,
            quantized_layers=rt.quantized_layers(),
            num_layers=rt.num_layers,
            tokens_per_layer=rt.tokens_per_layer(),
            recent_transitions=self.transitions.count(now),
            seconds_since_transition=now - self.last_transition,
        )
