"""The real-engine backend of ``MorphServe-v0``: a live SGLang server with the morph runtime.

The simulator is only trusted as far as it matches this backend, so both implement the same
``envs.backend.ServingBackend``: ``reset(window)`` prepares the window's requests, replayed
open-loop from the first ``advance`` with ``eval.replay``'s client (the same streaming client
``eval.run`` uses) in a background thread, and ``advance(dt, target, kv_fraction)`` sets the
int4 layer count through ``POST /morph/swap`` (the first ``target`` layers of the server's
importance order) and the KV limit through ``POST /morph/kv``, waits until ``dt`` more seconds
of the replay have passed, and reads the next ``LoadSnapshot`` from ``GET /morph/state``. The
server runs ``--morph-policy manual``, in which the runtime computes the observation every tick
without acting on it (``last_observation``), so the snapshot is exactly what a policy would get
in serving. Ticks are wall-clock: an episode takes as long as its window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from envs.backend import AdvanceResult, ServedRequest
from eval.replay import Replayer, RequestRecord, prompt_ids, usable_token_ids
from eval.traces import Trace
from rl_controller.observation import LoadSnapshot
from sglang_morph.client import MorphClient, MorphRequestError
from sglang_morph.data import resolve_model
from sglang_morph.memory import default_budget
from sglang_morph.paths import absolute, default_profile
from sglang_morph.server_process import Server

DEFAULT_PROFILE = default_profile("int4")
"""Layer-importance profile of the shipped policy (its quality table follows this order)."""

_SNAPSHOT_FIELDS = tuple(f.name for f in dataclasses.fields(LoadSnapshot))


class EngineError(RuntimeError):
    """The server refused a command or did not reach the requested state."""


class EngineBackend:
    """``ServingBackend`` over a real sglang-morph server in manual mode.

    Pass ``url`` to drive a server that is already running (``--morph-policy manual``), or
    leave it out to start one (``sglang_morph.server_process.Server``, with ``budget``, the
    layer order of ``profile`` and ``model_path``) that ``close`` stops; the server runs in
    another directory, so the paths it is given are made absolute.
    ``ttft_slo_s`` and ``tpot_slo_s`` must be the SLOs the policy is judged by; a started
    server gets them as ``--morph-ttft-slo`` and ``--morph-tpot-slo`` (when finite) so that the
    observation's ``oldest_wait / ttft_slo`` and ``decode_iteration / tpot_slo`` mean the same.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        ttft_slo_s: float,
        tpot_slo_s: float = math.inf,
        budget: str | None = None,
        profile: str | Path | None = DEFAULT_PROFILE,
        server_args: Sequence[str] = (),
        model_path: str | None = None,
        seed: int = 0,
        idle_timeout_s: float = 120.0,
    ) -> None:
        self.ttft_slo_s = ttft_slo_s
        self.tpot_slo_s = tpot_slo_s
        self.seed = seed
        self.idle_timeout_s = idle_timeout_s
        self._server = None
        model = resolve_model(model_path)
        if url is None:
            budget = budget or str(default_budget(model))
            args = ["--morph-policy", "manual", "--morph-memory-budget", budget,
                    "--morph-ttft-slo", f"{ttft_slo_s:.6f}", *server_args]
            if math.isfinite(tpot_slo_s):
                args += ["--morph-tpot-slo", f"{tpot_slo_s:.6f}"]
            if profile is not None:
                args += ["--morph-profile", absolute(profile)]
            if model_path is not None:
                args += ["--model-path", absolute(model)]
            self._server = Server(args)
            url = self._server.url
        self.url = url.rstrip("/")
        self.client = MorphClient(self.url)
        self.vocab = usable_token_ids(model)
        self._desired: dict[int, str] = {}
        state = self.state()
        if state.get("policy") != "manual":
            raise EngineError(f"{self.url} runs policy {state.get('policy')!r}; the engine "
                              "backend needs --morph-policy manual")
        self.layer_order: list[int] = list(state["layer_order"])
        self.kv_floor_tokens = int(state.get("kv_min_tokens") or 0)
        """The server refuses a KV limit below this (one maximum-length request)."""
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._replayer: Replayer | None = None  # prepared by reset, started by advance
        self._records: list[RequestRecord] = []
        self._t0 = 0.0
        self._clock = 0.0
        self._reported: set[int] = set()
        self._late: set[int] = set()
        self._late_reported = 0
        self._generated = 0
        self._transitions = 0
        self._kv_limit = 0  # the server's KV limit in tokens (0: none), as last set or read
        self._snap: LoadSnapshot | None = None

    # -- HTTP --

    def state(self) -> dict:
        """``GET /morph/state`` (and remember the layers' desired formats)."""
        return self._remember(self.client.state())

    def _remember(self, state: dict) -> dict:
        self._desired = {layer["id"]: layer["desired"] for layer in state["layers"]}
        return state

    def _swap(self, layers: list[int], fmt: str) -> None:
        if not layers:
            return
        try:
            self._remember(self.client.swap(layers, fmt, timeout_s=30))
        except MorphRequestError as err:
            raise EngineError(f"swap of layers {layers} to {fmt} refused: {err}") from err

    def set_quantized(self, target: int) -> None:
        """Ask for the first ``target`` layers of the importance order in int4, the rest fp.
        The runtime applies it at its next tick (a restore waits for its KV to be free).

        The layers' desired formats come from the last state read (this backend is the only
        one commanding the manual-policy server), not a new read: each read runs in the
        scheduler loop, and one per tick is what the simulator is calibrated with."""
        want = set(self.layer_order[:target])
        desired = self._desired
        self._swap(sorted(i for i in want if desired[i] == "fp"), "int4")
        self._swap(sorted(i for i, f in desired.items() if f != "fp" and i not in want), "fp")

    def set_kv_limit(self, tokens: int) -> None:
        """Set the server's KV limit to ``tokens`` (0 lifts it) unless it is already that."""
        if tokens == self._kv_limit:
            return
        try:
            self._remember(self.client.set_kv_limit(tokens, timeout_s=30))
        except MorphRequestError as err:
            raise EngineError(f"KV limit of {tokens} tokens refused: {err}") from err
        self._kv_limit = tokens

    def snapshot(self) -> LoadSnapshot:
        """The runtime's last observation (taken at its latest tick)."""
        return self._snapshot(self.state())

    @staticmethod
    def _snapshot(state: dict) -> LoadSnapshot:
        obs = state.get("last_observation")
        if not obs:
            raise EngineError("the server publishes no last_observation (is it sglang-morph "
                              "with the manual policy, and has it ticked yet?)")
        fields = {name: obs[name] for name in _SNAPSHOT_FIELDS}
        if fields["tpot_slo_s"] is None:  # JSON has no infinity: no TPOT target is sent as null
            fields["tpot_slo_s"] = math.inf
        return LoadSnapshot(**fields)

    # -- ServingBackend --

    def reset(self, window: Trace) -> LoadSnapshot:
        """Stop any replay, restore every layer, wait for an idle server, start ``window``."""
        self._stop_replay()
        self._kv_limit = self.state()["kv_limit_tokens"] or 0  # another episode's, an operator's
        self.set_quantized(0)
        self.set_kv_limit(0)
        deadline = time.monotonic() + self.idle_timeout_s
        while True:
            state = self.state()
            if (state["quantized_layers"] == 0 and state["queue_len"] == 0
                    and state["running_reqs"] == 0 and state["kv_resize_complete"]):
                break
            if time.monotonic() > deadline:
                raise EngineError(f"server not idle after {self.idle_timeout_s:g} s: {state}")
            time.sleep(0.1)
        requests_ = window.requests
        prompts = [prompt_ids(self.vocab, r.input_tokens, i, self.seed)
                   for i, r in enumerate(requests_)]
        self._replayer = Replayer(self.url, requests_, prompts, progress=False)
        self._records = self._replayer.records
        self._reported, self._late, self._late_reported = set(), set(), 0
        self._generated, self._transitions, self._clock = 0, state["transitions"], 0.0
        self._snap = self._snapshot(state)
        return self._snap

    def _start_replay(self) -> None:
        """Start the prepared window's replay now. Deferred from ``reset`` to the first
        ``advance``: whatever runs between the two (a learner's update at an episode
        boundary) must not let the window's first requests arrive unobserved."""
        assert self._replayer is not None
        self._loop = asyncio.new_event_loop()
        self._t0 = time.perf_counter()
        self._task = self._loop.create_task(self._replayer.run(self._t0))
        self._replayer = None
        self._thread = threading.Thread(target=self._run_loop, name="engine-replay", daemon=True)
        self._thread.start()

    def advance(self, dt: float, target_layers: int, kv_fraction: float = 1.0) -> AdvanceResult:
        """Request ``target_layers`` and a KV limit of ``kv_fraction`` of the budget, let ``dt``
        seconds of the replay pass, then report."""
        if self._snap is None or (self._thread is None and self._replayer is None):
            raise RuntimeError("call reset() before advance()")
        if self._thread is None:
            self._start_replay()
        self.set_quantized(target_layers)
        self.set_kv_limit(
            kv_limit_tokens(self._snap, target_layers, kv_fraction, self.kv_floor_tokens))
        self._clock += dt
        delay = self._t0 + self._clock - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        state = self.state()
        now = time.perf_counter() - self._t0
        finished, generated = [], 0
        for record in list(self._records):
            generated += record.output_tokens
            if record.index not in self._late and _late(record, now, self.ttft_slo_s):
                self._late.add(record.index)
            if record.index in self._reported or record.e2e_s is None or not record.ok:
                continue
            self._reported.add(record.index)
            finished.append(ServedRequest(record.arrival_s, record.prompt_tokens,
                                          record.output_tokens, record.ttft_s, record.e2e_s))
        newly_late, self._late_reported = len(self._late) - self._late_reported, len(self._late)
        swapped = state["transitions"] - self._transitions
        self._transitions = state["transitions"]
        self._snap = self._snapshot(state)
        result = AdvanceResult(
            snapshot=self._snap,
            finished=tuple(finished),
            generated_tokens=generated - self._generated,
            newly_late=newly_late,
            swapped_layers=swapped,
            newly_tpot_late=sum(r.tpot_s > self.tpot_slo_s for r in finished),
        )
        self._generated = generated
        return result

    def _run_loop(self) -> None:
        """Body of the replay thread; a cancelled replay (a reset mid-window) ends quietly."""
        assert self._loop is not None and self._task is not None
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)

    def failed_requests(self) -> list[RequestRecord]:
        """Requests of the current window that ended in an error (should be none)."""
        return [r for r in self._records if r.error is not None]

    def _stop_replay(self) -> None:
        """Cancel the running replay (its in-flight requests are aborted client-side), or
        drop one that was prepared and never started."""
        self._replayer = None
        if self._thread is None or self._loop is None or self._task is None:
            return
        loop = self._loop
        loop.call_soon_threadsafe(lambda: [task.cancel() for task in asyncio.all_tasks(loop)])
        self._thread.join(timeout=30)
        # Requests cancelled between sends are not awaited by the replayer: let them finish
        # their cancellation here, on the now idle loop, before it closes.
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
        self._thread = self._loop = self._task = None

    def close(self) -> None:
        """Stop the replay, and the server if this backend started it."""
        self._stop_replay()
        if self._server is not None:
            self._server.stop()
            self._server = None


def kv_limit_tokens(
    snap: LoadSnapshot, target_layers: int, fraction: float, floor_tokens: int = 0
) -> int:
    """The server KV limit, in tokens, that makes ``fraction`` of the budget at
    ``target_layers`` int4 layers (0: no limit, at fraction 1), from the last snapshot.

    The budget is taken at the smaller of the current and the target depth: the server applies
    a swap at its next tick, and refuses a limit above what the budget allows with the layers
    it has at the moment the limit arrives. Re-sent whenever it changes, so the limit follows
    the depth a tick later, as the runtime's own fraction does at once."""
    if fraction >= 1.0:
        return 0
    restored = max(0, snap.quantized_layers - target_layers)
    limit = int((snap.kv_budget_tokens - restored * snap.tokens_per_layer) * fraction)
    return max(floor_tokens, limit)


def _late(record: RequestRecord, now: float, slo: float) -> bool:
    """Whether the request's TTFT is (or is now certain to be) over the SLO."""
    if record.ttft_s is not None:
        return record.ttft_s > slo
    return record.error is None and record.sent_s is not None and now - record.sent_s > slo

