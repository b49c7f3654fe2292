"""LayerSwapper: runs a decoder layer from its pre-quantized copy, or from full precision.

Where the copies live: every layer's quantized copy is made once at start-up and kept in host
memory, because it is small (1/8-1/4 of the layer), must be ready the moment load rises and must
not count against the device budget while the layer runs in full precision; a swap copies it to
the device (repacking int4 for the GPU kernel's layout there) and moves the full-precision
weights to host memory (pinned on a GPU), freeing their device bytes. A restore copies them
back unchanged (bit-exact).

Preparation (copies, packing) runs on a background thread (with a side CUDA stream on a GPU) while
the scheduler keeps serving; the commit, which only rebinds the linears' weight tensors and
``quant_method``, runs at the scheduler's tick when no forward is in flight. A layer's KV cache
is untouched, so running requests continue across swaps. A preparation that fails is dropped and
counted, and the layer is prepared again a little later: one failed copy must not stop morphing.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from sglang_morph.faults import Faults
from sglang_morph.quant.linear_method import WeightOnlyLinearMethod
from sglang_morph.quant.quantize import QuantizedWeight, quantize_weight
from sglang_morph.timings import Timings

# The four linears of an SGLang Llama decoder layer, by attribute path.
LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")

PREPARE_RETRY_S = 1.0
"""Least time between a failed preparation of a layer and the next one: a failure that repeats
(memory exhausted) must not take the worker thread and a log line on every tick."""


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


@dataclass
class LayerSlot:
    """One decoder layer's swap state."""

    layer_id: int
    module: torch.nn.Module
    linears: dict[str, torch.nn.Module]
    original_methods: dict[str, object]
    fp_bytes: int
    format: str = "fp"
    copies: dict[str, dict[str, QuantizedWeight]] = field(default_factory=dict)
    host_fp: dict[str, torch.Tensor] | None = None

    def bytes_of(self, fmt: str) -> int:
        """Device bytes of this layer's linears in ``fmt``."""
        if fmt == "fp":
            return self.fp_bytes
        return sum(q.nbytes() for q in self.copies[fmt].values())


@dataclass
class _Job:
    fmt: str
    future: Future
    submitted_s: float = field(default_factory=time.perf_counter)


