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

from sglang_morph.config import PROVISIONAL_TTFT_SLO_S
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
                "--enable-metrics"])  # no --morph-ttft-slo: the warm-up probe sets the targets
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


def test_targets_measured_at_warm_up_and_settable(heuristic):
    deadline = time.monotonic() + 120
    st = heuristic.client.state()
    while st["targets_source"] != "POST /morph/targets" and time.monotonic() < deadline:
        time.sleep(0.5)
        st = heuristic.client.state()
    assert st["targets_source"] == "POST /morph/targets", "the warm-up probe never reported"
    assert st["ttft_slo_s"] > 0 and st["tpot_slo_s"] is not None and st["tpot_slo_s"] > 0
    assert st["ttft_slo_s"] != PROVISIONAL_TTFT_SLO_S
    log = heuristic.log_path.read_text(errors="replace")
    assert f"targets TTFT {1000 * st['ttft_slo_s']:.1f} ms" in log  # the probe's own line
    assert heuristic.client.get("/health").status_code == 200
    for bad in ({}, {"ttft_s": -1}, {"ttft_s": "fast"}, {"latency": 1}):
        r = heuristic.client.post("/morph/targets", bad)
        assert r.status_code == 400 and "ttft_s" in r.json()["error"], bad
    st = heuristic.client.set_targets(ttft_s=0.5)
    assert st["ttft_slo_s"] == 0.5 and st["tpot_slo_s"] > 0  # TPOT kept


def test_kv_limit_protects_tpot_and_lifts_when_it_eases(heuristic):
    """A TPOT target no decode can meet, and a TTFT target nobody waits long against: the
    heuristic limits KV below what the budget allows while the load runs, every request still
    completes, and the limit lifts once decodes are well inside a lax target again."""
    heuristic.client.set_targets(ttft_s=100.0, tpot_s=1e-5)
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(burst, heuristic, 10, 60, 120)
        seen = watch(heuristic, results)
        done = results.result()
    assert all(r["meta_info"]["completion_tokens"] == 120 for r in done)
    limited = [s for s in seen if s["kv_limit_fraction"] < 1.0]
    assert limited, "the KV limit never stepped down under TPOT pressure"
    assert any(s["kv_capacity_tokens"] < s["kv_budget_tokens"] for s in limited)
    heuristic.client.set_targets(ttft_s=0.5, tpot_s=10.0)
    heuristic.client.generate("Once upon a time", 20)
    deadline = time.monotonic() + 60
    st = heuristic.client.state()
    while st["kv_limit_fraction"] < 1.0 and time.monotonic() < deadline:
        heuristic.client.generate("Once upon a time", 5)
        st = heuristic.client.state()
    assert st["kv_limit_fraction"] == 1.0 and st["kv_limit_changes"] >= 2
    assert not st["frozen"] and st["device_bytes_in_use"] <= int(BUDGET)


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
