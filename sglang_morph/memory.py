"""The device memory budget: weights plus KV cache, in bytes, and the one rule that turns a
budget into KV capacity.

Every part of the project (launcher, runtime, harness, calibration, environment) sizes KV with
``kv_tokens_for``; the budget travels as ``budget_bytes: int`` end to end. On CPU the budget is
bookkeeping that makes the same pressure appear as on a GPU: KV capacity is whatever it leaves
after the weights in their current formats (see docs/design.md for what is physical where).
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_morph.config import MorphConfig
from sglang_morph.model_info import ModelInfo, context_length, read_model_info

DEFAULT_FP_KV_TOKENS = 768
"""KV tokens the default budget gives the full-precision model: with stories260K's ~100-token
prompts, about seven requests at once, so a burst queues in fp (the pressure morphing relieves)."""


def kv_tokens_for(budget_bytes: int, weight_bytes: int, kv_bytes_per_token: int) -> int:
    """KV tokens ``budget_bytes`` leaves after ``weight_bytes`` of weights (never negative)."""
    return max(0, (budget_bytes - weight_bytes) // kv_bytes_per_token)


def fp_kv_tokens(info: ModelInfo, budget_bytes: int) -> int:
    """KV tokens the budget leaves the model with every layer in full precision."""
    return kv_tokens_for(budget_bytes, info.weight_bytes, info.kv_bytes_per_token)


def default_budget(model_path: str, fp_kv_tokens: int = DEFAULT_FP_KV_TOKENS) -> int:
    """The budget shared by the evaluation, the calibration, the engine environment and the
    benchmarks: the weights as SGLang serves them plus ``fp_kv_tokens`` of full-precision KV."""
    return read_model_info(model_path).budget_bytes(fp_kv_tokens)


class BudgetError(ValueError):
    """A memory budget too small to serve the model."""


@dataclass(frozen=True)
class KVPlan:
    """What the launcher reserves for KV before SGLang starts."""

    pool_tokens: int
    fp_tokens: int
    kv_bytes_per_token: int
    weight_bytes: int


def plan_kv_tokens(model_path: str, cfg: MorphConfig, dtype: str, device: str) -> KVPlan:
    """Reserve KV for the largest capacity the budget can ever give.

    The reservation assumes quantized layers cost nothing (an upper bound, so it never runs
    short); the runtime then limits the usable part to what the budget allows exactly.
    Without morphing (policy off) the reservation is just the full-precision capacity.
    """
    info = read_model_info(model_path, dtype, device)
    budget = cfg.memory_budget_bytes
    assert budget is not None
    fp_tokens = fp_kv_tokens(info, budget)
    context = context_length(model_path)
    if fp_tokens < context:
        need = info.weight_bytes + context * info.kv_bytes_per_token
        raise BudgetError(
            f"--morph-memory-budget {budget} B is too small: the weights take "
            f"{info.weight_bytes} B and one full context ({context} tokens x "
            f"{info.kv_bytes_per_token} B) needs {need} B in all"
        )
    if not cfg.enabled:
        return KVPlan(fp_tokens, fp_tokens, info.kv_bytes_per_token, info.weight_bytes)
    swappable = info.layer_params * info.dtype_bytes * info.num_layers
    pool = kv_tokens_for(budget, info.weight_bytes - swappable, info.kv_bytes_per_token)
    return KVPlan(pool, fp_tokens, info.kv_bytes_per_token, info.weight_bytes)
