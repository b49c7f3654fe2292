"""RL checkpoints: export of the actor, numpy loading, refusal of bad files, and the controller's
fallback to the heuristic."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs.episodes import PolicyResult, choose_candidate, dominance_margin
from envs.morph_env import MorphEnv
from eval.traces import Trace, TraceRequest
from rl_controller import actor_export
from rl_controller.actor_export import export_actor
from rl_controller.controller import Controller
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import OBS_SIZE, OBS_VERSION, LoadSnapshot, observation_vector
from rl_controller.policy import (
    DELTA_ACTIONS,
    KV_FRACTIONS,
    RL_ACTIONS,
    Action,
    RLActions,
    target_layers,
)
from rl_controller.rl_policy import (
    CheckpointError,
    FallbackPolicy,
    RLPolicy,
    action_metadata,
    actor_path,
    arrays_from_layers,
    head_slices,
)


def trace() -> Trace:
    requests = tuple(TraceRequest(0.1 * i, 50 + (i * 37) % 250, 4 + i % 30) for i in range(150))
    return Trace("synthetic", requests, {"span_s": 15.0})


def snapshots() -> list[LoadSnapshot]:
    """A calm state, a burst building up, and a backlog with layers quantized."""
    calm = LoadSnapshot(0, 0, 0, 1, 512, 60, 452, 0, 0.5, 0.0, 0.08, 0, 5, 122, 0, 30.0)
    return [
        calm,
        dataclasses.replace(calm, queue_len=12, queued_prompt_tokens=2400, head_prefill_tokens=280,
                            running_reqs=4, kv_used_tokens=480, kv_free_tokens=32,
                            arrival_rate=9.0, oldest_wait_s=0.3),
        dataclasses.replace(calm, queue_len=3, head_prefill_tokens=120, kv_capacity_tokens=878,
                            kv_used_tokens=700, kv_free_tokens=178, quantized_layers=3,
                            seconds_since_transition=1.0),
    ]


def write_metadata(zip_path: Path, **overrides) -> None:
    meta = {"obs_version": OBS_VERSION, "obs_size": OBS_SIZE, "num_layers": 5,
            **action_metadata(), **overrides}
    zip_path.with_suffix(".json").write_text(json.dumps(meta))


def tiny_checkpoint(path: Path, actions: RLActions = RL_ACTIONS) -> Path:
    """A PPO policy after 128 steps at ``path``: untrained, but a real checkpoint in the real
    format (MultiDiscrete action of ``actions``), with its metadata and exported actor."""
    torch.set_num_threads(1)
    env = MorphEnv(trace(), [(0.0, 15.0)], actions=actions)
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16, 16]})
    model.learn(total_timesteps=128)
    model.save(path)
    write_metadata(path, **action_metadata(actions))
    assert export_actor(path) == actor_path(path) == path.with_suffix(".actor.npz")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default heads' tiny checkpoint, in pytest's temporary directory."""
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.zip")


def copy_checkpoint(src: Path, dst: Path) -> Path:
    """``dst`` (a .zip) with copies of ``src``'s metadata and actor beside it."""
    for suffix in (".zip", ".json", ".actor.npz"):
        shutil.copy(src.with_suffix(suffix), dst.with_suffix(suffix))
    return dst


def test_load_and_decide_match_sb3(checkpoint: Path) -> None:
    """The numpy actor decides what SB3's deterministic prediction means, on both heads."""
    rl = RLPolicy.load(checkpoint)
    model = PPO.load(checkpoint, device="cpu")
    for snap in snapshots():
        action, _ = model.predict(observation_vector(snap), deterministic=True)
        delta, fraction = action.tolist()
        layers = min(max(snap.quantized_layers + DELTA_ACTIONS[delta], 0), 5)
        assert rl.decide(snap) == Action(layers, KV_FRACTIONS[fraction])
    # Each head's argmax, on observations all over the feature cube (an untrained network
    # answers alike for the few snapshots above).
    observations = np.random.default_rng(1).random((200, OBS_SIZE)).astype(np.float32)
    predicted, _ = model.predict(observations, deterministic=True)
    spans = head_slices(rl.actions.nvec)
    heads = [[int(np.argmax(rl.logits(o)[span])) for span in spans] for o in observations]
    assert heads == predicted.tolist()
    assert len({tuple(h) for h in heads}) > 1


