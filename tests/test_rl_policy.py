"""RL checkpoints: loading, refusal of bad ones, and the heuristic fallback."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs.morph_env import MorphEnv
from eval.traces import Trace, TraceRequest
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import OBS_SIZE, OBS_VERSION, LoadSnapshot, observation_vector
from rl_controller.policy import DELTA_ACTIONS
from rl_controller.rl_policy import CheckpointError, FallbackPolicy, RLPolicy


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
            "action_mode": "delta", **overrides}
    zip_path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PPO policy after 128 steps: untrained, but a real checkpoint in the real format."""
    torch.set_num_threads(1)
    env = MorphEnv(trace(), [(0.0, 15.0)])
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16, 16]})
    model.learn(total_timesteps=128)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.zip"
    model.save(path)
    write_metadata(path)
    return path


def test_load_and_decide_match_sb3(checkpoint: Path) -> None:
    rl = RLPolicy.load(checkpoint)
    model = PPO.load(checkpoint, device="cpu")
    for snap in snapshots():
        action, _ = model.predict(observation_vector(snap), deterministic=True)
        expected = min(max(snap.quantized_layers + DELTA_ACTIONS[int(action)], 0), 5)
        assert rl.decide(snap) == expected


def test_corrupt_checkpoint_raises(tmp_path: Path) -> None:
    path = tmp_path / "garbage.zip"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    write_metadata(path)
    with pytest.raises(CheckpointError, match="cannot load"):
        RLPolicy.load(path)


def test_missing_checkpoint_and_metadata_raise(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        RLPolicy.load(tmp_path / "absent.zip")
    lone = tmp_path / "lone.zip"
    shutil.copy(checkpoint, lone)
    with pytest.raises(CheckpointError, match="metadata"):
        RLPolicy.load(lone)


@pytest.mark.parametrize(
    "overrides",
    [{"obs_version": OBS_VERSION + 1}, {"obs_size": OBS_SIZE - 1}, {"action_mode": "target"}],
)
def test_incompatible_metadata_raises(tmp_path: Path, checkpoint: Path, overrides: dict) -> None:
    path = tmp_path / "other.zip"
    shutil.copy(checkpoint, path)
    write_metadata(path, **overrides)
    with pytest.raises(CheckpointError):
        RLPolicy.load(path)


def test_fallback_after_failed_load_uses_heuristic(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "garbage.zip"
    path.write_bytes(b"\x00not a zip at all")
    write_metadata(path)
    policy = FallbackPolicy.from_checkpoint(path)
    reference = HeuristicPolicy()
    with caplog.at_level(logging.WARNING, logger="rl_controller.rl_policy"):
        decisions = [policy.decide(s) for s in snapshots()]
    assert policy.rl is None
    assert decisions == [reference.decide(s) for s in snapshots()]
    assert decisions[1] > 0  # the burst snapshot: the heuristic quantizes
    assert policy.fallbacks == 3
    assert sum("fallback #" in r.getMessage() for r in caplog.records) == 3


def test_nan_output_falls_back(checkpoint: Path) -> None:
    rl = RLPolicy.load(checkpoint)
    weight, bias, activation = rl.layers[-1]
    rl.layers[-1] = (weight, np.full_like(bias, np.nan), activation)
    policy = FallbackPolicy(rl)
    snap = snapshots()[1]
    assert policy.decide(snap) == HeuristicPolicy().decide(snap)
    assert policy.fallbacks == 1


def test_healthy_rl_does_not_fall_back(checkpoint: Path) -> None:
    policy = FallbackPolicy.from_checkpoint(checkpoint)
    rl = RLPolicy.load(checkpoint)
    assert [policy.decide(s) for s in snapshots()] == [rl.decide(s) for s in snapshots()]
    assert policy.fallbacks == 0


def test_wrong_layer_count_falls_back(checkpoint: Path) -> None:
    policy = FallbackPolicy(RLPolicy.load(checkpoint))
    snap = dataclasses.replace(snapshots()[0], num_layers=32)
    policy.decide(snap)
    assert policy.fallbacks == 1


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
                "--n-steps", "64", "--batch-size", "64", "--n-epochs", "1", "--window-s", "30"])
    meta = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert meta["obs_version"] == OBS_VERSION and meta["timesteps"] >= 256
    assert max(e for _, e in meta["train_windows"]) <= min(s for s, _ in meta["eval_windows"])
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
    assert all(rl.decide(s) in range(6) for s in snapshots())
