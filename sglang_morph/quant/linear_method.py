"""SGLang's ``quant_method`` interface over a weight-only quantized copy.

SGLang's ``LinearBase.forward`` calls ``self.quant_method.apply(self, x, bias)``, so a layer
swap only replaces a linear's ``quant_method`` (and frees its full-precision weight); the model
code and CUDA graphs' Python side stay untouched. The class is duck-typed rather than derived
from SGLang's ``LinearMethodBase`` because importing SGLang costs about 20 s, which every test
and offline tool using this module would pay.
"""

from __future__ import annotations

import torch

from sglang_morph.quant.matmul import quantized_matmul
from sglang_morph.quant.quantize import QuantizedWeight


class WeightOnlyLinearMethod:
    """Computes a linear layer from ``qw`` instead of the layer's own weight."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's output for ``x``; ``layer`` is unused (its weight may already be freed)."""
        return quantized_matmul(x, self.qw, bias)
