"""MorphServe-v0 on the real engine: a live manual-policy server replays a trace window while
the environment's actions change its layers (one server for the module)."""

from __future__ import annotations

import time

import pytest

from envs.engine_backend import EngineBackend
from envs.morph_env import MorphEnv, prepare_trace
from eval.traces import LengthMapping, burstiest_window
from rl_controller.clock import RATE_WINDOW_S
from rl_controller.policy import Action, ConstantPolicy, Policy
from sglang_morph.config import RestoreRule

pytestmark = pytest.mark.slow

WINDOW_S = 6.0
TICK_S = 0.25


@pytest.fixture(scope="module")
def env():
    trace = prepare_trace("azure-code", LengthMapping(), 1.0)
    start, _ = burstiest_window(trace, WINDOW_S)
    backend = EngineBackend(ttft_slo_s=0.5)
    # Restores as the actions ask (no stabilization window): these cases test the backend.
    e = MorphEnv(trace, [(start, start + WINDOW_S)], backend=backend, tick_s=TICK_S,
                 action_mode="target", restore=RestoreRule(0.0, 0.0, load_drop=0.0))
    yield e
    e.close()


def run_until(env: MorphEnv, policy: Policy, ticks: int) -> list[int]:
    """Step with ``policy``'s decisions for ``ticks`` ticks; the int4 layer count after each."""
    seen = []
    for _ in range(ticks):
        env.step(policy.decide(env.snapshot))
        seen.append(env.snapshot.quantized_layers)
    return seen


def test_policy_decisions_change_the_server(env: MorphEnv) -> None:
    backend: EngineBackend = env.backend
    snap0 = env.reset()[0]
    assert env.observation_space.contains(snap0)
    before = backend.state()
    assert before["quantized_layers"] == 0

    up = run_until(env, ConstantPolicy(2), 8)
    state = backend.state()
    assert up[-1] == 2 and state["quantized_layers"] == 2
    int4 = {layer["id"] for layer in state["layers"] if layer["format"] == "int4"}
    assert int4 == set(state["layer_order"][:2])  # the profile's order, least important first
    assert state["kv_capacity_tokens"] > before["kv_capacity_tokens"]
    assert state["transitions"] >= before["transitions"] + 2

    # Restores wait until the KV they take back is free (clipped, then the runtime's shrink),
    # so give the burst's requests time to finish.
    fp = ConstantPolicy(0)
    for _ in range(80):
        env.step(fp.decide(env.snapshot))
        if env.snapshot.quantized_layers == 0 and env.stats.ticks * TICK_S >= WINDOW_S:
            break
    assert backend.state()["quantized_layers"] == 0
    assert env.stats.swapped_layers >= 4
    assert env.stats.generated_tokens > 0 and env.stats.ttfts
    assert all(t > 0 for t in env.stats.ttfts)
    assert backend.failed_requests() == []


def test_reset_starts_the_window_again_from_full_precision(env: MorphEnv) -> None:
    env.reset()
    run_until(env, ConstantPolicy(1), 4)
    env.reset()  # mid-window: the replay is cancelled, layers restored, server idle
    # reset returns only once the server read idle (no queue, nothing running, every layer fp)
    # and raises otherwise; a state read now may already see the new window's first request.
    assert env.backend.state()["quantized_layers"] == 0
    assert env.stats.ticks == 0


def test_kv_fraction_sets_and_lifts_the_servers_kv_limit(env: MorphEnv) -> None:
    backend: EngineBackend = env.backend
    env.reset()
    budget = env.snapshot.kv_budget_tokens
    # 0.75 is above the server's KV floor (the longest admissible request); the window's first
    # requests may already hold more than that, and then clip_kv_fraction raises the fraction.
    _, _, _, _, info = env.step(Action(0, 0.75))
    applied = info["kv_fraction"]
    assert 0.75 <= applied <= 1.0
    expected = None if applied >= 1.0 else max(backend.kv_floor_tokens, int(applied * budget))
    assert backend.state()["kv_limit_tokens"] == expected
    env.step(Action(0, 1.0))
    assert backend.state()["kv_limit_tokens"] is None
    assert env.stats.kv_fraction_ticks == pytest.approx(applied + 1.0)


def test_replay_starts_at_the_first_step_not_at_reset(env: MorphEnv) -> None:
    """Whatever runs between reset and the first step (a learner's update) must not let the
    window's first requests arrive unobserved: the replay starts with the first step."""
    window = env.trace.requests
    first = min(r.arrival_s for r in window if env.window[0] <= r.arrival_s < env.window[1])
    assert first - env.window[0] < 0.5  # the burst's first request is due at once
    env.reset()
    time.sleep(RATE_WINDOW_S + 0.5)  # the earlier cases' arrivals have left the rate's window
    idle = env.backend.snapshot()
    assert idle.arrival_rate == 0 and idle.queue_len == 0 and idle.running_reqs == 0
    for _ in range(4):
        env.step(Action(0))
    assert env.snapshot.arrival_rate > 0
