"""The interface between the environment and whatever serves the requests.

Two implementations plug in here: the discrete-event simulator (``envs.simulator``), used for
training, and a real SGLang server with the morph runtime (``envs.engine_backend``); any object
with these two methods can be passed to ``MorphEnv(backend=...)``. Keeping the interface this
small (replay a window, advance time with a layer target and a KV limit) is what lets a policy
trained on one be evaluated on the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from eval.traces import Trace
from rl_controller.observation import LoadSnapshot


@dataclass(frozen=True)
class ServedRequest:
    """One finished request as a backend reports it, timed from its arrival (named apart from
    ``eval.replay.RequestRecord``, the client's record of a request in flight)."""

    arrival_s: float
    input_tokens: int
    output_tokens: int
    ttft_s: float
    e2e_s: float

    @property
    def tpot_s(self) -> float:
        """Mean time per output token after the first (0 for single-token outputs)."""
        if self.output_tokens < 2:
            return 0.0
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class AdvanceResult:
    """What happened during one ``advance`` (one controller tick)."""

    snapshot: LoadSnapshot
    """State at the end of the tick (the next observation)."""
    finished: tuple[ServedRequest, ...]
    generated_tokens: int
    """Output tokens produced in the tick, all with the tick's number of quantized layers."""
    newly_late: int
    """Requests whose wait for a first token passed the TTFT SLO during the tick. A request
    counts once, at the moment its violation becomes certain, so the penalty is not deferred to
    the (possibly much later) moment its first token arrives."""
    swapped_layers: int
    """Layers quantized or restored at the start of the tick."""
    newly_tpot_late: int = 0
    """Requests that finished during the tick with a mean time per output token over the TPOT
    SLO (known only at the end, so counted then)."""


@runtime_checkable
class ServingBackend(Protocol):
    """Replays a trace window against a server whose quantized-layer count the caller sets."""

    def reset(self, window: Trace) -> LoadSnapshot:
        """Start replaying ``window`` (arrivals relative to 0) from an empty server with no
        quantized layer; returns the state at time 0."""
        ...

    def advance(self, dt: float, target_layers: int, kv_fraction: float = 1.0) -> AdvanceResult:
        """Switch to ``target_layers`` quantized layers (already clipped with
        ``rl_controller.policy.clip_action``) and a KV limit of ``kv_fraction`` of what the
        budget allows at that depth (clipped with ``clip_kv_fraction``), then serve for ``dt``
        seconds."""
        ...

