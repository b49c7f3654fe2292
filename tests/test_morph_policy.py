"""The controller in the live server: the heuristic reacts to a burst and settles back, its
gauges reach Prometheus; the shipped RL policy runs (no fallback) and moves the layers; an
unusable RL checkpoint stops the launcher before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.server_process import Server

BUDGET = "2100000"  # ~768 KV tokens at full precision: a burst of long prompts does not fit


def burst(server: Server, n: int = 12, prompt: int = 200, out: int = 60) -> list[dict]:
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


@pytest.fixture(scope="module")
def heuristic():
    s = Server(["--morph-policy", "heuristic", "--morph-memory-budget", BUDGET,
                "--morph-ttft-slo", "0.5", "--enable-metrics"])
    yield s
    s.stop()


def test_heuristic_quiet_under_low_load(heuristic):
    for _ in range(5):
        heuristic.client.generate("Once upon a time", 20)
        time.sleep(0.3)
    st = heuristic.client.state()
    assert st["transitions"] == 0 and st["quantized_layers"] == 0


def test_heuristic_quantizes_in_a_burst_and_restores_after(heuristic):
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(burst, heuristic)
        seen = watch(heuristic, results)
        done = results.result()
    assert all(r["meta_info"]["completion_tokens"] == 60 for r in done)
    peak = max(s["quantized_layers"] for s in seen)
    assert peak > 0, "the heuristic never quantized during the burst"
    assert max(s["kv_capacity_tokens"] for s in seen) > seen[0]["kv_capacity_tokens"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        st = heuristic.client.state()
        if st["quantized_layers"] == 0 and st["kv_resize_complete"]:
            break
        time.sleep(0.5)
    assert st["quantized_layers"] == 0, "layers were not restored once the load was gone"
    assert st["device_bytes_in_use"] <= int(BUDGET) and not st["frozen"]
    assert st["decision_s_median"] is not None


def test_morph_gauges_in_prometheus(heuristic):
    text = heuristic.client.get("/metrics").text
    st = heuristic.client.state()
    for name in ("quantized_layers", "kv_capacity_tokens", "transitions"):
        assert f"sglang_morph:{name}" in text
    line = next(x for x in text.splitlines() if x.startswith("sglang_morph:transitions"))
    assert float(line.split()[-1]) == st["transitions"]


def test_manual_swap_refused_while_policy_decides(heuristic):
    r = heuristic.client.post("/morph/swap", {"layers": [0], "format": "int4"})
    assert r.status_code == 409 and "heuristic policy owns" in r.json()["error"]


@pytest.mark.parametrize("content", [None, b"not a zip file"])
def test_unusable_rl_checkpoint_is_a_one_line_error(tmp_path, content):
    checkpoint = tmp_path / "policy.zip"
    if content is not None:
        checkpoint.write_bytes(content)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sglang_morph.launch_server", "--morph-policy", "rl",
                        "--morph-checkpoint", "policy.zip"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - started < 60
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert str(tmp_path) in r.stderr  # resolved where the launcher was started


@pytest.fixture(scope="module")
def rl():
    """The shipped policy, named by a path relative to the directory the server starts in."""
    relative = os.path.relpath(DEFAULT_CHECKPOINT, tempfile.gettempdir())
    s = Server(["--morph-policy", "rl", "--morph-checkpoint", relative,
                "--morph-memory-budget", BUDGET, "--morph-ttft-slo", "0.5"])
    yield s
    s.stop()


def test_rl_policy_decides_without_fallback_and_moves_the_layers(rl):
    st = rl.client.state()
    assert st["policy"] == "rl" and st["policy_loaded"] == str(DEFAULT_CHECKPOINT)
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(burst, rl, 16)
        seen = watch(rl, results)
        done = results.result()
    assert all(r["meta_info"]["completion_tokens"] == 60 for r in done)
    st = rl.client.state()
    assert st["fallbacks"] == 0 and st["fallback_reason"] is None and not st["frozen"]
    assert st["last_observation"]["target"] is not None and st["decision_s_median"] is not None
    assert max(x["quantized_layers"] for x in seen) > 0, "the policy never quantized in the burst"
    assert st["transitions"] > 0 and st["device_bytes_in_use"] <= int(BUDGET)
