"""Weight-only quantization of one linear weight, stored in the form its kernel consumes.

MorphServe swaps a layer's full-precision weights for a quantized copy at run time, so the copy
is packed once here (never per matmul) in the layout of the kernel that will read it
(see docs/quantization.md for the measurements behind each choice):

* ``int8``: symmetric, one scale per output channel, ``q = round(w / s)`` in [-127, 127], the
  input of ``torch._weight_int8pack_mm``.
* ``int4``: asymmetric (min-max) per group of ``group_size`` input channels, in the tinygemm
  format of ``torch._weight_int4pack_mm[_for_cpu]``: codes ``q`` in [0, 15] and a per-group
  (scale, zero) pair, ``w = (q - 8) * scale + zero``. Asymmetric costs no extra bytes (the
  kernel reads a zero anyway) and wastes no grid points on groups not centred on zero.

Torch 2.13's CPU kernels are vectorized for bfloat16 activations only (with float32 they run
6-70x slower than the float32 GEMM, 1-128 tokens), so on CPU the scales are kept in bfloat16
and the matmul feeds the kernels bfloat16. Codes are computed against the rounded scales, so
``dequantize()`` is exactly the matrix the kernel multiplies by.

Padding, so every shape takes a kernel: int4 pads ``in_features`` to whole groups (the kernels'
requirement; the matmul zero-pads ``x``) and ``out_features`` to 16 rows (CPU packs rows in
blocks of 16, CUDA needs 8; the matmul drops them). CPU int8 pads ``in_features`` to 16: the
bfloat16 ``_weight_int8pack_mm`` crashes (SIGSEGV) on other widths for more than one token.
On a device with neither kernel int4 codes stay plain nibbles (layout "nibble") and the matmul
dequantizes.

An AWQ ``input_scale`` s (per input channel) is folded in first: the stored weight is ``W * s``
and the matmul divides ``x`` by ``s``, giving salient input channels a finer grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

FORMATS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)
INT4_ROW_ALIGN = 16
INT8_CPU_COL_ALIGN = 16


@dataclass
class QuantizedWeight:
    """A weight-only quantized copy of one (out_features, in_features) matrix.

    ``layout`` names how ``qweight`` and ``scales`` are stored: "int8" (int8 codes (out, K),
    scales (out,)), "int4_cpu" / "int4_cuda" (the kernel's packed codes, and
    (groups, padded_out, 2) (scale, zero) pairs) or "nibble" (uint8 (out, K/2), low nibble first).
    """

    fmt: str
    out_features: int
    in_features: int
    group_size: int | None
    qweight: torch.Tensor
    scales: torch.Tensor
    layout: str
    input_scale: torch.Tensor | None = None
    packed_for: str | None = None
    """The device type whose kernel layout this copy already has while it waits on the host
    (``staged_for``): moving it there is then a copy, never a repack."""

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def padded_in_features(self) -> int:
        """The input width the stored codes have, which ``x`` is padded to."""
        if self.fmt == "int8":
            return self.qweight.shape[1]
        return self.scales.shape[0] * self.group_size

    def nbytes(self) -> int:
        """Bytes this copy keeps resident: what a layer swap actually frees or costs."""
        tensors = [self.qweight, self.scales]
        if self.input_scale is not None:
            tensors.append(self.input_scale)
        return sum(t.numel() * t.element_size() for t in tensors)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) matrix this copy stands for, AWQ scale undone; for checks and fallback."""
        if self.fmt == "int8":
            w = self.qweight.float() * self.scales.float()[:, None]
        else:
            w = _decode_int4(unpack_int4_codes(self), self.scales, self.group_size)
        return _finish(w, self.out_features, self.in_features, self.input_scale).to(dtype)

    def staged_for(self, device: torch.device | str) -> QuantizedWeight:
        """A host copy already packed for ``device``'s kernel (pinned when it is a GPU), so that
        every later swap to ``device`` only copies: the packing (on a GPU, an identity product
        to read the CPU layout back, then the CUDA pack) runs once, when the copy is made."""
        device = torch.device(device)
        if device.type == "cpu":
            return self
        on = self.to(device)

        def host(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
            return out.copy_(t)

        return replace(on, qweight=host(on.qweight), scales=host(on.scales),
                       input_scale=host(on.input_scale), packed_for=device.type)  # fmt: skip

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """This copy on ``device``, repacked when the two devices' kernels read other layouts
        (a copy ``staged_for`` that device is only moved)."""
        device = torch.device(device)
        moved_scale = None if self.input_scale is None else self.input_scale.to(device)
        if self.packed_for == device.type:
            return replace(self, qweight=self.qweight.to(device, non_blocking=True),
                           scales=self.scales.to(device, non_blocking=True),
                           input_scale=moved_scale, packed_for=None)  # fmt: skip
        if self.fmt == "int8":
            q = self.qweight[:, : self.in_features].to(device)
            qweight, scales = _pack_int8(q, self.scales.to(device))
            return replace(self, qweight=qweight, scales=scales, input_scale=moved_scale)
        layout = _int4_layout(device)
        if layout == self.layout:
            return replace(
                self,
                qweight=self.qweight.to(device),
                scales=self.scales.to(device),
                input_scale=moved_scale,
            )
        codes = unpack_int4_codes(self).to(device)
        sz = self.scales[:, : codes.shape[0]].to(device)
        qweight, scales = _pack_int4(codes, sz, self.out_features, layout)
        return replace(self, qweight=qweight, scales=scales, layout=layout, input_scale=moved_scale)


def quantize_weight(
    w: torch.Tensor,
    fmt: str,
    group_size: int = 32,
    input_scale: torch.Tensor | None = None,
) -> QuantizedWeight:
    """Quantize ``w`` (out, in) to ``fmt`` and pack it for the kernel of ``w``'s device."""
    w, input_scale = _prepare(w, fmt, group_size, input_scale)
    out_features, in_features = w.shape
    if fmt == "int8":
        qweight, scales = _pack_int8(*_int8_codes(w))
        return QuantizedWeight(
            fmt, out_features, in_features, None, qweight, scales, "int8", input_scale
        )
    layout = _int4_layout(w.device)
    codes, sz = _int4_codes(w, group_size, _int4_scale_dtype(layout))
    qweight, scales = _pack_int4(codes, sz, out_features, layout)
    return QuantizedWeight(
        fmt, out_features, in_features, group_size, qweight, scales, layout, input_scale
    )


def fake_quantize(
    w: torch.Tensor,
    fmt: str,
    group_size: int = 32,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``quantize_weight(...).dequantize()`` without packing: the cheap inner step of AWQ."""
    w, input_scale = _prepare(w, fmt, group_size, input_scale)
    out_features, in_features = w.shape
    if fmt == "int8":
        q, scales = _int8_codes(w)
        deq = q.float() * scales.float()[:, None]
    else:
        codes, sz = _int4_codes(w, group_size, _int4_scale_dtype(_int4_layout(w.device)))
        deq = _decode_int4(codes, sz, group_size)
    return _finish(deq, out_features, in_features, input_scale)


def _prepare(
    w: torch.Tensor, fmt: str, group_size: int, input_scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the arguments; the float32 weight with the AWQ scale folded in, and the scale."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
    if fmt == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    w = w.detach().float()
    if input_scale is None:
        return w, None
    input_scale = input_scale.detach().float().to(w.device)
    if input_scale.shape != (w.shape[1],):
        raise ValueError(f"input_scale must have shape ({w.shape[1]},)")
    return w * input_scale[None, :], input_scale


def _finish(
    w: torch.Tensor, out_features: int, in_features: int, input_scale: torch.Tensor | None
) -> torch.Tensor:
    """Drop padding and undo the AWQ scale of a decoded weight."""
    w = w[:out_features, :in_features]
    return w if input_scale is None else w / input_scale[None, :]


def _int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row codes against scales already rounded to the kernel's dtype."""
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127.0, 1.0).to(_int8_scale_dtype(w.device))
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def _int4_scale_dtype(layout: str) -> torch.dtype:
    """Scales in the dtype of the activations the layout's kernel takes (module docstring)."""
    return torch.float32 if layout == "nibble" else torch.bfloat16


def _int8_scale_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 for the CPU kernel; the CUDA kernel computes in float32."""
    return torch.bfloat16 if device.type == "cpu" else torch.float32


def _pack_int8(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes (out, in), padded to the CPU kernel's width there, scales in its dtype."""
    pad = -q.shape[1] % INT8_CPU_COL_ALIGN if q.device.type == "cpu" else 0
    if pad:
        q = torch.cat([q, q.new_zeros(q.shape[0], pad)], dim=1)
    return q.contiguous(), scales.to(_int8_scale_dtype(q.device))


def _int4_codes(
    w: torch.Tensor, group_size: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max codes (out, padded_in) in [0, 15] and (groups, out, 2) (scale, zero) pairs."""
    out_features, in_features = w.shape
    pad = -in_features % group_size
    if pad:
        # Repeat the last column: it lies in the last group, so that group's min and max (and
        # thus its grid) stay those of its real columns; the matmul's zero-padded x ignores it.
        w = torch.cat([w, w[:, -1:].expand(out_features, pad)], dim=1)
    groups = w.view(out_features, -1, group_size)
    lo = groups.amin(dim=2, keepdim=True)
    hi = groups.amax(dim=2, keepdim=True)
    scale = torch.where(hi > lo, (hi - lo) / 15.0, 1.0).to(scale_dtype).float()
    zero = (lo + 8.0 * scale).to(scale_dtype).float()
    codes = torch.round((groups - zero) / scale + 8.0).clamp(0, 15).to(torch.uint8)
    sz = torch.cat([scale, zero], dim=2).permute(1, 0, 2).to(scale_dtype).contiguous()
    return codes.view(out_features, -1), sz


def _decode_int4(codes: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(q - 8) * scale + zero`` in float32, as the kernels compute it."""
    rows = codes.shape[0]
    pairs = sz.float().permute(1, 0, 2)
    w = (codes.float() - 8.0).view(rows, -1, group_size) * pairs[..., :1] + pairs[..., 1:]
    return w.view(rows, -1)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether this torch build registers ``aten::<op>`` for ``device``'s type.

    Asked of the dispatcher rather than assumed from the device: a CPU-only wheel has no CUDA
    kernels, and the weight-only kernels came to each backend in different torch releases.
    """
    key = torch._C._dispatch_key_for_device(device.type)
    return hasattr(torch.ops.aten, op) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"aten::{op}", key
    )


def _int4_layout(device: torch.device) -> str:
    """Which int4 layout a device's kernel reads; "nibble" where torch has none."""
    if device.type == "cpu" and has_kernel("_weight_int4pack_mm_for_cpu", device):
        return "int4_cpu"
    if (
        device.type == "cuda"
        and has_kernel("_weight_int4pack_mm", device)
        and torch.cuda.get_device_capability(device) >= (8, 0)  # tinygemm needs sm80+
    ):
        return "int4_cuda"
    return "nibble"


def _pack_int4(
    codes: torch.Tensor, sz: torch.Tensor, out_features: int, layout: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack codes (>= out_features rows, padded_in) and their (groups, rows, 2) scales."""
    codes = codes[:out_features]
    sz = sz[:, :out_features].to(_int4_scale_dtype(layout))
    if layout == "nibble":
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), sz.contiguous()
    pad = -out_features % INT4_ROW_ALIGN
    if pad:
        # Padding rows decode to exactly 0: code 8, scale 1, zero 0.
        codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
        pad_sz = torch.zeros(sz.shape[0], pad, 2, dtype=sz.dtype, device=sz.device)
        pad_sz[..., 0] = 1.0
        sz = torch.cat([sz, pad_sz], dim=1)
    if layout == "int4_cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        return packed, sz.contiguous()
    # CUDA tinygemm reads nibble pairs with the even column in the high half.
    nibbles = ((codes[:, 0::2] << 4) | codes[:, 1::2]).contiguous()
    inner_k_tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (t * 16) == 0)
    return torch._convert_weight_to_int4pack(nibbles, inner_k_tiles), sz.contiguous()


def unpack_int4_codes(qw: QuantizedWeight) -> torch.Tensor:
    """The (rows, padded_in) uint8 codes of an int4 copy, whatever its layout.

    The kernels' packed layouts are opaque (the CPU one depends on the SIMD width torch was
    built for), so codes are read back through the kernel itself: the identity times the packed
    weight with every (scale, zero) set to (1, 0) is exactly ``q - 8``.
    """
    if qw.layout == "nibble":
        low, high = qw.qweight & 0x0F, qw.qweight >> 4
        return torch.stack([low, high], dim=2).view(qw.qweight.shape[0], -1)
    eye = torch.eye(qw.padded_in_features, dtype=qw.scales.dtype, device=qw.device)
    unit = torch.zeros_like(qw.scales)
    unit[..., 0] = 1.0
    mm = torch._weight_int4pack_mm_for_cpu if qw.layout == "int4_cpu" else torch._weight_int4pack_mm
    return (mm(eye, qw.qweight, qw.group_size, unit).t() + 8).to(torch.uint8)
