"""Weight-only quantization: error bounds, every kernel path against a float64 reference,
byte accounting, AWQ against round-to-nearest, and SGLang's quant_method hook."""

from __future__ import annotations

import pytest
import torch

from sglang_morph.quant import (
    WeightOnlyLinearMethod,
    kernel_name,
    quantize_weight,
    quantized_matmul,
    search_awq_scale,
)
from sglang_morph.quant import quantize as quantize_module
from sglang_morph.quant.quantize import fake_quantize, unpack_int4_codes

# stories260K's fused SGLang linears (qkv, o, gate_up, down) plus awkward shapes that need
# padding on both axes.
SHAPES = [(128, 64), (64, 64), (344, 64), (64, 172), (7, 13), (100, 300)]


pytestmark = pytest.mark.usefixtures("one_thread")


def _weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=generator)
    w[:, 0] *= 6  # an outlier column, as real weights have
    return w


def _kernel_operands(x: torch.Tensor, qw) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernel multiplies, in float64: the activations as it receives them (AWQ
    scale divided out, cast to the kernel's dtype) and the stored (AWQ-scaled) weight."""
    w = qw.dequantize().double()
    if qw.input_scale is not None:
        x = x / qw.input_scale
        w = w * qw.input_scale.double()
    return x.to(qw.scales.dtype).double(), w


def _assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, qw, bias=None) -> None:
    """``y`` against a float64 dequantize-then-matmul reference."""
    xk, wk = _kernel_operands(x, qw)
    ref = xk @ wk.t()
    # The kernels round their output to the activation dtype: allow a few of its ulps of the
    # magnitudes summed (|x| |W|^T), which any wrong code, scale or padding far exceeds.
    eps = torch.finfo(qw.scales.dtype).eps
    bound = 4 * eps * (xk.abs() @ wk.abs().t()) + 1e-6
    if bias is not None:
        ref = ref + bias.double()
        bound = bound + 4 * eps * bias.double().abs()
    assert y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_error_within_half_a_step(shape: tuple[int, int]) -> None:
    w = _weight(*shape)
    qw = quantize_weight(w, "int8")
    step = qw.scales.float()[:, None]
    assert qw.group_size is None
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-7).all()


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4_error_within_half_a_step(shape: tuple[int, int], group_size: int) -> None:
    w = _weight(*shape)
    qw = quantize_weight(w, "int4", group_size)
    sz = qw.scales.float()[:, : shape[0]]
    scale = sz[..., 0].t().repeat_interleave(group_size, dim=1)[:, : shape[1]]
    zero = sz[..., 1].t().repeat_interleave(group_size, dim=1)[:, : shape[1]]
    # Half a grid step, plus the bfloat16 rounding of the stored zero and scale.
    bound = scale / 2 + (zero.abs() + 15 * scale) * 2**-8
    assert ((qw.dequantize() - w).abs() <= bound).all()
    # Asymmetric min-max: every group's extremes land on the grid's ends, codes 0 and 15.
    groups = unpack_int4_codes(qw)[: shape[0]].view(shape[0], -1, group_size)
    assert (groups.amin(dim=2) == 0).all() and (groups.amax(dim=2) == 15).all()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_packed_kernels_match_reference(shape: tuple[int, int], fmt: str) -> None:
    w = _weight(*shape)
    qw = quantize_weight(w, fmt, 32)
    assert kernel_name(qw) == ("int8pack_mm" if fmt == "int8" else "int4pack_mm_for_cpu")
    generator = torch.Generator().manual_seed(1)
    bias = torch.randn(shape[0], generator=generator)
    for tokens in (1, 5, 33):
        x = torch.randn(2, tokens, shape[1], generator=generator)
        y = quantized_matmul(x, qw, bias)
        assert y.dtype == torch.float32 and y.shape == (2, tokens, shape[0])
        _assert_close_to_reference(y.reshape(-1, shape[0]), x.reshape(-1, shape[1]), qw, bias)


def test_awq_input_scale_is_folded_into_the_kernel() -> None:
    w = _weight(64, 172)
    scale = torch.rand(172, generator=torch.Generator().manual_seed(2)) + 0.5
    for fmt in ("int8", "int4"):
        qw = quantize_weight(w, fmt, 32, input_scale=scale)
        assert torch.equal(qw.dequantize(), fake_quantize(w, fmt, 32, scale))
        x = torch.randn(9, 172, generator=torch.Generator().manual_seed(3))
        _assert_close_to_reference(quantized_matmul(x, qw), x, qw)


