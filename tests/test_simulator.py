"""The simulator against hand-computed schedules (closed-form TTFT and end-to-end times)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from envs.calibration import (
    COEFFICIENTS,
    IterationModel,
    IterationSample,
    fit_iteration_model,
    load_calibration,
    parse_samples,
)
from envs.simulator import ReplicaConfig, Simulator
from eval.traces import Trace, TraceRequest
from sglang_morph.config import UNLOADED_SLO_MULTIPLE
from sglang_morph.paths import DEFAULT_CALIBRATION

BASE, PER_TOKEN, PER_DECODE, PER_LAYER, SWAP = 0.005, 1e-4, 1e-3, 5e-4, 0.01
MODEL = IterationModel(BASE, PER_TOKEN, PER_DECODE, PER_LAYER, SWAP, source="test")


def window(*requests: tuple[float, int, int], span: float = 10.0) -> Trace:
    return Trace("synthetic", tuple(TraceRequest(*r) for r in requests), {"span_s": span})


def run(sim: Simulator, trace: Trace, target: int = 0, ticks: int = 40, dt: float = 0.25):
    sim.reset(trace)
    results = [sim.advance(dt, target) for _ in range(ticks)]
    return results


def test_single_request_closed_form() -> None:
    sim = Simulator(MODEL)
    run(sim, window((0.1, 100, 5)))
    (rec,) = sim.records
    prefill = BASE + 100 * PER_TOKEN
    decode = BASE + PER_DECODE
    assert rec.ttft_s == pytest.approx(prefill, abs=1e-12)
    assert rec.e2e_s == pytest.approx(prefill + 4 * decode, abs=1e-12)
    assert rec.tpot_s == pytest.approx(decode, abs=1e-12)


def test_response_time_delays_what_the_client_sees_not_the_schedule() -> None:
    response = 0.02
    sim = Simulator(dataclasses.replace(MODEL, response_s=response))
    run(sim, window((0.1, 100, 5), (0.1, 100, 5)))
    prefill, decode = BASE + 200 * PER_TOKEN, BASE + 2 * PER_DECODE
    for rec in sim.records:  # one batch of both prompts, decoded together as without it
        assert rec.ttft_s == pytest.approx(prefill + response, abs=1e-12)
        assert rec.e2e_s == pytest.approx(prefill + 4 * decode + response, abs=1e-12)


def test_context_cost_counts_sequence_lengths_as_sglang_does() -> None:
    per_ctx = 1e-5
    sim = Simulator(dataclasses.replace(MODEL, per_context_token_s=per_ctx))
    run(sim, window((0.1, 100, 5)))
    (rec,) = sim.records
    prefill = BASE + 100 * PER_TOKEN + 100 * per_ctx
    # decode steps see sequences of 101..104 tokens (prompt + tokens so far, the new one too)
    decodes = 4 * (BASE + PER_DECODE) + (101 + 102 + 103 + 104) * per_ctx
    assert rec.ttft_s == pytest.approx(prefill, abs=1e-12)
    assert rec.e2e_s == pytest.approx(prefill + decodes, abs=1e-12)


def test_chunked_prefill_closed_form() -> None:
    sim = Simulator(MODEL, ReplicaConfig(chunk_size=128))
    run(sim, window((0.0, 300, 1)))
    (rec,) = sim.records
    assert rec.ttft_s == pytest.approx(3 * BASE + 300 * PER_TOKEN, abs=1e-12)
    assert rec.e2e_s == rec.ttft_s


def test_kv_capacity_serialises_requests() -> None:
    sim = Simulator(MODEL)  # 512 tokens: two 300-token prompts cannot be resident together
    run(sim, window((0.0, 300, 2), (0.0, 300, 2)))
    first, second = sim.records
    prefill, decode = BASE + 300 * PER_TOKEN, BASE + PER_DECODE
    assert first.ttft_s == pytest.approx(prefill)
    assert first.e2e_s == pytest.approx(prefill + decode)
    assert second.ttft_s == pytest.approx(2 * prefill + decode)


def test_quantized_layers_add_capacity_and_cost() -> None:
    sim = Simulator(MODEL, ReplicaConfig(chunk_size=1024))  # 2 layers: 512 + 244 >= 600
    results = run(sim, window((0.1, 300, 1), (0.1, 300, 1)), target=2)
    assert results[0].swapped_layers == 2 and results[1].swapped_layers == 0
    ttft = BASE + 600 * PER_TOKEN + 2 * PER_LAYER  # one batch; the swap stall ends before 0.1
    assert [r.ttft_s for r in sim.records] == pytest.approx([ttft, ttft])


def test_swap_stall_delays_requests() -> None:
    sim = Simulator(MODEL)
    sim.reset(window((0.0, 100, 1)))
    sim.advance(0.25, 5)
    (rec,) = sim.records
    assert rec.ttft_s == pytest.approx(5 * SWAP + BASE + 100 * PER_TOKEN + 5 * PER_LAYER)


def test_admission_reserves_the_remaining_outputs() -> None:
    """SGLang admits a request (ignore_eos) only if its prompt and whole output fit beside the
    outputs promised to running requests: B (150 tokens) waits although 412 slots are free."""
    sim = Simulator(MODEL)
    run(sim, window((0.0, 100, 300), (0.0, 100, 50)), ticks=80)
    a, b = sim.records
    prefill, decode = BASE + 100 * PER_TOKEN, BASE + PER_DECODE
    assert a.e2e_s == pytest.approx(prefill + 299 * decode)
    assert b.ttft_s == pytest.approx(a.e2e_s + prefill)


def test_snapshot_counts_promised_tokens_as_used() -> None:
    sim = Simulator(MODEL)
    sim.reset(window((0.0, 100, 300)))
    sim.advance(0.01, 0)  # the prefill: 100 tokens held, 299 promised
    snap = sim.snapshot()
    assert snap.kv_used_tokens == 399 and snap.kv_free_tokens == 512 - 399


def test_unsafe_restore_is_refused() -> None:
    sim = Simulator(MODEL)
    sim.reset(window((0.0, 300, 150), (0.0, 300, 150), (0.0, 300, 150)))
    sim.advance(0.2, 5)  # 512 + 610 tokens: two requests admitted, 600 prompt tokens held
    assert sim.snapshot().kv_used_tokens > 512
    with pytest.raises(ValueError, match="unsafe restore"):
        sim.advance(0.05, 0)


def test_retraction_frees_kv_and_everything_finishes() -> None:
    sim = Simulator(MODEL, ReplicaConfig(base_capacity_tokens=20))
    run(sim, window((0.0, 8, 10), (0.0, 8, 10), (0.0, 8, 10)))
    assert len(sim.records) == 3
    assert all(r.output_tokens == 10 for r in sim.records)
    snap = sim.snapshot()
    assert snap.kv_used_tokens == 0 and snap.queue_len == 0 and snap.running_reqs == 0


def test_late_requests_counted_once() -> None:
    burst = window(*[(0.0, 200, 4) for _ in range(30)])
    sim = Simulator(MODEL, ReplicaConfig(ttft_slo_s=0.05))
    results = run(sim, burst)
    late = sum(r.newly_late for r in results)
    assert late == sum(rec.ttft_s > 0.05 for rec in sim.records) > 0
    assert sum(r.generated_tokens for r in results) == 30 * 4


def test_kv_fraction_limits_admission_like_a_smaller_budget() -> None:
    """At fraction 0.5 the 512-token budget admits 256 tokens: two 100-token requests with
    40 promised outputs each (280 tokens) run one after the other, as on a 256-token replica."""
    pair = window((0.0, 100, 40), (0.0, 100, 40))
    limited = Simulator(MODEL)
    limited.reset(pair)
    results = [limited.advance(0.25, 0, kv_fraction=0.5) for _ in range(40)]
    snap = results[0].snapshot
    assert limited.capacity == 256 and snap.kv_budget_tokens == 512
    small = Simulator(MODEL, ReplicaConfig(base_capacity_tokens=256))
    run(small, pair)
    assert [r.ttft_s for r in limited.records] == pytest.approx([r.ttft_s for r in small.records])
    first, second = limited.records
    assert second.ttft_s > first.e2e_s  # serialised, as the full budget would not be


def test_kv_limit_rounds_to_segments_above_the_floor_as_the_runtime_does() -> None:
    config = ReplicaConfig(base_capacity_tokens=768, tokens_per_layer=128, kv_floor_tokens=511,
                           kv_segment_tokens=64)
    sim = Simulator(MODEL, config)
    sim.reset(window((5.0, 10, 2)))
    for layers, fraction, expected in ((0, 0.5, 511), (0, 0.75, 576), (2, 0.75, 768),
                                       (3, 0.5, 576), (5, 0.75, 1024), (5, 1.0, 1408)):
        sim.advance(0.01, layers, kv_fraction=fraction)
        assert sim.capacity == expected, (layers, fraction)


def test_kv_fraction_never_cuts_below_the_tokens_in_use() -> None:
    sim = Simulator(MODEL)
    sim.reset(window((0.0, 300, 150)))
    sim.advance(0.01, 0)  # 300 prompt tokens held
    sim.advance(0.01, 0, kv_fraction=0.5)
    assert sim.capacity >= sim.snapshot().kv_used_tokens - 149  # promised tokens aside
    assert sim.capacity >= 300


def test_tpot_violations_counted_when_a_request_finishes() -> None:
    """Eight requests decoding together: each step costs BASE + 8 * PER_DECODE = 13 ms, so a
    12-ms TPOT SLO is broken by all of them, a 14-ms one by none."""
    burst = window(*[(0.0, 20, 10) for _ in range(8)])
    for slo, expected in ((0.012, 8), (0.014, 0)):
        sim = Simulator(MODEL, ReplicaConfig(tpot_slo_s=slo))
        results = run(sim, burst)
        assert sum(r.newly_tpot_late for r in results) == expected
        assert sim.snapshot().decode_iteration_s == pytest.approx(BASE + 8 * PER_DECODE)


def test_replica_tpot_slo_from_the_calibration() -> None:
    replica = json.loads(DEFAULT_CALIBRATION.read_text())["replica"]
    config = ReplicaConfig.from_calibration()
    assert config.tpot_slo_s == pytest.approx(UNLOADED_SLO_MULTIPLE * replica["unloaded_tpot_s"])


def test_oversized_request_rejected() -> None:
    with pytest.raises(ValueError, match="LengthMapping"):
        Simulator(MODEL).reset(window((0.0, 500, 100)))


def samples_of(model: IterationModel) -> list[IterationSample]:
    rows = [(p, d, k, c) for p in (0, 50, 200) for d in (0, 1, 4, 9) for k in (0, 2, 5)
            for c in (p + 40 * d, p + 300 * d) if (p == 0) != (d == 0)]
    return [IterationSample(p + d, p, d, k, model.iteration_s(p, d, k, c), c)
            for p, d, k, c in rows]


def test_calibration_fit_recovers_exact_coefficients() -> None:
    model = dataclasses.replace(MODEL, per_context_token_s=2e-6)
    unloaded_ttft = model.iteration_s(92, 0, 0, 92) + 0.019
    fitted, report = fit_iteration_model(samples_of(model), MODEL, [(1, 0.002), (2, 0.004)], "t",
                                         unloaded=(92, unloaded_ttft))
    for name in ("base_s", "per_prefill_token_s", "per_decode_req_s", "per_quantized_layer_s",
                 "per_context_token_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(model, name), rel=1e-4)
    assert fitted.swap_s_per_layer == pytest.approx(0.002)
    assert fitted.response_s == pytest.approx(0.019, rel=1e-3)
    assert report["level_scale"] == pytest.approx(1.0) and report["clamped_to_zero"] == []
    assert "response_s" not in report["from_fallback"]


def test_calibration_fit_keeps_shape_from_median_and_total_time() -> None:
    samples = samples_of(MODEL)
    spiked = [dataclasses.replace(s, loop_s=s.loop_s * 10) if i % 7 == 0 else s
              for i, s in enumerate(samples)]
    fitted, report = fit_iteration_model(spiked, MODEL, [], "t")
    total = sum(fitted.iteration_s(s.prefill_tokens, s.decode_reqs, s.quantized_layers,
                                   s.context_tokens) for s in spiked)
    assert total == pytest.approx(sum(s.loop_s for s in spiked), rel=1e-6)
    scale = report["level_scale"]
    assert scale > 1.5  # the spikes' cost is kept, as one factor on the median shape
    assert fitted.per_decode_req_s / scale == pytest.approx(PER_DECODE, rel=0.05)
    assert fitted.base_s / scale == pytest.approx(BASE, rel=0.05)


def test_shipped_calibration_is_the_fit_of_its_samples() -> None:
    shipped = load_calibration(DEFAULT_CALIBRATION)
    raw = json.loads(DEFAULT_CALIBRATION.with_name("stories260K-cpu-samples.json").read_text())
    samples, swaps = parse_samples(raw)
    unloaded = (raw["replica"]["unloaded_prefill_tokens"], raw["replica"]["unloaded_ttft_s"])
    fitted, _ = fit_iteration_model(samples, shipped, swaps, "refit", unloaded)
    for name in (*COEFFICIENTS, "swap_s_per_layer", "response_s"):
        assert getattr(fitted, name) == pytest.approx(getattr(shipped, name), rel=1e-9, abs=1e-15)
