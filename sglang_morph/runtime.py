"""MorphRuntime: the scheduler-side state machine, one per scheduler process.

Data flows one way each tick: scheduler state -> observation -> policy decision -> desired
layer formats -> swaps and KV resizes. Everything here runs at the entry of
``get_next_batch_to_run``, when no forward is in flight, so every in-flight request keeps its
state across changes.

Failures: a failed background preparation of a swap is dropped, counted (``prepare_failures``),
shown in ``last_error`` and retried; a failing RL policy is replaced by the heuristic for that
tick (``fallbacks``); any other error in a tick freezes morphing (``frozen``), and serving goes on
in the current formats. ``SGLANG_MORPH_FAULTS`` (``sglang_morph.faults``) injects each of these
failures; it is for the fault tests only and does nothing when unset.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

from rl_controller.clock import LoadClock
from rl_controller.controller import Controller, Decision
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import LoadSnapshot, build_snapshot
from rl_controller.rl_policy import RLPolicy
from rl_controller.stabilizer import RestoreStabilizer
from sglang_morph import scheduler_view
from sglang_morph.config import (
    FORMAT_BITS,
    KV_KEY,
    PROVISIONAL_TTFT_SLO_S,
    SWAP_KEY_PREFIX,
    TPOT_KEY,
    TTFT_KEY,
    MorphConfig,
)
from sglang_morph.faults import Faults
from sglang_morph.iterations import IterationLog
from sglang_morph.memory import kv_tokens_for
from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.timings import Timings
from sglang_morph.tp_sync import TPSync

logger = logging.getLogger("sglang_morph")

FALLBACK_LOG_INTERVAL_S = 10.0
"""Least time between two log lines about RL fallbacks (each line carries the count)."""


class MorphRuntime:
    """Owns the layer formats and KV capacity of one scheduler."""

    def __init__(self, scheduler, cfg: MorphConfig) -> None:
        self.scheduler = scheduler
        self.tp = TPSync.from_scheduler(scheduler)
        """Under --tp-size > 1: rank 0 decides, every rank commits in the same pass, and the
        budget is split between the ranks (``sglang_morph.tp_sync``)."""
        self.tp_ready: dict[int, str] = {}
        """Under TP, the layers every rank may commit in this pass (layer -> format)."""
        cfg = cfg if self.tp is None else self.tp.rank_config(cfg)
        self.cfg = cfg
        self.model = scheduler.tp_worker.model_runner.model
        self.num_layers = len(self.model.model.layers)
        self.transitions = 0
        self.clipped_actions = 0
        self.fallbacks = 0
        self.fallback_reason: str | None = None
        self._fallback_logged_s = -math.inf
        self.last_error: str | None = None
        self.frozen = False
        self.iterations = IterationLog(
            cfg.extra.get("iteration_log") if self.tp is None or self.tp.is_source else None
        )  # one log per TP group: the other ranks run the same iterations
        self.clock = LoadClock(start_s=time.perf_counter())
        self.decisions = Timings()
        self.last_decision_s = -math.inf
        self.last_snapshot: LoadSnapshot | None = None
        self.last_target: int | None = None
        self.swapper = None
        self.kv = None
        self.controller: Controller | None = None
        self.stabilizer = RestoreStabilizer(cfg.restore_rule)
        """Holds restores back until a whole window asked for them (every policy)."""
        self.observing = cfg.policy in ("manual", "heuristic", "rl") and (
            self.tp is None or self.tp.is_source
        )
        """Snapshots are taken every tick under these policies; under ``manual`` nothing
        decides, but ``/morph/state`` shows what a policy would see (the engine environment
        reads it)."""
        self.layer_order = list(range(self.num_layers - 1, -1, -1))
        self.profile = None
        self.kv_limit = None
        self.kv_fraction = 1.0
        self.wanted_kv_fraction = 1.0
        """The controller's last KV fraction; applied by ``_settle`` (under TP: rank 0's, once
        every rank has it, so all apply it in the same pass)."""
        self.agreed_kv_fraction = 1.0
        self.kv_limit_changes = 0
        self.ttft_slo_s = cfg.ttft_slo_s or PROVISIONAL_TTFT_SLO_S
        self.tpot_slo_s = cfg.tpot_slo_s or math.inf
        self.targets_source = (
            "--morph-ttft-slo" if cfg.ttft_slo_s else "provisional until the warm-up probe"
        )
        self.kv_bytes_per_token = _kv_bytes_per_token(scheduler)
        self.base_weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.metrics = None
        self.faults = Faults.from_env()
        if cfg.enabled:
            self._build()
        self.desired = self.formats()
        if cfg.static_format is not None:
            self.desired = [cfg.static_format] * self.num_layers
            self._settle()

    # -- construction --

    def _build(self) -> None:
        from sglang_morph.swap.layer_swapper import LayerSwapper

        if self.cfg.policy in ("heuristic", "rl"):  # first: a bad checkpoint fails fast
            self.controller = _make_controller(self.cfg, self.faults)
        if self.cfg.profile_path:
            from sglang_morph.profile_file import layer_order, load_profile

            self.profile = load_profile(self.cfg.profile_path)
            self.layer_order = layer_order(self.profile)
        scales = (self.profile or {}).get("act_scales") if self.cfg.quant_method == "awq" else None
        fmts = tuple({self.cfg.quant_format, self.cfg.static_format or self.cfg.quant_format})
        self.swapper = LayerSwapper(self.model, fmts, self.cfg.group_size, scales, self.faults)
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
        """KV capacity for ``formats``: what the budget allows, times the policy's KV fraction,
        capped by an operator's limit."""
        tokens = self._budget_capacity(formats)
        if self.kv_fraction < 1.0:
            tokens = int(tokens * self.kv_fraction)
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

    def loop_pass(self) -> None:
        """The plugin's entry at every scheduler loop pass (nothing in flight).

        While morphing is frozen only the size holders are kept in step: quarantined KV slots
        still retire as their requests finish, and SGLang's idle leak check compares the pool
        against the scheduler's size. Under TP every rank first agrees with the others, also
        while frozen: the collectives must be called in every pass on every rank.
        """
        if self.kv is not None:
            self.kv.alloc.retire_freed_above_limit()
        if self.tp is not None:
            self.tp.exchange(self)
        if self.frozen:
            if self.kv is not None:
                self.kv.sync_holders()
            return
        self.guarded(self.tick)
        self.tp_ready = {}

    def tick(self) -> None:
        """One scheduler iteration boundary: decide, then move toward the decision."""
        if self.swapper is None:
            return
        now = time.perf_counter()
        if self.observing and now - self.last_decision_s >= self.cfg.tick_interval_s:
            self.last_decision_s = now
            self.faults.check("tick")
            self.decide(now)
        self._settle()
        if self.metrics is not None:
            self.metrics.update({
                "quantized_layers": self.quantized_layers(),
                "kv_capacity_tokens": self.kv_capacity_tokens(),
                "kv_quarantined_tokens": self.kv.alloc.quarantined_size() if self.kv else 0,
                "transitions": self.transitions,
                "fallbacks": self.fallbacks,
                "restore_window_seconds": self.stabilizer.window_s,
                "held_restores": self.stabilizer.held,
            })

    def snapshot(self, now: float) -> LoadSnapshot:
        """The scheduler's load and memory at ``now`` as the controller sees them."""
        raw = scheduler_view.raw_load(
            self.scheduler,
            kv_capacity_tokens=self.kv_capacity_tokens(),
            kv_committed_tokens=self.kv_committed_tokens(),
            quantized_layers=self.quantized_layers(),
            num_layers=self.num_layers,
            tokens_per_layer=self.tokens_per_layer(),
            ttft_slo_s=self.ttft_slo_s,
            tpot_slo_s=self.tpot_slo_s,
            decode_iteration_s=self.iterations.median_decode_s() or 0.0,
            kv_budget_tokens=self._budget_capacity(self.formats()) if self.kv else 0,
        )
        return build_snapshot(raw, self.clock, now)

    def decide(self, now: float) -> None:
        """Observe the scheduler at ``now`` and, unless the policy is manual, let the
        controller set the target."""
        snap = self.snapshot(now)
        self.last_snapshot = snap
        if self.controller is None:
            return
        decision = self.controller.decide(snap)
        self._count(decision, now)
        target = self.stabilizer.apply(decision.target, snap.quantized_layers, now,
                                        snap.arrival_rate)
        self.last_target = target
        if target != sum(f != "fp" for f in self.desired):
            self.set_target_quantized(target)
        self.wanted_kv_fraction = decision.kv_fraction

    def _count(self, decision: Decision, now: float) -> None:
        """The runtime's counters of a decision; fallbacks are logged at most once per
        ``FALLBACK_LOG_INTERVAL_S`` so a failing policy cannot flood the log."""
        self.decisions.add(decision.seconds)
        self.clipped_actions += int(decision.clipped)
        if not decision.fell_back:
            return
        self.fallbacks += 1
        self.fallback_reason = decision.reason
        if now - self._fallback_logged_s >= FALLBACK_LOG_INTERVAL_S:
            self._fallback_logged_s = now
            logger.warning(
                "RL policy failed, the heuristic decided (%d fallbacks so far): %s",
                self.fallbacks, decision.reason,
            )

    def set_target_quantized(self, k: int) -> None:
        """Quantize the first ``k`` layers of the importance order, restore the others."""
        chosen = set(self.layer_order[:k])
        self.desired = [
            self.cfg.quant_format if i in chosen else "fp" for i in range(self.num_layers)
        ]

    def _settle(self) -> None:
        """Advance every layer toward its desired format within the memory budget."""
        fraction = self.wanted_kv_fraction if self.tp is None else self.agreed_kv_fraction
        if self.kv is not None and fraction != self.kv_fraction:
            self.kv_fraction = fraction
            self.kv_limit_changes += 1
            self.kv.request(self._kv_target(self.formats()))
        if self.kv is not None and not self.kv.complete:
            self.kv.step()
        current = self.formats()
        for i, (have, want) in enumerate(zip(current, self.desired)):
            if have == want:
                continue
            self.swapper.prepare(i, want)
            failure = self.swapper.take_failure(i)
            if failure is not None:
                self.last_error = f"preparing layer {i} for {want} failed, retrying: {failure!r}"
                logger.warning("sglang-morph: %s", self.last_error)
                continue
            if not self.swapper.ready(i) or (self.tp and self.tp_ready.get(i) != want):
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
            self.clock.transition(time.perf_counter())
            if self.kv is not None:
                self.kv.request(self._kv_target(self.formats()))

    # -- hooks from the scheduler --

    def record_iteration(self, batch, start_s: float, forward_s: float) -> None:
        self.iterations.record(batch, start_s, forward_s, self.quantized_layers())

    def on_arrival(self) -> None:
        self.clock.arrival(time.perf_counter())

    # -- operator commands (POST /morph/swap) --

    def handle_swaps(self, swaps: dict[str, int]) -> bool:
        """Apply ``{"morph.layer.<id>": <format bits>, "morph.kv_tokens": N}``; False (with
        last_error) if refused.

        The launcher has already checked the JSON's types; this checks what only the
        scheduler knows: the policy in force and the layer ids.
        """
        try:
            if self._set_targets(swaps):
                return True
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

    def _set_targets(self, entries: dict[str, float]) -> bool:
        """Apply latency targets (POST /morph/targets) under any policy; True when the entries
        held nothing else. The first targets the launcher's probe sends end the provisional
        period; a harness's SLO replaces them."""
        ttft, tpot = entries.pop(TTFT_KEY, None), entries.pop(TPOT_KEY, None)
        if ttft is None and tpot is None:
            return False
        self.ttft_slo_s = float(ttft) if ttft is not None else self.ttft_slo_s
        self.tpot_slo_s = float(tpot) if tpot is not None else self.tpot_slo_s
        self.targets_source = "POST /morph/targets"
        logger.warning(
            "sglang-morph controller targets: TTFT %.1f ms, TPOT %s",
            1000 * self.ttft_slo_s,
            "none" if math.isinf(self.tpot_slo_s) else f"{1000 * self.tpot_slo_s:.2f} ms",
        )
        self.last_error = None
        return not entries

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
        return {
            **self._config_state(),
            **self._layer_state(),
            **self._kv_state(),
            **self._controller_state(),
            **self._timing_state(),
            "last_error": self.last_error,
            "frozen": self.frozen,
        }

    def _config_state(self) -> dict:
        cfg = self.cfg
        return {
            "enabled": cfg.enabled,
            "policy": cfg.policy,
            "static_format": cfg.static_format,
            "quant_format": cfg.quant_format,
            "profile": cfg.profile_path,
            "budget_bytes": cfg.memory_budget_bytes,
            "kv_segment_tokens": cfg.kv_segment_tokens,
        }

    def _layer_state(self) -> dict:
        formats = self.formats()
        layers = []
        for i, fmt in enumerate(formats):
            entry = {"id": i, "format": fmt, "desired": self.desired[i]}
            if self.swapper is not None:
                slot = self.swapper.slots[i]
                entry["bytes"] = slot.bytes_of(fmt)
                entry["bytes_by_format"] = {f: slot.bytes_of(f) for f in ("fp", *slot.copies)}
            layers.append(entry)
        return {
            "layers": layers,
            "layer_order": self.layer_order,
            "quantized_layers": sum(f != "fp" for f in formats),
            "weight_bytes": self.weight_bytes(),
            "transitions": self.transitions,
            "prepare_failures": self.swapper.prepare_failures if self.swapper else 0,
        }

    def _kv_state(self) -> dict:
        s = self.scheduler
        committed = self.kv_committed_tokens()
        available = s.token_to_kv_pool_allocator.available_size()
        evictable = int(s.tree_cache.evictable_size())
        return {
            "kv_capacity_tokens": int(self.kv_capacity_tokens()),
            "kv_reserved_tokens": int(s.token_to_kv_pool_allocator.size),
            "kv_used_tokens": int(committed - available - evictable),
            "kv_evictable_tokens": evictable,
            "kv_quarantined_tokens": int(self.kv.alloc.quarantined_size()) if self.kv else 0,
            "kv_pool_resident_bound_bytes": (
                self.kv.pages.resident_bound_bytes() if self.kv else None
            ),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "device_bytes_in_use": self.weight_bytes() + committed * self.kv_bytes_per_token,
            "kv_limit_tokens": self.kv_limit,
            "kv_limit_fraction": self.kv_fraction,
            "kv_limit_changes": self.kv_limit_changes,
            "kv_budget_tokens": self._budget_capacity(self.formats()) if self.kv else None,
            "kv_min_tokens": self.kv.min_tokens if self.kv else None,
            "kv_segment_tokens": self.kv.segment if self.kv else None,
            "kv_resize_complete": self.kv.complete if self.kv else True,
            "queue_len": len(s.waiting_queue),
            "running_reqs": len(scheduler_view.active_requests(s)),
        }

    def _controller_state(self) -> dict:
        snap = self.last_snapshot
        return {
            "policy_loaded": self.controller.checkpoint if self.controller else None,
            "fallbacks": self.fallbacks,
            "fallback_reason": self.fallback_reason,
            "clipped_actions": self.clipped_actions,
            "restore_window_s": self.stabilizer.window_s,
            "restore_window_range_s": [self.stabilizer.rule.window_s,
                                       self.stabilizer.rule.max_window_s],
            "held_restores": self.stabilizer.held,
            "restore_load_drop": self.stabilizer.rule.load_drop,
            "smoothed_arrival_rate": self.stabilizer.rate,
            "arrival_rate_peak": self.stabilizer.peak,
            "ttft_slo_s": self.ttft_slo_s,
            "tpot_slo_s": None if math.isinf(self.tpot_slo_s) else self.tpot_slo_s,
            "targets_source": self.targets_source,
            "decision_s_median": self.decisions.median(),
            "last_observation": (
                None if snap is None
                else {**_json_safe(dataclasses.asdict(snap)), "target": self.last_target}
            ),
        }

    def _timing_state(self) -> dict:
        sw = self.swapper
        return {
            "swap_stall_max_s": sw.stalls.max if sw else 0.0,
            "swap_stall_last_s": sw.stalls.last if sw else 0.0,
            "swap_lead_median_s": sw.leads.median() if sw else None,
            "swap_lead_max_s": sw.leads.max if sw else 0.0,
            "decode_iteration_median_s": self.iterations.median_decode_s(),
            "kv_resize_last_step_s": self.kv.last_step_s if self.kv else 0.0,
            "iteration_log_bytes": self.iterations.bytes_on_disk(),
            "internal_sizes": self._internal_sizes(),
            "internal_bounds": self._internal_bounds(),
        }

    def _internal_sizes(self) -> dict:
        """Lengths of every buffer the runtime keeps across ticks: all bounded, and watched for
        growth by the soak benchmark (eval.soak)."""
        sizes = {**self.clock.entries(), "decisions": len(self.decisions.recent),
                 "decode_times": len(self.iterations.decode.recent)}
        if self.swapper is not None:
            sizes.update(swap_stalls=len(self.swapper.stalls.recent),
                         swap_leads=len(self.swapper.leads.recent),
                         swap_jobs=len(self.swapper.jobs))
        return sizes

    def _internal_bounds(self) -> dict:
        """The bound of each of ``internal_sizes`` and of the iteration log's bytes on disk:
        a buffer that fills up to its bound during a soak is not a leak."""
        bounds = {**self.clock.max_entries(), "decisions": self.decisions.bound,
                  "decode_times": self.iterations.decode.bound,
                  "iteration_log_bytes": self.iterations.bytes_bound()}
        if self.swapper is not None:
            bounds.update(swap_stalls=self.swapper.stalls.bound,
                          swap_leads=self.swapper.leads.bound, swap_jobs=self.num_layers)
        return bounds

    def summary(self) -> str:
        return (
            f"policy={self.cfg.policy} layers={self.num_layers} "
            f"kv_capacity={self.kv_capacity_tokens()} budget={self.cfg.memory_budget_bytes}"
        )


