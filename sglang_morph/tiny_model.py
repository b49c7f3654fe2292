"""``python -m sglang_morph.tiny_model``: a small random-weight model of a dense Llama-family
architecture (Llama, Qwen2, Qwen3, Mistral) that SGLang can serve.

Why: the runtime swaps the layers of whatever dense decoder SGLang loads, and each family differs
in what a layer holds (Qwen2's q/k/v biases, Qwen3's q_norm/k_norm). Building each architecture
with transformers' own config and model classes, at a size that serves in seconds on a CPU, lets
the tests run the swapper on every family without downloading a checkpoint. The tokenizer is the
embedded model's (stories260K, vocabulary 512), so prompts are real text.

The weights are random: such a model serves mechanisms and timing (swaps, KV budgets, latency),
never quality; its outputs are meaningless text.

``--preset gpu-ratio`` gives the weights-to-KV proportion of a real GPU deployment (weights at
least ``GPU_RATIO`` x the KV bytes of ``GPU_RATIO_TOKENS`` tokens, through grouped-query attention
with one KV head and a wide MLP): stories260K has the opposite proportion (a few hundred tokens
of KV outweigh its weights), so quantizing a layer there frees few tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sglang_morph.cli import UsageError, exit_with, positive_int
from sglang_morph.data import resolve_model
from sglang_morph.model_info import read_model_info

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
VOCAB_SIZE = 512
"""The embedded tokenizer's vocabulary (stories260K)."""
CONTEXT = 512
GPU_RATIO = 10
GPU_RATIO_TOKENS = 1000
"""``gpu-ratio``: weights >= GPU_RATIO x (KV bytes per token x GPU_RATIO_TOKENS). Llama-3-8B in
bfloat16 is more than ten times further; a model below it is KV-dominated as no GPU deployment
is."""


@dataclass(frozen=True)
class Shape:
    """The sizes of a tiny model; head_dim is hidden // heads."""

    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128


PRESETS = {
    "small": Shape(),
    "gpu-ratio": Shape(layers=4, hidden=512, heads=8, kv_heads=1, intermediate=1536),
}


def check_shape(shape: Shape) -> None:
    """UsageError naming the flag when the shape cannot be built."""
    if shape.hidden % shape.heads:
        raise UsageError(
            f"--hidden {shape.hidden} is not a multiple of the {shape.heads} attention heads; "
            f"give a multiple of {shape.heads}"
        )
    if (shape.hidden // shape.heads) % 2:
        raise UsageError(
            f"--hidden {shape.hidden} gives an odd head size {shape.hidden // shape.heads} "
            "(rotary embeddings need an even one); give a multiple of "
            f"{2 * shape.heads}"
        )


def build_config(arch: str, shape: Shape):
    """transformers' own config of ``arch`` with ``shape`` and the embedded tokenizer's ids."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }
    extra = {"sliding_window": None} if arch == "mistral" else {}
    return classes[arch](
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.hidden // shape.heads,
        max_position_embeddings=CONTEXT,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **extra,
    )


def build(arch: str, out: Path, shape: Shape, seed: int, data_dir: str | None = None) -> Path:
    """Write the random-weight model of ``arch`` (safetensors, config.json, tokenizer) to
    ``out``; returns ``out``."""
    import torch
    import transformers

    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}; accepted: {', '.join(ARCHS)}")
    check_shape(shape)
    models = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "qwen3": transformers.Qwen3ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }
    tokenizer_dir = Path(resolve_model(None, data_dir))
    torch.manual_seed(seed)
    model = models[arch](build_config(arch, shape)).to(torch.float32).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def summary(out: Path) -> dict:
    """Sizes of the written model as SGLang serves it in float32 on a CPU."""
    info = read_model_info(str(out), "float32", "cpu")
    kv = info.kv_bytes_per_token
    return {
        "path": str(out),
        "architecture": json.loads((out / "config.json").read_text())["architectures"][0],
        "weight_bytes": info.weight_bytes,
        "kv_bytes_per_token": kv,
        "weights_to_kv_ratio": round(info.weight_bytes / (kv * GPU_RATIO_TOKENS), 2),
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sglang_morph.tiny_model",
        description="Build a small RANDOM-WEIGHT model of a dense Llama-family architecture "
        "with transformers' own classes (no download), with the embedded stories260K "
        "tokenizer, that SGLang can serve. Random weights serve mechanisms and timing "
        "(swaps, KV budgets), never quality.",
    )
    p.add_argument("--arch", required=True, choices=ARCHS, help="model family")
    p.add_argument("--out", required=True, help="directory to write the model to")
    p.add_argument(
        "--preset",
        choices=tuple(PRESETS),
        default="small",
        help="small: 4 layers, hidden 64, 4 heads, 2 KV heads, intermediate 128 (serves in "
        f"seconds on a CPU); gpu-ratio: weights >= {GPU_RATIO}x the KV bytes of "
        f"{GPU_RATIO_TOKENS} tokens, as on a real GPU (hidden 512, 8 heads, 1 KV head, "
        "intermediate 1536). Default: small",
    )
    p.add_argument("--layers", type=positive_int, default=None, help="decoder layers")
    p.add_argument(
        "--hidden",
        type=positive_int,
        default=None,
        help="hidden size (a multiple of twice the heads); the intermediate size follows at "
        "the preset's proportion",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.add_argument("--data-dir", default=None, help="shared data directory (tokenizer source)")
    return p


def shape_from(preset: str, layers: int | None, hidden: int | None) -> Shape:
    """The preset's shape with the given overrides."""
    shape = PRESETS[preset]
    if layers is not None:
        shape = replace(shape, layers=layers)
    if hidden is not None:
        scale = shape.intermediate // shape.hidden
        shape = replace(shape, hidden=hidden, intermediate=scale * hidden)
    return shape


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        shape = shape_from(args.preset, args.layers, args.hidden)
        check_shape(shape)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file; give a directory")
        build(args.arch, out, shape, args.seed, args.data_dir)
    except (UsageError, FileNotFoundError) as err:
        exit_with(err)
    print(json.dumps(summary(out)))


if __name__ == "__main__":
    main()
