"""Byte sizes of a Hugging Face Llama-family checkpoint, read without loading the model.

The launcher turns a memory budget into KV capacity before SGLang starts, so it needs the
weight bytes and the KV bytes per token from the checkpoint's config and safetensors headers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
"""What SGLang's ``--dtype`` accepts; ``half`` and ``float`` are its names for float16 and
float32."""
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
CPU_INTERMEDIATE_PADDING = 64
"""On CPU, SGLang 0.5.23 pads ``intermediate_size`` up to a multiple of 64 x tp_size
(``adjust_config_with_unaligned_cpu_tp`` in configs/update_config.py): stories260K's 172 becomes
192, so the MLP weights SGLang holds are larger than the checkpoint's. A budget must count the
weights as served, or full precision would get more memory than it is allowed."""


@dataclass(frozen=True)
class ModelInfo:
    """Sizes that the memory budget is made of."""

    num_layers: int
    num_params: int
    layer_params: int
    kv_bytes_per_token: int
    dtype_bytes: int

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    def budget_bytes(self, fp_kv_tokens: int) -> int:
        """A memory budget that leaves exactly ``fp_kv_tokens`` of KV to full precision."""
        return self.weight_bytes + fp_kv_tokens * self.kv_bytes_per_token


def _safetensors_params(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in meta["shape"]:
                count *= dim
            counts[name] = count
    return counts


def serving_device() -> str:
    """The device SGLang serves on here: ``cuda`` when torch sees a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class DtypeError(ValueError):
    """A ``--dtype`` SGLang would not accept."""


def checkpoint_dtype(cfg: dict) -> str:
    """The dtype the checkpoint was saved in (``dtype``, or ``torch_dtype`` from transformers
    before 5), float32 when absent or not a floating type SGLang serves, as SGLang reads it."""
    saved = cfg.get("dtype") or cfg.get("torch_dtype")
    saved = _DTYPE_ALIASES.get(saved, saved)
    return saved if saved in DTYPE_BYTES else "float32"


def served_dtype(dtype: str, cfg: dict) -> str:
    """The dtype SGLang serves weights and KV in for ``--dtype dtype``: float32, float16 or
    bfloat16.

    ``auto`` follows SGLang 0.5.23 (``_get_and_verify_dtype`` in configs/model_config.py): the
    checkpoint's dtype, except that a float32 checkpoint is served in float16 (bfloat16 for
    Gemma); a budget counted in float32 bytes would size the server's KV for twice its
    real weight and KV bytes.
    DtypeError, naming what is accepted, for anything else.
    """
    name = dtype.lower()
    if name not in DTYPES:
        raise DtypeError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    if name != "auto":
        return _DTYPE_ALIASES.get(name, name)
    saved = checkpoint_dtype(cfg)
    if saved != "float32":
        return saved
    return "bfloat16" if str(cfg.get("model_type", "")).startswith("gemma") else "float16"


def read_config(model_path: str | Path) -> dict:
    """The model's ``config.json``: the one reader, so every part of the project sees the same
    sizes and fallbacks."""
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text())
    except OSError as err:
        raise FileNotFoundError(f"no readable config.json in {model_path}: {err}") from err


def context_length(model_path: str | Path, override: int | None = None) -> int:
    """The longest sequence the server takes: ``override`` (the server's ``--context-length``)
    when given, else the model's ``max_position_embeddings`` (2048 when absent)."""
    if override is not None:
        return override
    return int(read_config(model_path).get("max_position_embeddings") or 2048)


def vocab_size(model_path: str | Path) -> int:
    """Number of token ids of the model's embedding."""
    return int(read_config(model_path)["vocab_size"])


def read_model_info(
    model_path: str, dtype: str = "float32", device: str | None = None
) -> ModelInfo:
    """Sizes of the checkpoint in ``model_path`` when SGLang serves it with ``--dtype dtype``
    (any of ``DTYPES``, resolved by ``served_dtype``; DtypeError otherwise) on ``device``
    (default: ``serving_device()``), with tensor parallelism 1."""
    path = Path(model_path)
    cfg = read_config(path)
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    dtype_bytes = DTYPE_BYTES[served_dtype(dtype, cfg)]
    counts = _safetensors_params(path)
    if not counts:
        raise FileNotFoundError(f"no *.safetensors weights in {model_path}")
    layer_params = sum(c for n, c in counts.items() if ".layers.0." in n)
    inter = int(cfg.get("intermediate_size") or 0)
    extra = 0
    if (device or serving_device()) == "cpu" and inter % CPU_INTERMEDIATE_PADDING:
        padded = -(-inter // CPU_INTERMEDIATE_PADDING) * CPU_INTERMEDIATE_PADDING
        extra = 3 * int(cfg["hidden_size"]) * (padded - inter)  # gate, up and down, per layer
    return ModelInfo(
        num_layers=layers,
        num_params=sum(counts.values()) + layers * extra,
        layer_params=layer_params + extra,
        kv_bytes_per_token=2 * layers * kv_heads * head_dim * dtype_bytes,
        dtype_bytes=dtype_bytes,
    )
