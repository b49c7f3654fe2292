"""The controllers the offline commands pit against each other, built by name, and what one
decision of each costs.

Training's final evaluation, ``rl_controller.evaluate`` and ``envs.sim_vs_real`` must compare
the same controllers under the same names; building them in one place keeps the tables of the
three commands comparable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import LoadSnapshot
from rl_controller.policy import ConstantPolicy, Policy
from rl_controller.rl_policy import FallbackPolicy, RLPolicy

POLICY_NAMES = ("fp", "int4", "heuristic", "rl")
"""What ``make_policy`` builds: no layer in int4, every layer, the paper's rule, the checkpoint."""


def make_policy(name: str, checkpoint: str | Path) -> Policy:
    """One controller by name (``POLICY_NAMES``); ``rl`` is the checkpoint behind the same
    fallback the server uses, so a comparison with the engine runs what serving would run."""
    if name == "fp":
        return ConstantPolicy(0)
    if name == "int4":
        return ConstantPolicy("all")
    if name == "heuristic":
        return HeuristicPolicy()
    if name == "rl":
        return FallbackPolicy.from_checkpoint(checkpoint)
    raise ValueError(f"unknown policy {name!r}; accepted: {', '.join(POLICY_NAMES)}")


def standard_policies(checkpoint: str | Path | None) -> dict[str, Callable[[], Policy]]:
    """Factories of the controllers an evaluation compares: RL (when a checkpoint is given),
    the heuristic, and the two static extremes. A factory per name because policies may keep
    state between ticks, and every window must start from a fresh one."""
    factories: dict[str, Callable[[], Policy]] = {}
    if checkpoint is not None:
        rl = RLPolicy.load(checkpoint)  # stateless: one instance serves every window
        factories["rl"] = lambda: rl
    factories["heuristic"] = HeuristicPolicy
    factories["always-0"] = lambda: ConstantPolicy(0)
    factories["always-L"] = lambda: ConstantPolicy("all")
    return factories


def decision_latency(
    policies: dict[str, Callable[[], Policy]], snapshots: Sequence[LoadSnapshot], reps: int = 5
) -> dict[str, dict[str, float]]:
    """Seconds per ``decide`` over recorded snapshots, replayed in order by a fresh policy (a
    stateful one then sees the sequence it would in serving), ``reps`` times with the policies
    interleaved (a rotated order each time, so a noisy moment does not fall on one policy).

    Per policy: ``mean_s`` and ``p99_s``, the medians over reps of each pass's mean and 99th
    percentile, and ``p99_low_s``/``p99_high_s``, the lowest and highest pass's p99 (a single
    pass's tail is what a moment of machine noise moves most).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(policies)
    passes: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    times = np.empty(len(snapshots))
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            policy = policies[name]()
            for i, snap in enumerate(snapshots):
                start = time.perf_counter()
                policy.decide(snap)
                times[i] = time.perf_counter() - start
            passes[name].append((float(times.mean()), float(np.percentile(times, 99))))
    out = {}
    for name, rows in passes.items():
        means, p99s = np.array(rows).T
        out[name] = {"mean_s": float(np.median(means)), "p99_s": float(np.median(p99s)),
                     "p99_low_s": float(p99s.min()), "p99_high_s": float(p99s.max())}
    return out