def test_rl_action_and_its_nearest_indices() -> None:
    assert RL_ACTIONS.space == "MultiDiscrete([3, 3])" and RL_ACTIONS.deltas == DELTA_ACTIONS
    assert RL_ACTIONS.action((0, 0), 3) == Action(2, 0.5)
    assert RL_ACTIONS.action((2, 2), 3) == Action(4, 1.0)
    assert RL_ACTIONS.indices(Action(5, 0.75), 3) == (2, 1)  # one layer toward 5
    assert RL_ACTIONS.indices(Action(0, 0.6), 3) == (0, 0)  # nearest fraction 0.5
    assert RL_ACTIONS.indices(Action(3, 1.0), 3) == (1, 2)
    wide = RLActions.up_to(3)  # restore one, hold, quantize 1-3
    assert wide.deltas == (-1, 0, 1, 2, 3) and wide.space == "MultiDiscrete([5, 3])"
    assert wide.indices(Action(5, 1.0), 0) == (4, 2)  # three layers toward 5 in one tick
    assert wide.indices(Action(0, 1.0), 3) == (0, 2)  # restores still one at a time
    for actions in (RL_ACTIONS, wide):
        for k in range(6):
            for fraction in KV_FRACTIONS:
                for delta in actions.deltas:
                    action = Action(k + delta, fraction)
                    assert actions.action(actions.indices(action, k), k) == action


@pytest.mark.parametrize("deltas", [(0, 1), (-1, 0), (-1, 1), (-2, -1, 0, 1), (-1, 0, 2)])
def test_layer_heads_other_than_restore_one_hold_quantize_n_are_refused(deltas) -> None:
    with pytest.raises(ValueError, match="accepted are -1, 0, 1, ..., n"):
        RLActions(deltas)


def test_a_wider_layer_head_is_trained_exported_and_run_as_recorded(tmp_path: Path) -> None:
    """A checkpoint of deltas -1..2 carries them in its metadata and runs with them: one tick
    can quantize two layers; metadata that names other deltas than its actor has is refused."""
    wide = RLActions.up_to(2)
    path = tiny_checkpoint(tmp_path / "wide.zip", wide)
    rl = RLPolicy.load(path)
    assert rl.actions == wide and rl.meta["action_space"] == "MultiDiscrete([4, 3])"
    model = PPO.load(path, device="cpu")
    observations = np.random.default_rng(2).random((300, OBS_SIZE)).astype(np.float32)
    predicted, _ = model.predict(observations, deterministic=True)
    spans = head_slices(wide.nvec)
    assert [[int(np.argmax(rl.logits(o)[s])) for s in spans] for o in observations] == \
        predicted.tolist()
    write_metadata(path, **action_metadata(RL_ACTIONS))  # says 3 deltas; the actor has 4
    with pytest.raises(CheckpointError, match="has 7 action logits; its metadata records "
                       r"MultiDiscrete\(\[3, 3\]\), which needs 6"):
        RLPolicy.load(path)


def test_export_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "garbage.zip"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    write_metadata(path)
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        export_actor(path)
    with pytest.raises(CheckpointError, match="garbage.actor.npz does not exist: export it"):
        RLPolicy.load(path)


