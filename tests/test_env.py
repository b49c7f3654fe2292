"""MorphServe-v0: gymnasium conformance, seeding, clipping, reward bookkeeping, backends; the
episode running and policy construction the offline commands share, and those commands'
command lines."""

from __future__ import annotations

import argparse
import importlib

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs  # noqa: F401  (registers MorphServe-v0)
from envs.backend import AdvanceResult
from envs.calibration import load_replica
from envs.engine_backend import kv_limit_tokens
from envs.episodes import env_from_metadata, evaluate_policies, run_episode
from envs.morph_env import MorphEnv, split_windows
from envs.policies import POLICY_NAMES, decision_latency, make_policy, standard_policies
from envs.reward import RewardWeights, load_quality_table, tick_terms
from envs.simulator import ReplicaConfig
from eval.traces import Trace, TraceRequest
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import LoadSnapshot
from rl_controller.policy import KV_FRACTIONS, Action, ConstantPolicy
from rl_controller.rl_policy import FallbackPolicy, read_metadata
from sglang_morph.config import RestoreRule
from sglang_morph.paths import DEFAULT_CHECKPOINT


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
    # restore one / hold / quantize one more, and the KV limit's fraction
    assert env.action_space.nvec.tolist() == [3, len(KV_FRACTIONS)] == [3, 3]


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
        _, _, terminated, truncated, info = env.step((1, 2))  # hold, full KV
        assert not terminated
        steps += 1
    assert steps == 20 and "morph_episode" in info
    assert info["morph_episode"]["tpot_late"] == env.stats.tpot_late


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
    weights = RewardWeights(slo=2.0, quality=0.5, transition=0.3, tpot=0.7)
    env = make_env(weights=weights)
    env.reset(options={"window": 1})
    rng = np.random.default_rng(0)
    total = 0.0
    for _ in range(40):
        total += env.step(rng.integers(0, 3, size=2))[1]
    s = env.stats
    expected = -(2.0 * s.late + 0.7 * s.tpot_late + 0.5 * s.quality_cost
                 + 0.3 * s.swapped_layers)
    assert total == pytest.approx(expected) == pytest.approx(s.reward)
    assert s.swapped_layers > 0 and s.generated_tokens > 0


def test_delta_actions_move_one_layer() -> None:
    env = make_env(restore=RestoreRule(0.0, 0.0, load_drop=0.0))  # restores not held
    env.reset(options={"window": 0})
    steps = [env.step((a, 2))[4]["target"] for a in (2, 2, 1, 0, 0, 0)]
    assert steps == [1, 2, 2, 1, 0, 0]
    assert env.stats.clipped_actions == 1  # the last restore, below 0
    assert env.stats.swapped_layers == 4


def test_restores_wait_for_the_stabilization_window() -> None:
    env = make_env(restore=RestoreRule(0.5, 0.5), tick_s=0.05)
    env.reset(options={"window": 0})
    env.step((2, 2))  # quantize one layer: never delayed
    targets = [env.step((0, 2))[4]["target"] for _ in range(12)]  # ask to restore every tick
    # The quantize recommendation stays in the 0.5-s window for 10 ticks; after that only the
    # safety clip may keep the layer (this window's requests hold KV), the stabilizer does not.
    assert targets[:9] == [1] * 9
    assert env.stats.held_restores == 9
    assert env.stats.swapped_layers + env.stats.clipped_actions >= 2


def test_kv_fraction_action_lowers_the_capacity() -> None:
    env = make_env()
    env.reset(options={"window": 0})
    budget = env.snapshot.kv_budget_tokens
    _, _, _, _, info = env.step((1, 0))  # hold the layers, KV limit at KV_FRACTIONS[0] = 0.5
    assert info["kv_fraction"] == 0.5 and not info["clipped"]
    floor = env.replica.kv_floor_tokens  # one maximum-length request (511 here): 384 would
    assert int(0.5 * budget) < floor     # strand requests the server admits
    assert env.backend.capacity == env.snapshot.kv_capacity_tokens == floor
    env.step((2, 2))  # one more layer, the full budget again
    assert env.backend.capacity == env.snapshot.kv_budget_tokens > budget
    assert env.stats.kv_fraction_ticks == pytest.approx(1.5)


def test_target_mode_applies_an_actions_kv_fraction_and_clips_it() -> None:
    heavy = Trace("heavy", tuple(TraceRequest(0.0, 300, 150) for _ in range(3)), {"span_s": 5.0})
    env = MorphEnv(heavy, [(0.0, 5.0)], action_mode="target")
    env.reset()
    env.step(Action(2, 0.75))
    assert env.backend.capacity == int(0.75 * env.snapshot.kv_budget_tokens)
    env.step(5)  # a bare target: the full budget
    used = env.snapshot.kv_used_tokens
    assert used > 0.5 * env.snapshot.kv_budget_tokens
    _, _, _, _, info = env.step(Action(5, 0.5))  # would cut below the tokens in use
    assert info["clipped"] and info["kv_fraction"] > 0.5
    assert env.stats.clipped_actions == 1
    assert env.snapshot.kv_used_tokens <= env.snapshot.kv_capacity_tokens