def test_devices_without_a_kernel_fall_back_to_dequant_matmul(monkeypatch) -> None:
    w = _weight(64, 172)
    monkeypatch.setattr(quantize_module, "_int4_layout", lambda device: "nibble")
    qw = quantize_weight(w, "int4", 64)
    assert qw.layout == "nibble" and kernel_name(qw) == "dequant_matmul"
    x = torch.randn(3, 172, generator=torch.Generator().manual_seed(4))
    reference = x.double() @ qw.dequantize().double().t()  # float32 throughout: no bf16 here
    torch.testing.assert_close(quantized_matmul(x, qw).double(), reference, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    repacked = qw.to("cpu")  # the CPU kernel exists again: repacked into its layout
    assert repacked.layout == "int4_cpu" and kernel_name(repacked) == "int4pack_mm_for_cpu"
    assert torch.equal(unpack_int4_codes(repacked)[:64], unpack_int4_codes(qw))
    # Same codes; only the (scale, zero) pairs were rounded to the CPU kernel's bfloat16.
    drift = (repacked.dequantize() - qw.dequantize()).abs().max()
    assert drift <= 2**-7 * qw.dequantize().abs().max()


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_formula(shape: tuple[int, int]) -> None:
    n, k = shape
    w = _weight(n, k)
    # int8: codes padded to 16 columns (CPU kernel), one bfloat16 scale per row.
    assert quantize_weight(w, "int8").nbytes() == n * _ceil_to(k, 16) + 2 * n
    for g in (32, 64, 128):
        rows, cols = _ceil_to(n, 16), _ceil_to(k, g)
        # int4: two codes per byte, one bfloat16 (scale, zero) pair per group and row.
        expected = rows * cols // 2 + (cols // g) * rows * 2 * 2
        assert quantize_weight(w, "int4", g).nbytes() == expected
        awq = quantize_weight(w, "int4", g, input_scale=torch.ones(k))
        assert awq.nbytes() == expected + 4 * k


def test_awq_beats_rtn_on_outlier_channels() -> None:
    generator = torch.Generator().manual_seed(5)
    w = torch.randn(256, 128, generator=generator)
    x = torch.randn(2048, 128, generator=generator)
    x[:, [3, 40, 77, 100]] *= 25  # salient input channels
    reference = x @ w.t()
    for fmt in ("int4", "int8"):
        scale = search_awq_scale(w, x, fmt, 32)
        assert scale.shape == (128,) and (scale > 0).all()
        rtn = (x @ fake_quantize(w, fmt, 32).t() - reference).pow(2).mean()
        awq = (x @ fake_quantize(w, fmt, 32, scale).t() - reference).pow(2).mean()
        assert awq < 0.8 * rtn, (fmt, float(awq), float(rtn))
        assert scale[[3, 40, 77, 100]].min() > scale.median()


def test_linear_method_apply_matches_reference() -> None:
    w = _weight(344, 64)
    bias = torch.randn(344, generator=torch.Generator().manual_seed(6))
    layer = torch.nn.Linear(64, 344)  # SGLang passes the layer; its weight is not read
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(7))
    for fmt in ("int8", "int4"):
        qw = quantize_weight(w, fmt, 32)
        method = WeightOnlyLinearMethod(qw)
        _assert_close_to_reference(method.apply(layer, x), x, qw)
        _assert_close_to_reference(method.apply(layer, x, bias=bias), x, qw, bias)


def test_invalid_arguments_are_rejected() -> None:
    w = _weight(16, 32)
    for bad in (w.flatten(), w[None]):
        with pytest.raises(ValueError, match="2-D"):
            quantize_weight(bad, "int8")
        with pytest.raises(ValueError, match="2-D"):
            fake_quantize(bad, "int4")
    with pytest.raises(ValueError, match="format"):
        quantize_weight(w, "int3")
    with pytest.raises(ValueError, match="format"):
        fake_quantize(w, "fp")
    with pytest.raises(ValueError, match="group size"):
        quantize_weight(w, "int4", 16)
    with pytest.raises(ValueError, match="input_scale"):
        quantize_weight(w, "int8", input_scale=torch.ones(31))


def test_kernels_are_found_through_the_dispatcher() -> None:
    cpu = torch.device("cpu")
    assert quantize_module.has_kernel("_weight_int8pack_mm", cpu)
    assert quantize_module.has_kernel("_weight_int4pack_mm_for_cpu", cpu)
    # torch 2.13 has tinygemm (_weight_int4pack_mm) for CUDA only; the CPU one is _for_cpu.
    assert not quantize_module.has_kernel("_weight_int4pack_mm", cpu)
    assert not quantize_module.has_kernel("no_such_op", cpu)
