"""MorphServe-v0: gymnasium conformance, seeding, clipping, reward bookkeeping, backends."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers MorphServe-v0)
from envs.backend import AdvanceResult
from envs.calibration import load_replica
from envs.morph_env import MorphEnv, split_windows
from envs.reward import RewardWeights, load_quality_table
from eval.traces import Trace, TraceRequest
from rl_controller.observation import LoadSnapshot


def synthetic_trace(seconds: float = 40.0, rate: float = 6.0, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate, int(seconds * rate * 1.5)))
    requests = tuple(
        TraceRequest(float(t), int(rng.integers(8, 300)), int(rng.integers(4, 60)))
        for t in arrivals if t < seconds
    )
    return Trace("synthetic", requests, {"span_s": seconds})


def make_env(**kwargs) -> MorphEnv:
    trace = synthetic_trace()
    return MorphEnv(trace, [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, 40.0)], **kwargs)


def test_check_env_passes() -> None:
    check_env(make_env(), skip_render_check=True)


def test_registered() -> None:
    env = gym.make("MorphServe-v0", trace=synthetic_trace(), windows=[(0.0, 10.0)])
    obs, _ = env.reset(seed=1)
    assert env.observation_space.contains(obs)
    assert env.action_space.n == 3  # restore one / hold / quantize one more


def test_seeded_window_choice_is_reproducible() -> None:
    def windows(seed: int) -> list:
        env = make_env()
        env.reset(seed=seed)
        return [env.reset()[1]["window"] for _ in range(8)]

    assert windows(3) == windows(3)
    assert len(set(windows(3))) > 1


def test_episode_truncates_at_window_end() -> None:
    env = make_env(tick_s=0.5)
    env.reset(options={"window": 0})
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, info = env.step(0)
        assert not terminated
        steps += 1
    assert steps == 20 and "morph_episode" in info


def test_unsafe_restore_is_clipped_and_counted() -> None:
    trace = Trace("heavy", tuple(TraceRequest(0.0, 300, 150) for _ in range(3)), {"span_s": 5.0})
    env = MorphEnv(trace, [(0.0, 5.0)], action_mode="target")
    env.reset()
    env.step(5)
    assert env.snapshot.kv_used_tokens > 512
    _, _, _, _, info = env.step(0)
    assert info["clipped"] and info["target"] > 0
    assert env.stats.clipped_actions == 1
    assert env.snapshot.kv_used_tokens <= env.snapshot.kv_capacity_tokens


def test_reward_is_the_weighted_sum_of_its_terms() -> None:
    weights = RewardWeights(slo=2.0, quality=0.5, transition=0.3)
    env = make_env(weights=weights)
    env.reset(options={"window": 1})
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(40):
        total += env.step(int(rng.integers(0, 3)))[1]
    s = env.stats
    expected = -(2.0 * s.late + 0.5 * s.quality_cost + 0.3 * s.swapped_layers)
    assert total == pytest.approx(expected) == pytest.approx(s.reward)
    assert s.swapped_layers > 0 and s.generated_tokens > 0


def test_delta_actions_move_one_layer() -> None:
    env = make_env()
    env.reset(options={"window": 0})
    assert [env.step(a)[4]["target"] for a in (2, 2, 1, 0, 0, 0)] == [1, 2, 2, 1, 0, 0]
    assert env.stats.clipped_actions == 1  # the last restore, below 0
    assert env.stats.swapped_layers == 4


def test_quality_table_must_match_layers() -> None:
    with pytest.raises(ValueError, match="has 3 entries"):
        make_env(quality_table=[0.0, 0.1, 0.2])


def test_split_windows_never_overlap() -> None:
    train, held_out = split_windows(synthetic_trace(100.0), 10.0, 0.7)
    assert train and held_out
    assert max(end for _, end in train) <= min(start for start, _ in held_out)


class ConstantBackend:
    """A stand-in for the engine backend: proves the protocol is all the env needs."""

    def __init__(self) -> None:
        self.snap = LoadSnapshot(0, 0, 0, 0, 512, 0, 512, 0, 0.0, 0.0, 0.08, 0, 5, 122, 0, 1.0)
        self.targets: list[int] = []

    def reset(self, window: Trace) -> LoadSnapshot:
        return self.snap

    def advance(self, dt: float, target_layers: int) -> AdvanceResult:
        self.targets.append(target_layers)
        return AdvanceResult(self.snap, (), 10, 1, 0)


def test_custom_backend_plugs_in() -> None:
    backend = ConstantBackend()
    env = make_env(backend=backend, action_mode="target")
    env.reset()
    _, reward, *_ = env.step(0)
    assert backend.targets == [0] and reward == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="accepted: simulator, engine"):
        make_env(backend="gpu")


def test_replica_comes_from_the_calibration() -> None:
    env = make_env()
    measured = load_replica()
    assert env.replica.base_capacity_tokens == measured["base_capacity_tokens"]
    assert env.replica.tokens_per_layer == measured["tokens_per_layer"]
    assert env.replica.ttft_slo_s == pytest.approx(measured["ttft_slo_s"])


def test_quality_table_from_eval_quality_output(tmp_path) -> None:
    path = tmp_path / "q.json"
    path.write_text('{"orders": {"lis": {"ppl": [3.5, 3.6, 3.75]}, "random": {"ppl": [0]}}}')
    assert load_quality_table(path) == pytest.approx((0.0, 0.1, 0.25))
