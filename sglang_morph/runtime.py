"""MorphRuntime: the scheduler-side state machine, one per scheduler process.

Data flows one way each tick: scheduler state -> observation -> policy decision -> desired
layer formats -> swaps and KV resizes. Everything here runs at the entry of
``get_next_batch_to_run``, when no forward is in flight, so every in-flight request keeps its
state across changes.
"""

from __future__ import annotations

import logging
import time

from sglang_morph.config import FORMAT_BITS, KV_KEY, SWAP_KEY_PREFIX, MorphConfig
from sglang_morph.iterations import IterationLog
from sglang_morph.memory import kv_tokens_for

logger = logging.getLogger("sglang_morph")


class MorphRuntime:
    """Owns the layer formats and KV capacity of one scheduler."""

    def __init__(self, scheduler, cfg: MorphConfig) -> None:
        self.scheduler = scheduler
        self.cfg = cfg
        self.model = scheduler.tp_worker.model_runner.model
        self.num_layers = len(self.model.model.layers)
        self.transitions = 0
        self.clipped_actions = 0
        self.last_error: str | None = None
        self.frozen = False
        self.iterations = IterationLog(cfg.extra.get("iteration_log"))
        self.arrivals: list[float] = []
        self.swapper = None
        self.kv = None
        self.controller = None
        self.layer_order = list(range(self.num_layers - 1, -1, -1))
        self.profile = None
        self.kv_limit = None
        self.kv_bytes_per_token = _kv_bytes_per_token(scheduler)
        self.base_weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.metrics = None
        if cfg.enabled:
            self._build()
        self.desired = self.formats()
        if cfg.static_format is not None:
            self.desired = [cfg.static_format] * self.num_layers
            self._settle()

    # -- construction --

    def _build(self) -> None:
        from sglang_morph.swap.layer_swapper import LayerSwapper

        if self.cfg.profile_path:
            from sglang_morph.profile_file import layer_order, load_profile

            self.profile = load_profile(self.cfg.profile_path)
            self.layer_order = layer_order(self.profile)
        scales = (self.profile or {}).get("act_scales") if self.cfg.quant_method == "awq" else None
        fmts = tuple({self.cfg.quant_format, self.cfg.static_format or self.cfg.quant_format})
        self.swapper = LayerSwapper(self.model, fmts, self.cfg.group_size, scales)
        self.swappable_fp_bytes = self.swapper.device_bytes()
        if self.cfg.memory_budget_bytes is not None:
            from sglang_morph.kv.resizer import KVResizer

            self.kv = KVResizer(
                self.scheduler, self.cfg.kv_segment_tokens, min_tokens=_context_len(self.scheduler)
            )
            self.kv.request(self._kv_target(self.formats()))
        from sglang_morph.metrics import MorphMetrics, metrics_enabled

        if metrics_enabled():
            self.metrics = MorphMetrics()
        if self.cfg.policy in ("heuristic", "rl", "manual"):
            from sglang_morph.controller import Controller

            self.controller = Controller(self)

    # -- queries --

    def formats(self) -> list[str]:
        if self.swapper is None:
            return ["fp"] * self.num_layers
        return self.swapper.formats()

    def quantized_layers(self) -> int:
        return sum(f != "fp" for f in self.formats())

    def weight_bytes(self, formats: list[str] | None = None) -> int:
        if self.swapper is None:
            return self.base_weight_bytes
        return self.base_weight_bytes - self.swappable_fp_bytes + self.swapper.device_bytes(formats)

    def _kv_target(self, formats: list[str]) -> int:
        """KV capacity for ``formats``: what the budget allows, capped by an operator's limit."""
        tokens = self._budget_capacity(formats)
        if self.kv_limit is not None:
            tokens = min(tokens, self.kv_limit)
        return self.kv.quantize_tokens(tokens)

    def _budget_capacity(self, formats: list[str]) -> int:
        assert self.cfg.memory_budget_bytes is not None
        return kv_tokens_for(
            self.cfg.memory_budget_bytes, self.weight_bytes(formats), self.kv_bytes_per_token
        )

    def tokens_per_layer(self) -> int:
        """KV tokens the next layer in the importance order frees when quantized."""
        if self.swapper is None:
            return 0
        k = min(self.quantized_layers(), self.num_layers - 1)
        slot = self.swapper.slots[self.layer_order[k]]
        freed = slot.fp_bytes - slot.bytes_of(self.cfg.quant_format)
        return max(0, freed // self.kv_bytes_per_token)

    def kv_capacity_tokens(self) -> int:
        return self.kv.capacity_tokens if self.kv else self.scheduler.max_total_num_tokens

    def kv_committed_tokens(self) -> int:
        if self.kv:
            return self.kv.alloc.committed_size()
        return self.scheduler.max_total_num_tokens

    def guarded(self, fn, *args):
        """Run a tick or command; an unexpected error freezes morphing instead of crashing
        the scheduler: serving goes on in the current formats, and /morph/state says why."""
        if self.frozen:
            self.last_error = self.last_error or "morphing frozen"
            return False
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - the server must keep serving
            logger.exception("sglang-morph: morphing frozen after an internal error")
            self.frozen = True
            self.last_error = f"morphing frozen after an internal error: {err!r}"
            return False

    # -- tick --

    def tick(self) -> None:
        """One scheduler iteration boundary: decide, then move toward the decision."""
        if self.swapper is None:
            return
        if self.controller is not None:
            self.controller.maybe_decide()
        self._settle()
        if self.metrics is not None:
            self.metrics.update({
                "quantized_layers": self.quantized_layers(),
                "kv_capacity_tokens": self.kv_capacity_tokens(),
                "kv_quarantined_tokens": self.kv.alloc.quarantined_size() if self.kv else 0,
                "transitions": self.transitions,
                "fallbacks": self.controller.fallbacks() if self.controller else 0,
            })

    def set_target_quantized(self, k: int) -> None:
        """Quantize the first ``k`` layers of the importance order, restore the others."""
        chosen = set(self.layer_order[:k])
        self.desired = [
            self.cfg.quant_format if i in chosen else "fp" for i in range(self.num_layers)
        ]

    def _settle(self) -> None:
        """Advance every layer toward its desired format within the memory budget."""
        if self.kv is not None and not self.kv.complete:
            self.kv.step()
        current = self.formats()
        for i, (have, want) in enumerate(zip(current, self.desired)):
            if have == want:
                continue
            self.swapper.prepare(i, want)
            if not self.swapper.ready(i):
                continue
            after = list(self.formats())
            after[i] = want
            if self.kv is not None:
                grows = self.weight_bytes(after) > self.weight_bytes()
                if grows:
                    # Weights grow (a restore): give KV bytes back first; wait for the shrink.
                    target = self._kv_target(after)
                    if target > self._budget_capacity(after):
                        self.last_error = "budget too small to restore layer while serving"
                        continue
                    if not self.kv.request(min(target, self.kv.capacity_tokens)):
                        continue
            self.swapper.commit(i)
            self.transitions += 1
            if self.kv is not None:
                self.kv.request(self._kv_target(self.formats()))

    # -- hooks from the scheduler --

    def record_iteration(self, batch, start_s: float, forward_s: float) -> None:
        self.iterations.record(batch, start_s, forward_s, self.quantized_layers())

    def on_arrival(self) -> None:
        self.arrivals.append(time.perf_counter())

    # -- operator commands (POST /morph/swap) --

    def handle_swaps(self, swaps: dict[str, int]) -> bool:
        """Apply ``{"morph.layer.<id>": <format bits>, "morph.kv_tokens": N}``; False (with
        last_error) if refused.

        The launcher has already checked the JSON's types; this checks what only the
        scheduler knows: the policy in force and the layer ids.
        """
        try:
            if self.cfg.policy in ("heuristic", "rl"):
                raise ValueError(
                    f"the {self.cfg.policy} policy owns the layer formats; manual swaps need "
                    "--morph-policy manual"
                )
            if self.swapper is None:
                raise ValueError(
                    "morphing is off (--morph-policy off); start with "
                    "--morph-policy manual to swap layers"
                )
            by_bits = {bits: fmt for fmt, bits in FORMAT_BITS.items()}
            changes: dict[int, str] = {}
            if KV_KEY in swaps:
                self._set_kv_limit(int(swaps.pop(KV_KEY)))
            for key, bits in swaps.items():
                layer = key[len(SWAP_KEY_PREFIX) :]
                if not layer.isdigit() or int(layer) >= self.num_layers:
                    raise ValueError(
                        f"unknown layer id {layer}; accepted: 0..{self.num_layers - 1}"
                    )
                if bits not in by_bits:
                    raise ValueError(f"unknown format; accepted: {', '.join(FORMAT_BITS)}")
                changes[int(layer)] = by_bits[bits]
            for i, fmt in changes.items():
                self.desired[i] = fmt
            self.last_error = None
            self._settle()
            return True
        except ValueError as err:
            self.last_error = str(err)
            logger.warning("morph swap refused: %s", err)
            return False

    def _set_kv_limit(self, tokens: int) -> None:
        """An operator's KV capacity limit (manual policy); 0 removes it."""
        if self.kv is None:
            raise ValueError("KV resizing needs --morph-memory-budget")
        if tokens == 0:
            self.kv_limit = None
        else:
            self.kv.check_request(tokens)
            allowed = self._budget_capacity(self.formats())
            if tokens > allowed:
                raise ValueError(
                    f"cannot grow KV to {tokens} tokens: the memory budget allows {allowed} "
                    f"tokens with the current layer formats (accepted: "
                    f"{self.kv.min_tokens}..{allowed})")
            self.kv_limit = tokens
        self.kv.request(self._kv_target(self.formats()))

    # -- state --

    def state(self) -> dict:
        """The JSON of GET /morph/state (msgpack-native values only)."""
        s = self.scheduler
        tree = s.tree_cache
        committed = self.kv_committed_tokens()
        available = s.token_to_kv_pool_allocator.available_size()
        evictable = int(tree.evictable_size())
        formats = self.formats()
        layers = []
        for i, fmt in enumerate(formats):
            entry = {"id": i, "format": fmt, "desired": self.desired[i]}
            if self.swapper is not None:
                slot = self.swapper.slots[i]
                entry["bytes"] = slot.bytes_of(fmt)
                entry["bytes_by_format"] = {f: slot.bytes_of(f) for f in ("fp", *slot.copies)}
            layers.append(entry)
        stalls = self.swapper.stalls_s if self.swapper is not None else []
        leads = self.swapper.leads_s if self.swapper is not None else []
        return {
            "enabled": self.cfg.enabled,
            "policy": self.cfg.policy,
            "static_format": self.cfg.static_format,
            "quant_format": self.cfg.quant_format,
            "layers": layers,
            "layer_order": self.layer_order,
            "quantized_layers": sum(f != "fp" for f in formats),
            "kv_capacity_tokens": int(self.kv_capacity_tokens()),
            "kv_reserved_tokens": int(s.token_to_kv_pool_allocator.size),
            "kv_used_tokens": int(committed - available - evictable),
            "kv_evictable_tokens": evictable,
            "kv_quarantined_tokens": int(self.kv.alloc.quarantined_size()) if self.kv else 0,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_segment_tokens": self.cfg.kv_segment_tokens,
            "budget_bytes": self.cfg.memory_budget_bytes,
            "weight_bytes": self.weight_bytes(),
            "device_bytes_in_use": self.weight_bytes() + committed * self.kv_bytes_per_token,
            "transitions": self.transitions,
            "fallbacks": self.controller.fallbacks() if self.controller else 0,
            "decision_s_median": _median(self.controller.decide_s) if self.controller else None,
            "last_observation": self.controller.observation_dict() if self.controller else None,
            "clipped_actions": self.clipped_actions,
            "queue_len": len(s.waiting_queue),
            "running_reqs": len(s.running_batch.reqs) if s.running_batch is not None else 0,
            "swap_stall_max_s": max(stalls, default=0.0),
            "swap_stall_last_s": stalls[-1] if stalls else 0.0,
            "swap_lead_median_s": _median(leads),
            "swap_lead_max_s": max(leads, default=0.0),
            "decode_iteration_median_s": self.iterations.median_decode_s(),
            "kv_resize_last_step_s": self.kv.last_step_s if self.kv else 0.0,
            "kv_limit_tokens": self.kv_limit,
            "kv_resize_complete": self.kv.complete if self.kv else True,
            "last_error": self.last_error,
            "frozen": self.frozen,
        }

    def summary(self) -> str:
        return (
            f"policy={self.cfg.policy} layers={self.num_layers} "
            f"kv_capacity={self.kv_capacity_tokens()} budget={self.cfg.memory_budget_bytes}"
        )


def _median(values: list[float]) -> float | None:
    return sorted(values)[len(values) // 2] if values else None


def _kv_bytes_per_token(scheduler) -> int:
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    k = pool.k_buffer
    return sum(2 * t[0].numel() * t.element_size() for t in k)


def _context_len(scheduler) -> int:
    return int(scheduler.model_config.context_len)
