"""Every command a user types follows one exit-status rule: input the user must change (an
option's value, a file it names) exits with status 2 and one error line, before any server
starts or any long computation runs, and never with a traceback.

Each command runs as the user runs it, in a subprocess, once with a bad option value and once
with a missing input file (for the benchmark, which reads none: an output path that cannot be
written). No case starts a server, so each ends in seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

CASES: dict[str, dict[str, tuple[list[str], str]]] = {
    "sglang_morph.launch_server": {
        "bad value": (["--morph-memory-budget", "1000"], "1000 B is too small"),
        "missing file": (["--morph-profile", "{missing}.json"], "--morph-profile"),
    },
    "rl_controller.train": {
        "bad value": (["--time-scale", "-1"], "--time-scale"),
        "missing file": (["--calibration", "{missing}.json", "--out", "{tmp}/ck.zip"],
                         "--calibration"),
    },
    "rl_controller.finetune": {
        "bad value": (["--episodes", "0"], "--episodes"),
        "missing file": (["--checkpoint", "{missing}.zip"], "--checkpoint"),
    },
    "rl_controller.evaluate": {
        "bad value": (["--time-scale", "0"], "--time-scale"),
        "missing file": (["--checkpoint", "{missing}.zip"], "--checkpoint"),
    },
    "envs.calibrate": {
        "bad value": (["--launch", "--budget", "lots", "--out", "{tmp}/c.json"], "--budget"),
        "missing file": (["--samples", "{missing}.json", "--out", "{tmp}/c.json"], "--samples"),
    },
    "envs.sim_vs_real": {
        "bad value": (["--window-index", "999"], "--window-index 999"),
        "missing file": (["--checkpoint", "{missing}.zip"], "--checkpoint"),
    },
    "sglang_morph.bench": {
        "bad value": (["--budget", "1000"], "--budget: 1000 B is too small"),
        "missing file": (["--out", "{tmp}/a-file/out.json"], "--out"),
    },
    "sglang_morph.profile": {
        "bad value": (["--samples", "0", "--out", "{tmp}/p.json"], "--samples"),
        "missing file": (["--calibration", "{missing}.txt", "--out", "{tmp}/p.json"],
                         "--calibration"),
    },
    "eval.soak": {
        "bad value": (["--load", "5"], "--load"),
        "missing file": (["--trace", "{missing}.csv"], "--trace"),
    },
    "eval.steady": {
        "bad value": (["--policies", "heuristic,chatter"], "--policies heuristic,chatter"),
        "missing file": (["--rl-checkpoint", "{missing}.zip"], "--rl-checkpoint"),
    },
    "eval.dominance": {
        "bad value": (["{missing}", "--out", "{tmp}/a-file/verdict.json"], "--out"),
        "missing file": (["{missing}"], "absent"),
    },
    "rl_controller.actor_export": {
        "bad value": (["{tmp}/a-file"], "cannot load checkpoint"),
        "missing file": (["{missing}.zip"], "does not exist"),
    },
    "eval.run": {
        "bad value": (["--systems", "fp,bogus"], "unknown system"),
        "missing file": (["--trace", "{missing}.csv"], "unknown trace"),
    },
    "eval.quality": {
        "bad value": (["--seeds", "0", "--out", "{tmp}/q.json"], "--seeds"),
        "missing file": (["--text", "{missing}.txt", "--out", "{tmp}/q.json"], "--text"),
    },
}


def assert_usage_error(stderr: str, prog: str, needle: str) -> None:
    """One line ``error: ...`` (or ``PROG: error: ...``), or argparse's usage lines followed by
    its ``PROG: error: ...`` line; the line names what was wrong; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines, "no error line on stderr"
    last = lines[-1]
    assert last.startswith(("error: ", f"{prog}: error: ")), stderr
    if len(lines) > 1:
        assert lines[0].startswith("usage: ") and last.startswith(f"{prog}: error: "), stderr
    assert needle in last, stderr


@pytest.mark.parametrize("kind", ["bad value", "missing file"])
@pytest.mark.parametrize("module", list(CASES))
def test_usage_errors_exit_2_with_one_line(module: str, kind: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_bytes(b"not a directory, not a zip")
    args, needle = CASES[module][kind]
    args = [a.format(tmp=tmp_path, missing=tmp_path / "absent") for a in args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # run elsewhere: default outputs go to tmp
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_usage_error(proc.stderr, f"python -m {module}", needle)
