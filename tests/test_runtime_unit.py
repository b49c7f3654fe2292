"""MorphRuntime's own logic without a server: a test-double scheduler and model (tests/
sglang_doubles.py) around SGLang's real KV pool and allocator, the real layer swapper and
quantizer. Covers settling within the budget, swaps between quantized formats, the frozen state,
fallback accounting, injected faults, the clock and the iteration log."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from rl_controller.controller import Controller
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.rl_policy import CheckpointError
from sglang_morph.config import FORMAT_BITS, KV_KEY, SWAP_KEY_PREFIX, MorphConfig
from sglang_morph.faults import ENV_VAR, Faults
from sglang_morph.iterations import IterationLog, previous_path, read_tail
from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.runtime import MorphRuntime
from sglang_morph.timings import Timings
from tests.sglang_doubles import FakeBatch, FakeLlama, FakeReq, FakeScheduler

POOL = 1280
FP_KV_TOKENS = 256
SEGMENT = 32


@pytest.fixture
def make_runtime(monkeypatch: pytest.MonkeyPatch, one_thread):
    """Builds runtimes over a fresh two-layer model and scheduler; stops their swap threads."""
    monkeypatch.setattr("sglang_morph.metrics.metrics_enabled", lambda: False)
    built: list[MorphRuntime] = []

    def make(policy: str = "manual", **cfg_fields) -> MorphRuntime:
        model = FakeLlama()
        scheduler = FakeScheduler(POOL, model=model)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        bpt = 2 * 2 * 2 * 4 * 4  # k and v, 2 layers, 2 heads x 4 dims of float32
        cfg = MorphConfig(policy=policy, memory_budget_bytes=weights + FP_KV_TOKENS * bpt,
                          kv_segment_tokens=SEGMENT, **cfg_fields)
        rt = MorphRuntime(scheduler, cfg)
        built.append(rt)
        return rt

    yield make
    for rt in built:
        rt.swapper.close()


def settle(rt: MorphRuntime, timeout_s: float = 30.0) -> None:
    """Run scheduler loop passes until every layer has its desired format and KV is resized,
    checking the budget at every pass."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rt.loop_pass()
        assert_within_budget(rt)
        if rt.formats() == rt.desired and rt.kv.complete:
            return
        time.sleep(0.005)
    raise AssertionError(f"not settled: {rt.formats()} vs {rt.desired}, {rt.last_error}")


def assert_within_budget(rt: MorphRuntime) -> None:
    st = rt.state()
    assert st["device_bytes_in_use"] <= st["budget_bytes"], st


def test_state_is_plain_json_with_the_new_keys(make_runtime) -> None:
    rt = make_runtime()
    st = json.loads(json.dumps(rt.state()))
    assert st["fallbacks"] == 0 and st["fallback_reason"] is None and st["policy_loaded"] is None
    assert st["kv_capacity_tokens"] == FP_KV_TOKENS and st["quantized_layers"] == 0
    assert rt.scheduler.holders() == {FP_KV_TOKENS}
    assert st["iteration_log_bytes"] == 0 and st["internal_sizes"]["arrivals"] == 0


def test_buffers_stay_bounded_without_a_controller(make_runtime) -> None:
    """Arrivals are counted whatever the policy; nothing drains them but the clock's window."""
    rt = make_runtime()
    for _ in range(50_000):
        rt.on_arrival()
    state = rt.state()
    sizes, bounds = state["internal_sizes"], state["internal_bounds"]
    assert sizes["arrivals"] <= 5.0 / 0.001 + 1 and sizes["transitions"] == 0
    assert set(bounds) == set(sizes) | {"iteration_log_bytes"}  # every buffer declares a bound
    assert all(sizes[k] <= bounds[k] for k in sizes) and bounds["arrivals"] == 5001


def test_quantize_grows_kv_and_restore_waits_for_the_tokens_in_use(make_runtime) -> None:
    rt = make_runtime()
    s = rt.scheduler
    rt.set_target_quantized(2)
    settle(rt)
    per_layer = rt.tokens_per_layer()
    grown = rt.kv_capacity_tokens()
    assert grown == (FP_KV_TOKENS + 2 * per_layer) // SEGMENT * SEGMENT
    assert rt.transitions == 2 and s.holders() == {grown}
    # A request holds more than one restore leaves room for, but less than two.
    req = s.admit(FakeReq(prompt_len=FP_KV_TOKENS + per_layer - SEGMENT, max_new_tokens=4),
                  FP_KV_TOKENS + per_layer - SEGMENT)
    s.running_batch = FakeBatch([req])
    rt.set_target_quantized(0)
    for _ in range(200):
        rt.loop_pass()
        assert_within_budget(rt)
        time.sleep(0.005)
    assert rt.quantized_layers() == 1, "the second restore must wait for the request's tokens"
    s.release(req)
    settle(rt)
    assert rt.quantized_layers() == 0 and rt.kv_capacity_tokens() == FP_KV_TOKENS
    assert rt.transitions == 4 and s.holders() == {FP_KV_TOKENS}


