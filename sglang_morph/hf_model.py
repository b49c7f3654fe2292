"""The Hugging Face model in float32 with per-layer weight-only quantization swapped in.

The offline layer profile and the quality evaluation both need the model's exact numerics
under an arbitrary assignment of formats to decoder layers, without starting SGLang. They run
transformers' ``LlamaForCausalLM`` and replace a layer's linears with ``QuantLinear``, which
calls the same ``quantized_matmul`` (same kernels, same packing) that SGLang's swapped layers
call, so quality measured here is the quality served.

SGLang fuses a layer's projections into four linears; ``SGLANG_LINEAR_GROUPS`` maps them to
transformers' seven. Both formats quantize each output row independently, so quantizing q, k, v
separately equals quantizing the fused qkv matrix; only the AWQ input scale is per SGLang group
(the fused rows read one input, so they share one scale).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from sglang_morph.data import resolve
from sglang_morph.quant.awq import search_awq_scale
from sglang_morph.quant.matmul import quantized_matmul
from sglang_morph.quant.quantize import QuantizedWeight, quantize_weight

SGLANG_LINEAR_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
FP = "fp"
EOS_SPLIT = "<|endoftext|>"
MAX_CONTEXT = 512
VALIDATION_STORIES = 2
"""The evaluation sample is split by position: its first stories are validation text (the
profiler chooses between layer orders on them), the rest test text (what ``eval.quality``
reports), so the order reported on was not chosen on the text it is reported on."""
TEXT_PARTS = ("all", "validation", "test")

ActScales = dict[int, dict[str, torch.Tensor]]
"""AWQ input scales: layer id -> SGLang linear name -> (in_features,) scale."""


def load_model(model_path: str) -> torch.nn.Module:
    """``LlamaForCausalLM`` in float32, eval mode, gradients off."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return model


def load_tokenizer(model_path: str) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_path)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.model.layers


def fused_weight(layer: torch.nn.Module, group: str) -> torch.Tensor:
    """The (out, in) weight SGLang holds for ``group`` of a full-precision layer: its HF
    projections' rows, concatenated."""
    return torch.cat([layer.get_submodule(name).weight for name in SGLANG_LINEAR_GROUPS[group]])


class QuantLinear(torch.nn.Module):
    """Drop-in for ``nn.Linear`` computing through ``quantized_matmul``."""

    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.qw = qw
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_matmul(x, self.qw, self.bias)


class HFLayerQuantizer:
    """Puts any per-layer format assignment on the model, reusing quantized copies.

    Copies are built on first use per (layer, format) and cached, so sweeping many assignments
    (the profile's greedy search, the quality curves) quantizes each layer at most once per
    format.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        group_size: int = 32,
        act_scales: dict[str, ActScales] | None = None,
    ) -> None:
        """``act_scales`` maps a format to its AWQ scales; formats without an entry use RTN."""
        self.model = model
        self.group_size = group_size
        self.act_scales = act_scales or {}
        self._fp: dict[tuple[int, str], torch.nn.Module] = {}
        self._quant: dict[tuple[int, str, str], QuantLinear] = {}
        for i, layer in enumerate(decoder_layers(model)):
            for names in SGLANG_LINEAR_GROUPS.values():
                for name in names:
                    module = layer.get_submodule(name)
                    if isinstance(module, QuantLinear):
                        raise ValueError("the model already has quantized layers swapped in")
                    self._fp[(i, name)] = module

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def set_formats(self, layer_formats: dict[int, str]) -> None:
        """Quantize exactly the layers named (format "int8"/"int4"; "fp" or absent: full)."""
        unknown = set(layer_formats) - set(range(self.num_layers))
        if unknown:
            raise ValueError(f"no such layer(s): {sorted(unknown)}")
        for i, layer in enumerate(decoder_layers(self.model)):
            fmt = layer_formats.get(i, FP)
            for group, names in SGLANG_LINEAR_GROUPS.items():
                for name in names:
                    module = self._fp[(i, name)] if fmt == FP else self._copy(i, group, name, fmt)
                    parent, child = name.rsplit(".", 1)
                    setattr(layer.get_submodule(parent), child, module)

    def fp_weight(self, layer_id: int, group: str) -> torch.Tensor:
        """The full-precision fused weight of SGLang linear ``group``, whatever is swapped in."""
        return torch.cat([self._fp[(layer_id, n)].weight for n in SGLANG_LINEAR_GROUPS[group]])

    def quantized_weight(self, layer_id: int, group: str, fmt: str) -> QuantizedWeight:
        """The fused SGLang linear ``group`` of a layer in ``fmt``, as the server would hold it."""
        scale = self._scale(layer_id, group, fmt)
        return quantize_weight(self.fp_weight(layer_id, group), fmt, self.group_size, scale)

    def _copy(self, layer_id: int, group: str, name: str, fmt: str) -> QuantLinear:
        key = (layer_id, name, fmt)
        if key not in self._quant:
            linear = self._fp[(layer_id, name)]
            scale = self._scale(layer_id, group, fmt)
            qw = quantize_weight(linear.weight, fmt, self.group_size, scale)
            self._quant[key] = QuantLinear(qw, linear.bias)
        return self._quant[key]

    def _scale(self, layer_id: int, group: str, fmt: str) -> torch.Tensor | None:
        scales = self.act_scales.get(fmt)
        return None if scales is None else scales[layer_id][group]


@dataclass
class TokenText:
    """Token sequences (each within the model's context) and where they came from."""

    source: str
    sha256: str
    sequences: list[torch.Tensor]

    @property
    def tokens(self) -> int:
        return sum(int(s.numel()) for s in self.sequences)


def tokenize_stories(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, stories: slice = slice(None)
) -> TokenText:
    """``<|endoftext|>``-separated stories (those at the positions ``stories`` selects), each
    tokenized (BOS first) in 512-token windows."""
    raw = Path(path).read_bytes()
    sequences = []
    texts = [story.strip() for story in raw.decode("utf-8").split(EOS_SPLIT) if story.strip()]
    for story in texts[stories]:
        ids = torch.tensor(tokenizer(story).input_ids)
        sequences.extend(ids[i : i + MAX_CONTEXT] for i in range(0, len(ids), MAX_CONTEXT))
    return TokenText(str(path), hashlib.sha256(raw).hexdigest(), sequences)


def evaluation_text(tokenizer: PreTrainedTokenizerBase, part: str = "all") -> TokenText:
    """The TinyStories sample (the model's own domain), whole or one part of its split by
    position (``VALIDATION_STORIES``); the source names the asset, not this machine's path."""
    if part not in TEXT_PARTS:
        raise ValueError(f"unknown text part {part!r}; accepted: {', '.join(TEXT_PARTS)}")
    stories = {
        "all": slice(None),
        "validation": slice(0, VALIDATION_STORIES),
        "test": slice(VALIDATION_STORIES, None),
    }[part]
    text = tokenize_stories(resolve("tinystories"), tokenizer, stories)
    text.source = "tinystories (text/tinystories_sample.txt)"
    if part == "validation":
        text.source += f", validation part: stories 1-{VALIDATION_STORIES}"
    elif part == "test":
        text.source += f", test part: the stories after the first {VALIDATION_STORIES}"
    return text


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, seq: torch.Tensor) -> torch.Tensor:
    """(len - 1, vocab) log-probabilities of each next token of ``seq``, teacher-forced."""
    return F.log_softmax(model(seq[None]).logits[0, :-1].float(), dim=-1)


