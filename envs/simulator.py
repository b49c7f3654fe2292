"""Discrete-event simulator of one SGLang replica whose KV capacity grows with quantized layers.

Training a controller against the real engine would take hours of wall time per episode; this
simulator replays a minute of trace in milliseconds while keeping the mechanisms that decide
TTFT under a burst. It follows SGLang 0.5.23's default scheduler (``event_loop_normal``):

- FCFS waiting queue; each iteration first tries to form a prefill batch of up to
  ``chunk_size`` prompt tokens (a prompt longer than the remaining budget is chunked and
  continued next iteration). Admission reserves, as SGLang's PrefillAdder does for requests
  with ``ignore_eos`` (every replayed request), a request's prompt plus all its remaining output
  tokens; the free KV it is checked against excludes the tokens promised to running decodes.
  Admission stops at the first request that does not fit (FCFS).
- Without a prefill batch, one decode step of every running request (one new KV token each).
  When the free KV cannot hold that step, the running request with the fewest output tokens is
  retracted to the front of the queue and later re-prefilled with its generated tokens, as in
  SGLang's ``retract_decode``.
- A request holds its prompt's KV from admission and one more token per decode step; all of
  it is freed when it finishes. No prefix sharing: trace requests share no tokens, so the radix
  cache holds nothing evictable here (``kv_evictable_tokens`` is always 0).
- KV capacity = ``base_capacity_tokens + quantized_layers * tokens_per_layer`` (what the
  budget allows at that depth); under a KV fraction below 1, that times the fraction, rounded
  down to whole segments and never below one maximum-length request (``kv_floor_tokens``), as
  the runtime sizes it; a fraction never cuts below the tokens in use (``clip_kv_fraction``'s
  rule).
- Iteration time (the whole scheduler-loop pass) from a calibrated ``IterationModel``; a
  transition stalls the engine for ``swap_s_per_layer`` per layer swapped. A token reaches the
  client ``response_s`` after its iteration (HTTP, tokenizer manager, detokenizer): TTFTs and
  end-to-end times include it. A finished request whose mean time per output token passed
  the TPOT SLO counts as a TPOT violation; the snapshot carries the recent median decode
  iteration (the runtime's ``decode_iteration_s``) for the KV-limit rule.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

from envs.backend import AdvanceResult, ServedRequest
from envs.calibration import DEFAULT_CALIBRATION, IterationModel, load_replica
from eval.traces import Trace, TraceRequest
from rl_controller.clock import LoadClock
from rl_controller.observation import LoadSnapshot, RawLoad, build_snapshot
from sglang_morph.config import UNLOADED_SLO_MULTIPLE
from sglang_morph.timings import Timings


@dataclass(frozen=True)
class ReplicaConfig:
    """The simulated replica. Environments take it from the calibration (``from_calibration``:
    what the engine served while being measured). The defaults are a round stand-in for tests:
    stories260K in fp32 with a 512-token KV budget (1,280 B/token; one layer in int4 frees
    ~156 KB = 122 tokens)."""

    base_capacity_tokens: int = 512
    tokens_per_layer: int = 122
    num_layers: int = 5
    chunk_size: int = 4096
    """SGLang 0.5.23's ``chunked_prefill_size`` on CPU."""
    ttft_slo_s: float = 0.08
    """5x the ~16 ms unloaded median TTFT measured on the engine (the notes' SLO)."""
    tpot_slo_s: float = math.inf
    """Mean time per output token a request may see (inf: no TPOT target, no violations)."""
    kv_floor_tokens: int = 0
    """Least KV a limit leaves: the runtime's floor, one maximum-length request."""
    kv_segment_tokens: int = 1
    """A limit is rounded down to whole segments of this many tokens (the runtime's resize
    unit)."""

    @classmethod
    def from_calibration(cls, path: str | Path = DEFAULT_CALIBRATION) -> ReplicaConfig:
        """The replica a calibration file was measured on (``envs.calibrate`` records its KV
        capacity, layer count and SLOs), so the simulator serves what the engine served; the
        TPOT SLO is ``UNLOADED_SLO_MULTIPLE`` x the measured unloaded TPOT, as the TTFT SLO is
        of the unloaded TTFT; fields the file lacks keep the defaults above."""
        replica = load_replica(path)
        if "tpot_slo_s" not in replica and replica.get("unloaded_tpot_s"):
            replica = {**replica, "tpot_slo_s": UNLOADED_SLO_MULTIPLE * replica["unloaded_tpot_s"]}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in replica.items() if k in names})