def test_int4_layer_swaps_to_int8_from_its_full_precision_host_copy(make_runtime) -> None:
    """The int8 copy was not made at start-up (int4 servers make int4 copies): it must be
    quantized from the host copy of the fp weights, the device weight being empty by then."""
    rt = make_runtime()
    slot = rt.swapper.slots[0]
    original = {n: lin.weight.detach().clone() for n, lin in slot.linears.items()}
    assert rt.handle_swaps({f"{SWAP_KEY_PREFIX}0": FORMAT_BITS["int4"]})
    settle(rt)
    copies_before = slot.copies
    assert rt.handle_swaps({f"{SWAP_KEY_PREFIX}0": FORMAT_BITS["int8"]})
    settle(rt)
    assert not rt.frozen and rt.last_error is None and rt.formats()[0] == "int8"
    for name, weight in original.items():
        error = (slot.copies["int8"][name].dequantize() - weight).abs().max()
        assert error < 0.05 * weight.abs().max()
    # The background thread replaced the copies dict instead of inserting into it: a reader
    # iterating the old one (GET /morph/state) never sees it change size.
    assert "int8" not in copies_before and "int8" in slot.copies
    assert rt.handle_swaps({f"{SWAP_KEY_PREFIX}0": FORMAT_BITS["fp"]})
    settle(rt)
    for name, lin in slot.linears.items():
        assert torch.equal(lin.weight, original[name])


def test_frozen_runtime_keeps_the_size_holders_in_step(make_runtime) -> None:
    rt = make_runtime()
    s = rt.scheduler
    req = s.admit(FakeReq(prompt_len=200, max_new_tokens=4), 200)
    s.running_batch = FakeBatch([req])
    assert rt.handle_swaps({KV_KEY: 96})
    assert s.holders() == {200}  # 104 quarantined slots still held
    rt.frozen = True
    s.release(req)  # the quarantined slots retire as the request finishes
    rt.loop_pass()
    assert s.holders() == {96} == {rt.kv.alloc.committed_size()}
    assert rt.formats() == ["fp", "fp"]  # nothing else moves while frozen


class _Broken:
    name = "broken"

    def decide(self, snap) -> int:
        raise RuntimeError("boom")


def test_fallbacks_are_counted_and_logged_at_most_every_ten_seconds(
    make_runtime, caplog: pytest.LogCaptureFixture
) -> None:
    rt = make_runtime("heuristic")
    rt.controller = Controller(_Broken(), HeuristicPolicy())
    with caplog.at_level(logging.WARNING, logger="sglang_morph"):
        for second in range(25):
            rt.decide(1000.0 + second)
    st = json.loads(json.dumps(rt.state(), allow_nan=False))  # what the HTTP route sends
    assert st["fallbacks"] == 25 and "boom" in st["fallback_reason"]
    assert st["tpot_slo_s"] is None and st["last_observation"]["tpot_slo_s"] is None
    assert st["last_observation"]["target"] == 0 and st["decision_s_median"] > 0
    lines = [r.getMessage() for r in caplog.records if "heuristic decided" in r.getMessage()]
    assert len(lines) == 3 and "(11 fallbacks so far)" in lines[1]


def test_rl_runtime_loads_the_shipped_policy_or_refuses_to_start(make_runtime, tmp_path) -> None:
    rt = make_runtime("rl")
    assert rt.state()["policy_loaded"] == str(DEFAULT_CHECKPOINT)
    rt.decide(time.perf_counter())  # two layers here, five in training: still runs
    assert rt.fallbacks == 0 and rt.last_target in (0, 1)
    with pytest.raises(CheckpointError, match="does not exist"):
        make_runtime("rl", checkpoint_path=str(tmp_path / "missing.zip"))


def test_failed_preparation_is_dropped_counted_and_retried(make_runtime, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, '{"prepare": 1}')
    monkeypatch.setattr("sglang_morph.swap.layer_swapper.PREPARE_RETRY_S", 0.05)
    rt = make_runtime()
    rt.set_target_quantized(1)
    settle(rt)  # the first preparation fails; the retry completes the swap
    st = rt.state()
    assert st["prepare_failures"] == 1 and st["transitions"] == 1 and st["quantized_layers"] == 1
    assert "injected fault: prepare call 1" in st["last_error"] and not st["frozen"]
    assert st["internal_sizes"]["swap_jobs"] == 0