def token_kl(fp: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-position KL(fp || other) of two rows-of-log-probabilities tensors."""
    return (fp.exp() * (fp - other)).sum(dim=-1)


@torch.no_grad()
def score_text(
    model: torch.nn.Module, sequences: list[torch.Tensor], fp_logprobs: list[torch.Tensor]
) -> dict[str, float]:
    """{"ppl", "kl"} of the model as it stands on ``sequences``: perplexity of the text and the
    mean per-token KL(full precision || model) of the next-token distributions, which sees
    changes perplexity can average away. ``fp_logprobs`` are the full-precision model's
    ``next_token_logprobs`` of the same sequences."""
    nll, kl, count = 0.0, 0.0, 0
    for seq, fp in zip(sequences, fp_logprobs, strict=True):
        logprobs = next_token_logprobs(model, seq)
        nll -= logprobs.gather(1, seq[1:, None]).sum().item()
        kl += token_kl(fp, logprobs).sum().item()
        count += len(seq) - 1
    return {"ppl": math.exp(nll / count), "kl": kl / count}


@torch.no_grad()
def sample_text(
    model: torch.nn.Module, num_sequences: int = 16, length: int = 256, seed: int = 0
) -> TokenText:
    """Stories sampled (temperature 1) from the full-precision model itself, from BOS.

    Calibrating on the model's own samples needs no dataset, follows its training distribution,
    and keeps the evaluation text out of calibration. Sampling uses a private generator, so the
    text depends only on the model and ``seed``; each sequence is cut after its first EOS.
    """
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((num_sequences, 1), config.bos_token_id, dtype=torch.long)
    out = model(ids, use_cache=True)
    cache, tokens = out.past_key_values, [ids]
    for _ in range(length - 1):
        probs = torch.softmax(out.logits[:, -1].double(), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        tokens.append(nxt)
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
    full = torch.cat(tokens, dim=1)
    sequences = []
    for row in full:
        eos = (row == config.eos_token_id).nonzero()
        sequences.append(row[: int(eos[0]) + 1] if len(eos) else row)
    digest = hashlib.sha256(torch.cat(sequences).numpy().tobytes()).hexdigest()
    source = f"sampled from the model: seed={seed}, {num_sequences} x {length} tokens"
    return TokenText(source, digest, sequences)


@torch.no_grad()
def capture_linear_inputs(
    model: torch.nn.Module, sequences: list[torch.Tensor]
) -> dict[int, dict[str, torch.Tensor]]:
    """Full-precision inputs (tokens, in) of every SGLang linear group, for AWQ."""
    captured: dict[int, dict[str, list[torch.Tensor]]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        captured[i] = {group: [] for group in SGLANG_LINEAR_GROUPS}
        for group, names in SGLANG_LINEAR_GROUPS.items():

            def hook(_m: torch.nn.Module, args: tuple, store: list = captured[i][group]) -> None:
                store.append(args[0].reshape(-1, args[0].shape[-1]))

            handles.append(layer.get_submodule(names[0]).register_forward_pre_hook(hook))
    try:
        for seq in sequences:
            model(seq[None])
    finally:
        for handle in handles:
            handle.remove()
    return {i: {g: torch.cat(xs) for g, xs in groups.items()} for i, groups in captured.items()}


def search_act_scales(
    model: torch.nn.Module, sequences: list[torch.Tensor], fmt: str, group_size: int
) -> ActScales:
    """AWQ scales for every layer and SGLang linear, from full-precision activations."""
    inputs = capture_linear_inputs(model, sequences)
    return {
        i: {
            group: search_awq_scale(fused_weight(layer, group), inputs[i][group], fmt, group_size)
            for group in SGLANG_LINEAR_GROUPS
        }
        for i, layer in enumerate(decoder_layers(model))
    }
