"""The controller's view of the server: one snapshot type and one way to turn it into features.

The runtime (live SGLang scheduler) and the simulator (training) each count their raw load into a
``RawLoad`` and turn it into a ``LoadSnapshot`` with ``build_snapshot`` and their
``rl_controller.clock.LoadClock``; both call ``observation_vector``, so a policy trained in the
simulator sees exactly the features the runtime will feed it. Any change to the features must
bump ``OBS_VERSION``: RL checkpoints record the version they were trained with and are refused
on a mismatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rl_controller.clock import LoadClock

OBS_VERSION: int = 2


@dataclass(frozen=True)
class LoadSnapshot:
    """Load and memory state of one replica at a controller tick (a quiescent scheduler point).

    KV accounting: ``kv_used_tokens`` are held by requests (running, prefilling, locked cache);
    ``kv_evictable_tokens`` are cached prefixes nobody holds; ``kv_free_tokens`` are unallocated.
    Their sum is ``kv_capacity_tokens``, the current usable capacity including the tokens freed
    by the ``quantized_layers`` int4 layers. ``kv_budget_tokens`` is what the budget allows at
    this depth, before any KV limit (0: unknown, taken as ``kv_capacity_tokens``);
    ``decode_iteration_s`` is the recent median decode iteration, the time per output token the
    running requests see, judged against ``tpot_slo_s``. These feed the KV-limit choice: the
    decode iteration relative to the TPOT target and the capacity relative to the budget (the
    limit in force) are features of ``observation_vector``.
    """

    queue_len: int
    queued_prompt_tokens: int
    head_prefill_tokens: int
    running_reqs: int
    kv_capacity_tokens: int
    kv_used_tokens: int
    kv_free_tokens: int
    kv_evictable_tokens: int
    arrival_rate: float
    oldest_wait_s: float
    ttft_slo_s: float
    quantized_layers: int
    num_layers: int
    tokens_per_layer: int
    recent_transitions: int
    seconds_since_transition: float
    tpot_slo_s: float = math.inf
    decode_iteration_s: float = 0.0
    kv_budget_tokens: int = 0
    queued_demand_tokens: int = 0


# Scales of the saturating features x / (x + scale): 0.5 at ``scale``, 0.9 at 9 * scale. Chosen
# around stories260K's operating point (a few running requests, bursts of ~10 req/s), where a
# linear clip would saturate and hide the difference between a queue of 20 and one of 100.
_QUEUE_SCALE = 16.0
_RUNNING_SCALE = 16.0
_RATE_SCALE = 8.0
_TRANSITIONS_SCALE = 4.0
_SINCE_TRANSITION_SCALE = 10.0
_WAIT_SLO_MULTIPLES = 4.0
_DECODE_SLO_MULTIPLES = 2.0

FEATURES: tuple[str, ...] = (
    "queue_len: q / (q + 16)",
    "queued_prompt_tokens / kv_capacity: r / (r + 1)",
    "head_prefill_tokens / kv_capacity, clipped to 1",
    "head fits: 1 if head_prefill_tokens <= free + evictable else 0",
    "running_reqs: r / (r + 16)",
    "kv_used / kv_capacity",
    "kv_free / kv_capacity",
    "kv_evictable / kv_capacity",
    "arrival_rate (req/s): a / (a + 8)",
    "oldest_wait / ttft_slo, divided by 4 and clipped to 1 (0.25 = at the SLO)",
    "quantized_layers / num_layers",
    "restorable: tokens_per_layer * quantized_layers / kv_capacity, clipped to 1",
    "one restore is safe: 1 if kv_used <= kv_capacity - tokens_per_layer and quantized_layers > 0",
    "recent_transitions: t / (t + 4)",
    "seconds_since_transition: s / (s + 10)",
    "decode_iteration / tpot_slo, divided by 2 and clipped to 1 (0.5 = at the target; 0 without "
    "a finite target)",
    "KV limit: kv_capacity / kv_budget, clipped to 1 (1 when the budget is unknown)",
)
"""Feature i of ``observation_vector``: what it is and how it is scaled into [0, 1]."""

OBS_SIZE: int = len(FEATURES)


def _saturate(x: float, scale: float) -> float:
    """x / (x + scale) for x >= 0; NaN -> 0, +inf -> 1."""
    if not x > 0:  # also catches NaN
        return 0.0
    return 1.0 if math.isinf(x) else x / (x + scale)


def _ratio(x: float, denominator: float) -> float:
    """x / denominator clipped to [0, 1]; NaN -> 0."""
    if not denominator > 0 or not x > 0:
        return 0.0
    return min(1.0, x / denominator)


def observation_vector(s: LoadSnapshot) -> np.ndarray:
    """Features of ``s`` (see ``FEATURES``), float32 of shape ``(OBS_SIZE,)`` in [0, 1].

    Token counts are relative to the current capacity so that a policy does not depend on the
    absolute KV size of the replica it was trained on. Non-finite inputs (a runtime bug) become
    0 or 1 rather than NaN, so a bad snapshot cannot poison the network's output.
    """
    cap = float(s.kv_capacity_tokens)
    reclaimable = s.kv_free_tokens + s.kv_evictable_tokens
    queued = s.queued_prompt_tokens / cap if cap > 0 else 0.0
    layers = max(1, s.num_layers)
    restore_safe = s.quantized_layers > 0 and s.kv_used_tokens <= cap - s.tokens_per_layer
    wait_multiple = s.oldest_wait_s / s.ttft_slo_s if s.ttft_slo_s > 0 else 0.0
    # No finite target (none set, or a bad one): the decode iteration is judged by nothing.
    tpot_target = 0 < s.tpot_slo_s < math.inf
    decode_multiple = s.decode_iteration_s / s.tpot_slo_s if tpot_target else 0.0
    limit = _ratio(cap, s.kv_budget_tokens) if s.kv_budget_tokens > 0 else 1.0
    values = (
        _saturate(s.queue_len, _QUEUE_SCALE),
        _saturate(queued, 1.0),
        _ratio(s.head_prefill_tokens, cap),
        float(s.head_prefill_tokens <= reclaimable),
        _saturate(s.running_reqs, _RUNNING_SCALE),
        _ratio(s.kv_used_tokens, cap),
        _ratio(s.kv_free_tokens, cap),
        _ratio(s.kv_evictable_tokens, cap),
        _saturate(s.arrival_rate, _RATE_SCALE),
        _ratio(wait_multiple, _WAIT_SLO_MULTIPLES),
        _ratio(s.quantized_layers, layers),
        _ratio(s.tokens_per_layer * s.quantized_layers, cap),
        float(restore_safe),
        _saturate(s.recent_transitions, _TRANSITIONS_SCALE),
        _saturate(s.seconds_since_transition, _SINCE_TRANSITION_SCALE),
        _ratio(decode_multiple, _DECODE_SLO_MULTIPLES),
        limit,
    )
    return np.array(values, dtype=np.float32)


@dataclass(frozen=True)
class RawLoad:
    """What a replica counts at a tick, before the controller's accounting is applied.

    ``kv_held_tokens`` are slots held by requests or by locked cache entries (quarantined ones
    included); ``kv_free_slots`` are unallocated usable slots; ``kv_promised_tokens`` are the
    decode tokens admission keeps for the running requests' remaining outputs.
    ``head_demand_tokens`` is what admitting the head request needs (its prompt plus its own
    promised decodes) and ``queued_demand_tokens`` what admitting every waiting request needs;
    ``oldest_arrival_s`` is when the longest-waiting request arrived (None: nothing waits). The
    last four fields pass through to ``LoadSnapshot`` unchanged.
    """

    queue_len: int
    queued_prompt_tokens: int
    head_demand_tokens: int
    running_reqs: int
    kv_capacity_tokens: int
    kv_held_tokens: int
    kv_free_slots: int
    kv_evictable_tokens: int
    kv_promised_tokens: int
    oldest_arrival_s: float | None
    ttft_slo_s: float
    quantized_layers: int
    num_layers: int
    tokens_per_layer: int
    tpot_slo_s: float = math.inf
    decode_iteration_s: float = 0.0
    kv_budget_tokens: int = 0
    queued_demand_tokens: int = 0


def build_snapshot(raw: RawLoad, clock: LoadClock, now: float) -> LoadSnapshot:
    """The snapshot of ``raw`` at ``now``, with SGLang admission's KV accounting.

    Free slots promised to running decodes are not free for the queue (SGLang's PrefillAdder
    admits a prefill only beside them): they count as used, up to the free slots there are.
    Counting them as free would hide exactly the pressure that matters.
    """
    free_slots = max(0, raw.kv_free_slots)
    reserved = min(max(0, raw.kv_promised_tokens), free_slots)
    oldest = raw.oldest_arrival_s
    return LoadSnapshot(
        queue_len=raw.queue_len,
        queued_prompt_tokens=raw.queued_prompt_tokens,
        head_prefill_tokens=raw.head_demand_tokens,
        running_reqs=raw.running_reqs,
        kv_capacity_tokens=raw.kv_capacity_tokens,
        kv_used_tokens=raw.kv_held_tokens + reserved,
        kv_free_tokens=free_slots - reserved,
        kv_evictable_tokens=raw.kv_evictable_tokens,
        arrival_rate=clock.arrival_rate(now),
        oldest_wait_s=0.0 if oldest is None else max(0.0, now - oldest),
        ttft_slo_s=raw.ttft_slo_s,
        quantized_layers=raw.quantized_layers,
        num_layers=raw.num_layers,
        tokens_per_layer=raw.tokens_per_layer,
        recent_transitions=clock.recent_transitions(now),
        seconds_since_transition=clock.seconds_since_transition(now),
        tpot_slo_s=raw.tpot_slo_s,
        decode_iteration_s=raw.decode_iteration_s,
        kv_budget_tokens=raw.kv_budget_tokens or raw.kv_capacity_tokens,
        queued_demand_tokens=max(raw.queued_demand_tokens, raw.head_demand_tokens),
    )
