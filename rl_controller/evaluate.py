"""``python -m rl_controller.evaluate``: RL vs heuristic vs static baselines on held-out windows.

Rebuilds the simulator environment exactly as the checkpoint's metadata describes it (trace,
length mapping, time scale, replica, calibration, quality table, reward weights, tick), replays
every evaluation window once per policy, and prints SLO violations and quality cost side by
side, then the decision latency of each controller against a ~6 ms decode iteration.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from envs.calibration import IterationModel, load_calibration
from envs.morph_env import EpisodeStats, MorphEnv, Window, prepare_trace, split_windows
from envs.reward import RewardWeights
from envs.simulator import ReplicaConfig
from eval.traces import LengthMapping
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import LoadSnapshot
from rl_controller.policy import ConstantPolicy, Policy
from rl_controller.rl_policy import FallbackPolicy, RLPolicy, read_metadata

DECODE_ITERATION_S = 0.006
"""Decode step at batch 1 measured on the engine (SGLang notes): the budget decisions share."""


@dataclass
class PolicyResult:
    """One policy's totals over a set of windows."""

    policy: str
    windows: int
    requests: int
    late: int
    generated_tokens: int
    quality_cost: float
    swapped_layers: int
    clipped_actions: int
    mean_layers: float
    p95_ttft_s: float
    reward: float

    @property
    def violation_rate(self) -> float:
        return self.late / self.requests if self.requests else 0.0

    @property
    def quality_per_token(self) -> float:
        """Mean quality delta (ppl by default) of a served token."""
        return self.quality_cost / self.generated_tokens if self.generated_tokens else 0.0


def run_episode(
    env: MorphEnv, policy: Policy, window: int, snapshots: list[LoadSnapshot] | None = None
) -> EpisodeStats:
    """Replay window ``window`` of ``env`` with ``policy``; optionally keep every snapshot."""
    env.reset(options={"window": window})
    done = False
    while not done:
        assert env.snapshot is not None
        if snapshots is not None:
            snapshots.append(env.snapshot)
        _, _, terminated, truncated, _ = env.step(policy.decide(env.snapshot))
        done = terminated or truncated
    return env.stats


def evaluate_policies(
    env: MorphEnv,
    factories: dict[str, Callable[[], Policy]],
    snapshots: list[LoadSnapshot] | None = None,
) -> list[PolicyResult]:
    """Every policy (a fresh one per window: policies keep state) on every window of ``env``."""
    results = []
    for name, factory in factories.items():
        episodes = [
            run_episode(env, factory(), i, snapshots if name == "heuristic" else None)
            for i in range(len(env.windows))
        ]
        ttfts = [t for e in episodes for t in e.ttfts]
        ticks = sum(e.ticks for e in episodes)
        results.append(
            PolicyResult(
                policy=name,
                windows=len(episodes),
                requests=sum(e.requests for e in episodes),
                late=sum(e.late for e in episodes),
                generated_tokens=sum(e.generated_tokens for e in episodes),
                quality_cost=sum(e.quality_cost for e in episodes),
                swapped_layers=sum(e.swapped_layers for e in episodes),
                clipped_actions=sum(e.clipped_actions for e in episodes),
                mean_layers=sum(e.layer_ticks for e in episodes) / ticks if ticks else 0.0,
                p95_ttft_s=float(np.percentile(ttfts, 95)) if ttfts else 0.0,
                reward=sum(e.reward for e in episodes),
            )
        )
    return results


def standard_policies(checkpoint: str | None) -> dict[str, Callable[[], Policy]]:
    """The four controllers compared: RL (when a checkpoint is given), heuristic, static."""
    factories: dict[str, Callable[[], Policy]] = {}
    if checkpoint is not None:
        rl = RLPolicy.load(checkpoint)  # stateless: one instance serves every window
        factories["rl"] = lambda: rl
    factories["heuristic"] = HeuristicPolicy
    factories["always-0"] = lambda: ConstantPolicy(0)
    factories["always-L"] = lambda: ConstantPolicy("all")
    return factories


def env_from_metadata(
    meta: dict,
    windows: Sequence[Window] | None = None,
    trace: str | None = None,
    time_scale: float | None = None,
    calibration: IterationModel | None = None,
    backend: str = "simulator",
    tick_s: float | None = None,
) -> MorphEnv:
    """The environment a checkpoint was trained in (or a variant: other trace, load, engine
    timing, the real engine as backend, another tick), on ``windows`` (default: the
    checkpoint's evaluation windows)."""
    scale = meta["time_scale"] if time_scale is None else time_scale
    prepared = prepare_trace(trace or meta["trace"], LengthMapping(**meta["length_mapping"]), scale)
    return MorphEnv(
        prepared,
        windows if windows is not None else [tuple(w) for w in meta["eval_windows"]],
        calibration=calibration or IterationModel(**meta["calibration"]),
        replica=ReplicaConfig(**meta["replica"]),
        quality_table=meta["quality_table"],
        weights=RewardWeights(**meta["reward_weights"]),
        tick_s=meta["tick_s"] if tick_s is None else tick_s,
        backend=backend,
        action_mode="target",
    )


