"""Test doubles of the SGLang scheduler pieces the morph runtime reads, around SGLang's real KV
pool and (elastic) allocator on CPU: unit tests of the runtime's KV and controller logic without
a server or a model.

Each double carries only what sglang_morph reads; the attribute names are SGLang 0.5.23's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictResult
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from sglang_morph.kv.elastic_allocator import ElasticTokenToKVPoolAllocator

HEADS, HEAD_DIM = 2, 4
SIZE_HOLDER_NAMES = (
    "pool_stats_observer", "invariant_checker", "load_inquirer", "kv_events_publisher"
)


@dataclass(frozen=True)
class FakeForwardMode:
    extend: bool

    def is_extend(self) -> bool:
        return self.extend

    def is_decode(self) -> bool:
        return not self.extend


@dataclass
class FakeReq:
    """A request: prompt, generated tokens, sampling limits and the KV slots it holds."""

    prompt_len: int
    max_new_tokens: int
    generated: int = 0
    recv_time: float = 0.0
    ignore_eos: bool = True
    done: bool = False
    slots: torch.Tensor | None = None
    kv: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(
        req_pool_idx=None, kv_allocated_len=0))

    def __post_init__(self) -> None:
        self.origin_input_ids = [1] * self.prompt_len
        self.output_ids = [2] * self.generated
        self.sampling_params = SimpleNamespace(
            max_new_tokens=self.max_new_tokens, ignore_eos=self.ignore_eos)
        self.time_stats = SimpleNamespace(scheduler_recv_time=self.recv_time)

    def finished(self) -> bool:
        return self.done


@dataclass
class FakeBatch:
    reqs: list[FakeReq]
    extend: bool = False

    def __post_init__(self) -> None:
        self.forward_mode = FakeForwardMode(self.extend)


class FakeRadixCache:
    """Cached prefixes as slot groups in LRU order; ``evict`` frees whole groups, oldest first,
    back to the allocator (as SGLang's radix cache frees leaves)."""

    def __init__(self, alloc) -> None:
        self.alloc = alloc
        self.entries: list[torch.Tensor] = []

    def insert(self, slots: torch.Tensor) -> None:
        self.entries.append(slots)

    def evictable_size(self) -> int:
        return sum(int(e.numel()) for e in self.entries)

    def protected_size(self) -> int:
        return 0

    def evict(self, params) -> EvictResult:
        evicted = 0
        while self.entries and evicted < params.num_tokens:
            slots = self.entries.pop(0)
            self.alloc.free(slots)
            evicted += int(slots.numel())
        return EvictResult(num_tokens_evicted=evicted)


class FakeScheduler:
    """The scheduler state sglang_morph reads, over SGLang's real MHA pool and the elastic
    allocator (page size 1, CPU). ``model`` is only needed to build a MorphRuntime."""

    def __init__(self, pool_tokens: int, layers: int = 2, model=None, context_len: int = 64,
                 max_running: int = 16) -> None:
        pool = MHATokenToKVPool(
            size=pool_tokens, page_size=1, dtype=torch.float32, head_num=HEADS,
            head_dim=HEAD_DIM, layer_num=layers, device="cpu", enable_memory_saver=False)
        self.token_to_kv_pool_allocator = ElasticTokenToKVPoolAllocator(
            pool_tokens, torch.float32, "cpu", pool, False)
        self.tree_cache = FakeRadixCache(self.token_to_kv_pool_allocator)
        self.req_to_token_pool = SimpleNamespace(
            req_to_token=torch.zeros(max_running, pool_tokens + 1, dtype=torch.int32))
        self.waiting_queue: list[FakeReq] = []
        self.running_batch = FakeBatch([])
        self.last_batch: FakeBatch | None = None
        self.chunked_req: FakeReq | None = None
        self.new_token_ratio_tracker = SimpleNamespace(current=0.5)
        self.max_total_num_tokens = pool_tokens
        for name in SIZE_HOLDER_NAMES:
            setattr(self, name, SimpleNamespace(max_total_num_tokens=pool_tokens))
        self.model_config = SimpleNamespace(context_len=context_len)
        self.max_req_len = min(context_len, pool_tokens) - 1  # as SGLang's tp_worker sets it
        self.tp_worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        self._rows = iter(range(max_running))

    def admit(self, req: FakeReq, tokens: int) -> FakeReq:
        """Give ``req`` a req_to_token row and ``tokens`` freshly allocated KV slots."""
        slots = self.token_to_kv_pool_allocator.alloc(tokens)
        assert slots is not None, "the test asked for more KV than is free"
        row = next(self._rows)
        self.req_to_token_pool.req_to_token[row, :tokens] = slots.to(torch.int32)
        req.slots = slots
        req.kv.req_pool_idx, req.kv.kv_allocated_len = row, tokens
        return req

    def release(self, req: FakeReq) -> None:
        """``req`` finished: its slots go back to the allocator, as SGLang releases them."""
        assert req.slots is not None
        self.token_to_kv_pool_allocator.free(req.slots)
        req.kv.kv_allocated_len = 0
        req.done = True

    def holders(self) -> set[int]:
        """Every copy of the pool size the scheduler keeps."""
        return {self.max_total_num_tokens,
                *(getattr(self, n).max_total_num_tokens for n in SIZE_HOLDER_NAMES)}


class FakeLinear(torch.nn.Module):
    """An SGLang linear as the layer swapper sees it: a weight and a ``quant_method``."""

    def __init__(self, out_features: int, in_features: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(
            torch.randn(out_features, in_features, generator=gen), requires_grad=False)
        self.quant_method = SimpleNamespace(name="unquantized")
        self.input_size = in_features


class FakeDecoderLayer(torch.nn.Module):
    def __init__(self, width: int, seed: int) -> None:
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.qkv_proj = FakeLinear(width, width, seed)
        self.self_attn.o_proj = FakeLinear(width, width, seed + 1)
        self.mlp = torch.nn.Module()
        self.mlp.gate_up_proj = FakeLinear(width, width, seed + 2)
        self.mlp.down_proj = FakeLinear(width, width, seed + 3)


class FakeLlama(torch.nn.Module):
    """``model.model.layers[i]`` with the four linears of an SGLang Llama decoder layer."""

    def __init__(self, layers: int = 2, width: int = 64) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(
            FakeDecoderLayer(width, 10 * i) for i in range(layers))
