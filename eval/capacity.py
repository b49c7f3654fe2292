"""What this machine serves in full precision: the yardstick "a load of X%" is measured against.

A fraction of capacity only means the same on every machine if capacity is measured on the
machine, with the same model, budget and request shapes the load will use.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import numpy as np

from eval.replay import Replayer, prompt_ids
from eval.traces import Trace
from sglang_morph.server_process import Server

CAPACITY_PROBE_S = 30.0
"""How long the closed loop runs."""
CLOSED_LOOP = 64
"""Requests of each round of the closed loop: several times what the KV holds."""


def fp_capacity(model: str, budget: int, trace: Trace, vocab: np.ndarray, seed: int) -> float:
    """Completed requests per second of full precision under a closed loop that keeps far
    more requests in flight than the KV holds (so it measures the server, not the client)."""
    server = Server(["--model-path", model, "--morph-policy", "off",
                     "--morph-memory-budget", str(budget)])
    try:
        # Shapes drawn from the whole trace, as the loads measured against this are drawn.
        picks = np.random.default_rng(seed).integers(len(trace.requests), size=CLOSED_LOOP)
        shapes = [trace.requests[i] for i in picks]
        burst = tuple(replace(r, arrival_s=0.0) for r in shapes)
        prompts = [prompt_ids(vocab, r.input_tokens, i, seed) for i, r in enumerate(burst)]
        start = time.perf_counter()
        done = 0
        while time.perf_counter() - start < CAPACITY_PROBE_S:
            records = asyncio.run(Replayer(server.url, burst, prompts, progress=False).run())
            done += sum(r.ok for r in records)
        return done / (time.perf_counter() - start)
    finally:
        server.stop()
