"""Weight-only int8/int4 quantization, its kernels, AWQ scale search and SGLang's linear hook."""

from sglang_morph.quant.awq import search_awq_scale
from sglang_morph.quant.linear_method import WeightOnlyLinearMethod
from sglang_morph.quant.matmul import kernel_name, quantized_matmul
from sglang_morph.quant.quantize import QuantizedWeight, quantize_weight

__all__ = [
    "QuantizedWeight",
    "WeightOnlyLinearMethod",
    "kernel_name",
    "quantize_weight",
    "quantized_matmul",
    "search_awq_scale",
]
