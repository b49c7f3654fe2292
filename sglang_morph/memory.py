"""The device memory budget: weights plus KV cache, in bytes.

On a GPU the budget bounds physical device memory; on a CPU it makes the same pressure appear:
KV capacity is whatever the budget leaves after the weights in their current formats.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_morph.config import MorphConfig
from sglang_morph.model_info import read_model_info

DEFAULT_FP_KV_TOKENS = 768
"""KV tokens the default budget gives the full-precision model: with stories260K's ~100-token
prompts, about seven requests at once, so a burst queues in fp (the pressure morphing relieves)."""


def default_budget(model_path: str, fp_kv_tokens: int = DEFAULT_FP_KV_TOKENS) -> int:
    """The budget shared by the evaluation, the calibration and the engine environment: the
    weights as SGLang serves them plus ``fp_kv_tokens`` of full-precision KV."""
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
    fp_tokens = (budget - info.weight_bytes) // info.kv_bytes_per_token
    context = _context_len(model_path)
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
    pool = (budget - info.weight_bytes + swappable) // info.kv_bytes_per_token
    return KVPlan(pool, fp_tokens, info.kv_bytes_per_token, info.weight_bytes)


def _context_len(model_path: str) -> int:
    import json
    from pathlib import Path

    cfg = json.loads((Path(model_path) / "config.json").read_text())
    return int(cfg.get("max_position_embeddings", 2048))


def capacity_for(budget: int, weight_bytes: int, kv_bytes_per_token: int) -> int:
    """KV tokens the budget leaves after ``weight_bytes`` of weights."""
    return max(0, (budget - weight_bytes) // kv_bytes_per_token)
