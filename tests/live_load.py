"""Load and observation helpers the live controller tests share: a burst of long prompts under
a budget where they do not fit at full precision, and the server's state read all along."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

from sglang_morph.server_process import Server

BUDGET = "2100000"  # ~768 KV tokens at full precision: a burst of long prompts does not fit


def burst(server: Server, n: int = 12, prompt: int = 200, out: int = 60) -> list[dict]:
    """``n`` greedy requests of ``prompt`` tokens and ``out`` outputs sent at once."""

    def one(i: int) -> dict:
        r = server.client.post("/generate", {"input_ids": [5 + i] * prompt, "sampling_params": {
            "temperature": 0, "max_new_tokens": out, "ignore_eos": True}}, timeout_s=600)
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def watch(server: Server, burst_done: Future) -> list[dict]:
    """/morph/state every 0.1 s for as long as the burst runs (however slow the machine)."""
    states, deadline = [], time.monotonic() + 600
    while not burst_done.done() and time.monotonic() < deadline:
        states.append(server.client.state())
        time.sleep(0.1)
    return states
