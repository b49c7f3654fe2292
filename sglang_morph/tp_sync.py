"""Tensor parallelism: TP rank 0 decides, every rank applies the same change at the same pass.

Under ``--tp-size N`` SGLang runs one scheduler process per rank. Each holds 1/N of every
layer's weights and of the KV heads, and so its own MorphRuntime, layer swapper and KV pool.
The ranks' schedulers must admit and run the same batches; if each rank decided on its own
clock, or committed a swap when its own background preparation happened to finish, their
formats and KV capacities would drift apart and so would their schedules. Hence, once per
scheduler loop pass, at the same point of the loop on every rank (the tick, nothing in flight):

- ``share``: rank 0's desired layer formats and KV fraction are broadcast on the scheduler's
  CPU (gloo) group, and every rank applies that fraction in this pass;
  only rank 0's controller decides (the other ranks do not observe), and operator commands,
  which SGLang delivers to every rank in the same pass, are overridden by rank 0's copy;
- ``agree``: an all-reduce (MIN) of per-layer readiness and of "not frozen": a layer commits
  only in a pass where its preparation for the shared format succeeded on every rank, and
  morphing freezes on every rank as soon as it freezes on one.

The memory budget is the whole group's: each rank gets ``budget // N`` (``rank_budget``), holds
1/N of the weights and 1/N of the KV bytes per token, so the KV capacity in tokens comes out
the same on every rank (replicated norms and vocabulary padding aside). ``/morph/state`` shows
TP rank 0 only: SGLang answers ``get_internal_state`` from the first rank of each data-parallel
group (the only rank with a socket to the tokenizer), and the other ranks hold the same formats
by construction.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from sglang_morph.config import FORMAT_BITS, MorphConfig

_BY_BITS = {bits: fmt for fmt, bits in FORMAT_BITS.items()}


def rank_budget(budget_bytes: int | None, tp_size: int) -> int | None:
    """One rank's share of the group's memory budget (None: no budget)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be 1 or more, got {tp_size}")
    return None if budget_bytes is None else budget_bytes // tp_size


class TPSync:
    """The agreement of one rank with the others of its tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int) -> None:
        self.group = group
        self.rank = rank
        self.size = size

    @classmethod
    def from_scheduler(cls, scheduler) -> TPSync | None:
        """The scheduler's TP agreement, or None on a single rank (nothing to agree on)."""
        coordinator = getattr(scheduler, "tp_group", None)
        if coordinator is None or coordinator.world_size <= 1:
            return None
        return cls(coordinator.cpu_group, coordinator.rank_in_group, coordinator.world_size)

    @property
    def is_source(self) -> bool:
        """Whether this rank decides (TP rank 0)."""
        return self.rank == 0

    def rank_config(self, cfg: MorphConfig) -> MorphConfig:
        """``cfg`` with this rank's share of the memory budget."""
        return dataclasses.replace(
            cfg, memory_budget_bytes=rank_budget(cfg.memory_budget_bytes, self.size)
        )

    def share(self, desired: list[str], kv_fraction: float) -> tuple[list[str], float]:
        """Rank 0's ``desired`` formats and KV fraction, on every rank (one broadcast of a
        small tensor; the fraction travels in thousandths)."""
        values = [FORMAT_BITS[f] for f in desired] + [round(kv_fraction * 1000)]
        bits = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(bits, group=self.group, group_src=0)
        return [_BY_BITS[int(b)] for b in bits[:-1]], int(bits[-1]) / 1000

    def agree(self, ready: list[bool], frozen: bool) -> tuple[list[bool], bool]:
        """Per layer, whether it is ready on every rank; and whether any rank is frozen."""
        flags = torch.tensor([*ready, not frozen], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=self.group)
        return [bool(x) for x in flags[:-1]], not bool(flags[-1])

    def exchange(self, rt) -> None:
        """The pass's agreement for the MorphRuntime ``rt``: its desired formats become rank
        0's, ``rt.tp_ready`` holds the layers it may commit in this pass (layer -> format),
        and it freezes if another rank froze."""
        if rt.swapper is None:  # morphing off: the same on every rank, nothing to agree
            return
        rt.desired, rt.wanted_kv_fraction = self.share(rt.desired, rt.wanted_kv_fraction)
        rt.agreed_kv_fraction = rt.wanted_kv_fraction
        formats = rt.formats()
        ready = [
            have != want and _prepared(rt.swapper, i, want)
            for i, (have, want) in enumerate(zip(formats, rt.desired))
        ]
        everywhere, any_frozen = self.agree(ready, rt.frozen)
        rt.tp_ready = {i: rt.desired[i] for i, ok in enumerate(everywhere) if ok}
        if any_frozen and not rt.frozen:
            rt.frozen = True
            rt.last_error = "morphing frozen on another tensor-parallel rank"


def _prepared(swapper, layer_id: int, fmt: str) -> bool:
    """Whether the layer's background preparation for ``fmt`` finished without error."""
    job = swapper.jobs.get(layer_id)
    return (
        job is not None and job.fmt == fmt and job.future.done() and job.future.exception() is None
    )
