"""scripts/gpu_check.{sh,py} cannot rot on a machine without a GPU: its ``--device cpu
--dry-run`` mode runs every check on tiny shapes here (eager stand-ins for CUDA graphs), it
refuses plainly without CUDA, and it imports nothing from SGLang (a GPU box needs torch only).
The figures of a dry run mean nothing and are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from sglang_morph.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "gpu_check.py"
PROBE = """
import runpy, sys
main = runpy.run_path(sys.argv[1])["main"]
status = main(["--device", "cpu", "--dry-run", "--out", sys.argv[2]])
ours = sorted(n for n in sys.modules if n.split(".")[0] in ("sglang", "sglang_morph"))
print("MODULES " + " ".join(ours))
sys.exit(status)
"""


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)


def test_dry_run_exercises_every_check_and_imports_no_sglang(tmp_path: Path) -> None:
    out = tmp_path / "gc.json"
    done = run([sys.executable, "-c", PROBE, str(SCRIPT), str(out)], tmp_path)
    assert done.returncode == 0, done.stderr
    modules = done.stdout.split("MODULES ", 1)[1].split()
    assert not [m for m in modules if m.split(".")[0] == "sglang"]
    assert set(modules) <= {"sglang_morph", "sglang_morph.cli"} | {
        m for m in modules if m.startswith("sglang_morph.quant")
    }
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert [r["batch"] for r in result["matmul"]] == [1, 4]
    for row in result["matmul"]:
        assert row["int8_kernel"] and row["int4_kernel"]
        assert row["int8_max_abs_err"] < 0.5 and row["int4_max_abs_err"] < 1.0
    assert result["swap"]["layer_bytes"] > 0 and not result["swap"]["pinned_host"]
    assert result["kv"]["method"].startswith("cpu allocation")
    graphs = result["cuda_graph"]
    assert [s["quantized_layers"] for s in graphs["steps"]] == [0, 1, 2, 1, 0]
    assert graphs["recapture_always_correct"] and graphs["first_capture_always_correct"]
    # The restores on the way down put fp weights at new addresses, as the swapper does:
    assert not graphs["steps"][-1]["weights_at_captured_addresses"]
    assert "first capture ok" in done.stdout and f"written: {out}" in done.stdout


def test_the_shell_entry_point_refuses_plainly_without_cuda(tmp_path: Path) -> None:
    assert not torch.cuda.is_available()  # this machine; on a GPU box the check would run
    done = run(["bash", str(REPO_ROOT / "scripts" / "gpu_check.sh")], tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: CUDA is needed: this torch sees no GPU (torch.cuda.is_available() is False)"
    ]
    assert not (tmp_path / "gpu_check.json").exists()


def test_cpu_without_dry_run_is_a_usage_error(tmp_path: Path) -> None:
    done = run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", "x.json"], tmp_path)
    assert done.returncode == 2
    assert "--device cpu is accepted with --dry-run only" in done.stderr
    help_text = run([sys.executable, str(SCRIPT), "--help"], tmp_path)
    assert help_text.returncode == 0 and "--dry-run" in help_text.stdout
