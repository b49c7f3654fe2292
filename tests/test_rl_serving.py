"""The shipped RL policy in the live server: it runs (no fallback) and moves the layers; an
unusable RL checkpoint stops the launcher before anything starts. Its own module, so that no
other server idles beside it (an idle SGLang scheduler polls without sleeping)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.server_process import Server
from tests.live_load import BUDGET, burst, watch


@pytest.mark.parametrize("content", [None, b"not a zip file"])
def test_unusable_rl_checkpoint_is_a_one_line_error(tmp_path, content):
    checkpoint = tmp_path / "policy.zip"
    if content is not None:
        checkpoint.write_bytes(content)
    started = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "sglang_morph.launch_server", "--morph-policy", "rl",
                        "--morph-checkpoint", "policy.zip"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and time.monotonic() - started < 60
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert str(tmp_path) in r.stderr  # resolved where the launcher was started


@pytest.fixture(scope="module")
def rl():
    """The shipped policy, named by a path relative to the directory the server starts in."""
    relative = os.path.relpath(DEFAULT_CHECKPOINT, tempfile.gettempdir())
    s = Server(["--morph-policy", "rl", "--morph-checkpoint", relative,
                "--morph-memory-budget", BUDGET, "--morph-ttft-slo", "0.5"])
    yield s
    s.stop()


def test_rl_policy_decides_without_fallback_and_moves_the_layers(rl):
    st = rl.client.state()
    assert st["policy"] == "rl" and st["policy_loaded"] == str(DEFAULT_CHECKPOINT)
    with ThreadPoolExecutor(1) as pool:
        results = pool.submit(burst, rl, 16)
        seen = watch(rl, results)
        done = results.result()
    assert all(r["meta_info"]["completion_tokens"] == 60 for r in done)
    st = rl.client.state()
    assert st["fallbacks"] == 0 and st["fallback_reason"] is None and not st["frozen"]
    assert st["last_observation"]["target"] is not None and st["decision_s_median"] is not None
    assert max(x["quantized_layers"] for x in seen) > 0, "the policy never quantized in the burst"
    assert st["transitions"] > 0 and st["device_bytes_in_use"] <= int(BUDGET)
