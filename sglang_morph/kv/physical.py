"""Gives the memory of KV slots above the limit back to the operating system (CPU).

The pool is reserved once at its largest size so tensor addresses never change; without this,
a shrink would only be bookkeeping and the process would keep every page it ever touched. On
CPU the rows of retired slots are advised away with ``madvise(MADV_DONTNEED)``: their pages
leave the resident set at once and come back zero-filled the next time a slot there is written,
which is harmless because a retired slot holds nothing. Only whole pages strictly inside the
released rows are advised, so a row below the limit is never touched. On a GPU this does
nothing (physical device memory needs CUDA virtual memory management; see docs/design.md).
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence

import torch

MADV_DONTNEED = 4
"""Linux's value (asm-generic/mman-common.h)."""
PAGE_BYTES = mmap.PAGESIZE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def release_rows(tensors: Sequence[torch.Tensor], first_row: int, end_row: int) -> int:
    """Advise away rows ``[first_row, end_row)`` of each CPU tensor (dimension 0); returns the
    bytes advised. Non-CPU or non-contiguous tensors are skipped. OSError if the kernel refuses."""
    released = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous() or end_row <= first_row:
            continue
        row_bytes = t.stride(0) * t.element_size()
        start = t.data_ptr() + first_row * row_bytes
        stop = t.data_ptr() + min(end_row, t.shape[0]) * row_bytes
        start = -(-start // PAGE_BYTES) * PAGE_BYTES
        stop = stop // PAGE_BYTES * PAGE_BYTES
        if stop <= start:
            continue
        if _libc.madvise(start, stop - start, MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_DONTNEED) failed: {os.strerror(err)}")
        released += stop - start
    return released


class PageReleaser:
    """Releases the KV pool's rows above the allocator's limit, once per shrink."""

    def __init__(self, pool) -> None:
        """``pool``: SGLang's KV pool (``k_buffer`` and ``v_buffer``: one tensor per layer,
        one row per slot)."""
        self.tensors = [*getattr(pool, "k_buffer", []), *getattr(pool, "v_buffer", [])]
        self.active = bool(self.tensors) and all(t.device.type == "cpu" for t in self.tensors)
        self.released_from: int | None = None
        """First slot whose rows are released (None: nothing released)."""
        self.released_bytes = 0

    def release_above(self, limit: int) -> None:
        """Release the rows of slots ``limit + 1 ..`` (all retired: the shrink is complete).
        Rows released earlier are not advised again; growth needs no call (pages come back on
        first write)."""
        if not self.active:
            return
        first = limit + 1
        end = self.released_from if self.released_from is not None else self.tensors[0].shape[0]
        if first < end:
            self.released_bytes += release_rows(self.tensors, first, end)
        self.released_from = first

    def resident_bound_bytes(self) -> int:
        """Bytes of the pool not advised away: at most this much of it is resident."""
        total = sum(t.numel() * t.element_size() for t in self.tensors)
        if self.released_from is None:
            return total
        rows = self.tensors[0].shape[0]
        above = max(0, rows - self.released_from)
        return total - sum(above * t.stride(0) * t.element_size() for t in self.tensors)

    def regrown(self, limit: int) -> None:
        """The limit grew to ``limit``: rows up to it may be written again (and so resident)."""
        if self.released_from is not None and limit + 1 > self.released_from:
            self.released_from = limit + 1
