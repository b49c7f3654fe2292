"""The per-tick controller of the live runtime: scheduler -> LoadSnapshot -> policy -> target.

The snapshot type and its features are defined once in ``rl_controller.observation`` and shared
with the simulator and training, so the policy sees here exactly what it was trained on.
"""

from __future__ import annotations

import dataclasses
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
        self.policy: HeuristicPolicy | FallbackPolicy | None
        if cfg.policy == "rl":
            self.policy = FallbackPolicy.from_checkpoint(cfg.checkpoint_path or DEFAULT_CHECKPOINT)
        elif cfg.policy == "heuristic":
            self.policy = HeuristicPolicy()
        else:  # manual: observe only; /morph/state shows what a policy would see (engine env)
            self.policy = None
        self.arrivals = ArrivalRateMeter()
        self.transitions = ArrivalRateMeter()
        self.last_decision = 0.0
        self.last_transition = time.perf_counter()
        self.seen_transitions = 0
        self.decide_s: list[float] = []
        self.last_snapshot: LoadSnapshot | None = None
        self.last_target: int | None = None

    def fallbacks(self) -> int:
        return getattr(self.policy, "fallbacks", 0)

    def observation_dict(self) -> dict | None:
        """The last snapshot and the target decided from it (for /morph/state)."""
        if self.last_snapshot is None:
            return None
        return {**dataclasses.asdict(self.last_snapshot), "target": self.last_target}

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
        if self.policy is None:
            self.last_snapshot = snap
            return
        target, clipped = clip_action(self.policy.decide(snap), snap)
        self.last_snapshot, self.last_target = snap, target
        self.decide_s.append(time.perf_counter() - start)
        del self.decide_s[:-256]
        rt.clipped_actions += int(clipped)
        if target != sum(f != "fp" for f in rt.desired):
            rt.set_target_quantized(target)

    def snapshot(self, now: float) -> LoadSnapshot:
        """The scheduler's load and memory at this tick, as SGLang's admission sees them:
        free KV excludes what running requests are promised for their decodes."""
        rt = self.runtime
        s = rt.scheduler
        waiting = list(s.waiting_queue)
        capacity = rt.kv_capacity_tokens()
        free = max(0, s.token_to_kv_pool_allocator.available_size() - _decode_reserve(s))
        evictable = int(s.tree_cache.evictable_size())
        used = rt.kv_committed_tokens() - free - evictable
        oldest = min((r.time_stats.scheduler_recv_time for r in waiting), default=now)
        return LoadSnapshot(
            queue_len=len(waiting),
            queued_prompt_tokens=sum(len(r.origin_input_ids) for r in waiting),
            head_prefill_tokens=_admission_demand(s, waiting[0]) if waiting else 0,
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


def _admission_demand(scheduler, req) -> int:
    """KV tokens SGLang needs free to admit ``req``: its prompt plus its promised decodes."""
    return len(req.origin_input_ids) + _promised(scheduler, req)


def _promised(scheduler, req) -> int:
    ratio = scheduler.new_token_ratio_tracker.current
    left = min(req.sampling_params.max_new_tokens - len(req.output_ids), 4096)
    return int(max(0, left) * (1.0 if req.sampling_params.ignore_eos else ratio))


def _decode_reserve(scheduler) -> int:
    """KV tokens SGLang's admission keeps for the running requests' remaining decodes.

    SGLang admits a prefill only if it fits beside ``(max_new_tokens - generated) * ratio`` per
    running request (schedule_policy.PrefillAdder), so free slots promised to decodes are not
    free for the queue: counting them as free would hide exactly the pressure that matters.
    """
    batch = scheduler.running_batch
    if batch is None or not batch.reqs:
        return 0
    return sum(_promised(scheduler, r) for r in batch.reqs)
