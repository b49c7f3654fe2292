"""KV pages above the limit really leave the process's resident memory (CPU, madvise), and
nothing below the limit is touched: measured on the pool's own pages (``mincore``) and on this
process's RSS, with SGLang's real KV pool and the elastic allocator under the KV resizer (no
server). RSS alone is a loose witness in a long test process (other allocations move it), so
the exact claim is made on the pool's pages."""

from __future__ import annotations

import ctypes

import torch

from sglang_morph.kv.physical import PAGE_BYTES, release_rows
from sglang_morph.kv.resizer import KVResizer
from tests.sglang_doubles import FakeReq, FakeScheduler

MIB = 1 << 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE_BYTES


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
_libc.mincore.restype = ctypes.c_int


def resident_bytes(tensors) -> int:
    """Bytes of the pages under ``tensors`` the kernel reports resident (mincore)."""
    total = 0
    for t in tensors:
        start = t.data_ptr() // PAGE_BYTES * PAGE_BYTES
        end = t.data_ptr() + t.numel() * t.element_size()
        pages = -(-(end - start) // PAGE_BYTES)
        vec = ctypes.create_string_buffer(pages)
        assert _libc.mincore(start, end - start, vec) == 0, ctypes.get_errno()
        total += sum(b & 1 for b in vec.raw) * PAGE_BYTES
    return total


def test_released_rows_leave_rss_read_zero_and_come_back_on_write() -> None:
    t = torch.ones(64 * MIB // 4, dtype=torch.float32).view(4096, -1)  # 64 MiB, every page touched
    before, pool_before = rss_bytes(), resident_bytes([t])
    released = release_rows([t], 1024, 4096)  # the upper three quarters
    after, pool_after = rss_bytes(), resident_bytes([t])
    assert released >= 47 * MIB
    assert pool_before - pool_after == released
    assert before - after >= 0.75 * released, (before, after, released)
    assert bool((t[:1024] == 1).all()) and bool((t[1025:4095] == 0).all())  # edges: partial pages
    t[1024:].fill_(2.0)
    assert resident_bytes([t]) == pool_before and rss_bytes() - after >= 0.75 * released


def test_partial_pages_at_the_edges_are_never_advised() -> None:
    t = torch.ones(1000, 3, dtype=torch.float32)  # 12-byte rows: rows straddle page edges
    assert release_rows([t], 10, 20) == 0  # 120 bytes: no whole page inside
    release_rows([t], 500, 1000)
    assert bool((t[:500] == 1).all())  # the row holding the boundary kept its value


def test_resizer_releases_the_pool_above_the_limit_only_once_the_shrink_completes() -> None:
    pool = 131072  # 8 layers x (k, v) x 131072 rows x 32 B = 64 MiB of KV
    s = FakeScheduler(pool, layers=8)
    kv_pool = s.token_to_kv_pool_allocator.get_kvcache()
    for t in (*kv_pool.k_buffer, *kv_pool.v_buffer):
        t.fill_(1.0)  # resident, as a pool that served a long context would be
    kv = KVResizer(s, 64, min_tokens=64)
    req = s.admit(FakeReq(prompt_len=70000, max_new_tokens=1), 70000)  # slots 1..70000
    buffers = (*kv_pool.k_buffer, *kv_pool.v_buffer)
    total = kv.pages.resident_bound_bytes()
    before, pool_before = rss_bytes(), resident_bytes(buffers)
    assert pool_before >= 0.99 * total  # every page of the pool is resident
    assert not kv.request(32768)  # held slots above the limit: the shrink waits
    assert kv.pages.resident_bound_bytes() == total and resident_bytes(buffers) == pool_before
    s.release(req)
    assert kv.step() and kv.complete
    bound = kv.pages.resident_bound_bytes()
    assert bound < 0.3 * total
    pool_after = resident_bytes(buffers)
    assert pool_after <= bound + 2 * len(buffers) * PAGE_BYTES, (pool_after, bound)  # edges only
    assert before - rss_bytes() >= 0.75 * (total - bound)  # and the process's RSS shows it
    kv.request(65536)  # growth: no call needed, slots come back zero-filled when written
    got = s.token_to_kv_pool_allocator.alloc(65536)
    assert int(got.max()) <= 65536 and kv.pages.resident_bound_bytes() > bound
