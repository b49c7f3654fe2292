"""AWQ (activation-aware weight quantization) per-input-channel scale search.

A few input channels carry much larger activations than the rest; their weights matter most for
the output but get the same coarse grid as every other. AWQ scales those weight columns up by
``s`` before quantizing (and the activations down by ``s``), so they land on a finer grid
relative to their size. ``s = mean|x|^alpha`` per channel, with ``alpha`` picked on a grid to
minimise the output error on calibration activations; ``alpha = 0`` is plain round-to-nearest,
so the chosen scale never does worse than RTN on the calibration data.
"""

from __future__ import annotations

import torch

from sglang_morph.quant.quantize import fake_quantize

ALPHA_GRID = tuple(i / 20 for i in range(20))


def search_awq_scale(w: torch.Tensor, x: torch.Tensor, fmt: str, group_size: int) -> torch.Tensor:
    """Per-input-channel scale (in,) for ``w`` (out, in) from calibration activations ``x``.

    ``x`` is (tokens, in). For a fused linear pass the concatenated rows (q, k, v or gate, up):
    they read the same input, so they must share one scale.
    """
    w = w.detach().float()
    x = x.detach().float().reshape(-1, w.shape[1])
    # ||x (W - W_q)^T||^2 = sum_rows d G d^T with G = x^T x: one (in, in) Gram matrix replaces
    # a pass over every calibration token per candidate.
    gram = (x.double().t() @ x.double()) / x.shape[0]
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-5)
    best_scale, best_err = torch.ones_like(mean_abs), float("inf")
    for alpha in ALPHA_GRID:
        scale = mean_abs.pow(alpha)
        # Centre the scales on 1 in log space so the weight's range does not drift.
        scale = scale / (scale.max() * scale.min()).sqrt()
        diff = (w - fake_quantize(w, fmt, group_size, input_scale=scale)).double()
        err = ((diff @ gram) * diff).sum().item()
        if err < best_err:
            best_scale, best_err = scale, err
    return best_scale
