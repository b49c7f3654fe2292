"""Model quality under any per-layer format assignment: perplexity and KL to full precision.

MorphServe's claim is that swapping the least important layers first costs little quality.
``QualityEvaluator`` measures a model on the TinyStories sample (each story on its own, within
the 512-token context); ``evaluate_formats`` is what the evaluation harness asks once per layer
configuration a run served; ``run_quality`` gives the curves for k = 0..L quantized layers,
on the sample's test part (the profiler chose the shipped order on its validation part), under
the profile's two candidate orders ``lis`` (greedy on the final hidden state's cosine) and
``greedy-kl`` (greedy on the output's KL), ``last_to_first`` and ``random`` (mean over seeds,
and the exact mean over all orders). k = 0 (nothing quantized) and k = L (everything
quantized) are the same model in every order, so the curves meet there by construction. KL is
the mean per-token KL(full precision || quantized) of the next-token distributions, which sees
changes perplexity can average away.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import track

from sglang_morph.config import GROUP_SIZES, QUANT_METHODS, QUANTIZED_FORMATS
from sglang_morph.data import DEFAULT_MODEL, resolve_model
from sglang_morph.hf_model import (
    ActScales,
    HFLayerQuantizer,
    evaluation_text,
    load_model,
    load_tokenizer,
    next_token_logprobs,
    sample_text,
    score_text,
    search_act_scales,
    tokenize_stories,
)
from sglang_morph.profile_file import act_scale_lists, layer_order

_CONSOLE = Console(stderr=True)
MAX_LAYERS_ALL_ORDERS = 8


class QualityEvaluator:
    """Perplexity and KL of any per-layer format assignment on the evaluation text."""

    @torch.no_grad()
    def __init__(
        self,
        model_path: str | None = None,
        group_size: int = 32,
        quant_method: str = "rtn",
        profile: dict | None = None,
        text_path: str | Path | None = None,
        part: str = "all",
    ) -> None:
        """``text_path``: ``<|endoftext|>``-separated evaluation text, used whole (default: the
        TinyStories sample, the model's own domain, whole or its ``part``: "validation" or
        "test", see ``hf_model.evaluation_text``). With ``quant_method="rtn"`` a profile's AWQ
        scales are ignored, so a comparison of the two methods can share one profile."""
        path = resolve_model(model_path)
        model = load_model(path)
        tokenizer = load_tokenizer(path)
        if text_path is None:
            self.text = evaluation_text(tokenizer, part)
        else:
            self.text = tokenize_stories(text_path, tokenizer)
        self._fp_logprobs = [next_token_logprobs(model, seq) for seq in self.text.sequences]
        self._awq = quant_method == "awq"
        scales = _profile_scales(profile, group_size) if self._awq else {}
        self.swapper = HFLayerQuantizer(model, group_size, scales)
        self.num_layers = self.swapper.num_layers
        self._calibration: list[torch.Tensor] | None = None

    @torch.no_grad()
    def evaluate(self, layer_formats: dict[int, str]) -> dict[str, float]:
        """{"ppl", "kl"} with the given layers quantized (the others full precision)."""
        self._set_formats(layer_formats)
        try:
            return score_text(self.swapper.model, self.text.sequences, self._fp_logprobs)
        finally:
            self.swapper.set_formats({})

    @torch.no_grad()
    def logprobs(self, layer_formats: dict[int, str], seq: torch.Tensor) -> torch.Tensor:
        """``next_token_logprobs`` of any sequence with the given layers quantized: what the
        served-quality measure reads for the configuration that served a token."""
        self._set_formats(layer_formats)
        try:
            return next_token_logprobs(self.swapper.model, seq)
        finally:
            self.swapper.set_formats({})

    def _set_formats(self, layer_formats: dict[int, str]) -> None:
        if self._awq:
            self._search_missing_scales(set(layer_formats.values()) & set(QUANTIZED_FORMATS))
        self.swapper.set_formats(layer_formats)

    def _search_missing_scales(self, formats: set[str]) -> None:
        """AWQ scales for formats the profile has none for, searched on the default
        calibration text (sampled from the model, never the evaluation text)."""
        model = self.swapper.model  # full precision between evaluations
        for fmt in sorted(formats - set(self.swapper.act_scales)):
            if self._calibration is None:  # sampled once, shared by the formats
                self._calibration = sample_text(model).sequences
            self.swapper.act_scales[fmt] = search_act_scales(
                model, self._calibration, fmt, self.swapper.group_size
            )


def _profile_scales(profile: dict | None, group_size: int) -> dict[str, ActScales]:
    """A profile's AWQ scales as tensors, keyed by its format, if it has them for this group
    size."""
    scales = None if profile is None else act_scale_lists(profile)
    if not scales or profile.get("group_size") != group_size:
        return {}
    tensors = {
        int(layer): {group: torch.tensor(values) for group, values in groups.items()}
        for layer, groups in scales.items()
    }
    return {profile["format"]: tensors}


@functools.lru_cache(maxsize=4)
def _evaluator(
    model_path: str, group_size: int, quant_method: str, profile_json: str | None
) -> QualityEvaluator:
    profile = None if profile_json is None else json.loads(profile_json)
    return QualityEvaluator(model_path, group_size, quant_method, profile)


def shared_evaluator(
    model_path: str | None,
    group_size: int = 32,
    quant_method: str = "rtn",
    profile: dict | None = None,
) -> QualityEvaluator:
    """The evaluator for these settings, loaded once per process: the model, reference
    distributions and AWQ scales are reused across calls with the same model, group size,
    method and profile."""
    profile_json = None if profile is None else json.dumps(profile, sort_keys=True)
    return _evaluator(resolve_model(model_path), group_size, quant_method, profile_json)


def evaluate_formats(
    model_path: str,
    layer_formats: dict[int, str],
    group_size: int = 32,
    quant_method: str = "rtn",
    profile: dict | None = None,
) -> dict:
    """{"ppl", "kl"} for an arbitrary per-layer assignment ("fp", "int8" or "int4" per layer)
    on the whole evaluation sample (``shared_evaluator``)."""
    return shared_evaluator(model_path, group_size, quant_method, profile).evaluate(layer_formats)


def _curve(
    evaluate: Callable[[frozenset[int]], dict[str, float]], order: list[int]
) -> tuple[list[float], list[float]]:
    """ppl and kl for k = 0..L layers of ``order`` quantized."""
    results = [evaluate(frozenset(order[:k])) for k in range(len(order) + 1)]
    return [r["ppl"] for r in results], [r["kl"] for r in results]


def _all_orders_mean(
    evaluate: Callable[[frozenset[int]], dict[str, float]], layers: int
) -> dict[str, list[float]] | None:
    """The exact mean over all L! random orders, free of the seeds' luck; None past 8 layers.

    A uniformly random order's first k layers are a uniformly random k-subset, so the mean
    over orders at k is the mean over all k-subsets (2^L evaluations in all).
    """
    if layers > MAX_LAYERS_ALL_ORDERS:
        return None
    out: dict[str, list[float]] = {"ppl": [], "kl": []}
    for k in range(layers + 1):
        results = [evaluate(frozenset(c)) for c in itertools.combinations(range(layers), k)]
        for key in out:
            out[key].append(sum(r[key] for r in results) / len(results))
    return out


PROFILE_ORDERS = ("lis", "greedy-kl")
"""The candidate orders every profile of ``python -m sglang_morph.profile`` carries."""


def profile_orders(profile: dict) -> dict[str, list[int]]:
    """The profile's candidate orders by method; ValueError naming what is missing (a profile
    made before methods existed carries neither)."""
    orders = profile.get("orders") or {}
    missing = [name for name in PROFILE_ORDERS if name not in orders]
    if missing:
        raise ValueError(
            f"the profile has no {', '.join(missing)} order; make it again with "
            "`python -m sglang_morph.profile`, which records both"
        )
    return {name: [int(i) for i in orders[name]] for name in PROFILE_ORDERS}


def random_orders(layers: int, seeds: int) -> list[list[int]]:
    """One shuffled order per seed 0..seeds-1."""
    orders = []
    for seed in range(seeds):
        order = list(range(layers))
        random.Random(seed).shuffle(order)
        orders.append(order)
    return orders


def run_quality(
    model_path: str | None,
    fmt: str,
    group_size: int,
    quant_method: str,
    profile: dict,
    seeds: int,
    text_path: str | Path | None = None,
    part: str = "test",
) -> dict:
    """The quality report: ppl and kl curves per order (see the module docstring), on ``part``
    of the evaluation sample unless ``text_path`` names another text."""
    evaluator = QualityEvaluator(model_path, group_size, quant_method, profile, text_path, part)
    layers = evaluator.num_layers
    if profile["num_layers"] != layers:
        raise ValueError(
            f"the profile is for {profile['num_layers']} layers; the model has {layers}"
        )

    @functools.cache
    def evaluate(quantized: frozenset[int]) -> dict[str, float]:
        return evaluator.evaluate({i: fmt for i in quantized})

    named = {**profile_orders(profile), "last_to_first": list(range(layers - 1, -1, -1))}
    shuffled = random_orders(layers, seeds)
    jobs = [*named.items(), *((f"random/{s}", o) for s, o in enumerate(shuffled))]
    curves = {
        name: _curve(evaluate, order)
        for name, order in track(jobs, "quality curves", console=_CONSOLE)
    }
    random_ppl = [curves[f"random/{s}"][0] for s in range(seeds)]
    random_kl = [curves[f"random/{s}"][1] for s in range(seeds)]
    orders: dict[str, dict] = {
        name: {"order": order, "ppl": curves[name][0], "kl": curves[name][1]}
        for name, order in named.items()
    }
    orders["random"] = {
        "seeds": list(range(seeds)),
        "orders": shuffled,
        "ppl": [sum(col) / seeds for col in zip(*random_ppl, strict=True)],
        "kl": [sum(col) / seeds for col in zip(*random_kl, strict=True)],
        "all_orders": _all_orders_mean(evaluate, layers),
    }
    return {
        "model": model_path or DEFAULT_MODEL,
        "format": fmt,
        "group_size": group_size,
        "quant_method": quant_method,
        "text": {
            "source": evaluator.text.source,
            "sha256": evaluator.text.sha256,
            "tokens": evaluator.text.tokens,
            "sequences": len(evaluator.text.sequences),
        },
        "profile": {
            "sha256": hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest(),
            "format": profile.get("format"),
            "quant_method": profile.get("quant_method"),
            "calibration": profile.get("calibration"),
            "method": profile.get("method"),
            "order_method": profile.get("order_method"),
            "layer_order": layer_order(profile),
        },
        "orders": orders,
    }


def compare_methods(
    model_path: str | None = None,
    group_sizes: tuple[int, ...] = GROUP_SIZES,
    text_path: str | Path | None = None,
) -> dict:
    """ppl and KL with every layer quantized, per format, method and int4 group size.

    The worst case of any order (k = L) is where formats and methods differ most, so this is
    the comparison behind the int8 and AWQ-versus-RTN targets. AWQ scales are searched on the
    default calibration text (sampled from the model), never on the evaluation text.
    """
    rows, fp, text = [], None, None
    configs = list(itertools.product(QUANT_METHODS, group_sizes))
    for method, group_size in track(configs, "methods", console=_CONSOLE):
        evaluator = QualityEvaluator(model_path, group_size, method, None, text_path)
        if fp is None:
            fp, text = evaluator.evaluate({}), evaluator.text
        # int8 has one scale per output channel: the group size does not apply.
        formats = QUANTIZED_FORMATS if group_size == group_sizes[0] else ("int4",)
        for fmt in formats:
            result = evaluator.evaluate({i: fmt for i in range(evaluator.num_layers)})
            rows.append(
                {
                    "format": fmt,
                    "quant_method": method,
                    "group_size": group_size if fmt == "int4" else None,
                    **result,
                    "ppl_change": result["ppl"] / fp["ppl"] - 1,
                }
            )
    return {
        "model": model_path or DEFAULT_MODEL,
        "text": {"source": text.source, "sha256": text.sha256, "tokens": text.tokens},
        "fp": fp,
        "all_layers": rows,
    }
