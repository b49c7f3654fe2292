"""Every dense Llama-family architecture the runtime claims (Llama, Qwen2 with its q/k/v biases,
Qwen3 with q_norm/k_norm, Mistral), built small with random weights by
``python -m sglang_morph.tiny_model`` and served by real SGLang with ``--morph-policy manual``:
every layer goes to int4, int8 and back to full precision under 16 requests in flight, with no
failed request and greedy outputs after the restore identical to those before. One server at a
time (module-scoped, one per architecture): Qwen2 and Qwen3 in float32, Mistral in bfloat16, so
the budget in the served dtype is checked on a live server too. Llama in float32 is what every
other live test serves (stories260K); every family's build is checked here without a server.
"""

from __future__ import annotations

import itertools
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors import safe_open

from sglang_morph import tiny_model
from sglang_morph.memory import fp_kv_tokens
from sglang_morph.model_info import read_model_info
from sglang_morph.server_process import Server

FP_KV_TOKENS = 2048
"""KV tokens the float32 budget leaves full precision: 16 requests of ~60 tokens fit easily."""
SEGMENT = 64
IN_FLIGHT = 16
LOAD_NEW_TOKENS = 32
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the"]
SERVED = [("qwen2", "float32"), ("qwen3", "float32"), ("mistral", "bfloat16")]


def tensor_names(model_dir: Path) -> set[str]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("arch", tiny_model.ARCHS)
def test_tiny_model_builds_each_family(arch: str, tmp_path: Path) -> None:
    out = tiny_model.build(arch, tmp_path / arch, tiny_model.Shape(), seed=0)
    names = tensor_names(out)
    assert len([n for n in names if n.endswith("self_attn.q_proj.weight")]) == 4
    assert any(n.endswith("self_attn.q_proj.bias") for n in names) == (arch == "qwen2")
    assert any(n.endswith("self_attn.q_norm.weight") for n in names) == (arch == "qwen3")
    for name in tiny_model.TOKENIZER_FILES:
        assert (out / name).is_file(), name
    info = tiny_model.summary(out)
    assert info["architecture"].lower().startswith(arch)
    assert info["kv_bytes_per_token"] == 2 * 4 * 2 * 16 * 4  # k+v, 4 layers, 2 heads x 16, fp32


def test_same_seed_same_weights_and_gpu_ratio_preset(tmp_path: Path) -> None:
    a = tiny_model.build("qwen3", tmp_path / "a", tiny_model.Shape(), seed=3)
    b = tiny_model.build("qwen3", tmp_path / "b", tiny_model.Shape(), seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    shape = tiny_model.shape_from("gpu-ratio", layers=2, hidden=None)
    big = tiny_model.summary(tiny_model.build("llama", tmp_path / "g", shape, seed=0))
    kv_1000 = big["kv_bytes_per_token"] * tiny_model.GPU_RATIO_TOKENS
    assert big["weight_bytes"] >= tiny_model.GPU_RATIO * kv_1000
    small = tiny_model.summary(a)
    assert small["weight_bytes"] < tiny_model.GPU_RATIO * small["kv_bytes_per_token"] * 1000


def test_bad_shape_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        tiny_model.main(["--arch", "llama", "--out", str(tmp_path / "m"), "--hidden", "66"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("error: --hidden 66 is not a multiple") and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module", params=SERVED, ids=lambda p: f"{p[0]}-{p[1]}")
def served(request, tmp_path_factory):
    arch, dtype = request.param
    model = tiny_model.build(arch, tmp_path_factory.mktemp(arch), tiny_model.Shape(), seed=0)
    budget = read_model_info(str(model), "float32", "cpu").budget_bytes(FP_KV_TOKENS)
    server = Server(
        ["--model-path", str(model), "--dtype", dtype, "--morph-policy", "manual",
         "--morph-memory-budget", str(budget), "--morph-kv-segment-tokens", str(SEGMENT)],
        env={"SGLANG_IS_IN_CI": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"},
    )  # fmt: skip
    yield model, dtype, budget, server
    server.stop()


def wait_settled(server: Server, fmt: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        st = server.client.state()
        if all(x["format"] == fmt for x in st["layers"]) and st["kv_resize_complete"]:
            return st
        time.sleep(0.1)
    raise AssertionError(f"layers never all reached {fmt}: {st}")


class Load:
    """IN_FLIGHT threads, each sending greedy requests back to back until stopped."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(IN_FLIGHT)
        self.futures = [self.pool.submit(self._worker, i) for i in range(IN_FLIGHT)]

    def _worker(self, worker: int) -> None:
        for n in itertools.count():
            if self.stop.is_set():
                return
            ids = [3 + (worker * 31 + n * 7 + k) % 500 for k in range(12 + worker)]
            body = {
                "input_ids": ids,
                "sampling_params": {
                    "temperature": 0,
                    "max_new_tokens": LOAD_NEW_TOKENS,
                    "ignore_eos": True,
                },
            }
            try:
                r = self.server.client.post("/generate", body, timeout_s=300)
                ok = r.status_code == 200 and (
                    r.json()["meta_info"]["completion_tokens"] == LOAD_NEW_TOKENS
                )
                why = None if ok else f"HTTP {r.status_code}: {r.text[:200]}"
            except Exception as err:  # every failure is recorded and asserted
                why = repr(err)
            with self.lock:
                if why is None:
                    self.done += 1
                else:
                    self.failures.append(why)

    def wait_for(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while self.done < count and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.done >= count, f"only {self.done} requests completed: {self.failures[:3]}"

    def close(self) -> None:
        self.stop.set()
        for f in self.futures:
            f.result(timeout=300)
        self.pool.shutdown()


@pytest.mark.slow
def test_budget_in_the_served_dtype(served) -> None:
    model, dtype, budget, server = served
    info = read_model_info(str(model), dtype, "cpu")
    st = server.client.state()
    assert st["kv_bytes_per_token"] == info.kv_bytes_per_token
    assert st["weight_bytes"] == info.weight_bytes  # the launcher sized what SGLang holds
    assert st["kv_capacity_tokens"] == fp_kv_tokens(info, budget) // SEGMENT * SEGMENT
    if dtype == "bfloat16":  # same float32-sized budget, half the bytes per token and weight
        assert st["kv_capacity_tokens"] >= 2 * FP_KV_TOKENS
    else:
        assert st["kv_capacity_tokens"] == FP_KV_TOKENS


@pytest.mark.slow
def test_every_layer_swaps_under_load_and_restores_outputs(served) -> None:
    _, _, budget, server = served
    client = server.client
    layers = [x["id"] for x in client.state()["layers"]]
    before = [client.generate(p, 24) for p in PROMPTS]
    load = Load(server)
    try:
        load.wait_for(IN_FLIGHT)
        for fmt in ("int4", "int8", "fp"):
            started = load.done
            client.swap(layers, fmt)
            st = wait_settled(server, fmt)
            assert st["device_bytes_in_use"] <= budget, st
            assert st["last_error"] is None and st["prepare_failures"] == 0, st
            load.wait_for(started + IN_FLIGHT)  # requests kept completing in this format
    finally:
        load.close()
    assert load.failures == []
    assert client.state()["transitions"] >= 3 * len(layers)
    assert [client.generate(p, 24) for p in PROMPTS] == before
