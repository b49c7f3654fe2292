"""The heuristic controller in the live server: it reacts to a burst and settles back, its
gauges reach Prometheus, its targets are measured at warm-up, its KV limit protects TPOT. The
RL policy's live tests are in tests/test_rl_serving.py: one server at a time, because an idle
SGLang scheduler polls without sleeping and would take a core from the other."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_morph.config import PROVISIONAL_TTFT_SLO_S, RESTORE_LOAD_DROP
from sglang_morph.paths import default_profile
from sglang_morph.profile_file import load_profile
from sglang_morph.server_process import Server
from tests.live_load import BUDGET, burst, watch

RESTORE_WINDOW_S = 2.0


@pytest.fixture(scope="module")
def heuristic():
    # No --morph-ttft-slo: the warm-up probe sets the targets. Short restore windows, so that
    # the restore after the burst fits the test's time.
    s = Server(["--morph-policy", "heuristic", "--morph-memory-budget", BUDGET,
                "--enable-metrics", "--morph-restore-window", str(RESTORE_WINDOW_S),
                "--morph-restore-max-window", str(4 * RESTORE_WINDOW_S)])
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
    # Started without --morph-profile, as the README shows: the layers went to int4 in the
    # shipped profile's order (least important first), not last to first.
    shipped = load_profile(default_profile())["layer_order"]
    assert seen[0]["profile"] == str(default_profile()) and seen[0]["layer_order"] == shipped
    first = next(s for s in seen if s["quantized_layers"] > 0)
    int4 = {x["id"] for x in first["layers"] if x["format"] != "fp"}
    assert int4 == set(shipped[: first["quantized_layers"]])
    assert max(s["kv_capacity_tokens"] for s in seen) > seen[0]["kv_capacity_tokens"]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        st = heuristic.client.state()
        if st["quantized_layers"] == 0 and st["kv_resize_complete"]:
            break
        time.sleep(0.5)
    assert st["quantized_layers"] == 0, "layers were not restored once the load was gone"
    # The restore stabilizer ran with the given windows: the first restore the heuristic asked
    # for came after ticks that asked to hold, so it was held for a window.
    assert st["restore_window_range_s"] == [RESTORE_WINDOW_S, 4 * RESTORE_WINDOW_S]
    assert st["held_restores"] > 0
    # ... and waited for the load to fall: the smoothed arrival rate it judged by saw the
    # burst and had fallen below its peak by the default drop when the layers came back.
    assert st["restore_load_drop"] == RESTORE_LOAD_DROP
    assert max(s["arrival_rate_peak"] for s in seen) > 0
    assert st["smoothed_arrival_rate"] <= (1 - RESTORE_LOAD_DROP) * st["arrival_rate_peak"]
    assert st["device_bytes_in_use"] <= int(BUDGET) and not st["frozen"]
    assert st["decision_s_median"] is not None


def test_morph_gauges_in_prometheus(heuristic):
    text = heuristic.client.get("/metrics").text
    st = heuristic.client.state()
    for name in ("quantized_layers", "kv_capacity_tokens", "transitions",
                 "restore_window_seconds", "held_restores"):
        assert f"sglang_morph:{name}" in text
    for name in ("transitions", "held_restores"):  # idle after the burst: both settled
        line = next(x for x in text.splitlines() if x.startswith(f"sglang_morph:{name}"))
        assert float(line.split()[-1]) == st[name]


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