class _Req:
    """Mutable per-request state (slots: the simulator touches these in its inner loop)."""

    __slots__ = ("trace", "prompt", "prefilled", "generated", "kv", "first_token_s", "late")

    def __init__(self, trace: TraceRequest) -> None:
        self.trace = trace
        self.prompt = trace.input_tokens  # tokens to prefill (grows when retracted)
        self.prefilled = 0
        self.generated = 0
        self.kv = 0
        self.first_token_s: float | None = None
        self.late = False


class Simulator:
    """One replica replaying a trace window; implements ``envs.backend.ServingBackend``."""

    def __init__(self, model: IterationModel, config: ReplicaConfig | None = None) -> None:
        self.model = model
        self.config = config or ReplicaConfig()
        self._reset_state(())

    def _reset_state(self, requests: tuple[TraceRequest, ...]) -> None:
        self.now = 0.0
        self._clock = 0.0  # nominal end of the last tick (iterations may overrun it)
        self._pending = deque(sorted(requests, key=lambda r: r.arrival_s))
        self._waiting: deque[_Req] = deque()
        self._queued_tokens = 0
        self._prefilling: _Req | None = None  # the chunked request, if any
        self._running: list[_Req] = []
        self._kv_used = 0
        self.quantized_layers = 0
        self.kv_fraction = 1.0
        self._decode_s = Timings()  # the runtime's window of recent decode iterations
        self.clock = LoadClock(start_s=0.0)
        self.records: list[ServedRequest] = []

    def budget_tokens(self, layers: int) -> int:
        """KV tokens the budget allows with ``layers`` int4 layers (before any KV limit)."""
        c = self.config
        return c.base_capacity_tokens + layers * c.tokens_per_layer

    @property
    def capacity(self) -> int:
        """Current KV capacity in tokens: the budget's at this depth, limited by the KV
        fraction as the runtime limits it."""
        budget = self.budget_tokens(self.quantized_layers)
        if self.kv_fraction >= 1.0:
            return budget
        c = self.config
        limit = int(budget * self.kv_fraction) // c.kv_segment_tokens * c.kv_segment_tokens
        return min(budget, max(c.kv_floor_tokens, limit))

    def reset(self, window: Trace) -> LoadSnapshot:
        """Start ``window`` on an empty replica with every layer in full precision.

        Raises ValueError for a request that could never fit the KV (map lengths first)."""
        limit = self.config.base_capacity_tokens
        for r in window.requests:
            if r.input_tokens + r.output_tokens - 1 > limit or r.output_tokens < 1:
                raise ValueError(
                    f"request {r} needs {r.input_tokens + r.output_tokens - 1} KV tokens, more "
                    f"than the base capacity {limit}; apply a LengthMapping first"
                )
        self._reset_state(window.requests)
        self._enqueue_arrivals()
        return self.snapshot()

    def advance(self, dt: float, target_layers: int, kv_fraction: float = 1.0) -> AdvanceResult:
        """Apply the layer target (stalling for the swap) and the KV limit, then run iterations
        for ``dt``."""
        c = self.config
        if not 0 <= target_layers <= c.num_layers:
            raise ValueError(f"target_layers {target_layers} outside 0..{c.num_layers}")
        if not 0 < kv_fraction <= 1:
            raise ValueError(f"kv_fraction {kv_fraction} outside (0, 1]")
        swapped = abs(target_layers - self.quantized_layers)
        budget = self.budget_tokens(target_layers)
        if swapped:
            if self._kv_used > budget:
                raise ValueError(
                    f"unsafe restore to {target_layers} layers: {self._kv_used} KV tokens in use "
                    f"> capacity {budget} (clip targets with clip_action)"
                )
            self.now += self.model.swap_s_per_layer * swapped
            self.quantized_layers = target_layers
            self.clock.transition(self.now, swapped)
        self.kv_fraction = min(1.0, max(kv_fraction, self._kv_used / budget))
        self._clock += dt
        finished_before, generated, late = len(self.records), 0, 0
        while True:
            self._enqueue_arrivals()
            if self.now >= self._clock:
                break
            step_generated, step_late = self._iteration()
            generated += step_generated
            late += step_late
        late += self._mark_waiting_late()
        finished = tuple(self.records[finished_before:])
        return AdvanceResult(
            snapshot=self.snapshot(),
            finished=finished,
            generated_tokens=generated,
            newly_late=late,
            swapped_layers=swapped,
            newly_tpot_late=sum(r.tpot_s > c.tpot_slo_s for r in finished),
        )

    def _enqueue_arrivals(self) -> None:
        pending = self._pending
        while pending and pending[0].arrival_s <= self.now:
            req = _Req(pending.popleft())
            self._waiting.append(req)
            self._queued_tokens += req.prompt
            self.clock.arrival(req.trace.arrival_s)

    def _iteration(self) -> tuple[int, int]:
        """One scheduler iteration (or an idle jump); returns (tokens generated, newly late)."""
        batch = self._form_prefill_batch()
        if batch:
            tokens = sum(take for _, take in batch)
            context = sum(req.prefilled + take for req, take in batch)
            self.now += self.model.iteration_s(tokens, 0, self.quantized_layers, context)
            return self._finish_prefills(batch)
        if self._running:
            self._make_room_for_decode()
            running = self._running
            context = sum(req.kv for req in running) + len(running)
            step_s = self.model.iteration_s(0, len(running), self.quantized_layers, context)
            self._decode_s.add(step_s)
            self.now += step_s
            self._kv_used += len(running)
            still = []
            for req in running:
                req.kv += 1
                req.generated += 1
                if req.generated >= req.trace.output_tokens:
                    self._finish(req)
                else:
                    still.append(req)
            self._running = still
            return len(running), 0
        # Idle (or blocked with nothing running, which admission rules out): jump ahead.
        next_arrival = self._pending[0].arrival_s if self._pending else float("inf")
        self.now = max(self.now, min(next_arrival, self._clock))
        return 0, 0

    def _form_prefill_batch(self) -> list[tuple[_Req, int]]:
        budget = self.config.chunk_size
        batch: list[tuple[_Req, int]] = []
        if self._prefilling is not None:
            req = self._prefilling
            take = min(budget, req.prompt - req.prefilled)
            batch.append((req, take))
            budget -= take
        free = self.capacity - self._kv_used - self._promised()
        while budget > 0 and self._waiting:
            req = self._waiting[0]
            demand = req.prompt + req.trace.output_tokens - req.generated
            if demand > free:
                break
            free -= demand
            self._waiting.popleft()
            self._queued_tokens -= req.prompt
            req.kv = req.prompt
            self._kv_used += req.prompt
            take = min(budget, req.prompt)
            batch.append((req, take))
            budget -= take
        return batch

    def _finish_prefills(self, batch: list[tuple[_Req, int]]) -> tuple[int, int]:
        self._prefilling = None
        generated = late = 0
        for req, take in batch:
            req.prefilled += take
            if req.prefilled < req.prompt:
                self._prefilling = req
                continue
            generated += 1
            req.generated += 1
            if req.first_token_s is None:
                req.first_token_s = self.now + self.model.response_s
                ttft = req.first_token_s - req.trace.arrival_s
                if not req.late and ttft > self.config.ttft_slo_s:
                    req.late = True
                    late += 1
            if req.generated >= req.trace.output_tokens:
                self._finish(req)
            else:
                self._running.append(req)
        return generated, late

    def _promised(self) -> int:
        """Decode tokens admission has promised to the admitted requests (their remaining
        outputs), not yet in ``_kv_used``."""
        promised = sum(r.trace.output_tokens - r.generated for r in self._running)
        if self._prefilling is not None:
            p = self._prefilling
            promised += p.trace.output_tokens - p.generated
        return promised

    def _make_room_for_decode(self) -> None:
        """Retract running requests until one decode step fits (SGLang's retract_decode)."""
        while self.capacity - self._kv_used < len(self._running):
            victim = min(self._running, key=lambda r: (r.generated, -r.trace.input_tokens))
            self._running.remove(victim)
            self._kv_used -= victim.kv
            victim.kv = 0
            victim.prompt = victim.trace.input_tokens + victim.generated
            victim.prefilled = 0
            self._waiting.appendleft(victim)
            self._queued_tokens += victim.prompt

    def _finish(self, req: _Req) -> None:
        self._kv_used -= req.kv
        req.kv = 0
        t = req.trace
        assert req.first_token_s is not None
        self.records.append(
            ServedRequest(
                t.arrival_s, t.input_tokens, t.output_tokens,
                req.first_token_s - t.arrival_s, self.now + self.model.response_s - t.arrival_s,
            )
        )

    def _mark_waiting_late(self) -> int:
        """Count requests still without a first token that can no longer meet the SLO."""
        deadline = self.now + self.model.response_s - self.config.ttft_slo_s
        late = 0
        waiting = list(self._waiting)
        if self._prefilling is not None:
            waiting.append(self._prefilling)
        for req in waiting:
            if not req.late and req.first_token_s is None and req.trace.arrival_s < deadline:
                req.late = True
                late += 1
        return late

    @staticmethod
    def _demand(req) -> int:
        """What admitting ``req`` needs: its prompt plus its remaining (promised) outputs."""
        return req.prompt + req.trace.output_tokens - req.generated

    def raw_load(self) -> RawLoad:
        """The replica's load now, counted as the runtime counts SGLang's
        (``sglang_morph.scheduler_view``): admission's promised decodes, the head's demand as its
        prompt plus its own promised decodes."""
        c = self.config
        waiting = self._waiting
        head = waiting[0] if waiting else None
        capacity = self.capacity
        return RawLoad(
            queue_len=len(waiting),
            queued_prompt_tokens=self._queued_tokens,
            head_demand_tokens=self._demand(head) if head else 0,
            queued_demand_tokens=sum(self._demand(r) for r in waiting),
            running_reqs=len(self._running) + (self._prefilling is not None),
            kv_capacity_tokens=capacity,
            kv_held_tokens=self._kv_used,
            kv_free_slots=capacity - self._kv_used,
            kv_evictable_tokens=0,
            kv_promised_tokens=self._promised(),
            oldest_arrival_s=next(
                (r.trace.arrival_s for r in waiting if r.first_token_s is None), None
            ),
            ttft_slo_s=c.ttft_slo_s,
            quantized_layers=self.quantized_layers,
            num_layers=c.num_layers,
            tokens_per_layer=c.tokens_per_layer,
            tpot_slo_s=c.tpot_slo_s,
            decode_iteration_s=self._decode_s.median() or 0.0,
            kv_budget_tokens=self.budget_tokens(self.quantized_layers),
        )

    def snapshot(self) -> LoadSnapshot:
        """The controller's view of the replica now."""
        return build_snapshot(self.raw_load(), self.clock, self.now)
