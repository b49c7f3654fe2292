"""SGLang's token allocator with a movable limit on the usable slots.

The KV pool is reserved once for the largest capacity the budget can ever give (every layer
quantized); tensor addresses therefore never change and the attention backend keeps working.
Only slots ``1..limit`` are handed out. Slots above the limit are either *retired* (free, never
handed out) or *quarantined* (still held by a request or the radix cache after a shrink; they
retire when freed). Growth is visible to admission at once because SGLang reads
``available_size()`` live.

``free`` runs in SGLang's hot path (every finished request, every evicted prefix): it marks the
freed slots above the limit retired with a masked write and never branches on their values, so
on a GPU it costs no device synchronisation. Those slots still join the free list there; the
runtime takes them out at the tick (``retire_freed_above_limit``), which comes before anything
can be allocated in a scheduler pass.
"""

from __future__ import annotations

import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator


class ElasticTokenToKVPoolAllocator(TokenToKVPoolAllocator):
    """TokenToKVPoolAllocator whose free list only ever holds slots ``<= limit``."""

    def clear(self) -> None:
        super().clear()
        if not hasattr(self, "limit"):
            self.limit = self.size
        self.retired = torch.zeros(self.size + 1, dtype=torch.bool, device=self.device)
        self._retire_free_above_limit()

    # -- capacity control (called by KVResizer between scheduler iterations) --

    def set_limit(self, limit: int) -> None:
        """Move the limit. Growth returns retired slots at once; a shrink retires what is free
        above it and quarantines the rest until freed."""
        if not 0 < limit <= self.size:
            raise ValueError(f"KV limit {limit} outside the reserved pool 1..{self.size} tokens")
        old = self.limit
        self.limit = limit
        if limit > old:
            back = torch.nonzero(self.retired[old + 1 : limit + 1]).flatten() + (old + 1)
            self.retired[old + 1 : limit + 1] = False
            if back.numel():
                self.free_pages = torch.cat((self.free_pages, back.to(self.free_pages.dtype)))
        elif limit < old:
            self._retire_free_above_limit()

    def quarantined_size(self) -> int:
        """Slots above the limit still held by a request or the radix cache."""
        above = self.size - self.limit
        return above - int(self.retired[self.limit + 1 :].sum())

    def committed_size(self) -> int:
        """Slots that count against the memory budget: usable plus quarantined."""
        return self.limit + self.quarantined_size()

    def held_above_limit(self) -> torch.Tensor:
        """Ids of the quarantined slots (for diagnostics and tests)."""
        held = ~self.retired[self.limit + 1 :]
        return torch.nonzero(held).flatten() + (self.limit + 1)

    # -- SGLang allocator interface --

    def free(self, free_index: torch.Tensor) -> None:
        if free_index.numel() and self.free_group is None and self.limit < self.size:
            self.retired[free_index] |= free_index > self.limit  # a masked write: no sync
        super().free(free_index)

    def retire_freed_above_limit(self) -> None:
        """Take slots freed above the limit since the last call out of the free lists (the
        tick's side of ``free``; one device synchronisation per scheduler pass at most)."""
        if self.limit < self.size:
            self._retire_free_above_limit()

    def _retire_free_above_limit(self) -> None:
        for name in ("free_pages", "release_pages"):
            pages = getattr(self, name)
            above = pages > self.limit
            if bool(above.any()):
                self.retired[pages[above]] = True
                setattr(self, name, pages[~above])
