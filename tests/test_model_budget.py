"""Budgets in the dtype and context length the server really uses, and the KV floor of one
maximum-length request, without a server: the launcher's real ``build()`` over the embedded
model, the real config reader, and a runtime over the scheduler double's real KV pool."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sglang_morph.cli import UsageError
from sglang_morph.config import MorphConfig
from sglang_morph.data import resolve_model
from sglang_morph.launch_server import build
from sglang_morph.memory import BudgetError, check_budget, fp_kv_tokens
from sglang_morph.model_info import (
    DTYPES,
    DtypeError,
    context_length,
    read_model_info,
    served_dtype,
)
from sglang_morph.runtime import MorphRuntime
from tests.sglang_doubles import FakeLlama, FakeScheduler

MODEL = resolve_model(None)  # stories260K: float32 checkpoint, context 512


def gpu_double() -> str:
    """Test double for ``serving_device`` on a machine with a GPU (there is none here)."""
    return "cuda"


def pool_tokens(argv: list[str], detect_device=None) -> int:
    """The KV reservation the launcher gives SGLang for ``argv``."""
    kwargs = {} if detect_device is None else {"detect_device": detect_device}
    _, sg = build(argv, **kwargs)
    return int(sg[sg.index("--max-total-tokens") + 1])


@pytest.fixture(autouse=True)
def _cpu_engine_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")  # the launcher sets it; restored after


@pytest.mark.parametrize(
    ("dtype", "saved", "served"),
    [
        ("float32", "float32", "float32"),
        ("float", "bfloat16", "float32"),
        ("half", "float32", "float16"),
        ("float16", "bfloat16", "float16"),
        ("bfloat16", "float32", "bfloat16"),
        ("BFloat16", "float32", "bfloat16"),
        ("auto", "bfloat16", "bfloat16"),
        ("auto", "float16", "float16"),
        ("auto", "float32", "float16"),  # SGLang downcasts float32 checkpoints under auto
        ("auto", None, "float16"),  # no dtype saved: read as float32
    ],
)
def test_served_dtype_follows_sglang(dtype: str, saved: str | None, served: str) -> None:
    cfg = {"model_type": "llama"} | ({"dtype": saved} if saved else {})
    assert served_dtype(dtype, cfg) == served


def test_auto_reads_torch_dtype_of_older_checkpoints_and_gemma_gets_bfloat16() -> None:
    assert served_dtype("auto", {"torch_dtype": "bfloat16"}) == "bfloat16"
    assert served_dtype("auto", {"model_type": "gemma2", "torch_dtype": "float32"}) == "bfloat16"


def test_unknown_dtype_names_the_accepted_values() -> None:
    with pytest.raises(DtypeError, match="unknown dtype 'int3'; accepted: " + ", ".join(DTYPES)):
        served_dtype("int3", {})


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_sglang_dtype_sizes_the_model(dtype: str) -> None:
    info = read_model_info(MODEL, dtype, "cpu")
    fp32 = read_model_info(MODEL, "float32", "cpu")
    ratio = 1 if dtype in ("float", "float32") else 2
    assert info.weight_bytes * ratio == fp32.weight_bytes
    assert info.kv_bytes_per_token * ratio == fp32.kv_bytes_per_token


def test_same_budget_serves_at_least_twice_the_kv_tokens_in_bfloat16() -> None:
    fp32 = read_model_info(MODEL, "float32", "cpu")
    bf16 = read_model_info(MODEL, "bfloat16", "cpu")
    budget = fp32.budget_bytes(768)
    # KV halves per token and the weights halve too, leaving more bytes for KV
    assert fp_kv_tokens(bf16, budget) == 2 * 768 + fp32.weight_bytes // fp32.kv_bytes_per_token
    cpu = ["--morph-policy", "off", "--morph-memory-budget", str(budget)]
    assert pool_tokens(cpu) == 768
    assert pool_tokens(cpu + ["--dtype", "bfloat16"]) == fp_kv_tokens(bf16, budget)
    assert pool_tokens(cpu + ["--dtype", "half"]) == fp_kv_tokens(bf16, budget)


def test_budget_without_dtype_uses_what_the_server_will_use() -> None:
    budget = read_model_info(MODEL, "float32", "cpu").budget_bytes(768)
    argv = ["--morph-policy", "off", "--morph-memory-budget", str(budget)]
    assert pool_tokens(argv) == 768  # CPU: the launcher adds --dtype float32
    on_gpu = fp_kv_tokens(read_model_info(MODEL, "auto", "cuda"), budget)
    assert on_gpu > 2 * 768  # SGLang's default on CUDA: auto, float16 for this checkpoint
    assert pool_tokens(argv, gpu_double) == on_gpu
    fp32_on_gpu = fp_kv_tokens(read_model_info(MODEL, "float32", "cuda"), budget)
    assert pool_tokens(argv + ["--dtype", "float32"], gpu_double) == fp32_on_gpu < on_gpu / 2


def test_unknown_dtype_with_a_budget_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="^--dtype: unknown dtype 'fp8'; accepted: auto, half"):
        build(["--morph-memory-budget", "4MB", "--dtype", "fp8"])


def test_context_length_sets_the_kv_floor() -> None:
    info = read_model_info(MODEL, "float32", "cpu")
    budget = info.budget_bytes(300)  # less than the model's 512-token context
    argv = ["--morph-policy", "manual", "--morph-memory-budget", str(budget)]
    with pytest.raises(UsageError, match="maximum-length request \\(512 tokens"):
        build(argv)
    assert pool_tokens(argv + ["--context-length", "256"]) >= 300
    assert pool_tokens(argv + ["--context-length=300"]) >= 300
    with pytest.raises(UsageError, match="maximum-length request \\(301 tokens"):
        build(argv + ["--context-length", "301"])


def test_check_budget_honours_context_and_dtype() -> None:
    fp32 = read_model_info(MODEL, "float32", "cpu")
    assert context_length(MODEL) == 512 and context_length(MODEL, 128) == 128
    budget = fp32.weight_bytes + 128 * fp32.kv_bytes_per_token
    with pytest.raises(BudgetError):
        check_budget(MODEL, budget, "float32", "cpu")
    assert check_budget(MODEL, budget, "float32", "cpu", context_len=128) == fp32
    # the same bytes hold a whole context in bfloat16 (weights and KV at half the size)
    assert check_budget(MODEL, budget * 2, "bfloat16", "cpu").dtype_bytes == 2


def test_auto_sizes_a_bfloat16_checkpoint_in_bfloat16(tmp_path: Path) -> None:
    model = tmp_path / "bf16"
    shutil.copytree(MODEL, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"dtype": "bfloat16"}))
    assert read_model_info(str(model), "auto", "cpu") == read_model_info(MODEL, "bfloat16", "cpu")


def test_runtime_kv_floor_is_one_maximum_length_request(monkeypatch, one_thread) -> None:
    """SGLang caps a request at ``max_req_len`` = min(context - 1, pool - 1): the runtime's KV
    never goes below that, and never needs a whole context more."""
    monkeypatch.setattr("sglang_morph.metrics.metrics_enabled", lambda: False)
    model = FakeLlama()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    bpt = 2 * 2 * 2 * 4 * 4  # k and v, 2 layers, 2 heads x 4 dims of float32 (the double's)
    for context, floor in [(64, 63), (2048, 1279)]:  # the second: a pool shorter than context
        scheduler = FakeScheduler(1280, model=model, context_len=context)
        cfg = MorphConfig(policy="manual", memory_budget_bytes=weights + 1280 * bpt,
                          kv_segment_tokens=32)  # fmt: skip
        rt = MorphRuntime(scheduler, cfg)
        try:
            assert rt.kv.min_tokens == floor
            assert rt.kv.quantize_tokens(0) == floor
        finally:
            rt.swapper.close()
