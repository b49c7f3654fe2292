"""Pure-torch stand-in for the two CPU functions SGLang 0.5.23 imports from ``sgl_kernel``.

The CPU build of sgl-kernel is not published on PyPI. On a CPU without AMX, SGLang runs its
``forward_native`` paths, but ``mem_cache/allocation.py`` and ``kernels/ops/kvcache/cache_move.py``
import two helpers at module level. This package provides exactly those two, with the same
semantics, and deliberately registers no ``torch.ops.sgl_kernel`` namespace so SGLang's AMX probe
stays False. It is installed only on machines without CUDA (see scripts/setup.sh).
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+sglang-morph-cpu"


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's newly allocated KV slots into its row of ``req_to_token``.

    Request ``i`` owns ``out_cache_loc[sum(len_<i) : sum(len_<=i)]`` and stores it at columns
    ``start_offset[i]:end_offset[i]`` of row ``req_pool_indices[i]`` (same as the Triton kernel).
    """
    del pool_len  # implied by req_to_token's shape; kept for signature compatibility
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Copy rows ``src_loc`` to ``tgt_loc`` in every KV buffer given by raw address and row stride.

    All source rows are read before any target row is written, so overlapping moves are safe,
    as in the tiled Triton kernel this replaces.
    """
    srcs = src_loc.tolist()
    tgts = tgt_loc.tolist()
    for base, stride in zip(data_ptrs.tolist(), strides.tolist()):
        staged = [ctypes.string_at(base + s * stride, stride) for s in srcs]
        for t, row in zip(tgts, staged):
            ctypes.memmove(base + t * stride, row, stride)


def _unsupported(name: str):
    """A named stand-in for a CPU kernel this package does not provide.

    SGLang imports these at module level on CPU (speculative decoding, linear attention), so the
    names must exist; calling one means a feature that sglang-morph does not support on CPU.
    """

    def kernel(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not available: this is sglang-morph's CPU stand-in for "
            "sgl-kernel, which supports plain decoding only (no speculative decoding, no linear "
            "attention). Install SGLang's CPU sgl-kernel build for that feature."
        )

    kernel.__name__ = name
    return kernel


for _name in (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "causal_conv1d_fn_cpu",
    "causal_conv1d_update_cpu",
    "chunk_gated_delta_rule_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
    "verify_tree_greedy_cpu",
):
    globals()[_name] = _unsupported(_name)
