"""Tensor-parallel agreement (sglang_morph/tp_sync.py) across two real processes.

SGLang's CPU engine cannot run ``--tp-size 2`` usefully on this machine (docs/design.md, "What
is real on GPU today"), so the two ranks are two spawned processes joined by a real gloo group
on 127.0.0.1, each with a real MorphRuntime, layer swapper and elastic KV pool over the test
doubles of tests/sglang_doubles.py (a scheduler and a model; the scheduler's ``tp_group`` is a
stand-in for SGLang's GroupCoordinator around the real gloo group). Rank 0 decides; rank 1
prepares its swaps more slowly, as a loaded rank would; both must show the same layer formats,
KV capacity and frozen state after every scheduler loop pass.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglang_morph.config import MorphConfig
from sglang_morph.server_process import free_port
from sglang_morph.tp_sync import rank_budget

POOL = 1280
FP_KV_TOKENS = 256
BYTES_PER_TOKEN = 2 * 2 * 2 * 4 * 4  # k and v, 2 layers, 2 heads x 4 dims of float32
QUANTIZE_AT, RESTORE_AT, FREEZE_AT, PASSES = 5, 200, 400, 420
LIMIT_AT, UNLIMIT_AT = 250, 300
"""Rank 0's controller halves the KV limit (a KV fraction of 0.5), then lifts it."""
SLOW_PREPARE_S = 0.3
"""Rank 1's extra seconds per layer preparation: rank 0 is ready long before it."""


def test_rank_budget_splits_the_group_budget() -> None:
    assert rank_budget(1000, 2) == 500 and rank_budget(1001, 2) == 500
    assert rank_budget(None, 4) is None
    with pytest.raises(ValueError, match="tp_size must be 1 or more, got 0"):
        rank_budget(1000, 0)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One TP rank: a runtime over the doubles, driven through PASSES loop passes."""
    import sglang_morph.metrics
    from sglang_morph.runtime import MorphRuntime
    from tests.sglang_doubles import FakeLlama, FakeScheduler

    torch.set_num_threads(1)
    sglang_morph.metrics.metrics_enabled = lambda: False
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = FakeLlama()
    scheduler = FakeScheduler(POOL, model=model)
    scheduler.tp_group = SimpleNamespace(
        cpu_group=dist.group.WORLD, rank_in_group=rank, world_size=2
    )  # stand-in for SGLang's GroupCoordinator
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    group_budget = 2 * (weights + FP_KV_TOKENS * BYTES_PER_TOKEN)
    rt = MorphRuntime(
        scheduler, MorphConfig(policy="manual", memory_budget_bytes=group_budget,
                               kv_segment_tokens=32, tick_interval_s=0.0)
    )  # fmt: skip
    if rank == 1:
        prepare = rt.swapper._prepare

        def slow_prepare(slot, fmt):
            time.sleep(SLOW_PREPARE_S)
            return prepare(slot, fmt)

        rt.swapper._prepare = slow_prepare
    history, frozen, locally_ready = [], [], None
    for n in range(PASSES):
        if rank == 0 and n == QUANTIZE_AT:
            rt.set_target_quantized(2)  # rank 0 decides; rank 1 never does
        if rank == 0 and n == RESTORE_AT:
            rt.set_target_quantized(0)
        if rank == 0 and n in (LIMIT_AT, UNLIMIT_AT):
            rt.wanted_kv_fraction = 0.5 if n == LIMIT_AT else 1.0  # as decide() sets it
        rt.loop_pass()
        if rank == 1 and n == FREEZE_AT:
            rt.frozen, rt.last_error = True, "frozen on rank 1 (test)"
        if locally_ready is None and rt.swapper.ready(rt.layer_order[0]):
            locally_ready = n
        history.append([rt.formats(), rt.kv_capacity_tokens()])
        frozen.append(rt.frozen)
        time.sleep(0.01)
    result = {
        "history": history,
        "frozen": frozen,
        "locally_ready": locally_ready,
        "budget": rt.cfg.memory_budget_bytes,
        "group_budget": group_budget,
        "last_error": rt.last_error,
        "observing": rt.observing,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    rt.swapper.close()
    dist.destroy_process_group()


@pytest.mark.slow
def test_rank0_decides_and_both_ranks_commit_in_the_same_pass(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["budget"] == r1["budget"] == r0["group_budget"] // 2
    assert r0["observing"] and not r1["observing"]  # only rank 0's controller decides
    fp, int4 = ["fp", "fp"], ["int4", "int4"]
    # Identical formats and KV capacity after every pass while nobody is frozen:
    assert r0["history"][: FREEZE_AT + 1] == r1["history"][: FREEZE_AT + 1]
    formats = [h[0] for h in r0["history"]]
    first_quantized = next(n for n, f in enumerate(formats) if f != fp)
    assert QUANTIZE_AT <= first_quantized < RESTORE_AT and int4 in formats[:RESTORE_AT]
    assert formats[FREEZE_AT] == fp  # restored before the freeze
    capacity = [h[1] for h in r0["history"]]
    assert capacity[0] == FP_KV_TOKENS and max(capacity) > FP_KV_TOKENS
    # The KV fraction rank 0 chose before a pass applies on both ranks in that pass (the
    # histories are identical), never on rank 0 alone:
    assert capacity[LIMIT_AT - 1] == FP_KV_TOKENS and capacity[LIMIT_AT] == FP_KV_TOKENS // 2
    assert capacity[UNLIMIT_AT - 1] == FP_KV_TOKENS // 2 and capacity[UNLIMIT_AT] == FP_KV_TOKENS
    # Rank 0 had its first layer ready well before rank 1, and waited for it:
    assert r0["locally_ready"] < first_quantized
    # Rank 1 froze after pass FREEZE_AT; rank 0 follows in the next pass, not before:
    assert r1["frozen"].index(True) == FREEZE_AT
    assert r0["frozen"].index(True) == FREEZE_AT + 1
    assert r0["last_error"] == "morphing frozen on another tensor-parallel rank"
