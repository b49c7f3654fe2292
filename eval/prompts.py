"""Prompt token ids of a shaped trace, with Mooncake's shared prefixes kept.

Random per-request prompts (``eval.replay.prompt_ids``) defeat prefix caching, which is right for
traces that say nothing about sharing (Azure, BurstGPT). Mooncake's ``hash_ids`` do say it: each
id is one block of prompt tokens and equal ids are equal blocks. Rebuilding that sharing is what
makes a replay exercise SGLang's radix cache the way the production workload did, and shows
whether morphing (which changes the weights under cached KV) disturbs it.

A block's tokens depend only on the seed and its id, so any request naming the id gets the same
tokens wherever it stands in the trace, in any window, subset or resumed run. Blocks are scaled
like the prompts: ``MOONCAKE_BLOCK_TOKENS / input_div`` tokens (at least 1), so a prompt mapped
to ``input_tokens`` is about as many blocks long as its source was. The prompt is its blocks in
order, cut to ``input_tokens``; a prompt longer than its blocks ends in request-unique tokens.
"""

from __future__ import annotations

import numpy as np

from eval.replay import prompt_ids
from eval.traces import MOONCAKE_BLOCK_TOKENS, Trace, TraceRequest

_BLOCK_STREAM = 0x6D6F6F6E
"""Middle word of a block's seed, so block streams never coincide with per-request streams."""


def block_tokens(input_div: float) -> int:
    """Tokens of one hash-id block after a length mapping that divides inputs by ``input_div``."""
    if not input_div > 0:
        raise ValueError(f"input_div must be positive, got {input_div!r}")
    return max(1, round(MOONCAKE_BLOCK_TOKENS / input_div))


def trace_block_tokens(trace: Trace) -> int:
    """Block size of ``trace``: from its length mapping (source size when it has none)."""
    mapping = trace.meta.get("length_mapping") or {}
    return block_tokens(float(mapping.get("input_div", 1.0)))


def block_ids(vocab: np.ndarray, hash_id: int, length: int, seed: int = 0) -> list[int]:
    """The ``length`` token ids of block ``hash_id``: a function of (seed, id) only."""
    rng = np.random.default_rng([seed, _BLOCK_STREAM, hash_id])
    return rng.choice(vocab, size=length).tolist()


def request_prompt(
    vocab: np.ndarray, request: TraceRequest, index: int, block_len: int, seed: int = 0
) -> list[int]:
    """Prompt of request ``index``: its blocks cut to ``input_tokens``, then unique tokens to
    fill; a request without hash ids gets ``prompt_ids`` (so Azure prompts are unchanged)."""
    if request.hash_ids is None:
        return prompt_ids(vocab, request.input_tokens, index, seed)
    ids: list[int] = []
    for hash_id in request.hash_ids:
        if len(ids) >= request.input_tokens:
            break
        ids += block_ids(vocab, hash_id, block_len, seed)
    ids = ids[: request.input_tokens]
    tail = request.input_tokens - len(ids)
    return ids + (prompt_ids(vocab, tail, index, seed) if tail else [])


def trace_prompts(vocab: np.ndarray, trace: Trace, seed: int = 0) -> list[list[int]]:
    """Every request's prompt; the same for every system and for a resumed run."""
    block_len = trace_block_tokens(trace)
    return [request_prompt(vocab, r, i, block_len, seed) for i, r in enumerate(trace.requests)]
