"""Prefix sharing: Mooncake's hash-id blocks become shared prompt prefixes, SGLang's prefix cache
serves them (cached_tokens), and morphing under a cached prefix loses nothing.

The unit tests check the block builder, the records and the saved plan without a server. The
slow tests replay a real, prefix-heavy Mooncake slice against one morphing server (manual
policy, default budget) while the test quantizes every layer, shrinks and lifts the KV limit and
restores full precision; then the same slice against a full-precision server
(``--morph-policy off``), whose greedy outputs the morphing server's full-precision segment
(the requests that ended before the first swap) must equal.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from eval import run_dir
from eval.metrics import Slo, prefix_cache_hit_rate, summarize
from eval.plan import make_plan, plan_json, resume_plan
from eval.prompts import block_ids, block_tokens, request_prompt, trace_prompts
from eval.replay import Replayer, RequestRecord, _add_output_ids, prompt_ids, usable_token_ids
from eval.run import build_parser
from eval.run_dir import SystemRun
from eval.traces import (
    LengthMapping,
    Trace,
    TraceError,
    TraceRequest,
    load_trace,
    map_lengths,
    select_window,
)
from sglang_morph.data import resolve_model
from sglang_morph.memory import default_budget
from sglang_morph.server_process import Server

VOCAB = np.arange(3, 512, dtype=np.int64)

WINDOW = (1008.0, 1022.0)
"""The last 14 s of the Mooncake trace: 53 requests, most sharing leading blocks with an
earlier one (the trace's sharing grows towards its end)."""
MAPPING = LengthMapping(input_div=32, input_max=128, output_min=48, output_max=64)
"""Blocks of 16 tokens, prompts of at most 8 blocks, outputs long enough that requests with the
same first block overlap in time on a quiet, fast machine too (the cache-hit test needs some:
with 24-32 output tokens a machine twice as fast as the first one left only 2 overlaps, with
48-64 it had 5), short enough that a loaded 2-core machine serves the slice in real time."""
LAYERS = [0, 1, 2, 3, 4]
FP_SEGMENT = 24
"""Requests that complete before the first swap: the full-precision segment compared with the
fp server. Counted rather than timed, so a loaded machine still gives a segment this long."""
STEP_S = 1.5
"""Seconds between the later commands (shrink the KV limit, lift it, restore fp)."""
SHRINK_TOKENS = 576
"""Below the fp capacity (768), above the 511-token minimum (the model's context)."""


# -- the block builder (no server) --


def _request(input_tokens: int, hash_ids: tuple[int, ...] | None) -> TraceRequest:
    return TraceRequest(0.0, input_tokens, 4, hash_ids)


def test_same_id_same_tokens_different_ids_differ() -> None:
    assert block_ids(VOCAB, 7, 16) == block_ids(VOCAB, 7, 16)
    assert block_ids(VOCAB, 7, 16) != block_ids(VOCAB, 8, 16)
    assert block_ids(VOCAB, 7, 16, seed=1) != block_ids(VOCAB, 7, 16)
    assert set(block_ids(VOCAB, 7, 64)) <= set(VOCAB.tolist())


def test_shared_prefixes_line_up_and_tails_are_unique() -> None:
    a = request_prompt(VOCAB, _request(40, (1, 2, 3)), index=0, block_len=16)
    b = request_prompt(VOCAB, _request(40, (1, 2, 9)), index=1, block_len=16)
    c = request_prompt(VOCAB, _request(40, (5, 2, 3)), index=2, block_len=16)
    assert len(a) == len(b) == len(c) == 40
    assert a[:32] == b[:32] and a[32:] != b[32:]  # blocks 1, 2 shared; block 3 vs 9 not
    assert a[:16] != c[:16] and a[16:32] == c[16:32]  # same block, other prefix
    longer = request_prompt(VOCAB, _request(60, (1, 2)), index=3, block_len=16)
    again = request_prompt(VOCAB, _request(60, (1, 2)), index=4, block_len=16)
    assert longer[:32] == a[:32] and longer[32:] != again[32:]  # request-unique tails
    assert request_prompt(VOCAB, _request(20, None), 5, 16) == prompt_ids(VOCAB, 20, 5)


def test_block_size_follows_the_input_mapping() -> None:
    assert [block_tokens(d) for d in (1, 16, 32, 600)] == [512, 32, 16, 1]
    with pytest.raises(ValueError, match="input_div must be positive"):
        block_tokens(0)
    source = Trace("t", (_request(1024, (4, 5)), _request(1024, (4, 6))), {})
    mapped = map_lengths(source, LengthMapping(input_div=16, input_max=300))
    prompts = trace_prompts(VOCAB, mapped)
    assert [len(p) for p in prompts] == [64, 64]
    assert prompts[0][:32] == prompts[1][:32] == block_ids(VOCAB, 4, 32)
    assert prompts[0][32:] != prompts[1][32:]
    assert trace_prompts(VOCAB, source)[0][:512] == block_ids(VOCAB, 4, 512)


def test_records_keep_cached_tokens_and_output_ids() -> None:
    record = RequestRecord(0, 0.0, 0.0, 10, 3)
    _add_output_ids(record, [5], 1)  # SGLang's default stream: every id so far
    _add_output_ids(record, [5, 6, 7], 3)
    assert record.output_ids == [5, 6, 7]
    deltas = RequestRecord(1, 0.0, 0.0, 10, 3)
    for chunk, tokens in (([5], 1), ([6, 7], 3)):  # --incremental-streaming-output
        _add_output_ids(deltas, chunk, tokens)
    assert deltas.output_ids == [5, 6, 7]
    record.cached_tokens, record.ttft_s = 4, 0.1
    run = SystemRun.from_json(SystemRun("fp", 0, [record]).to_json())
    assert run.records[0].cached_tokens == 4 and run.records[0].output_ids == [5, 6, 7]
    old = {k: v for k, v in record.to_json().items() if k not in ("cached_tokens", "output_ids")}
    assert RequestRecord(**old).cached_tokens is None  # a rep file written before they existed


def test_hit_rate_counts_completed_requests_that_report() -> None:
    def rec(prompt: int, cached: int | None, error: str | None = None) -> RequestRecord:
        return RequestRecord(0, 0.0, 0.0, prompt, 2, 2, 0.1, 0.1, 0.2, error, cached)

    records = [rec(100, 50), rec(100, 0), rec(100, 100, error="timeout"), rec(50, None)]
    assert summarize(records, Slo(1.0, 1.0, "test"))["prefix_cache_hit_rate"] == 0.25
    assert prefix_cache_hit_rate([rec(10, None)]) is None


def test_mooncake_plan_resumes_with_the_same_shared_prompts(tmp_path: Path) -> None:
    """The saved plan keeps the hash ids, so a resumed run rebuilds the very same prompts
    (its checksum check passes) and they share prefixes as the trace says."""
    _slice()  # skips without the trace
    out = tmp_path / "run"
    window = f"{WINDOW[0]:g}:{WINDOW[1]:g}"
    args = build_parser().parse_args(
        ["--trace", "mooncake", "--window", window, "--input-div", "32", "--input-max", "128",
         "--systems", "fp", "--slo-ttft", "1", "--slo-tpot", "1", "--out", str(out)]
    )  # fmt: skip
    plan = make_plan(args)
    run_dir.save_plan(out, plan_json(plan))
    resumed = resume_plan(build_parser().parse_args(["--resume", str(out)]), set())
    assert resumed.prompts == plan.prompts
    assert resumed.trace.requests == plan.trace.requests
    firsts = [tuple(p[:16]) for p in plan.prompts]
    assert len(set(firsts)) < len(firsts) / 2  # most prompts begin with a block seen before


# -- a live replay under morphing --


def _slice() -> tuple[Trace, list[list[int]]]:
    try:
        trace = load_trace("mooncake")
    except TraceError as err:
        pytest.skip(f"Mooncake trace not available: {err}")
    trace = map_lengths(select_window(trace, *WINDOW), MAPPING)
    return trace, trace_prompts(usable_token_ids(resolve_model(None)), trace)


def _first_token_s(r: RequestRecord) -> float:
    return r.sent_s + r.ttft_s


def _locked_prefix_source(trace: Trace, records: list[RequestRecord], i: int) -> bool:
    """Whether request ``i`` was prefilled while another request beginning with the same block
    ran with its own prefill done: that request holds its prefix in the radix cache (locked, so
    never evicted, whatever the KV pressure), hence ``i`` must find at least that block. The
    50 ms margin keeps out requests prefilled in the same batch, which cannot share."""
    first, start = trace.requests[i].hash_ids[0], _first_token_s(records[i])
    return any(
        j != i
        and trace.requests[j].hash_ids[0] == first
        and _first_token_s(records[j]) + 0.05 < start < records[j].sent_s + records[j].e2e_s
        for j in range(len(records))
    )


async def _settle(server: Server, fmt: str) -> dict:
    while True:
        state = await asyncio.to_thread(server.client.state)
        if all(x["format"] == fmt for x in state["layers"]) and state["kv_resize_complete"]:
            return state
        await asyncio.sleep(0.1)


async def _morph(server: Server, replayer: Replayer, t0: float, events: dict) -> None:
    """Once FP_SEGMENT requests have ended: quantize every layer, shrink then lift the KV
    limit, restore full precision."""
    total = len(replayer.requests)
    while True:
        ended = sum(r.e2e_s is not None or r.error is not None for r in replayer.records)
        if ended >= min(FP_SEGMENT, total):
            break
        await asyncio.sleep(0.05)
    client = server.client
    steps = [
        ("swap", lambda: client.swap(LAYERS, "int4")),
        ("shrink", lambda: client.set_kv_limit(SHRINK_TOKENS)),
        ("lift", lambda: client.set_kv_limit(0)),
        ("restore", lambda: client.swap(LAYERS, "fp")),
    ]
    for name, command in steps:
        if name != "swap":
            await asyncio.sleep(STEP_S)
        events[name] = time.perf_counter() - t0
        await asyncio.to_thread(command)
        if name == "swap":
            events["int4_state"] = await _settle(server, "int4")
    await _settle(server, "fp")
    events["fp_again"] = time.perf_counter() - t0


def _replay(args: list[str], trace: Trace, prompts: list[list[int]], morph: bool) -> dict:
    """One server, the slice replayed open-loop (morphing it alongside when ``morph``)."""
    server = Server(["--morph-memory-budget", str(default_budget(resolve_model(None))), *args])
    try:
        replayer = Replayer(server.url, trace.requests, prompts, progress=False)
        events: dict = {}

        async def run() -> None:
            t0 = time.perf_counter()
            jobs = [replayer.run(t0)] + ([_morph(server, replayer, t0, events)] if morph else [])
            await asyncio.gather(*jobs)

        asyncio.run(run())
        return {"records": replayer.records, "events": events, "state": server.client.state()}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def workload() -> tuple[Trace, list[list[int]]]:
    return _slice()


@pytest.fixture(scope="module")
def morphed(workload) -> dict:
    return _replay(["--morph-policy", "manual"], *workload, morph=True)


@pytest.fixture(scope="module")
def full_precision(workload, morphed) -> dict:
    """Started after the morphing server has stopped (``morphed`` first): one at a time."""
    return _replay(["--morph-policy", "off"], *workload, morph=False)


@pytest.mark.slow
def test_replay_under_morphing_fails_nothing(workload, morphed) -> None:
    trace, _ = workload
    records, events, state = morphed["records"], morphed["events"], morphed["state"]
    assert [r.error for r in records if not r.ok] == []
    assert len(records) == len(trace.requests) >= 40
    for record, request in zip(records, trace.requests, strict=True):
        assert record.output_tokens == request.output_tokens == len(record.output_ids)
    assert events["swap"] < events["shrink"] < events["lift"] < events["restore"]
    in_flight = [r for r in records if r.sent_s < events["swap"] < r.sent_s + r.e2e_s]
    assert in_flight  # the model changed under running requests, which all completed
    quantized = events["int4_state"]
    assert quantized["quantized_layers"] == len(LAYERS)
    assert quantized["kv_capacity_tokens"] > state["kv_capacity_tokens"]  # freed bytes -> KV
    assert state["transitions"] >= 2 * len(LAYERS) and state["quantized_layers"] == 0


@pytest.mark.slow
def test_shared_prefixes_are_served_from_the_cache(workload, morphed) -> None:
    trace, _ = workload
    records = morphed["records"]
    block = block_tokens(MAPPING.input_div)
    assert summarize(records, Slo(1.0, 1.0, "test"))["prefix_cache_hit_rate"] > 0
    locked = [i for i in range(len(records)) if _locked_prefix_source(trace, records, i)]
    assert len(locked) >= 3, f"only {len(locked)} request(s) overlapped one with their prefix"
    assert all(records[i].cached_tokens >= block for i in locked), [
        (i, records[i].cached_tokens) for i in locked
    ]
    first_blocks: set[int] = set()
    for i, request in enumerate(trace.requests):
        if request.hash_ids[0] not in first_blocks:  # nothing before began like this one
            assert records[i].cached_tokens < block, (i, records[i].cached_tokens)
        first_blocks.add(request.hash_ids[0])


@pytest.mark.slow
def test_full_precision_segment_equals_the_fp_server(workload, morphed, full_precision) -> None:
    """Requests that ended before the first swap ran, prefixes included, in full precision."""
    records, reference = morphed["records"], full_precision["records"]
    assert [r.error for r in reference if not r.ok] == []
    swap_at = morphed["events"]["swap"]
    fp_only = [i for i, r in enumerate(records) if r.sent_s + r.e2e_s < swap_at]
    assert len(fp_only) >= FP_SEGMENT
    for i in fp_only:
        assert records[i].output_ids == reference[i].output_ids, i
    assert summarize(reference, Slo(1.0, 1.0, "test"))["prefix_cache_hit_rate"] > 0
