"""KVResizer: moves the elastic allocator's limit and keeps every holder of the size consistent.

Runs only between scheduler iterations (at the runtime's tick), when nothing is in flight.
A shrink never takes a slot from a running or admitted request: free slots above the new limit
retire at once, radix-cache entries that alone hold quarantined slots are evicted, and slots that
requests hold wait until those requests finish. The shrink is complete when nothing above the
limit is held; layer restores wait for that.
"""

from __future__ import annotations

import time

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from sglang_morph.kv.elastic_allocator import ElasticTokenToKVPoolAllocator
from sglang_morph.kv.physical import PageReleaser
from sglang_morph.scheduler_view import request_held_slots

# Objects of the scheduler that keep their own copy of the KV capacity (see the SGLang notes).
SIZE_HOLDERS = ("pool_stats_observer", "invariant_checker", "load_inquirer", "kv_events_publisher")


class KVResizeError(ValueError):  # a ValueError: refused commands report it as last_error
    """A resize request that can never be satisfied (e.g. larger than the reservation)."""


class KVResizer:
    """Owns the usable KV capacity of one scheduler."""

    def __init__(self, scheduler, segment_tokens: int, min_tokens: int) -> None:
        alloc = scheduler.token_to_kv_pool_allocator
        if not isinstance(alloc, ElasticTokenToKVPoolAllocator):
            raise TypeError(
                "elastic KV needs page size 1 (TokenToKVPoolAllocator); this server uses "
                f"{type(alloc).__name__}"
            )
        self.scheduler = scheduler
        self.alloc = alloc
        self.segment = segment_tokens
        self.min_tokens = min_tokens
        self.pages = PageReleaser(alloc.get_kvcache())
        self.target = alloc.limit
        self.last_step_s = 0.0
        for name in SIZE_HOLDERS:
            if not hasattr(getattr(scheduler, name, None), "max_total_num_tokens"):
                raise RuntimeError(f"SGLang layout changed: scheduler.{name} holds no KV size")

    @property
    def reserved_tokens(self) -> int:
        return self.alloc.size

    @property
    def capacity_tokens(self) -> int:
        return self.alloc.limit

    def quantize_tokens(self, tokens: int) -> int:
        """Round down to whole segments, within [min_tokens, reservation]."""
        tokens = min(self.reserved_tokens, tokens)
        if tokens < self.reserved_tokens:
            tokens = tokens // self.segment * self.segment
        return max(self.min_tokens, tokens)

    def request(self, tokens: int) -> bool:
        """Set the target capacity; returns whether it is reached already."""
        self.check_request(tokens)
        self.target = tokens
        return self.step()

    def check_request(self, tokens: int) -> None:
        """Raise KVResizeError for a capacity this reservation can never have."""
        if tokens > self.reserved_tokens:
            raise KVResizeError(
                f"cannot resize KV to {tokens} tokens: the reservation holds "
                f"{self.reserved_tokens} tokens (accepted: {self.min_tokens}.."
                f"{self.reserved_tokens})"
            )
        if tokens < self.min_tokens:
            raise KVResizeError(
                f"cannot resize KV to {tokens} tokens: below the minimum {self.min_tokens} "
                f"(accepted: {self.min_tokens}..{self.reserved_tokens})"
            )

    def step(self) -> bool:
        """Advance toward the target; True when no slot above the limit is held any more."""
        start = time.perf_counter()
        if self.target != self.alloc.limit:
            self.alloc.set_limit(self.target)
            self.pages.regrown(self.target)
        if self.alloc.quarantined_size() > 0:
            self._evict_cache_held()
            self.alloc.retire_freed_above_limit()  # what the evictions freed above the limit
        self.sync_holders()
        done = self.alloc.quarantined_size() == 0
        if done:
            self.pages.release_above(self.alloc.limit)
        self.last_step_s = time.perf_counter() - start
        return done

    @property
    def complete(self) -> bool:
        return self.alloc.limit == self.target and self.alloc.quarantined_size() == 0

    def _evict_cache_held(self) -> None:
        """Evict LRU radix-cache entries while quarantined slots are held by the cache alone."""
        tree = self.scheduler.tree_cache
        while True:
            held = self.alloc.held_above_limit()
            by_reqs = torch.isin(held, request_held_slots(self.scheduler)).sum().item()
            cache_only = held.numel() - by_reqs
            if cache_only <= 0 or tree.evictable_size() <= 0:
                return
            result = tree.evict(EvictParams(num_tokens=cache_only))
            if not getattr(result, "num_tokens_evicted", 0):
                return

    def sync_holders(self) -> None:
        """Set every holder of the pool size to the committed size (usable plus quarantined),
        so SGLang's own invariant ``available + evictable + protected == total`` holds."""
        committed = self.alloc.committed_size()
        s = self.scheduler
        s.max_total_num_tokens = committed
        for name in SIZE_HOLDERS:
            # Two of these are frozen dataclasses (SGLang assumes a fixed pool); others hold
            # references to them, so they are updated in place rather than replaced.
            object.__setattr__(getattr(s, name), "max_total_num_tokens", committed)
