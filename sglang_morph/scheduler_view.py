"""What the controller and the KV resizer read off SGLang's scheduler at the tick.

At the entry of ``get_next_batch_to_run`` the requests holding KV are in three places: the
running (decode) batch, the last prefill batch (SGLang merges it into the running batch only
inside ``get_next_batch_to_run``) and the chunked request. Everything here looks in all three,
as SGLang's own retraction does, so no request that holds or is promised KV is missed.
"""

from __future__ import annotations

import torch
from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

from rl_controller.observation import RawLoad


def holding_requests(scheduler) -> list:
    """Requests that may hold KV slots now: the running batch, the last prefill batch not yet
    merged into it, and the chunked request (each once, finished ones included)."""
    reqs: list = []
    seen: set[int] = set()

    def add(batch_reqs) -> None:
        for r in batch_reqs:
            if id(r) not in seen:
                seen.add(id(r))
                reqs.append(r)

    running = scheduler.running_batch
    if running is not None:
        add(running.reqs)
    last = scheduler.last_batch
    if last is not None and last is not running and last.forward_mode.is_extend():
        add(last.reqs)
    if scheduler.chunked_req is not None:
        add([scheduler.chunked_req])
    return reqs


def active_requests(scheduler) -> list:
    """Admitted requests that have not finished: they decode (or prefill) next."""
    return [r for r in holding_requests(scheduler) if not r.finished()]


def request_held_slots(scheduler) -> torch.Tensor:
    """KV slot ids referenced by the holding requests (int64, possibly with repeats)."""
    table = scheduler.req_to_token_pool.req_to_token
    rows = [
        table[r.kv.req_pool_idx, : r.kv.kv_allocated_len]
        for r in holding_requests(scheduler)
        if r.kv.req_pool_idx is not None and r.kv.kv_allocated_len > 0
    ]
    return torch.cat(rows).to(torch.int64) if rows else torch.empty(0, dtype=torch.int64)


def promised_tokens(scheduler, req) -> int:
    """Decode tokens SGLang's admission keeps free for ``req``: its remaining outputs, times the
    new-token ratio unless it ignores EOS (then all of them), capped as admission caps them."""
    ratio = scheduler.new_token_ratio_tracker.current
    left = min(req.sampling_params.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
    return int(max(0, left) * (1.0 if req.sampling_params.ignore_eos else ratio))


def admission_demand(scheduler, req) -> int:
    """KV tokens SGLang needs free to admit ``req``: its prompt plus its promised decodes."""
    return len(req.origin_input_ids) + promised_tokens(scheduler, req)


def decode_reserve(scheduler) -> int:
    """KV tokens admission keeps for the active requests' remaining decodes.

    SGLang admits a prefill only if it fits beside ``(max_new_tokens - generated) * ratio`` per
    running request (schedule_policy.PrefillAdder), so free slots promised to decodes are not
    free for the queue.
    """
    return sum(promised_tokens(scheduler, r) for r in active_requests(scheduler))


def raw_load(
    scheduler,
    *,
    kv_capacity_tokens: int,
    kv_committed_tokens: int,
    quantized_layers: int,
    num_layers: int,
    tokens_per_layer: int,
    ttft_slo_s: float,
    tpot_slo_s: float,
    decode_iteration_s: float,
    kv_budget_tokens: int,
) -> RawLoad:
    """The scheduler's load for ``rl_controller.observation.build_snapshot``.

    ``kv_committed_tokens`` is every slot that counts against the budget (the usable limit plus
    quarantined slots): what is neither free nor evictable in it is held.
    """
    waiting = list(scheduler.waiting_queue)
    free_slots = int(scheduler.token_to_kv_pool_allocator.available_size())
    evictable = int(scheduler.tree_cache.evictable_size())
    oldest = min((r.time_stats.scheduler_recv_time for r in waiting), default=None)
    return RawLoad(
        queue_len=len(waiting),
        queued_prompt_tokens=sum(len(r.origin_input_ids) for r in waiting),
        head_demand_tokens=admission_demand(scheduler, waiting[0]) if waiting else 0,
        queued_demand_tokens=sum(admission_demand(scheduler, r) for r in waiting),
        running_reqs=len(active_requests(scheduler)),
        kv_capacity_tokens=kv_capacity_tokens,
        kv_held_tokens=kv_committed_tokens - free_slots - evictable,
        kv_free_slots=free_slots,
        kv_evictable_tokens=evictable,
        kv_promised_tokens=decode_reserve(scheduler),
        oldest_arrival_s=oldest,
        ttft_slo_s=ttft_slo_s,
        quantized_layers=quantized_layers,
        num_layers=num_layers,
        tokens_per_layer=tokens_per_layer,
        tpot_slo_s=tpot_slo_s,
        decode_iteration_s=decode_iteration_s,
        kv_budget_tokens=kv_budget_tokens,
    )
