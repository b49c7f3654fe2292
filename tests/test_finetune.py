"""Fine-tuning on the real engine: PPO goes on from the shipped checkpoint on a live
manual-policy server, and the heuristic, the parent and the fine-tuned checkpoint are then
replayed on a validation window of the same server (the command as a user runs it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rl_controller.observation import OBS_SIZE
from rl_controller.rl_policy import RLPolicy, file_sha256
from sglang_morph.paths import DEFAULT_CHECKPOINT, REPO_ROOT

pytestmark = pytest.mark.slow

EPISODE_S = 4.0


def test_finetune_learns_on_the_engine_and_validates_against_its_parent(tmp_path: Path) -> None:
    out = tmp_path / "ft.zip"
    proc = subprocess.run(
        [sys.executable, "-m", "rl_controller.finetune", "--episodes", "2", "--busiest", "2",
         "--val-windows", "1", "--episode-s", str(EPISODE_S), "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads(out.with_suffix(".json").read_text())
    ft = meta["finetune"]
    assert ft["parent"] == "checkpoints/morph-ppo.zip"
    assert ft["parent_sha256"] == file_sha256(DEFAULT_CHECKPOINT)
    # Two engine episodes of the whole (cut) window each, every one with requests served.
    ticks = round(EPISODE_S / meta["tick_s"])
    assert ft["timesteps"] == 2 * ticks
    assert len(ft["episodes"]) == 2
    assert all(e["requests"] > 0 and e["generated_tokens"] > 0 for e in ft["episodes"])
    # Training windows only; the test part is never replayed here.
    train_end = max(e for _, e in meta["train_windows"])
    assert all(e <= train_end for _, e in ft["train_windows"])
    assert all(s >= train_end for s, _ in ft["val_windows"])
    assert all(s < min(t for t, _ in meta["eval_windows"]) for s, _ in ft["val_windows"])
    # PPO updated the network: the fine-tuned actor runs, and it is not its parent's.
    parent, tuned = RLPolicy.load(DEFAULT_CHECKPOINT), RLPolicy.load(out)
    probe = np.linspace(0.0, 1.0, OBS_SIZE, dtype=np.float32)
    assert not np.allclose(parent.logits(probe), tuned.logits(probe))
    # The decision: three policies on the same validation window, the same requests each.
    val = {r["policy"]: r for r in ft["validation"]}
    assert set(val) == {"heuristic", "parent", "fine-tuned"}
    assert len({r["requests"] for r in val.values()}) == 1 and val["parent"]["requests"] > 0
    assert ft["verdict"]["better"] in ("parent", "fine-tuned") and ft["verdict"]["why"]
    assert ft["validation_failed_requests"] == 0
    assert out.with_suffix(".png").stat().st_size > 0
