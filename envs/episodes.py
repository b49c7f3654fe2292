"""Replaying a checkpoint's windows with several controllers, and totalling what they did.

Training ends with this evaluation and ``rl_controller.evaluate`` repeats it later, so both
rebuild the environment from the checkpoint's metadata (never from today's defaults, which may
have moved on) and count episodes the same way; ``envs.sim_vs_real`` starts from the same
environment to put one of its windows on the real engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from envs.backend import ServingBackend
from envs.calibration import IterationModel
from envs.morph_env import EpisodeStats, MorphEnv, Window, prepare_trace, split_windows
from envs.reward import RewardWeights
from envs.simulator import ReplicaConfig
from eval.traces import LengthMapping, Trace, poisson_load
from rl_controller.observation import LoadSnapshot
from rl_controller.policy import RL_ACTIONS, Policy, RLActions
from sglang_morph.config import DOMINANCE_MAX_TRANSITIONS, RestoreRule

STEADY_S = 300.0
"""Length of a simulated steady load (``env_from_metadata(steady_rate=...)``): five minutes, the
engine benchmark's (``eval.steady``)."""


def env_from_metadata(
    meta: dict,
    windows: Sequence[Window] | None = None,
    trace: str | None = None,
    time_scale: float | None = None,
    calibration: IterationModel | None = None,
    backend: str | ServingBackend = "simulator",
    tick_s: float | None = None,
    restore: RestoreRule | None = None,
    steady_rate: float | None = None,
    actions: RLActions | None = None,
) -> MorphEnv:
    """The environment a checkpoint was trained in, or a variant of it (another trace, load,
    engine timing, tick, or the real engine as backend), with absolute-target actions so that
    any policy can drive it, or with the RL heads ``actions`` (the checkpoint's own, to go on
    training it).

    ``windows`` default to the checkpoint's test windows (``eval_windows``): those it recorded,
    or at another time scale the same test part of the trace cut anew; another trace has no
    held-out part, so it is replayed whole. Windows always have the training length.
    ``restore``, the restore stabilization rule, defaults to the one the checkpoint was trained
    under (``RestoreRule.from_metadata``).

    ``steady_rate`` replaces the windows by one steady load: ``STEADY_S`` of constant-rate
    Poisson arrivals at that many requests per second (seeded), request shapes drawn from the
    training part of the trace only, so a steady-load check touches no held-out request.
    """
    scale = meta["time_scale"] if time_scale is None else time_scale
    name = trace or meta["trace"]
    prepared = prepare_trace(name, LengthMapping(**meta["length_mapping"]), scale)
    if windows is None:
        if name != meta["trace"]:
            windows = split_windows(prepared, meta["window_s"], 1.0)[0]
        elif scale != meta["time_scale"]:
            held_out = meta["train_frac"] + meta.get("val_frac", 0.0)  # the test part
            windows = split_windows(prepared, meta["window_s"], held_out)[1]
        else:
            windows = [tuple(w) for w in meta["eval_windows"]]
    if steady_rate is not None:
        end = meta["train_windows"][-1][1] * meta["time_scale"] / scale  # arrival_s / scale
        shapes = Trace("train", tuple(r for r in prepared.requests if r.arrival_s < end))
        requests = poisson_load(shapes, steady_rate, STEADY_S, seed=0)
        prepared = Trace(f"poisson-{steady_rate:g}", requests, {"span_s": STEADY_S})
        windows = [(0.0, STEADY_S)]
    return MorphEnv(
        prepared,
        windows,
        calibration=calibration or IterationModel(**meta["calibration"]),
        replica=ReplicaConfig(**meta["replica"]),
        quality_table=meta["quality_table"],
        weights=RewardWeights(**meta["reward_weights"]),
        tick_s=meta["tick_s"] if tick_s is None else tick_s,
        backend=backend,
        action_mode="target" if actions is None else "delta",
        actions=RL_ACTIONS if actions is None else actions,
        restore=RestoreRule.from_metadata(meta) if restore is None else restore,
    )


def run_episode(
    env: MorphEnv, policy: Policy, window: int, snapshots: list[LoadSnapshot] | None = None
) -> EpisodeStats:
    """Replay window ``window`` of ``env`` (in target mode) with ``policy``; optionally keep
    every snapshot it decided on, to time decisions on realistic inputs later."""
    env.reset(options={"window": window})
    done = False
    while not done:
        assert env.snapshot is not None
        if snapshots is not None:
            snapshots.append(env.snapshot)
        _, _, terminated, truncated, _ = env.step(policy.decide(env.snapshot))
        done = terminated or truncated
    return env.stats


@dataclass
class PolicyResult:
    """One policy's totals over a set of windows."""

    policy: str
    windows: int
    requests: int
    late: int
    tpot_late: int
    generated_tokens: int
    quality_cost: float
    swapped_layers: int
    clipped_actions: int
    held_restores: int
    worst_minute_swaps: int
    """The most layer swaps in one minute of any episode."""
    mean_layers: float
    mean_kv_fraction: float
    p95_ttft_s: float
    reward: float

    @property
    def violation_rate(self) -> float:
        """Share of requests that broke the TTFT SLO."""
        return self.late / self.requests if self.requests else 0.0

    @property
    def tpot_violation_rate(self) -> float:
        """Share of requests that broke the TPOT SLO."""
        return self.tpot_late / self.requests if self.requests else 0.0

    @property
    def quality_per_token(self) -> float:
        """Mean quality delta (ppl by default) of a served token."""
        return self.quality_cost / self.generated_tokens if self.generated_tokens else 0.0

    def as_dict(self) -> dict:
        """The totals and the derived rates, as checkpoint metadata stores them."""
        return {**asdict(self), "violation_rate": self.violation_rate,
                "tpot_violation_rate": self.tpot_violation_rate,
                "quality_per_token": self.quality_per_token}


