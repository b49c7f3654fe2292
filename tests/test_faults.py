"""Morphing under failures, injected with ``SGLANG_MORPH_FAULTS`` (test-only; docs/design.md,
"Failures") into real servers: a failed background preparation is retried and the swap
completes; a failing RL policy is replaced by the heuristic for that tick; a failing tick
freezes morphing while serving goes on.

Two servers, one per test and never both at once (CPU, stories260K, a memory budget), with
SGLang's strict memory checks on, so a fault that left the KV pool inconsistent would stop the
scheduler and fail the test.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.server_process import Server

BUDGET = "2100000"
ADMIN = {"Authorization": "Bearer morph-admin"}
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the"]
TICK_S = 0.25
FREEZE_TICK = 160
"""The tick that fails: ticks come at most every TICK_S, so not before 40 s after the scheduler
started, which leaves the first part of the test (a few requests) time to see it running."""


def start(args: list[str], faults: dict[str, int]) -> Server:
    return Server([*args, "--morph-memory-budget", BUDGET],
                  env={"SGLANG_MORPH_FAULTS": json.dumps(faults), "SGLANG_IS_IN_CI": "1",
                       "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"})


def wait_for(server: Server, done: Callable[[dict], bool], timeout_s: float) -> dict:
    """``/morph/state`` once ``done(state)`` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        st = server.client.state()
        if done(st):
            return st
        assert time.monotonic() < deadline, f"state never reached: {st}"
        time.sleep(0.1)


def settled(st: dict) -> bool:
    return all(x["format"] == x["desired"] for x in st["layers"]) and st["kv_resize_complete"]


def swap(server: Server, layers: list[int], fmt: str) -> dict:
    r = server.client.post("/morph/swap", {"layers": layers, "format": fmt}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return wait_for(server, settled, 60)


def greedy(server: Server) -> list[str]:
    return [server.client.generate(p, 40) for p in PROMPTS]


def test_failed_preparation_is_retried_and_the_swap_completes() -> None:
    server = start(["--morph-policy", "manual", "--admin-api-key", "morph-admin"],
                   {"prepare": 1})
    try:
        before = greedy(server)
        st = swap(server, [0, 1, 2, 3, 4], "int4")
        assert st["quantized_layers"] == 5 and not st["frozen"]
        assert st["prepare_failures"] == 1
        assert "injected fault: prepare call 1" in st["last_error"]
        assert all(greedy(server))
        st = swap(server, [0, 1, 2, 3, 4], "fp")
        assert st["quantized_layers"] == 0 and st["prepare_failures"] == 1
        assert greedy(server) == before
    finally:
        server.stop()


def test_policy_failure_falls_back_and_tick_failure_freezes() -> None:
    """The RL policy fails on its 2nd decision: the heuristic decides that tick and nothing
    freezes. Later a tick fails: morphing freezes, and the server keeps serving in the formats
    it had, with the same greedy outputs."""
    server = start(["--morph-policy", "rl", "--morph-checkpoint", str(DEFAULT_CHECKPOINT),
                    "--morph-tick-interval", str(TICK_S)],
                   {"policy": 2, "tick": FREEZE_TICK})
    try:
        st = wait_for(server, lambda s: s["fallbacks"] >= 1, 30)
        assert st["fallbacks"] == 1 and not st["frozen"]
        assert st["fallback_reason"] == "InjectedFault: injected fault: policy call 2"
        before = greedy(server)
        st = server.client.state()
        assert not st["frozen"], "froze too early to compare"
        formats_before = [x["format"] for x in st["layers"]]

        st = wait_for(server, lambda s: s["frozen"], FREEZE_TICK * TICK_S + 60)
        assert f"injected fault: tick call {FREEZE_TICK}" in st["last_error"]
        assert st["fallbacks"] == 1
        assert server.client.health()
        with ThreadPoolExecutor(4) as pool:
            done = list(pool.map(lambda i: server.client.post("/generate", {
                "input_ids": [7 + i] * 50, "sampling_params": {
                    "temperature": 0, "max_new_tokens": 30, "ignore_eos": True}},
                timeout_s=300).json(), range(4)))
        assert [d["meta_info"]["completion_tokens"] for d in done] == [30] * 4
        if [x["format"] for x in st["layers"]] == formats_before:  # idle: all fp, as a rule
            assert greedy(server) == before
        after = server.client.state()
        assert after["frozen"] and after["layers"] == st["layers"]
    finally:
        server.stop()
