"""Layer swapping and elastic KV in the live server under --morph-policy manual.

One real SGLang server (CPU, stories260K, a memory budget) is shared by the module; SGLang's
strict memory checks are on, so any leak or inconsistent size holder stops its scheduler and
fails the tests that follow.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sglang_morph.server_process import Server

BUDGET = 2_100_000  # stories260K fp32: ~1.1 MB of weights + 768 KV tokens of 1,280 B
SEGMENT = 64
ADMIN = {"Authorization": "Bearer morph-admin"}
PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the"]


@pytest.fixture(scope="module")
def server():
    s = Server(
        ["--morph-policy", "manual", "--morph-memory-budget", str(BUDGET),
         "--morph-kv-segment-tokens", str(SEGMENT), "--admin-api-key", "morph-admin"],
        env={"SGLANG_IS_IN_CI": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1"},
    )
    yield s
    s.stop()


def state(server) -> dict:
    r = server.client.get("/morph/state")
    assert r.status_code == 200, r.text
    return r.json()


def command(server, path: str, body: dict) -> requests.Response:
    return server.client.post(path, body, headers=ADMIN)


def swap(server, layers: list[int], fmt: str) -> None:
    r = command(server, "/morph/swap", {"layers": layers, "format": fmt})
    assert r.status_code == 200, r.text
    wait_settled(server)


def wait_settled(server, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = state(server)
        if all(x["format"] == x["desired"] for x in st["layers"]) and st["kv_resize_complete"]:
            return st
        time.sleep(0.1)
    raise AssertionError(f"not settled: {st}")


def generate_ids(server, ids: list[int], n: int) -> dict:
    r = server.client.post("/generate", {"input_ids": ids, "sampling_params": {
        "temperature": 0, "max_new_tokens": n, "ignore_eos": True}}, timeout_s=300)
    r.raise_for_status()
    return r.json()


def test_swap_requires_admin_key(server):
    r = server.client.post("/morph/swap", {"layers": [0], "format": "int4"})
    assert r.status_code == 401
    assert state(server)["quantized_layers"] == 0


def test_bad_swaps_are_refused_and_change_nothing(server):
    for body, needle in [({"layers": [7], "format": "int4"}, "unknown layer id 7"),
                         ({"layers": [0], "format": "int3"}, "accepted: fp, int8, int4"),
                         ({"layers": "all", "format": "int4"}, "non-empty list")]:
        r = command(server, "/morph/swap", body)
        assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert state(server)["quantized_layers"] == 0


def test_swap_then_restore_gives_identical_greedy_output(server):
    before = [server.client.generate(p, 40) for p in PROMPTS]
    swap(server, [0, 1, 2, 3, 4], "int4")
    st = state(server)
    assert [x["format"] for x in st["layers"]] == ["int4"] * 5
    quantized = [server.client.generate(p, 40) for p in PROMPTS]
    assert all(q for q in quantized)
    swap(server, [0, 1, 2, 3, 4], "fp")
    assert [server.client.generate(p, 40) for p in PROMPTS] == before
    st = state(server)  # each commit came after its preparation: a lead time is recorded
    assert 0 < st["swap_lead_median_s"] <= st["swap_lead_max_s"] < 30


def test_freed_bytes_become_kv_capacity_and_come_back(server):
    st0 = wait_settled(server)
    bpt = st0["kv_bytes_per_token"]
    assert st0["device_bytes_in_use"] <= BUDGET
    swap(server, [3, 4], "int8")
    st1 = state(server)
    freed = sum(x["bytes_by_format"]["fp"] - x["bytes_by_format"]["int8"]
                for x in st1["layers"] if x["id"] in (3, 4))
    assert st0["weight_bytes"] - st1["weight_bytes"] == freed
    grown = st1["kv_capacity_tokens"] - st0["kv_capacity_tokens"]
    assert 0 <= freed // bpt - grown < SEGMENT  # the freed bytes, within one segment
    assert st1["kv_capacity_tokens"] == (BUDGET - st1["weight_bytes"]) // bpt // SEGMENT * SEGMENT
    assert st1["device_bytes_in_use"] <= BUDGET
    swap(server, [3, 4], "fp")
    st2 = state(server)
    assert st2["kv_capacity_tokens"] == st0["kv_capacity_tokens"]
    assert st2["weight_bytes"] == st0["weight_bytes"]


def test_request_in_flight_completes_across_swaps(server):
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(
        generate_ids(server, list(range(10, 60)), 250)))
    worker.start()
    _wait_running(server)
    swap(server, [0, 2, 4], "int4")
    swap(server, [0, 2, 4], "fp")
    worker.join(timeout=300)
    assert result["meta_info"]["completion_tokens"] == 250
    assert result["meta_info"]["finish_reason"]["type"] == "length"
    assert state(server)["transitions"] >= 6


def test_kv_shrink_and_grow_in_flight_keep_outputs(server):
    ids = [[7 + i, 30, 41, 52, 63] * 8 for i in range(4)]
    baseline = [generate_ids(server, x, 120)["output_ids"] for x in ids]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate_ids, server, x, 120) for x in ids]
        _wait_running(server)
        assert command(server, "/morph/kv", {"tokens": 576}).status_code == 200
        time.sleep(0.5)
        assert command(server, "/morph/kv", {"tokens": 0}).status_code == 200
        outputs = [f.result()["output_ids"] for f in futures]
    assert outputs == baseline
    assert wait_settled(server)["kv_capacity_tokens"] == 768


def test_shrink_below_running_requests_waits(server):
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(generate_ids, server, [20 + i] * 250, 100) for i in range(2)]
        deadline = time.monotonic() + 120
        while state(server)["kv_used_tokens"] < 600 and time.monotonic() < deadline:
            time.sleep(0.02)
        r = command(server, "/morph/kv", {"tokens": 512})
        assert r.status_code == 200, r.text
        st = r.json()["state"]
        # >= 600 tokens are held by running requests and only 512 slots lie below the limit.
        assert st["kv_quarantined_tokens"] > 0 and not st["kv_resize_complete"]
        assert st["kv_capacity_tokens"] == 512
        results = [f.result() for f in futures]
    assert all(x["meta_info"]["completion_tokens"] == 100 for x in results)
    st = wait_settled(server)
    assert st["kv_quarantined_tokens"] == 0 and st["kv_capacity_tokens"] == 512
    assert command(server, "/morph/kv", {"tokens": 0}).status_code == 200
    assert wait_settled(server)["kv_capacity_tokens"] == 768


def test_impossible_kv_sizes_are_refused(server):
    r = command(server, "/morph/kv", {"tokens": 100_000})
    assert r.status_code == 400 and "reservation holds" in r.json()["error"]
    r = command(server, "/morph/kv", {"tokens": 10})
    # the floor is one maximum-length request: SGLang's max_req_len, context 512 - 1
    assert r.status_code == 400 and "below the minimum 511" in r.json()["error"]
    r = command(server, "/morph/kv", {"tokens": 1400})
    assert r.status_code == 400 and "memory budget allows" in r.json()["error"]
    assert wait_settled(server)["kv_capacity_tokens"] == 768


def test_randomized_resize_stress_keeps_invariants(server):
    """1,000 grow/shrink steps and layer swaps under concurrent load with shared prefixes."""
    rng = random.Random(0)
    prefixes = [[rng.randrange(3, 500) for _ in range(40)] for _ in range(3)]
    stop = threading.Event()
    done: list[dict] = []

    def load() -> None:
        local = random.Random(threading.get_ident())
        while not stop.is_set():
            ids = local.choice(prefixes) + [local.randrange(3, 500) for _ in range(20)]
            done.append(generate_ids(server, ids, local.randrange(4, 40)))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for step in range(1000):
            if step % 100 == 50:
                layers = rng.sample(range(5), rng.randrange(1, 6))
                r = command(server, "/morph/swap", {"layers": layers,
                                                    "format": rng.choice(["int4", "fp"])})
            else:
                r = command(server, "/morph/kv", {"tokens": rng.choice([0, 512, 576, 640, 704])})
            assert r.status_code in (200, 400), r.text
            st = r.json().get("state") or state(server)
            cap = st["kv_capacity_tokens"]
            assert cap % SEGMENT == 0 or cap == st["kv_reserved_tokens"]
            assert st["device_bytes_in_use"] <= BUDGET
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=300)
    assert command(server, "/morph/kv", {"tokens": 0}).status_code == 200
    swap(server, [0, 1, 2, 3, 4], "fp")
    st = wait_settled(server)
    assert done and all(d["meta_info"]["completion_tokens"] > 0 for d in done)
    assert st["kv_quarantined_tokens"] == 0 and not st["frozen"]
    # Idle: every usable slot is free or cached (SGLang's strict idle leak check agrees).
    assert st["kv_used_tokens"] == 0
    assert server.client.generate("Once upon a time", 10)


def _wait_running(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(server)["running_reqs"] > 0:
            return
        time.sleep(0.01)
    raise AssertionError("request never started running")