class LayerSwapper:
    """Owns the format of every decoder layer of one model replica."""

    def __init__(
        self,
        model: torch.nn.Module,
        formats: tuple[str, ...],
        group_size: int,
        act_scales: dict | None = None,
        faults: Faults | None = None,
    ) -> None:
        layers = model.model.layers
        self.device = next(model.parameters()).device
        self.group_size = group_size
        self.act_scales = act_scales or {}
        self.slots: list[LayerSlot] = []
        for i, layer in enumerate(layers):
            linears = {name: _get(layer, name) for name in LINEAR_NAMES}
            fp_bytes = sum(
                lin.weight.numel() * lin.weight.element_size() for lin in linears.values()
            )
            slot = LayerSlot(
                i, layer, linears, {n: lin.quant_method for n, lin in linears.items()}, fp_bytes
            )
            for fmt in formats:
                slot.copies[fmt] = self._quantize_layer(slot, fmt)
            self.slots.append(slot)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="morph-swap")
        self._stream = torch.cuda.Stream() if self.device.type == "cuda" else None
        self.jobs: dict[int, _Job] = {}
        self.faults = faults or Faults()
        self.prepare_failures = 0
        self._retry_at: dict[int, float] = {}
        """Per layer whose last preparation failed: when it may be prepared again."""
        self.stalls = Timings()
        """Per commit: seconds the scheduler waited for it (the rebinding at the tick)."""
        self.leads = Timings()
        """Per commit: seconds from the decision (``prepare``) to the commit: the background
        preparation, then the wait for a tick (and, for a restore, for its KV to be free). The
        simulator applies a decision at once; this is how late the engine does."""

    # -- preparation (background) --

    def _quantize_layer(self, slot: LayerSlot, fmt: str) -> dict[str, QuantizedWeight]:
        """Quantized host copies of the layer's four linears, always from full precision: the
        device weight while the layer runs in fp, its host copy while it runs quantized (the
        device weight is empty then). On a GPU they are stored already packed for its kernel
        (``staged_for``), so a swap only copies them."""
        scales = self.act_scales.get(str(slot.layer_id), {})
        out = {}
        for name, lin in slot.linears.items():
            s = scales.get(name.split(".")[-1])
            s = None if s is None else torch.tensor(s, dtype=torch.float32)
            if slot.format == "fp":
                source = lin.weight.detach()
            else:
                assert slot.host_fp is not None, "a quantized layer keeps its fp weights on host"
                source = slot.host_fp[name]
            w = source.to("cpu", torch.float32)
            q = quantize_weight(w, fmt, self.group_size, input_scale=s)
            out[name] = q.staged_for(self.device)
        return out

    def prepare(self, layer_id: int, fmt: str) -> None:
        """Start preparing ``layer_id`` for ``fmt`` in the background (no-op if under way, or
        within ``PREPARE_RETRY_S`` of a failed preparation of the layer)."""
        slot = self.slots[layer_id]
        job = self.jobs.get(layer_id)
        if job is not None and job.fmt == fmt:
            return
        if fmt == slot.format:
            self.jobs.pop(layer_id, None)
            return
        if time.perf_counter() < self._retry_at.get(layer_id, -math.inf):
            return
        self.jobs[layer_id] = _Job(fmt, self._executor.submit(self._prepare, slot, fmt))

    def _prepare(self, slot: LayerSlot, fmt: str) -> dict:
        self.faults.check("prepare")
        with torch.no_grad(), _stream_ctx(self._stream):
            if fmt == "fp":
                assert slot.host_fp is not None
                payload = {
                    "weights": {n: t.to(self.device, copy=True) for n, t in slot.host_fp.items()}
                }
            else:
                if fmt not in slot.copies:
                    # A new dict, not an insertion: the scheduler thread may be iterating the
                    # old one (``/morph/state``) while this thread runs.
                    slot.copies = {**slot.copies, fmt: self._quantize_layer(slot, fmt)}
                payload = {"quantized": {n: q.to(self.device) for n, q in slot.copies[fmt].items()}}
                if slot.host_fp is None:
                    payload["host_fp"] = {
                        n: _to_host(lin.weight.detach()) for n, lin in slot.linears.items()
                    }
            if self._stream is not None:
                self._stream.synchronize()
        return payload

    def take_failure(self, layer_id: int) -> BaseException | None:
        """The error of the layer's preparation if it finished by failing, else None. The
        failed job is dropped and counted; the layer can be prepared again ``PREPARE_RETRY_S``
        later. Nothing was changed on the layer: preparation only makes copies."""
        job = self.jobs.get(layer_id)
        if job is None or not job.future.done() or job.future.exception() is None:
            return None
        del self.jobs[layer_id]
        self.prepare_failures += 1
        self._retry_at[layer_id] = time.perf_counter() + PREPARE_RETRY_S
        return job.future.exception()

    def ready(self, layer_id: int) -> bool:
        job = self.jobs.get(layer_id)
        return job is not None and job.future.done()

    # -- commit (scheduler tick, nothing in flight) --

    def commit(self, layer_id: int) -> float:
        """Switch the layer to its prepared format; returns the stall in seconds."""
        start = time.perf_counter()
        slot = self.slots[layer_id]
        job = self.jobs.pop(layer_id)
        payload = job.future.result()
        if job.fmt == "fp":
            for name, lin in slot.linears.items():
                lin.weight.data = payload["weights"][name]
                lin.quant_method = slot.original_methods[name]
            slot.host_fp = None
        else:
            if "host_fp" in payload:
                slot.host_fp = payload["host_fp"]
            for name, lin in slot.linears.items():
                lin.quant_method = WeightOnlyLinearMethod(payload["quantized"][name])
                lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=self.device)
        slot.format = job.fmt
        _reset_cached_dispatch(slot.module)
        stall = time.perf_counter() - start
        self.stalls.add(stall)
        self.leads.add(start - job.submitted_s)
        return stall

    # -- accounting --

    def device_bytes(self, formats: list[str] | None = None) -> int:
        """Device bytes of all swappable linears, for the current or the given formats."""
        formats = formats or [s.format for s in self.slots]
        return sum(s.bytes_of(f) for s, f in zip(self.slots, formats))

    def formats(self) -> list[str]:
        return [s.format for s in self.slots]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.device.type == "cuda")
    host.copy_(t, non_blocking=t.device.type == "cuda")
    return host


class _stream_ctx:
    """``torch.cuda.stream(s)`` on a GPU, nothing on a CPU."""

    def __init__(self, stream) -> None:
        self.ctx = torch.cuda.stream(stream) if stream is not None else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc) -> None:
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _reset_cached_dispatch(layer: torch.nn.Module) -> None:
    """SGLang caches kernel choices from the linears' methods at construction: recompute them.

    ``LlamaMLP.dual_gemm`` picks its mode from ``gate_up_proj.quant_method`` and may read the raw
    weight; after a swap it must choose again (it falls back to the plain path for our method).
    """
    mlp = getattr(layer, "mlp", None)
    dual = getattr(mlp, "dual_gemm", None)
    if dual is not None and hasattr(dual, "_select_mode"):
        dual.mode = dual._select_mode(mlp.gate_up_proj, mlp.gate_up_proj.input_size)
