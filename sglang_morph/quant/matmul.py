"""``y = x W^T (+ bias)`` with a weight-only quantized W, on the device's real kernel.

Paths (``kernel_name``): ``int8pack_mm`` (``torch._weight_int8pack_mm``: CPU, and CUDA in the
torch builds that register it), ``int4pack_mm_for_cpu`` (``torch._weight_int4pack_mm_for_cpu``),
``int4pack_mm`` (CUDA tinygemm ``torch._weight_int4pack_mm``, sm80+), and ``dequant_matmul``
where this torch build has no kernel for the device (asked of the dispatcher, ``has_kernel``).
The CPU kernels and CUDA int4 run on bfloat16 activations (the only vectorized CPU path in
torch 2.13; tinygemm's only input type); the result is returned in the input's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sglang_morph.quant.quantize import QuantizedWeight, has_kernel

_LAYOUT_KERNELS = {
    "int4_cpu": "int4pack_mm_for_cpu",
    "int4_cuda": "int4pack_mm",
    "nibble": "dequant_matmul",
}


def kernel_name(qw: QuantizedWeight) -> str:
    """Which path ``quantized_matmul`` takes for ``qw``: for reports, tests and the profile."""
    if qw.fmt == "int8":
        return "int8pack_mm" if has_kernel("_weight_int8pack_mm", qw.device) else "dequant_matmul"
    return _LAYOUT_KERNELS[qw.layout]


def quantized_matmul(
    x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x`` (..., in) times the quantized (out, in) weight, transposed: (..., out)."""
    dtype = x.dtype
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if qw.input_scale is not None:
        x2 = x2 / qw.input_scale.to(dtype)
    kernel = kernel_name(qw)
    if kernel == "dequant_matmul":
        y = x2 @ qw.dequantize(dtype).t()
    else:
        xk = x2.to(qw.scales.dtype)
        pad = qw.padded_in_features - qw.in_features
        if pad:
            xk = F.pad(xk, (0, pad))
        xk = xk.contiguous()
        if kernel == "int8pack_mm":
            y = torch._weight_int8pack_mm(xk, qw.qweight, qw.scales)
        elif kernel == "int4pack_mm_for_cpu":
            y = torch._weight_int4pack_mm_for_cpu(xk, qw.qweight, qw.group_size, qw.scales)
        else:
            y = torch._weight_int4pack_mm(xk, qw.qweight, qw.group_size, qw.scales)
        if y.shape[1] != qw.out_features:
            y = y[:, : qw.out_features]
        y = y.to(dtype)
    if bias is not None:
        y = y + bias
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], qw.out_features)
