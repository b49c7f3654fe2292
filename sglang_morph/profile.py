"""Offline layer-importance profile: which layers to quantize first, and what each costs.

MorphServe swaps the least important layers first. This measures, on calibration text:

* ``io_cosine``: cosine between a layer's input and output hidden states (high: the layer
  changes little, so errors in it matter less);
* ``quant_output_cosine``: cosine between a layer's full-precision and quantized outputs on the
  same input (how much quantization perturbs that layer alone);
* ``greedy`` (method ``lis``): the paper's greedy order. Step j quantizes, on top of the j-1
  layers already chosen, each remaining layer in turn and keeps the one whose addition leaves
  the final hidden state (the LM head's input) closest to full precision. Conditioning on the
  chosen set catches interactions that per-layer scores miss;
* ``greedy_kl`` (method ``greedy-kl``): the same greedy search scored on what is served, the
  output: each step keeps the layer whose addition gives the least mean per-token KL(full
  precision || quantized) of the next-token distributions;
* ``selection`` (method ``best``, the default): both orders scored on the validation part of
  the evaluation sample (``hf_model.evaluation_text``; never its test part, which ``python -m
  eval.quality`` reports on), keeping the order with the lower mean log-perplexity over the
  k = 1..L-1 that differ between orders (a server may sit at any k).

Both orders are always built (``orders``, so ``python -m eval.quality`` can compare them);
``method`` is the one asked for, ``order_method`` the method whose order ships as
``layer_order`` (for ``best``, the one chosen).

It also records each layer's bytes per format and the latency of its four SGLang linears per
format and token count (attention and norms do not depend on the format), for the runtime and
the simulator, and with AWQ the searched input scales so the server reuses them.

Calibration text defaults to stories sampled from the full-precision model itself with a fixed
seed (see ``hf_model.sample_text``), never the evaluation text. A model, calibration file or
output path that cannot be used exits with status 2 and one line before any computation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import track
from transformers import PreTrainedTokenizerBase

from sglang_morph.cli import UsageError, exit_with, output_path, positive_int, read_input
from sglang_morph.config import QUANTIZED_FORMATS, add_quant_args
from sglang_morph.data import DEFAULT_MODEL, resolve_model
from sglang_morph.hf_model import (
    SGLANG_LINEAR_GROUPS,
    ActScales,
    HFLayerQuantizer,
    TokenText,
    decoder_layers,
    evaluation_text,
    load_model,
    load_tokenizer,
    next_token_logprobs,
    sample_text,
    score_text,
    search_act_scales,
    tokenize_stories,
)
from sglang_morph.model_info import read_config
from sglang_morph.profile_file import act_scale_lists
from sglang_morph.quant.matmul import quantized_matmul
from sglang_morph.quant.quantize import quantize_weight

TOKEN_COUNTS = (1, 8, 32, 128)
METHODS = ("lis", "greedy-kl", "best")
_CONSOLE = Console(stderr=True)


def act_scales_from_profile(profile: dict) -> ActScales | None:
    """The AWQ input scales a profile carries, as tensors; None for a round-to-nearest one."""
    scales = act_scale_lists(profile)
    if not scales:
        return None
    return {
        int(layer): {group: torch.tensor(values) for group, values in groups.items()}
        for layer, groups in scales.items()
    }


def _cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Mean per-token cosine similarity over all tokens of all sequences."""
    return F.cosine_similarity(torch.cat(a), torch.cat(b), dim=-1).mean().item()