def test_injected_tick_fault_freezes_morphing(make_runtime, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, '{"tick": 2}')
    rt = make_runtime(tick_interval_s=0.0)
    rt.loop_pass()
    assert not rt.frozen
    rt.loop_pass()
    assert rt.frozen and "injected fault: tick call 2" in rt.last_error
    rt.set_target_quantized(2)
    rt.loop_pass()
    assert rt.formats() == ["fp", "fp"]  # frozen: nothing moves


@pytest.mark.parametrize("policy", ["rl", "heuristic"])
def test_injected_policy_fault_falls_back_or_freezes(make_runtime, monkeypatch, policy) -> None:
    """The RL policy's failure is decided by the heuristic; the heuristic has no fallback, so
    its own failure freezes morphing like any failing tick."""
    monkeypatch.setenv(ENV_VAR, '{"policy": 2}')
    rt = make_runtime(policy, tick_interval_s=0.0)
    for _ in range(3):
        rt.loop_pass()
    if policy == "rl":
        assert not rt.frozen and rt.fallbacks == 1
        assert rt.fallback_reason == "InjectedFault: injected fault: policy call 2"
    else:
        assert rt.frozen and "injected fault: policy call 2" in rt.last_error


def test_fault_plans_are_checked_and_nothing_is_injected_without_one(monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    faults = Faults.from_env()
    for step in ("prepare", "tick", "policy"):
        faults.check(step)
    assert faults.plan == {} and not faults.calls
    for bad in ('{"tick": 0}', '{"commit": 1}', '[1]', '{"tick": "3"}'):
        monkeypatch.setenv(ENV_VAR, bad)
        with pytest.raises(ValueError, match="expected a JSON object of steps"):
            Faults.from_env()


def test_arrivals_and_transitions_reach_the_snapshot(make_runtime) -> None:
    rt = make_runtime()
    for _ in range(10):
        rt.on_arrival()
    rt.set_target_quantized(1)
    settle(rt)
    snap = rt.snapshot(time.perf_counter())
    assert snap.arrival_rate == pytest.approx(10 / 5.0)
    assert snap.recent_transitions == 1 and snap.seconds_since_transition < 5
    later = rt.snapshot(time.perf_counter() + 7.0)  # transitions count over 10 s, arrivals 5 s
    assert later.recent_transitions == 1 and later.arrival_rate == 0.0


def test_timings_keep_constant_memory_and_the_worst_case() -> None:
    t = Timings(window=4)
    for x in (5.0, 1.0, 2.0, 3.0, 4.0, 0.5):
        t.add(x)
    assert len(t.recent) == 4 and t.max == 5.0 and t.last == 0.5 and t.median() == 3.0


# -- the iteration log --


class _Batch:
    def __init__(self, reqs: int) -> None:
        self.reqs = [None] * reqs
        self.forward_mode = FakeBatch([], extend=False).forward_mode
        self.extend_num_tokens = 0
        self.seq_lens_cpu = torch.tensor([10] * reqs)


def write_records(log: IterationLog, n: int) -> None:
    for i in range(n):
        log.loop_pass(float(i))
        log.record(_Batch(1 + i % 3), float(i), 0.001, 0)
    log.loop_pass(float(n))


def test_iteration_log_rotates_and_the_tail_spans_both_files(tmp_path: Path) -> None:
    path = tmp_path / "iterations.jsonl"
    log = IterationLog(str(path), max_bytes=4096)
    write_records(log, 200)
    assert previous_path(path).exists() and path.stat().st_size < 4096
    assert previous_path(path).stat().st_size >= 4096
    current = sum(1 for _ in open(path))
    kept = current + sum(1 for _ in open(previous_path(path)))
    assert kept < 200  # what came before the previous file is gone: the log stays bounded
    tail = read_tail(path, current + 5)
    assert [r["start_s"] for r in tail] == [float(i) for i in range(200 - current - 5, 200)]
    assert len(read_tail(path, 10**6)) == kept
    assert log.median_decode_s() == pytest.approx(0.001)


def test_tail_skips_a_record_being_written_and_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "iterations.jsonl"
    lines = [json.dumps({"start_s": float(i)}) for i in range(5000)]
    path.write_text("\n".join(lines) + "\n" + '{"start_s": 99')  # half-written last record
    assert [r["start_s"] for r in read_tail(path, 3)] == [4997.0, 4998.0, 4999.0]
    assert read_tail(tmp_path / "absent.jsonl", 5) == []