def _make_controller(cfg: MorphConfig, faults: Faults) -> Controller:
    """The heuristic, or the RL checkpoint with the heuristic behind it. A checkpoint that
    cannot be run raises CheckpointError: the scheduler (and so the server) does not start,
    rather than serve another policy than the one asked for. An injected policy fault hits the
    primary policy only: the heuristic's own failure has no fallback and freezes morphing."""
    if cfg.policy == "heuristic":
        return Controller(faults.wrap_policy(HeuristicPolicy()))
    path = cfg.checkpoint_path or str(DEFAULT_CHECKPOINT)
    return Controller(faults.wrap_policy(RLPolicy.load(path)), HeuristicPolicy(), checkpoint=path)


def _json_safe(values: dict) -> dict:
    """Non-finite floats as None: JSON has no infinity (an unset TPOT target is one)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in values.items()}


def _kv_bytes_per_token(scheduler) -> int:
    pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
    k = pool.k_buffer
    return sum(2 * t[0].numel() * t.element_size() for t in k)


def _context_len(scheduler) -> int:
    """The KV floor: one maximum-length request, min(context length, the longest request the
    scheduler admits, ``max_req_len`` = min(context - 1, pool - 1) in SGLang 0.5.23). Less KV
    could strand a request the scheduler accepted; it never accepts a longer one."""
    return min(int(scheduler.model_config.context_len), int(scheduler.max_req_len))