def total(policy: str, episodes: Sequence[EpisodeStats]) -> PolicyResult:
    """The totals of ``episodes`` (P95 TTFT over all their requests, not a mean of P95s)."""
    ttfts = [t for e in episodes for t in e.ttfts]
    ticks = sum(e.ticks for e in episodes)
    return PolicyResult(
        policy=policy,
        windows=len(episodes),
        requests=sum(e.requests for e in episodes),
        late=sum(e.late for e in episodes),
        tpot_late=sum(e.tpot_late for e in episodes),
        generated_tokens=sum(e.generated_tokens for e in episodes),
        quality_cost=sum(e.quality_cost for e in episodes),
        swapped_layers=sum(e.swapped_layers for e in episodes),
        clipped_actions=sum(e.clipped_actions for e in episodes),
        held_restores=sum(e.held_restores for e in episodes),
        worst_minute_swaps=max((m for e in episodes for m in e.swaps_by_minute), default=0),
        mean_layers=sum(e.layer_ticks for e in episodes) / ticks if ticks else 0.0,
        mean_kv_fraction=sum(e.kv_fraction_ticks for e in episodes) / ticks if ticks else 1.0,
        p95_ttft_s=float(np.percentile(ttfts, 95)) if ttfts else 0.0,
        reward=sum(e.reward for e in episodes),
    )


def dominance_margin(result: PolicyResult, heuristic: PolicyResult) -> float | None:
    """How far ``result`` beats ``heuristic``: the larger of its relative reductions in SLO
    violations (TTFT and TPOT together) and in quality cost per token, when it is at least as
    good on both with at most ``DOMINANCE_MAX_TRANSITIONS`` times its layer swaps; None
    otherwise (it does not dominate)."""
    late, late_h = result.late + result.tpot_late, heuristic.late + heuristic.tpot_late
    quality, quality_h = result.quality_per_token, heuristic.quality_per_token
    if (late > late_h or quality > quality_h
            or result.swapped_layers > DOMINANCE_MAX_TRANSITIONS * heuristic.swapped_layers):
        return None
    return max(1 - late / late_h if late_h else 0.0, 1 - quality / quality_h if quality_h else 0.0)


def choose_candidate(results: list[PolicyResult], heuristic: PolicyResult) -> tuple[int, str]:
    """Index of the candidate to keep, from validation results only, and why.

    The learned controller is there to dominate the heuristic (violations and quality cost
    both at most its, one clearly lower, without chattering), so that is what chooses: among
    the candidates that
    dominate it on validation, the widest margin (ties: higher reward). When none does, the
    highest reward, and the reason says that none dominated.
    """
    margins = [dominance_margin(r, heuristic) for r in results]
    dominating = [i for i, m in enumerate(margins) if m is not None]
    if dominating:
        best = max(dominating, key=lambda i: (margins[i], results[i].reward))
        return best, (f"dominates the heuristic on the validation windows by the widest margin "
                      f"({margins[best]:.1%}) of the {len(dominating)} of {len(results)} "
                      f"candidates that do")
    best = max(range(len(results)), key=lambda i: results[i].reward)
    return best, (f"none of the {len(results)} candidates dominates the heuristic on the "
                  "validation windows: highest validation reward")


def evaluate_policies(
    env: MorphEnv,
    factories: dict[str, Callable[[], Policy]],
    snapshots: list[LoadSnapshot] | None = None,
) -> list[PolicyResult]:
    """Every policy (a fresh one per window: policies keep state) on every window of ``env``;
    ``snapshots``, when given, collects the heuristic's inputs."""
    results = []
    for name, factory in factories.items():
        episodes = [
            run_episode(env, factory(), i, snapshots if name == "heuristic" else None)
            for i in range(len(env.windows))
        ]
        results.append(total(name, episodes))
    return results


def print_results(results: list[PolicyResult], title: str, console: Console) -> None:
    """The comparison table."""
    table = Table(title=title)
    for column in ("policy", "TTFT violations", "TPOT violations", "quality cost/token",
                   "mean int4 layers", "mean KV limit", "layer swaps", "clipped",
                   "held restores", "worst minute swaps", "P95 TTFT ms",
                   "reward"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for r in results:
        table.add_row(
            r.policy,
            f"{r.late}/{r.requests} ({r.violation_rate:.2%})",
            f"{r.tpot_late}/{r.requests} ({r.tpot_violation_rate:.2%})",
            f"{r.quality_per_token:.4f}",
            f"{r.mean_layers:.2f}",
            f"{r.mean_kv_fraction:.2f}",
            str(r.swapped_layers),
            str(r.clipped_actions),
            str(r.held_restores),
            str(r.worst_minute_swaps),
            f"{r.p95_ttft_s * 1e3:.0f}",
            f"{r.reward:.1f}",
        )
    console.print(table)