def test_missing_checkpoint_metadata_or_actor_raise(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        RLPolicy.load(tmp_path / "absent.zip")
    lone = tmp_path / "lone.zip"
    shutil.copy(checkpoint, lone)
    with pytest.raises(CheckpointError, match="metadata"):
        RLPolicy.load(lone)
    write_metadata(lone)
    with pytest.raises(CheckpointError, match="lone.actor.npz does not exist"):
        RLPolicy.load(lone)


def test_damaged_or_stale_actor_files_are_refused(tmp_path: Path, checkpoint: Path) -> None:
    damaged = copy_checkpoint(checkpoint, tmp_path / "damaged.zip")
    actor_path(damaged).write_bytes(b"not an npz")
    with pytest.raises(CheckpointError, match="cannot read actor file"):
        RLPolicy.load(damaged)
    stale = copy_checkpoint(checkpoint, tmp_path / "stale.zip")
    with open(stale, "ab") as fh:  # the zip changed after the export (e.g. retrained)
        fh.write(b"\0")
    with pytest.raises(CheckpointError, match="exported from another version"):
        RLPolicy.load(stale)


@pytest.mark.parametrize("outputs", [3, 4])  # 3: an actor of the layer delta alone (v1)
def test_actor_with_other_actions_is_refused(
    tmp_path: Path, checkpoint: Path, outputs: int
) -> None:
    path = copy_checkpoint(checkpoint, tmp_path / "other.zip")
    layers = [(np.ones((8, OBS_SIZE)), np.zeros(8), "Tanh"),
              (np.ones((outputs, 8)), np.zeros(outputs), None)]
    np.savez(actor_path(path), **arrays_from_layers(layers), probes=np.zeros((1, OBS_SIZE)),
             probe_log_probs=np.zeros((1, outputs)), checkpoint_sha256=np.array(""))
    expected = f"has {outputs} action logits; its metadata records MultiDiscrete([3, 3])"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        RLPolicy.load(path)


class LayerDeltaOnly(gym.Env):
    """The observation of today with the earlier action space (Discrete(3), the layer delta)."""

    observation_space = gym.spaces.Box(0.0, 1.0, (OBS_SIZE,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def reset(self, *, seed=None, options=None):
        return np.zeros(OBS_SIZE, np.float32), {}

    def step(self, action):
        return np.zeros(OBS_SIZE, np.float32), 0.0, False, True, {}


def test_export_refuses_a_checkpoint_of_the_old_action_space(tmp_path: Path) -> None:
    path = tmp_path / "delta-only.zip"
    PPO("MlpPolicy", LayerDeltaOnly(), n_steps=64, batch_size=64, device="cpu",
        policy_kwargs={"net_arch": [8]}).save(path)
    write_metadata(path)
    expected = "action space Discrete(3); this code expects MultiDiscrete([n, 3])"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        export_actor(path)


@pytest.mark.parametrize(
    "overrides",
    [{"obs_version": OBS_VERSION + 1}, {"obs_size": OBS_SIZE - 1}, {"action_mode": "target"},
     {"obs_version": 1, "obs_size": 15},  # the observation before the KV-limit features
     {"action_space": "Discrete(3): change of the int4 layer count by [-1, 0, 1]"},
     {"kv_fractions": [0.25, 0.5, 1.0]}, {"delta_actions": [-1, 0, 2]},
     {"delta_actions": [-1, 0, 1, 2]}],  # deltas that disagree with the recorded space
)
def test_incompatible_metadata_raises(tmp_path: Path, checkpoint: Path, overrides: dict) -> None:
    path = copy_checkpoint(checkpoint, tmp_path / "other.zip")
    write_metadata(path, **overrides)
    with pytest.raises(CheckpointError, match="other.json"):
        RLPolicy.load(path)


def test_export_command(tmp_path: Path, checkpoint: Path, capsys) -> None:
    path = copy_checkpoint(checkpoint, tmp_path / "again.zip")
    actor_path(path).unlink()
    actor_export.main([str(path)])
    assert "again.actor.npz" in capsys.readouterr().out
    RLPolicy.load(path)
    garbage = tmp_path / "garbage.zip"
    garbage.write_bytes(b"\0not a zip")
    with pytest.raises(SystemExit) as exit_info:
        actor_export.main([str(garbage)])
    assert exit_info.value.code == 2  # the checkpoint given is the input to change
    assert capsys.readouterr().err.startswith("error: cannot load checkpoint")


def test_policy_runs_on_any_layer_count(checkpoint: Path) -> None:
    """Features are fractions and the action is a delta: nothing depends on the model's size."""
    rl = RLPolicy.load(checkpoint)
    for layers in (2, 32):
        snap = dataclasses.replace(snapshots()[2], num_layers=layers,
                                   quantized_layers=min(3, layers))
        action = rl.decide(snap)
        assert abs(action.layers - snap.quantized_layers) <= 1
        assert action.kv_fraction in KV_FRACTIONS


# -- the controller --


class Broken:
    name = "broken"

    def __init__(self, answer: object = None) -> None:
        self.answer = answer

    def decide(self, snap: LoadSnapshot) -> int:
        if self.answer is None:
            raise RuntimeError("boom")
        return self.answer  # type: ignore[return-value]


@pytest.mark.parametrize("policy", [Broken(), Broken(float("nan")), Broken("three")])
def test_controller_falls_back_to_the_heuristic_for_that_tick(policy: Broken) -> None:
    controller, reference = Controller(policy, HeuristicPolicy()), HeuristicPolicy()
    for snap in snapshots():
        decision = controller.decide(snap)
        assert decision.fell_back and decision.reason and decision.seconds >= 0
        assert decision.target == target_layers(reference.decide(snap))
    assert controller.decide(snapshots()[1]).target > 0  # the burst: the heuristic quantizes


def test_controller_without_fallback_raises() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        Controller(Broken()).decide(snapshots()[0])


def test_controller_clips_unsafe_targets() -> None:
    snap = snapshots()[2]  # 3 layers, 700 of 878 tokens used: one restore at most
    decision = Controller(Broken(0)).decide(snap)
    assert (decision.target, decision.clipped, decision.fell_back) == (2, True, False)


def test_nan_output_falls_back(checkpoint: Path) -> None:
    rl = RLPolicy.load(checkpoint)
    weight, bias, activation = rl.layers[-1]
    rl.layers[-1] = (weight, np.full_like(bias, np.nan), activation)
    decision = Controller(rl, HeuristicPolicy()).decide(snapshots()[1])
    assert decision.fell_back and "non-finite" in decision.reason
    assert decision.target == target_layers(HeuristicPolicy().decide(snapshots()[1]))


def test_healthy_rl_does_not_fall_back(checkpoint: Path) -> None:
    rl = RLPolicy.load(checkpoint)
    policy = FallbackPolicy.from_checkpoint(checkpoint)
    alone = Controller(rl)  # the same clips, no fallback
    expected = [Action(d.target, d.kv_fraction) for d in map(alone.decide, snapshots())]
    assert [policy.decide(s) for s in snapshots()] == expected
    assert [a.layers for a in expected] == [rl.decide(s).layers for s in snapshots()]
    assert policy.fallbacks == 0
    broken = FallbackPolicy(rl)
    broken.controller.policy = Broken()
    broken.decide(snapshots()[0])
    assert broken.fallbacks == 1


def test_fallback_policy_refuses_an_unusable_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        FallbackPolicy.from_checkpoint(tmp_path / "absent.zip")


def _result(row: dict) -> PolicyResult:
    """A PolicyResult from its ``as_dict`` (derived fields dropped)."""
    return PolicyResult(**{f.name: row[f.name] for f in dataclasses.fields(PolicyResult)})


def _val(late: int, quality_cost: float, reward: float, swaps: int = 4) -> PolicyResult:
    return PolicyResult("rl", 3, 100, late, 0, 1000, quality_cost, swaps, 0, 0, 2, 0.5, 1.0, 0.2,
                        reward)


def test_training_keeps_the_candidate_that_dominates_the_heuristic_widest_on_validation() -> None:

    heuristic = _val(10, 100.0, -20.0)
    fewer_late = _val(8, 100.0, -18.0)          # 20% fewer violations, same quality
    better_quality = _val(10, 70.0, -17.0)      # same violations, 30% less quality cost
    best_reward = _val(11, 50.0, -15.0)         # highest reward, but more violations
    assert dominance_margin(fewer_late, heuristic) == pytest.approx(0.2)
    assert dominance_margin(best_reward, heuristic) is None
    # Better on both, but by swapping layers back and forth: not dominating (4 swaps x 1.5).
    assert dominance_margin(_val(5, 50.0, -10.0, swaps=6), heuristic) == pytest.approx(0.5)
    assert dominance_margin(_val(5, 50.0, -10.0, swaps=7), heuristic) is None
    chosen, why = choose_candidate([fewer_late, best_reward, better_quality], heuristic)
    assert chosen == 2 and "dominates" in why and "2 of 3" in why
    # No candidate dominates: the highest reward, and the reason says so.
    chosen, why = choose_candidate([best_reward, _val(12, 90.0, -30.0)], heuristic)
    assert chosen == 0 and why.startswith("none of the 2 candidates dominates")


@pytest.mark.slow
def test_train_script_end_to_end(tmp_path: Path) -> None:
    """The training command writes a loadable checkpoint, its metadata and its curve."""
    from rl_controller import train

    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(1200):  # 4 minutes at 5 req/s, lengths in Azure's range
        seconds = i * 0.2
        rows.append(f"2023-11-16 18:{17 + int(seconds // 60):02d}:{seconds % 60:010.7f},"
                    f"{200 + (i * 977) % 4000},{10 + (i * 131) % 200}")
    csv = tmp_path / "trace.csv"
    csv.write_text("\n".join(rows) + "\n")
    out = tmp_path / "tiny.zip"
    train.main(["--trace", str(csv), "--timesteps", "256", "--out", str(out), "--n-envs", "2",
                "--n-steps", "64", "--batch-size", "64", "--n-epochs", "1", "--window-s", "30",
                "--seeds", "1,2", "--learning-rates", "1e-4,3e-4", "--bc-epochs", "2",
                "--max-step", "2"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert meta["obs_version"] == OBS_VERSION and meta["timesteps"] >= 256
    # A layer head that quantizes up to two layers per tick, recorded as trained.
    assert {k: meta[k] for k in action_metadata()} == action_metadata(RLActions.up_to(2))
    assert meta["action_space"] == "MultiDiscrete([4, 3])"
    # The restore rule it was trained under (the defaults), read back as the server reads it.
    from sglang_morph.config import DEFAULT_RESTORE_RULE, RestoreRule

    assert RestoreRule.from_metadata(meta) == DEFAULT_RESTORE_RULE
    warm = meta["warm_start"]
    assert warm["demonstration_ticks"] > 0 and 0 <= warm["kv_agreement"] <= 1
    # Split by time: train < validation < test, none empty.
    train_end = max(e for _, e in meta["train_windows"])
    assert meta["val_windows"] and meta["eval_windows"]
    assert train_end <= min(s for s, _ in meta["val_windows"])
    assert max(e for _, e in meta["val_windows"]) <= min(s for s, _ in meta["eval_windows"])
    # One candidate per learning rate and seed, each reported on validation and test; the kept
    # one is chosen on validation, and it is the checkpoint written.
    assert [(c["learning_rate"], c["seed"]) for c in meta["candidates"]] == [
        (1e-4, 1), (1e-4, 2), (3e-4, 1), (3e-4, 2)]
    assert meta["seeds"] == [1, 2] and meta["learning_rates"] == [1e-4, 3e-4]
    assert all(c["validation"] and c["test"] for c in meta["candidates"])
    heuristic = _result(meta["validation_heuristic"])
    chosen, why = choose_candidate(
        [_result(c["validation"]) for c in meta["candidates"]], heuristic)
    kept = meta["candidates"][chosen]
    assert meta["selected"]["seed"] == kept["seed"] == meta["seed"]
    assert meta["selected"]["learning_rate"] == kept["learning_rate"] == meta["learning_rate"]
    assert meta["selection"].startswith(why)
    assert [r["policy"] for r in meta["eval"]] == ["rl", "heuristic", "always-0", "always-L"]
    RLPolicy.load(out)


def test_shipped_checkpoint_loads_and_never_trained_on_its_evaluation_windows() -> None:
    shipped = Path(__file__).resolve().parent.parent / "checkpoints" / "morph-ppo.zip"
    rl = RLPolicy.load(shipped)
    meta = rl.meta
    for key in ("obs_version", "profile", "layer_order", "trace", "time_scale", "train_frac",
                "reward_weights", "quality_table", "calibration", "replica", "eval"):
        assert key in meta, key
    assert meta["obs_version"] == OBS_VERSION and shipped.with_suffix(".png").is_file()
    last_train = max(end for _, end in meta["train_windows"])
    assert last_train <= min(start for start, _ in meta["eval_windows"])
    assert len(meta["quality_table"]) == meta["num_layers"] + 1
    assert all(rl.decide(s).layers in range(6) for s in snapshots())
    # Fine-tuned on the engine: training windows to learn on, validation windows to decide on;
    # the test part was never replayed before the report.
    finetune = meta["finetune"]
    first_test = min(start for start, _ in meta["eval_windows"])
    assert all(end <= last_train for _, end in finetune["train_windows"])
    assert all(last_train <= s and e <= first_test for s, e in finetune["val_windows"])
    assert finetune["verdict"]["better"] == "fine-tuned" and finetune["parent_sha256"]
