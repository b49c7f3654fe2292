"""The elastic allocator, the KV resizer and the scheduler view against SGLang's real KV pool and
allocator on CPU, with test doubles of the scheduler around them (no server, no model)."""

from __future__ import annotations

import pytest
import torch

from sglang_morph import scheduler_view
from sglang_morph.kv.resizer import KVResizeError, KVResizer
from tests.sglang_doubles import FakeBatch, FakeReq, FakeScheduler

POOL = 256
SEGMENT = 32


def ids(t: torch.Tensor) -> set[int]:
    return {int(x) for x in t}


# -- the allocator --


def test_allocator_hands_out_only_slots_below_the_limit() -> None:
    alloc = FakeScheduler(POOL).token_to_kv_pool_allocator
    alloc.set_limit(100)
    assert alloc.available_size() == 100 and alloc.committed_size() == 100
    got = alloc.alloc(100)
    assert ids(got) == set(range(1, 101)) and alloc.alloc(1) is None


def test_allocator_grow_returns_retired_slots_at_once() -> None:
    alloc = FakeScheduler(POOL).token_to_kv_pool_allocator
    alloc.set_limit(64)
    held = alloc.alloc(10)
    alloc.set_limit(128)
    assert alloc.available_size() == 128 - 10 and alloc.quarantined_size() == 0
    assert max(ids(alloc.alloc(118))) == 128
    alloc.free(held)
    with pytest.raises(ValueError, match="outside the reserved pool"):
        alloc.set_limit(POOL + 1)


def test_allocator_shrink_quarantines_held_slots_and_retires_them_on_free() -> None:
    alloc = FakeScheduler(POOL).token_to_kv_pool_allocator
    held = alloc.alloc(100)  # slots 1..100
    alloc.set_limit(64)
    # 65..100 are held above the limit: quarantined; 101..256 were free: retired.
    assert alloc.quarantined_size() == 36 and ids(alloc.held_above_limit()) == set(range(65, 101))
    assert alloc.committed_size() == 100 and alloc.available_size() == 0
    alloc.free(held[50:])  # slots 51..100: 51..64 come back, 65..100 retire
    assert alloc.quarantined_size() == 0  # marked at once, without a device sync
    alloc.retire_freed_above_limit()  # the tick takes 65..100 out of the free list
    assert alloc.available_size() == 14
    assert max(ids(alloc.alloc(14))) == 64


# -- the resizer --


def test_resizer_grows_and_keeps_every_size_holder_in_step() -> None:
    s = FakeScheduler(POOL)
    kv = KVResizer(s, SEGMENT, min_tokens=64)
    assert kv.request(96) and kv.capacity_tokens == 96
    assert s.holders() == {96}
    assert kv.request(160) and kv.complete and s.holders() == {160}
    assert s.token_to_kv_pool_allocator.available_size() == 160


def test_resizer_refuses_impossible_sizes_and_rounds_to_segments() -> None:
    kv = KVResizer(FakeScheduler(POOL), SEGMENT, min_tokens=64)
    with pytest.raises(KVResizeError, match="reservation holds 256"):
        kv.request(POOL + 1)
    with pytest.raises(KVResizeError, match="below the minimum 64"):
        kv.request(10)
    assert kv.quantize_tokens(100) == 96 and kv.quantize_tokens(10) == 64
    assert kv.quantize_tokens(10_000) == POOL


def test_shrink_waits_for_running_requests() -> None:
    s = FakeScheduler(POOL)
    kv = KVResizer(s, SEGMENT, min_tokens=64)
    req = s.admit(FakeReq(prompt_len=150, max_new_tokens=20), 150)
    s.running_batch = FakeBatch([req])
    assert not kv.request(96)
    assert not kv.complete and kv.capacity_tokens == 96
    # The request keeps its slots; the budget counts them until it finishes.
    assert s.token_to_kv_pool_allocator.quarantined_size() == 150 - 96
    assert s.holders() == {150}
    assert not kv.step()
    s.release(req)
    assert kv.step() and kv.complete and s.holders() == {96}


