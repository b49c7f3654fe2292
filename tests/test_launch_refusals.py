"""The launcher's safety rules for what the morph runtime cannot serve, and its CUDA switches.

No GPU exists here: ``cuda_device_double`` stands in for ``serving_device()`` on a machine with
one (a test double for the GPU). Everything else is the real launcher's ``build()`` and
``main()`` over the embedded model's real config, or a copy of it changed into the model kind
under test.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from sglang_morph.cli import UsageError
from sglang_morph.data import resolve_model
from sglang_morph.launch_server import build, main


def cuda_device_double() -> str:
    """Test double for a machine whose torch sees a GPU."""
    return "cuda"


def cpu_device() -> str:
    return "cpu"


@pytest.fixture(autouse=True)
def _cpu_engine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """build() sets SGLANG_USE_CPU_ENGINE for CPU serving; keep it from leaking."""
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")


def model_like(tmp_path: Path, **changes) -> str:
    """A copy of the embedded model's config.json with ``changes`` (None deletes a key)."""
    config = json.loads((Path(resolve_model(None)) / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_cuda_with_morphing_adds_eager_decode_and_no_overlap(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="sglang_morph"):
        _, sg = build(["--morph-policy", "heuristic"], detect_device=cuda_device_double)
    assert sg.count("--disable-cuda-graph") == 1 and sg.count("--disable-overlap-schedule") == 1
    assert "--device" not in sg and "--attention-backend" not in sg  # no CPU flags on CUDA
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "switches: --disable-cuda-graph --disable-overlap-schedule added" in lines[0]
    assert "eagerly" in lines[0]


def test_cuda_switches_given_by_the_user_are_kept_and_not_announced(caplog) -> None:
    argv = ["--morph-policy", "manual", "--disable-overlap-schedule"]
    with caplog.at_level(logging.WARNING, logger="sglang_morph"):
        _, sg = build(argv, detect_device=cuda_device_double)
    assert sg.count("--disable-overlap-schedule") == 1 and sg.count("--disable-cuda-graph") == 1
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "switches: --disable-cuda-graph added" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sglang_morph"):
        build([*argv, "--disable-cuda-graph"], detect_device=cuda_device_double)
    assert not caplog.records


@pytest.mark.parametrize("argv", [[], ["--morph-static-format", "int8"]])
def test_cuda_graphs_stay_on_only_without_morphing(argv: list[str]) -> None:
    """Policy off is plain SGLang; a static format swaps at start-up, after graph capture."""
    _, sg = build(argv, detect_device=cuda_device_double)
    assert ("--disable-cuda-graph" in sg) == bool(argv)


def test_cpu_gets_the_cpu_flags_and_no_cuda_switch() -> None:
    _, sg = build(["--morph-policy", "manual"], detect_device=cpu_device)
    assert "--disable-cuda-graph" not in sg
    assert sg[sg.index("--device") + 1] == "cpu" and "--disable-overlap-schedule" in sg


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--pp-size", "2"], "--pp-size 2"),
        (["--pipeline-parallel-size=4"], "--pipeline-parallel-size 4"),
        (["--page-size", "16"], "--page-size 16"),
    ],
)
def test_pipeline_parallel_and_paged_kv_are_refused(argv: list[str], named: str) -> None:
    with pytest.raises(UsageError) as info:
        build(["--morph-policy", "heuristic", *argv], detect_device=cuda_device_double)
    message = str(info.value)
    assert message.startswith(named) and "\n" not in message
    assert "accepted:" in message and "--morph-policy off" in message


def test_without_morphing_sglang_options_pass_through() -> None:
    _, sg = build(["--pp-size", "2", "--page-size", "16"], detect_device=cuda_device_double)
    assert "--pp-size" in sg and "--page-size" in sg


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"num_local_experts": 8}, "mixture-of-experts model (num_local_experts=8)"),
        ({"num_experts": 64}, "mixture-of-experts model (num_experts=64)"),
        ({"n_routed_experts": 256}, "mixture-of-experts model (n_routed_experts=256)"),
        ({"kv_lora_rank": 512}, "multi-head latent attention (kv_lora_rank=512)"),
        ({"use_sliding_window": True}, "sliding-window attention (use_sliding_window=true)"),
        ({"layer_types": ["sliding_attention", "full_attention"]}, "(layer_types)"),
    ],
)
def test_unsupported_model_kinds_are_refused(tmp_path: Path, changes: dict, why: str) -> None:
    model = model_like(tmp_path, **changes)
    with pytest.raises(UsageError) as info:
        build(["--morph-policy", "manual", "--model-path", model], detect_device=cpu_device)
    message = str(info.value)
    assert message.startswith(f"--model-path {model} ") and why in message
    assert "\n" not in message


def test_dense_full_attention_variants_are_accepted(tmp_path: Path) -> None:
    """Keys that merely exist with a harmless value do not refuse a dense model."""
    model = model_like(
        tmp_path,
        num_experts=0,
        use_sliding_window=False,
        sliding_window=4096,
        layer_types=["full_attention"] * 5,
    )
    cfg, sg = build(["--morph-policy", "manual", "--model-path", model], detect_device=cpu_device)
    assert cfg.enabled and sg[sg.index("--model-path") + 1] == model


def test_main_exits_2_with_one_line_for_a_refusal(capsys, tmp_path: Path) -> None:
    model = model_like(tmp_path, kv_lora_rank=512)
    with pytest.raises(SystemExit) as info:
        main(["--morph-policy", "manual", "--model-path", model])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --model-path ")
