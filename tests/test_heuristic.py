"""clip_action's safety cases and the heuristic's behaviour in the simulator (calm and burst)."""

from __future__ import annotations

import dataclasses
import time

import pytest

from envs.calibration import IterationModel
from envs.morph_env import MorphEnv
from envs.simulator import ReplicaConfig
from eval.traces import Trace, TraceRequest
from rl_controller.controller import Controller
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import LoadSnapshot
from rl_controller.policy import (
    KV_FRACTIONS,
    Action,
    ConstantPolicy,
    clip_action,
    clip_kv_fraction,
    target_layers,
)
from sglang_morph.config import RestoreRule

TICK_S = 0.25


def snapshot(**overrides) -> LoadSnapshot:
    base = LoadSnapshot(
        queue_len=0, queued_prompt_tokens=0, head_prefill_tokens=0, running_reqs=0,
        kv_capacity_tokens=756, kv_used_tokens=0, kv_free_tokens=756, kv_evictable_tokens=0,
        arrival_rate=0.0, oldest_wait_s=0.0, ttft_slo_s=0.08, quantized_layers=2, num_layers=5,
        tokens_per_layer=122, recent_transitions=0, seconds_since_transition=100.0,
    )
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize(
    ("target", "used", "expected"),
    [
        (3, 0, (3, False)),  # quantize one more: always safe
        (9, 700, (5, True)),  # beyond num_layers
        (-2, 0, (0, True)),  # below 0
        (0, 500, (0, False)),  # restore both: 500 <= 756 - 244
        (0, 600, (1, True)),  # only one restore fits: 600 <= 756 - 122
        (0, 700, (2, True)),  # no restore fits: 700 > 634
        (1, 634, (1, False)),  # exactly fits after one restore
        (2, 756, (2, False)),  # no change is always allowed
    ],
)
def test_clip_action(target: int, used: int, expected: tuple[int, bool]) -> None:
    snap = snapshot(kv_used_tokens=used, kv_free_tokens=756 - used)
    assert clip_action(target, snap) == expected


def trace_of(rates: list[tuple[float, float, float]], prompt: int, output: int) -> Trace:
    """Constant-rate segments (start_s, end_s, requests per second), evenly spaced arrivals."""
    requests = []
    for start, end, rate in rates:
        n = int(round((end - start) * rate))
        requests += [TraceRequest(start + i / rate, prompt, output) for i in range(n)]
    span = max(end for _, end, _ in rates)
    return Trace("synthetic", tuple(sorted(requests, key=lambda r: r.arrival_s)),
                 {"span_s": span})


# A fixed, uncontended engine (the SGLang notes' decode steps: 6 ms at batch 1, +0.8 ms per
# request), so these cases test the rule and not whatever the shared CPU measured last.
ENGINE = IterationModel(0.0048, 3e-5, 0.0008, 0.0002, 0.002, source="test")
NO_RESTORE_RULE = RestoreRule(0.0, 0.0, load_drop=0.0)
"""Restores as the policy asks: these cases test the policy's rule, not the stabilizer."""


def replay(trace: Trace, policy, restore: RestoreRule = NO_RESTORE_RULE) -> list[int]:
    """Quantized-layer count after every tick (by default the rule alone, without the restore
    stabilizer every policy serves behind: tests/test_stabilizer.py has it)."""
    env = MorphEnv(trace, [(0.0, trace.duration_s)], tick_s=TICK_S, action_mode="target",
                   calibration=ENGINE, replica=ReplicaConfig(), restore=restore)
    env.reset(seed=0)
    layers, done = [], False
    while not done:
        _, _, terminated, truncated, _ = env.step(policy.decide(env.snapshot))
        layers.append(env.snapshot.quantized_layers)
        done = terminated or truncated
    return layers


def transitions(layers: list[int]) -> int:
    return sum(a != b for a, b in zip([0, *layers], layers, strict=False))


def test_steady_low_load_makes_no_transition() -> None:
    layers = replay(trace_of([(0.0, 60.0, 2.0)], prompt=120, output=20), HeuristicPolicy())
    assert transitions(layers) == 0


def test_burst_quantizes_quickly_then_restores() -> None:
    trace = trace_of([(0.0, 20.0, 1.0), (20.0, 30.0, 40.0), (30.0, 60.0, 0.5)],
                     prompt=250, output=20)
    layers = replay(trace, HeuristicPolicy())
    burst_tick = int(20.0 / TICK_S)
    assert max(layers[:burst_tick]) == 0  # calm before the burst
    first = next(i for i, k in enumerate(layers) if k > 0)
    assert burst_tick <= first <= burst_tick + 4  # reacts within a second
    assert max(layers) == 5  # the burst needs all the capacity it can get
    assert layers[-1] == 0  # and it is all given back once calm
    assert transitions(layers) <= 12  # no chatter: up, then down one layer at a time