def test_tpot_violations_are_counted_and_priced() -> None:
    """Every finished multi-token request breaks a TPOT SLO of a nanosecond: the episode counts
    each once, and with only the TPOT weight the reward is minus their number."""
    only_tpot = RewardWeights(slo=0.0, quality=0.0, transition=0.0, tpot=1.0)
    env = make_env(replica=ReplicaConfig(tpot_slo_s=1e-9), weights=only_tpot,
                   action_mode="target")
    stats = run_episode(env, ConstantPolicy(0), 0)
    multi_token = sum(r.output_tokens > 1 for r in env.backend.records)
    assert stats.tpot_late == multi_token > 0
    assert stats.reward == pytest.approx(-stats.tpot_late)


def test_reward_terms_of_a_tick() -> None:
    snap = LoadSnapshot(0, 0, 0, 0, 512, 0, 512, 0, 0.0, 0.0, 0.08, 0, 5, 122, 0, 1.0)
    result = AdvanceResult(snap, (), generated_tokens=20, newly_late=1, swapped_layers=2,
                           newly_tpot_late=3)
    terms = tick_terms(result, 2, (0.0, 0.1, 0.5, 1.0, 1.0, 1.0))
    assert (terms.late, terms.tpot_late, terms.quality, terms.swapped) == (1, 3, 10.0, 2)
    assert terms.reward(RewardWeights()) == pytest.approx(-(1 + 3 + 0.05 * 10 + 0.05 * 2))


def test_engine_kv_limit_follows_the_fraction_of_the_budget() -> None:
    snap = LoadSnapshot(0, 0, 0, 0, 1024, 0, 1024, 0, 0.0, 0.0, 0.08, 2, 5, 128, 0, 1.0,
                        kv_budget_tokens=1024)
    assert kv_limit_tokens(snap, 2, 1.0) == 0  # no limit
    assert kv_limit_tokens(snap, 2, 0.75) == 768
    assert kv_limit_tokens(snap, 5, 0.75) == 768  # a quantize: the present budget, until it lands
    assert kv_limit_tokens(snap, 0, 0.75) == 576  # a restore: the smaller budget at once
    assert kv_limit_tokens(snap, 0, 0.5, floor_tokens=511) == 511  # never below the floor


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
        self.targets: list[tuple[int, float]] = []

    def reset(self, window: Trace) -> LoadSnapshot:
        return self.snap

    def advance(self, dt: float, target_layers: int, kv_fraction: float = 1.0) -> AdvanceResult:
        self.targets.append((target_layers, kv_fraction))
        return AdvanceResult(self.snap, (), 10, 1, 0, newly_tpot_late=2)


def test_custom_backend_plugs_in() -> None:
    backend = ConstantBackend()
    env = make_env(backend=backend, action_mode="target")
    env.reset()
    _, reward, _, _, info = env.step(Action(0, 0.75))
    assert backend.targets == [(0, 0.75)] and reward == pytest.approx(-3.0)  # 1 TTFT + 2 TPOT
    assert info["tpot_late"] == 2 and env.stats.tpot_late == 2
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


def test_evaluation_totals_every_window_with_fresh_policies() -> None:
    env = make_env(action_mode="target")
    snapshots: list[LoadSnapshot] = []
    factories = {k: v for k, v in standard_policies(None).items() if k != "always-L"}
    results = evaluate_policies(env, factories, snapshots)
    assert [r.policy for r in results] == ["heuristic", "always-0"]
    requests = sum(1 for r in synthetic_trace().requests if r.arrival_s < 40.0)
    for r in results:
        assert r.windows == 4 and r.requests == requests
        assert r.as_dict()["violation_rate"] == r.violation_rate
        assert r.as_dict()["tpot_violation_rate"] == r.tpot_violation_rate
        assert 0.5 <= r.mean_kv_fraction <= 1.0
    fp = results[1]
    assert fp.swapped_layers == 0 and fp.mean_layers == 0 and fp.quality_cost == 0
    assert len(snapshots) == 4 * 10 / env.tick_s  # the heuristic's ticks only