def decision_latency(
    policies: dict[str, Policy], snapshots: Sequence[LoadSnapshot]
) -> dict[str, dict[str, float]]:
    """Mean and p99 seconds per ``decide`` over recorded snapshots (replayed in order)."""
    out = {}
    for name, policy in policies.items():
        times = np.empty(len(snapshots))
        for i, snap in enumerate(snapshots):
            start = time.perf_counter()
            policy.decide(snap)
            times[i] = time.perf_counter() - start
        out[name] = {"mean_s": float(times.mean()), "p99_s": float(np.percentile(times, 99))}
    return out


def print_results(results: list[PolicyResult], title: str, console: Console) -> None:
    """The comparison table."""
    table = Table(title=title)
    for column in ("policy", "SLO violations", "quality cost/token", "mean int4 layers",
                   "layer swaps", "clipped", "P95 TTFT ms", "reward"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    for r in results:
        table.add_row(
            r.policy,
            f"{r.late}/{r.requests} ({r.violation_rate:.2%})",
            f"{r.quality_per_token:.4f}",
            f"{r.mean_layers:.2f}",
            str(r.swapped_layers),
            str(r.clipped_actions),
            f"{r.p95_ttft_s * 1e3:.0f}",
            f"{r.reward:.1f}",
        )
    console.print(table)


def print_latency(
    latency: dict[str, dict[str, float]], console: Console, calibrated_decode_s: float
) -> None:
    """Decision latency against the decode iteration it delays: the uncontended 6-ms step of
    the SGLang notes (the strict bound) and the calibration's batch-1 decode."""
    table = Table(title="decision latency per tick")
    for column in ("controller", "mean us", "p99 us", f"mean / {DECODE_ITERATION_S * 1e3:g} ms",
                   f"p99 / {DECODE_ITERATION_S * 1e3:g} ms",
                   f"mean / {calibrated_decode_s * 1e3:.1f} ms (calibrated)"):
        table.add_column(column, justify="left" if column == "controller" else "right")
    for name, t in latency.items():
        table.add_row(name, f"{t['mean_s'] * 1e6:.1f}", f"{t['p99_s'] * 1e6:.1f}",
                      f"{t['mean_s'] / DECODE_ITERATION_S:.3%}",
                      f"{t['p99_s'] / DECODE_ITERATION_S:.3%}",
                      f"{t['mean_s'] / calibrated_decode_s:.3%}")
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, evaluate, print both tables."""
    parser = argparse.ArgumentParser(prog="python -m rl_controller.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="NAME.zip with NAME.json beside it")
    parser.add_argument("--trace", help="trace to replay (default: the training trace, on its "
                        "held-out windows; another trace is replayed whole)")
    parser.add_argument("--time-scale", type=float, help="load level (default: training's)")
    parser.add_argument("--calibration", help="iteration-time calibration JSON (default: the "
                        "one the checkpoint was trained with)")
    args = parser.parse_args(argv)
    meta = read_metadata(args.checkpoint)
    windows = None
    if args.trace and args.trace != meta["trace"]:
        scale = args.time_scale or meta["time_scale"]
        mapping = LengthMapping(**meta["length_mapping"])
        windows = split_windows(prepare_trace(args.trace, mapping, scale), meta["window_s"], 1.0)[0]
    calibration = load_calibration(args.calibration) if args.calibration else None
    env = env_from_metadata(meta, windows, args.trace, args.time_scale, calibration)
    console = Console()
    snapshots: list[LoadSnapshot] = []
    results = evaluate_policies(env, standard_policies(args.checkpoint), snapshots)
    trace = args.trace or meta["trace"]
    scale = args.time_scale or meta["time_scale"]
    print_results(
        results,
        f"{trace}, time scale {scale:g}, {len(env.windows)} held-out windows of "
        f"{meta['window_s']:g} s, SLO TTFT {env.replica.ttft_slo_s * 1e3:g} ms (simulator)",
        console,
    )
    rl = RLPolicy.load(args.checkpoint)
    latency = decision_latency(
        {"heuristic": HeuristicPolicy(), "rl": rl, "rl+fallback": FallbackPolicy(rl)}, snapshots
    )
    engine = calibration or IterationModel(**meta["calibration"])
    print_latency(latency, console, engine.iteration_s(0, 1, 0))


if __name__ == "__main__":
    main()