def test_dwell_blocks_reversal_after_restore() -> None:
    policy = HeuristicPolicy(dwell_s=2.0, requantize_dwell_s=2.0)
    pressure = {"queue_len": 5, "head_prefill_tokens": 400, "oldest_wait_s": 0.05,
                "kv_used_tokens": 700, "kv_free_tokens": 56, "running_reqs": 3}
    policy.decide(snapshot(quantized_layers=3, kv_capacity_tokens=878))
    # A restore just happened (3 -> 2, 0.5 s ago): pressure must not flip it back yet.
    assert target_layers(policy.decide(snapshot(seconds_since_transition=0.5, **pressure))) == 2
    assert target_layers(policy.decide(snapshot(seconds_since_transition=2.5, **pressure))) > 2


def test_escalation_is_sized_to_admit_the_whole_queue() -> None:
    """Five waiting requests of 200 tokens each with 56 reclaimable: sized to the head, one
    layer (200 + 12 - 56 = 156 tokens, 2 layers of 122); sized to the queue, every layer the
    1000 queued tokens need (capped at the model's depth)."""
    pressure = snapshot(
        queue_len=5, head_prefill_tokens=200, queued_demand_tokens=1000, oldest_wait_s=0.05,
        kv_used_tokens=700, kv_free_tokens=56, running_reqs=3, quantized_layers=0,
    )
    assert target_layers(HeuristicPolicy(whole_queue=False).decide(pressure)) == 2
    assert target_layers(HeuristicPolicy().decide(pressure)) == 5
    smaller = dataclasses.replace(pressure, queued_demand_tokens=400)
    assert target_layers(HeuristicPolicy().decide(smaller)) == 3  # 400 + 12 - 56 = 356 tokens
    calm = dataclasses.replace(pressure, oldest_wait_s=0.0)  # waited less than the gate
    assert target_layers(HeuristicPolicy().decide(calm)) == 0


def test_decision_is_cheap() -> None:
    policy, snap = HeuristicPolicy(), snapshot(queue_len=3, head_prefill_tokens=100)
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        policy.decide(snap)
    per_decision = (time.perf_counter() - start) / n
    assert per_decision < 60e-6  # 1% of a 6 ms decode iteration, with a wide margin for noise


def test_constant_policies() -> None:
    assert ConstantPolicy(0).decide(snapshot()) == 0
    assert ConstantPolicy("all").decide(snapshot()) == 5


def test_kv_limit_steps_down_under_tpot_pressure_and_back_with_dwell() -> None:
    """Decodes slower than the TPOT target with nobody waiting long: the limit steps down one
    fraction at a time, never twice within the dwell; a request that waits long brings it up."""
    policy = HeuristicPolicy(kv_dwell_s=2.0)
    slow = {"decode_iteration_s": 0.3, "tpot_slo_s": 0.2, "running_reqs": 6}
    fractions = []
    for t in range(8):  # half-second ticks (seconds_since_transition is the policy's clock)
        answer = policy.decide(snapshot(seconds_since_transition=10 + 0.5 * t, **slow))
        fractions.append(answer.kv_fraction)
    assert fractions[0] == KV_FRACTIONS[-2]
    assert fractions[-1] == KV_FRACTIONS[0]
    changes = [i for i in range(1, len(fractions)) if fractions[i] != fractions[i - 1]]
    assert all(b - a >= 4 for a, b in zip(changes, changes[1:]))  # 4 ticks = the 2 s dwell
    waited = {**slow, "queue_len": 3, "oldest_wait_s": 0.5, "head_prefill_tokens": 10}
    ups = [policy.decide(snapshot(seconds_since_transition=14 + 0.5 * t, **waited)).kv_fraction
           for t in range(6)]
    assert ups[-1] > KV_FRACTIONS[0]


def test_kv_limit_stays_full_without_a_tpot_target() -> None:
    policy = HeuristicPolicy()
    for t in range(10):
        answer = policy.decide(snapshot(seconds_since_transition=t, decode_iteration_s=9.0,
                                        running_reqs=8))
        assert answer.kv_fraction == 1.0  # the default target is infinite: nothing to protect


def test_kv_fraction_is_clipped_to_the_tokens_in_use() -> None:
    snap = snapshot(kv_budget_tokens=1000, kv_capacity_tokens=1000, kv_used_tokens=800)
    assert clip_kv_fraction(0.5, snap) == (0.8, True)
    assert clip_kv_fraction(0.1, snapshot(kv_budget_tokens=1000)) == (KV_FRACTIONS[0], True)
    assert clip_kv_fraction(1.0, snap) == (1.0, False)


def test_controller_carries_the_kv_fraction_and_refuses_non_finite_ones() -> None:
    class Fixed:
        name = "fixed"

        def __init__(self, answer) -> None:
            self.answer = answer

        def decide(self, snap: LoadSnapshot):
            return self.answer

    snap = snapshot(kv_budget_tokens=1000, kv_used_tokens=100)
    assert Controller(Fixed(Action(2, 0.75))).decide(snap).kv_fraction == 0.75
    assert Controller(Fixed(3)).decide(snap).kv_fraction == 1.0
    decision = Controller(Fixed(Action(2, float("nan"))), HeuristicPolicy()).decide(snap)
    assert decision.fell_back and "non-finite" in decision.reason
