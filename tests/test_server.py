"""The foundation against the real SGLang server on CPU: plugin loaded, routes, plain equality."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sglang_morph.server_process import Server

STORY = (
    "Once upon a time, there was a little girl named Lily. "
    "She loved to play outside in the park."
)
KV_TOKENS = "2048"


@pytest.fixture(scope="module")
def server():
    s = Server(["--morph-policy", "off", "--max-total-tokens", KV_TOKENS])
    yield s
    s.stop()


def test_generate_known_continuation(server):
    text = "Once upon a time" + server.client.generate("Once upon a time", max_new_tokens=30)
    assert text.startswith(STORY)


def test_openai_completions(server):
    r = server.client.post("/v1/completions", {"model": "default", "prompt": "Once upon a time",
                                        "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"].startswith(", there was")


def test_openai_chat_completions(server):
    r = server.client.post("/v1/chat/completions", {
        "model": "default", "max_tokens": 8, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a story"}]})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


def test_morph_state_comes_from_scheduler(server):
    state = server.client.state()
    assert state["policy"] == "off" and state["enabled"] is False
    assert [layer["format"] for layer in state["layers"]] == ["fp"] * 5
    # kv_capacity_tokens is read from the scheduler's live allocator, not the launcher's args.
    assert state["kv_capacity_tokens"] == int(KV_TOKENS)
    assert state["transitions"] == 0 and state["fallbacks"] == 0
    for key in ("kv_used_tokens", "budget_bytes", "device_bytes_in_use"):
        assert key in state
    log = server.log_path.read_text()
    assert "sglang-morph runtime active in scheduler process" in log


def test_iteration_log_times_whole_loop_passes(server):
    before = len(server.client.iterations())
    server.client.post("/generate", {"input_ids": list(range(5, 45)),
                              "sampling_params": {"max_new_tokens": 12, "ignore_eos": True}})
    records = server.client.iterations()[before:]
    prefill = [r for r in records if r["prefill_tokens"]]
    decode = [r for r in records if r["decode_reqs"]]
    assert [r["prefill_tokens"] for r in prefill] == [40] and prefill[0]["context_tokens"] == 40
    # 11 decode steps of the one request, its sequence one token longer at each.
    assert [r["context_tokens"] for r in decode] == list(range(41, 52))
    for r in records:  # a loop pass holds its forward and the scheduling around it
        assert 0 < r["forward_s"] < r["loop_s"] < 5
    for r, after in zip(records, records[1:]):
        assert after["start_s"] >= r["start_s"] + r["forward_s"]


def test_swap_refused_when_policy_off(server):
    r = server.client.post("/morph/swap", {"layers": [0], "format": "int4"})
    assert r.status_code == 409
    assert "--morph-policy manual" in r.json()["error"]


def test_off_equals_plain_sglang(server):
    prompts = ["Once upon a time", "The little dog", "Tom and Sue went to"]
    ours = [server.client.generate(p, 40) for p in prompts]
    plain = Server(["--model-path", _model(), "--device", "cpu", "--attention-backend",
                    "torch_native", "--dtype", "float32", "--disable-overlap-schedule",
                    "--max-total-tokens", KV_TOKENS],
                   module="sglang.launch_server", env={"SGLANG_USE_CPU_ENGINE": "1"})
    try:
        theirs = [plain.client.generate(p, 40) for p in prompts]
        assert plain.client.get("/morph/state").status_code == 404  # the plugin stays passive there
    finally:
        plain.stop()
    assert ours == theirs


def _model() -> str:
    from sglang_morph.data import resolve_model

    return resolve_model(None)


@pytest.mark.parametrize("args, message", [
    (["--morph-policy", "bogus"], "invalid choice: 'bogus'"),
    (["--morph-format", "int3"], "invalid choice: 'int3'"),
    (["--morph-bogus", "1"], "unknown option --morph-bogus"),
])
def test_bad_morph_values_exit_2(args, message):
    r = subprocess.run([sys.executable, "-m", "sglang_morph.launch_server", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr


def test_missing_model_path_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "sglang_morph.launch_server", "--model-path",
                        "/nonexistent/model"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: model path does not exist: /nonexistent/model"
