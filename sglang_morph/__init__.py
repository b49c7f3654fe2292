"""sglang-morph: MorphServe (quantized layer swapping + elastic KV cache) as a plugin of SGLang."""

SGLANG_VERSION = "0.5.23"
"""The exact SGLang release this plugin is written against; any other is refused."""

__all__ = ["SGLANG_VERSION"]