def test_policies_by_name() -> None:
    assert isinstance(make_policy("heuristic", DEFAULT_CHECKPOINT), HeuristicPolicy)
    assert isinstance(make_policy("int4", DEFAULT_CHECKPOINT), ConstantPolicy)
    assert isinstance(make_policy("rl", DEFAULT_CHECKPOINT), FallbackPolicy)
    assert set(POLICY_NAMES) == {"fp", "int4", "heuristic", "rl"}
    with pytest.raises(ValueError, match="accepted: fp, int4, heuristic, rl"):
        make_policy("random", DEFAULT_CHECKPOINT)


def test_decision_latency_replays_a_fresh_policy_per_pass() -> None:
    """Each pass starts a new policy on the whole sequence (a stateful one sees what serving
    would), every policy gets every pass, and the reported p99 lies within the passes' range."""
    built: list[str] = []

    class Counting:
        name = "counting"

        def __init__(self, tag: str) -> None:
            built.append(tag)
            self.seen = 0

        def decide(self, snap: LoadSnapshot) -> int:
            self.seen += 1
            assert self.seen <= 3  # a reused policy would see a fourth snapshot
            return 0

    snaps = [LoadSnapshot(0, 0, 0, 0, 100, 0, 100, 0, 0.0, 0.0, 1.0, 0, 4, 10, 0, 1.0)] * 3
    out = decision_latency({"a": lambda: Counting("a"), "b": lambda: Counting("b")}, snaps, 4)
    assert sorted(built) == ["a"] * 4 + ["b"] * 4
    assert built[:4] == ["a", "b", "b", "a"]  # the order rotates between passes
    for t in out.values():
        assert 0 < t["p99_low_s"] <= t["p99_s"] <= t["p99_high_s"] and t["mean_s"] > 0
    with pytest.raises(ValueError, match="reps must be >= 1"):
        decision_latency({"a": lambda: Counting("a")}, snaps, 0)


def test_shipped_checkpoint_environment_is_rebuilt_from_its_metadata() -> None:
    meta = read_metadata(DEFAULT_CHECKPOINT)
    env = env_from_metadata(meta)
    assert env.windows == [tuple(w) for w in meta["eval_windows"]]
    assert env.action_mode == "target" and env.tick_s == meta["tick_s"]
    assert env.replica.num_layers == meta["num_layers"]
    assert env.weights == RewardWeights(**meta["reward_weights"])
    assert env.restore == RestoreRule.from_metadata(meta)
    slower = env_from_metadata(meta, time_scale=2 * meta["time_scale"])
    held_out = slower.trace.duration_s * meta["train_frac"]
    assert slower.windows and min(start for start, _ in slower.windows) >= held_out


def test_evaluation_replaces_only_the_restore_settings_it_is_given() -> None:
    """Each ``--restore-*`` option of ``rl_controller.evaluate`` replaces its part of the
    checkpoint's rule; a window past the checkpoint's max window raises the max with it."""
    evaluate = importlib.import_module("rl_controller.evaluate")
    meta = {"restore_window_s": 10.0, "restore_max_window_s": 120.0, "restore_load_drop": 0.25}

    def rule(window: float | None = None, max_window: float | None = None,
             load_drop: float | None = None) -> RestoreRule:
        return evaluate.restore_rule(argparse.Namespace(
            restore_window=window, restore_max_window=max_window, restore_load_drop=load_drop),
            meta)

    assert rule() == RestoreRule(10.0, 120.0, load_drop=0.25)
    assert rule(window=5.0, load_drop=0.0) == RestoreRule(5.0, 120.0, load_drop=0.0)
    assert rule(max_window=60.0) == RestoreRule(10.0, 60.0, load_drop=0.25)
    assert rule(window=200.0) == RestoreRule(200.0, 200.0, load_drop=0.25)


def test_shipped_checkpoint_metadata_carries_no_machine_paths() -> None:
    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [s for v in value.values() for s in strings(v)]
        if isinstance(value, list):
            return [s for v in value for s in strings(v)]
        return [value] if isinstance(value, str) else []

    meta = read_metadata(DEFAULT_CHECKPOINT)
    assert not [s for s in strings(meta) if s.startswith(("/", "~")) or ":\\" in s]


def test_training_records_file_arguments_relative_to_the_checkout() -> None:
    train = importlib.import_module("rl_controller.train")
    recorded = train.portable_args(train.Args())
    assert recorded["out"] == "checkpoints/morph-ppo.zip"
    assert recorded["calibration"] == "envs/calibrations/stories260K-cpu.json"
    assert recorded["profile"] == "checkpoints/profiles/stories260K-int4.json"
    assert recorded["quality"] == ""


@pytest.mark.parametrize(
    "command", ["rl_controller.train", "rl_controller.evaluate", "envs.sim_vs_real",
                "envs.calibrate"],
)
def test_commands_parse_their_options(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(command).main(["--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out
