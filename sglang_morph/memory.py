"""The device memory budget: weights plus KV cache, in bytes, and the one rule that turns a
budget into KV capacity.

Every part of the project (launcher, runtime, harness, calibration, environment) sizes KV with
``kv_tokens_for``; the budget travels as ``budget_bytes: int`` end to end: KV capacity is
whatever it leaves after the weights in their current formats. On CPU the KV pages above the
limit are given back to the operating system (``sglang_morph.kv.physical``); what is physical
where is in docs/design.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang_morph.config import MorphConfig, parse_bytes
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


def parse_budget(text: str | None, model_path: str) -> int:
    """A budget typed on a command line (``2100000``, ``2MB``), checked against the model
    before any server starts; None gives ``default_budget``. ValueError (BudgetError) with the
    reason otherwise."""
    if text is None:
        return default_budget(model_path)
    budget = parse_bytes(text)
    check_budget(model_path, budget)
    return budget


@dataclass(frozen=True)
class KVPlan:
    """What the launcher reserves for KV before SGLang starts."""

    pool_tokens: int
    fp_tokens: int
    kv_bytes_per_token: int
    weight_bytes: int


def check_budget(
    model_path: str,
    budget_bytes: int,
    dtype: str = "float32",
    device: str | None = None,
    context_len: int | None = None,
) -> ModelInfo:
    """The model's sizes, once ``budget_bytes`` is known to hold its full-precision weights and
    the KV of one maximum-length request; BudgetError otherwise, its message starting with the
    budget so callers prefix their flag.

    The KV floor is one request of the server's context length (``context_len``, the
    launcher's ``--context-length``; the model's own when None): less could never serve a
    request the server accepts. SGLang caps a request one token below the context length
    (``max_req_len``), so this floor also covers the runtime's, which reads that cap live.
    ``dtype`` is SGLang's ``--dtype`` (``model_info.DTYPES``).
    """
    info = read_model_info(model_path, dtype, device)
    context = context_length(model_path, context_len)
    if fp_kv_tokens(info, budget_bytes) < context:
        need = info.weight_bytes + context * info.kv_bytes_per_token
        raise BudgetError(
            f"{budget_bytes} B is too small: the weights take {info.weight_bytes} B and one "
            f"maximum-length request ({context} tokens x {info.kv_bytes_per_token} B) needs "
            f"{need} B in all"
        )
    return info


def plan_kv_tokens(
    model_path: str, cfg: MorphConfig, dtype: str, device: str, context_len: int | None = None
) -> KVPlan:
    """Reserve KV for the largest capacity the budget can ever give.

    The reservation assumes quantized layers cost nothing (an upper bound, so it never runs
    short); the runtime then limits the usable part to what the budget allows exactly.
    Without morphing (policy off) the reservation is just the full-precision capacity.
    ``dtype`` and ``context_len`` are the server's ``--dtype`` and ``--context-length``.
    """
    budget = cfg.memory_budget_bytes
    assert budget is not None
    info = check_budget(model_path, budget, dtype, device, context_len)
    fp_tokens = fp_kv_tokens(info, budget)
    if not cfg.enabled:
        return KVPlan(fp_tokens, fp_tokens, info.kv_bytes_per_token, info.weight_bytes)
    swappable = info.layer_params * info.dtype_bytes * info.num_layers
    pool = kv_tokens_for(budget, info.weight_bytes - swappable, info.kv_bytes_per_token)
    return KVPlan(pool, fp_tokens, info.kv_bytes_per_token, info.weight_bytes)