class _Runner:
    """Runs the calibration text under a format assignment, capturing hidden states."""

    def __init__(self, swapper: HFLayerQuantizer, text: TokenText, fmt: str) -> None:
        self.swapper, self.text, self.fmt = swapper, text, fmt
        self._finals: dict[frozenset[int], list[torch.Tensor]] = {}

    @torch.no_grad()
    def run(self, quantized: frozenset[int]) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
        """Final hidden states and (input, then each layer's output) per sequence."""
        self.swapper.set_formats({i: self.fmt for i in quantized})
        model = self.swapper.model
        layers = decoder_layers(model)
        states: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]

        def keep(index: int) -> Callable[..., None]:
            def hook(_m: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                if index == 0:
                    states[0].append(args[0][0])
                states[index + 1].append(output[0])

            return hook

        handles = [layer.register_forward_hook(keep(i)) for i, layer in enumerate(layers)]
        try:
            finals = [model.model(seq[None]).last_hidden_state[0] for seq in self.text.sequences]
        finally:
            for handle in handles:
                handle.remove()
        self._finals[quantized] = finals
        return finals, states

    def finals(self, quantized: frozenset[int]) -> list[torch.Tensor]:
        if quantized not in self._finals:
            self.run(quantized)
        return self._finals[quantized]


def _layer_latency(
    swapper: HFLayerQuantizer,
    layer_id: int,
    fmt: str,
    token_counts: tuple[int, ...],
    repeats: int,
) -> dict[str, float]:
    """Median seconds for the layer's four SGLang linears at each token count."""
    weights = [swapper.fp_weight(layer_id, group) for group in SGLANG_LINEAR_GROUPS]
    if fmt == "fp":
        calls = [lambda x, w=w: F.linear(x, w) for w in weights]
    else:
        qws = [swapper.quantized_weight(layer_id, group, fmt) for group in SGLANG_LINEAR_GROUPS]
        calls = [lambda x, qw=qw: quantized_matmul(x, qw) for qw in qws]
    generator = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for tokens in token_counts:
        inputs = [torch.randn(tokens, w.shape[1], generator=generator) for w in weights]
        times = []
        for rep in range(repeats + 3):
            start = time.perf_counter()
            for call, x in zip(calls, inputs, strict=True):
                call(x)
            if rep >= 3:  # the first calls warm caches and allocators
                times.append(time.perf_counter() - start)
        out[str(tokens)] = statistics.median(times)
    return out


def _layer_bytes(
    swapper: HFLayerQuantizer, layer_id: int, act_scales: ActScales | None
) -> dict[str, int]:
    """Resident bytes of the layer's four SGLang linears per format (fp: float32).

    With AWQ every quantized format carries an input scale; its size does not depend on the
    values, so the profile format's scales size the other format too.
    """
    weights = {g: swapper.fp_weight(layer_id, g) for g in SGLANG_LINEAR_GROUPS}
    out = {"fp": sum(w.numel() * 4 for w in weights.values())}
    for fmt in QUANTIZED_FORMATS:
        out[fmt] = sum(
            quantize_weight(
                w, fmt, swapper.group_size, None if act_scales is None else act_scales[layer_id][g]
            ).nbytes()
            for g, w in weights.items()
        )
    return out


@torch.no_grad()
def build_profile(
    model_path: str | None = None,
    fmt: str = "int4",
    group_size: int = 32,
    quant_method: str = "rtn",
    calibration: str | Path | None = None,
    token_counts: tuple[int, ...] = TOKEN_COUNTS,
    latency_repeats: int = 20,
    progress: bool = True,
    samples: int = 16,
    seed: int = 0,
    method: str = "best",
) -> dict:
    """The profile JSON of ``model_path`` (default: the embedded stories260K), its order built
    by ``method`` (one of ``METHODS``, module docstring).

    Without a ``calibration`` file the text is ``samples`` stories of up to 256 tokens sampled
    from the model with ``seed``: more samples or another seed show whether the order is a
    property of the model or of one calibration sample.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; accepted: {', '.join(METHODS)}")
    path = resolve_model(model_path)
    model = load_model(path)
    if calibration is None:
        text = sample_text(model, num_sequences=samples, seed=seed)
    else:
        text = tokenize_stories(calibration, load_tokenizer(path))
    act_scales = None
    if quant_method == "awq":
        act_scales = search_act_scales(model, text.sequences, fmt, group_size)
    swapper = HFLayerQuantizer(model, group_size, {fmt: act_scales} if act_scales else None)
    runner = _Runner(swapper, text, fmt)
    layers = _layer_entries(runner, act_scales, token_counts, latency_repeats, progress)
    searches: dict = {
        "greedy": _greedy_order(runner, progress),
        "greedy_kl": greedy_kl_order(swapper, text.sequences, fmt, progress),
    }
    orders = {
        "lis": [entry["layer"] for entry in searches["greedy"]],
        "greedy-kl": [entry["layer"] for entry in searches["greedy_kl"]],
    }
    chosen = method
    if method == "best":
        searches["selection"] = _select(swapper, load_tokenizer(path), fmt, orders)
        chosen = searches["selection"]["chosen"]
    swapper.set_formats({})

    profile = {
        "model": model_path or DEFAULT_MODEL,
        "format": fmt,
        "group_size": group_size,
        "quant_method": quant_method,
        "calibration": {"source": text.source, "sha256": text.sha256, "tokens": text.tokens},
        "num_layers": swapper.num_layers,
        "latency_setup": {
            "scope": "the layer's four SGLang linears (fused shapes), random activations",
            "statistic": f"median of {latency_repeats} after 3 warm-up calls",
            "torch_threads": torch.get_num_threads(),
        },
        "layers": layers,
        **searches,
        "method": method,
        "order_method": chosen,
        "orders": orders,
        "layer_order": orders[chosen],
    }
    if act_scales is not None:
        profile["act_scales"] = {
            str(i): {g: s.tolist() for g, s in groups.items()} for i, groups in act_scales.items()
        }
    return profile


def _layer_entries(
    runner: _Runner,
    act_scales: ActScales | None,
    token_counts: tuple[int, ...],
    latency_repeats: int,
    progress: bool,
) -> list[dict]:
    """Each layer alone: how much it changes its input, how much quantizing it alone perturbs
    its output, its bytes and its linears' latency per format."""
    swapper = runner.swapper
    _, fp_states = runner.run(frozenset())
    layers = []
    for i in track(
        range(swapper.num_layers), "per-layer scores", disable=not progress, console=_CONSOLE
    ):
        _, q_states = runner.run(frozenset({i}))
        layers.append(
            {
                "id": i,
                "io_cosine": _cosine(fp_states[i], fp_states[i + 1]),
                "quant_output_cosine": _cosine(fp_states[i + 1], q_states[i + 1]),
                "bytes": _layer_bytes(swapper, i, act_scales),
                "latency_s": {
                    f: _layer_latency(swapper, i, f, token_counts, latency_repeats)
                    for f in ("fp", *QUANTIZED_FORMATS)
                },
            }
        )
    return layers


def _greedy_order(runner: _Runner, progress: bool) -> list[dict]:
    """The paper's greedy order (module docstring): at each step the layer whose quantization,
    on top of those already chosen, leaves the final hidden state closest to full precision
    (ties to the lower id)."""
    num_layers = runner.swapper.num_layers
    fp_final = runner.finals(frozenset())
    chosen: list[int] = []
    greedy = []
    for step in track(
        range(1, num_layers + 1), "greedy order", disable=not progress, console=_CONSOLE
    ):
        scores = {
            c: _cosine(fp_final, runner.finals(frozenset([*chosen, c])))
            for c in range(num_layers)
            if c not in chosen
        }
        best = max(scores, key=lambda c: (scores[c], -c))
        chosen.append(best)
        greedy.append({"step": step, "layer": best, "final_hidden_cosine": scores[best]})
    return greedy


@torch.no_grad()
def greedy_kl_order(
    swapper: HFLayerQuantizer, sequences: list[torch.Tensor], fmt: str, progress: bool = False
) -> list[dict]:
    """The greedy order on the output (module docstring): at each step the layer whose
    quantization, on top of those already chosen, gives the least mean per-token KL(full
    precision || quantized) on ``sequences`` (ties to the lower id). Each step records every
    candidate's KL, so the choice can be checked."""
    num_layers = swapper.num_layers
    swapper.set_formats({})
    fp = [next_token_logprobs(swapper.model, seq) for seq in sequences]
    chosen: list[int] = []
    steps = []
    for step in track(
        range(1, num_layers + 1), "greedy-kl order", disable=not progress, console=_CONSOLE
    ):
        kls = {}
        for c in range(num_layers):
            if c not in chosen:
                swapper.set_formats({i: fmt for i in [*chosen, c]})
                kls[c] = score_text(swapper.model, sequences, fp)["kl"]
        best = min(kls, key=lambda c: (kls[c], c))
        chosen.append(best)
        candidates = {str(c): kl for c, kl in kls.items()}
        steps.append({"step": step, "layer": best, "final_kl": kls[best], "candidates": candidates})
    swapper.set_formats({})
    return steps


@torch.no_grad()
def _select(
    swapper: HFLayerQuantizer,
    tokenizer: PreTrainedTokenizerBase,
    fmt: str,
    orders: dict[str, list[int]],
) -> dict:
    """Each order's ppl and KL curves (k = 0..L) on the validation text and the one chosen: the
    lower mean log-perplexity over k = 1..L-1 (ties to the first order, lis)."""
    text = evaluation_text(tokenizer, "validation")
    swapper.set_formats({})
    fp = [next_token_logprobs(swapper.model, seq) for seq in text.sequences]
    curves: dict[str, dict] = {}
    for name, order in orders.items():
        results = []
        for k in range(len(order) + 1):
            swapper.set_formats({i: fmt for i in order[:k]})
            results.append(score_text(swapper.model, text.sequences, fp))
        inner = [math.log(r["ppl"]) for r in results[1:-1]] or [0.0]
        curves[name] = {
            "ppl": [r["ppl"] for r in results],
            "kl": [r["kl"] for r in results],
            "mean_log_ppl": sum(inner) / len(inner),
        }
    swapper.set_formats({})
    chosen = min(curves, key=lambda name: curves[name]["mean_log_ppl"])
    return {
        "text": {"source": text.source, "sha256": text.sha256, "tokens": text.tokens},
        "rule": "lowest mean log-perplexity over k = 1..L-1 on the validation text",
        "curves": curves,
        "chosen": chosen,
    }


def check_inputs(args: argparse.Namespace) -> Path:
    """The output path, once the model and the calibration file are known to be readable;
    UsageError naming the option that cannot be used."""
    model = read_input("--model-path", lambda: resolve_model(args.model_path))
    read_input("--model-path", lambda: read_config(model))
    if args.calibration is not None:
        read_input("--calibration", lambda: Path(args.calibration).read_bytes())
    return output_path("--out", args.out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sglang_morph.profile", description=__doc__.split("\n\n")[0]
    )
    add_quant_args(parser)
    parser.add_argument(
        "--calibration",
        default=None,
        help="<|endoftext|>-separated text file (default: text sampled from the model, seed 0)",
    )
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=16,
        help="sampled calibration stories (no --calibration)",
    )
    parser.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="best",
        help="lis: greedy on the final hidden state; greedy-kl: greedy on the output's KL; "
        "best: both, keeping the better on validation text",
    )
    parser.add_argument("--out", required=True, help="profile JSON to write")
    args = parser.parse_args(argv)
    try:
        out = check_inputs(args)
    except UsageError as err:
        exit_with(err)
    profile = build_profile(
        args.model_path,
        args.format,
        args.group_size,
        args.quant_method,
        args.calibration,
        samples=args.samples,
        seed=args.seed,
        method=args.method,
    )
    out.write_text(json.dumps(profile, indent=1) + "\n")
    for entry in profile["greedy"]:
        _CONSOLE.print(
            f"lis step {entry['step']}: layer {entry['layer']} "
            f"final-hidden cosine {entry['final_hidden_cosine']:.6f}"
        )
    for entry in profile["greedy_kl"]:
        _CONSOLE.print(
            f"greedy-kl step {entry['step']}: layer {entry['layer']} KL {entry['final_kl']:.6f}"
        )
    for name, curve in profile.get("selection", {}).get("curves", {}).items():
        ppl = " ".join(f"{p:.4f}" for p in curve["ppl"])
        _CONSOLE.print(f"validation {name} {profile['orders'][name]}: ppl by k {ppl}")
    _CONSOLE.print(f"layer_order {profile['layer_order']} ({profile['order_method']}) -> {out}")


if __name__ == "__main__":
    main()