def test_shrink_evicts_cache_entries_that_alone_hold_quarantined_slots() -> None:
    s = FakeScheduler(POOL)
    alloc = s.token_to_kv_pool_allocator
    kv = KVResizer(s, SEGMENT, min_tokens=64)
    s.tree_cache.insert(alloc.alloc(120))  # slots 1..120, cached, no request holds them
    assert kv.request(96)  # the entry above 96 is evicted at once
    assert s.tree_cache.evictable_size() == 0 and alloc.quarantined_size() == 0
    assert alloc.available_size() == 96 and s.holders() == {96}


def test_shrink_does_not_evict_for_slots_a_fresh_prefill_holds() -> None:
    """A prefill's requests sit in ``last_batch`` until the next get_next_batch_to_run merges
    them: their slots must count as held by requests, or the resizer takes them for cache-only
    slots and evicts the whole cache every tick."""
    s = FakeScheduler(POOL)
    alloc = s.token_to_kv_pool_allocator
    kv = KVResizer(s, SEGMENT, min_tokens=64)
    cached = [alloc.alloc(20), alloc.alloc(20)]  # slots 1..40
    for entry in cached:
        s.tree_cache.insert(entry)
    prefill = s.admit(FakeReq(prompt_len=100, max_new_tokens=10, generated=1), 100)  # 41..140
    s.last_batch = FakeBatch([prefill], extend=True)
    assert not kv.request(96)
    assert s.tree_cache.evictable_size() == 40, "the cache was evicted for a request's slots"
    assert alloc.quarantined_size() == 140 - 96
    s.release(prefill)
    assert kv.step() and s.tree_cache.evictable_size() == 40


# -- the scheduler view --


def test_view_counts_the_last_prefill_and_the_chunked_request_once() -> None:
    s = FakeScheduler(POOL)
    decoding = FakeReq(prompt_len=10, max_new_tokens=30, generated=10)
    finished = FakeReq(prompt_len=10, max_new_tokens=5, generated=5, done=True)
    prefilled = FakeReq(prompt_len=40, max_new_tokens=20, generated=1)
    chunked = FakeReq(prompt_len=300, max_new_tokens=8)
    s.running_batch = FakeBatch([decoding, finished])
    s.last_batch = FakeBatch([prefilled, chunked], extend=True)
    s.chunked_req = chunked
    assert scheduler_view.active_requests(s) == [decoding, prefilled, chunked]
    # ignore_eos: every remaining output token is promised.
    assert scheduler_view.decode_reserve(s) == 20 + 19 + 8
    s.last_batch = s.running_batch  # a decode step: nothing new to count
    assert scheduler_view.active_requests(s) == [decoding, chunked]


def test_view_promises_decodes_at_the_new_token_ratio_without_ignore_eos() -> None:
    s = FakeScheduler(POOL)
    req = FakeReq(prompt_len=50, max_new_tokens=40, generated=0, ignore_eos=False)
    assert scheduler_view.promised_tokens(s, req) == 20  # ratio 0.5
    assert scheduler_view.admission_demand(s, req) == 70


def test_view_reads_held_slots_of_every_holding_request() -> None:
    s = FakeScheduler(POOL)
    a = s.admit(FakeReq(prompt_len=5, max_new_tokens=5), 5)
    b = s.admit(FakeReq(prompt_len=7, max_new_tokens=5), 7)
    s.running_batch = FakeBatch([a])
    s.last_batch = FakeBatch([b], extend=True)
    assert ids(scheduler_view.request_held_slots(s)) == ids(a.slots) | ids(b.slots)


def test_free_never_branches_on_tensor_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """``free`` is SGLang's hot path: reading a tensor's value in Python (``bool``, ``item``)
    is what would force a device synchronisation on a GPU, so it must do neither."""
    alloc = FakeScheduler(POOL).token_to_kv_pool_allocator
    held = alloc.alloc(100)
    alloc.set_limit(64)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("free() read a tensor value (a device sync on a GPU)")

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "__bool__", forbidden)
        m.setattr(torch.Tensor, "item", forbidden)
        alloc.free(held)
    alloc.retire_freed_above_limit()
    assert alloc.quarantined_size() == 0 and alloc.available_size() == 64
