"""``python -m rl_controller.evaluate``: RL vs heuristic vs static baselines on held-out windows.

Rebuilds the simulator environment exactly as the checkpoint's metadata describes it (trace,
length mapping, time scale, replica, calibration, quality table, reward weights, tick), replays
every evaluation window once per policy, and prints TTFT and TPOT SLO violations and quality
cost side by side, then the decision latency of each controller against the decode iteration
it delays.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from envs.calibration import IterationModel, load_calibration
from envs.episodes import STEADY_S, env_from_metadata, evaluate_policies, print_results
from envs.morph_env import MorphEnv
from envs.policies import decision_latency, standard_policies
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import LoadSnapshot
from rl_controller.rl_policy import CheckpointError, FallbackPolicy, RLPolicy, read_metadata
from sglang_morph.cli import UsageError, exit_with, positive_float, read_input, seconds, share
from sglang_morph.config import RestoreRule
from sglang_morph.paths import DEFAULT_CHECKPOINT

LATENCY_REPS = 5
"""Passes over the recorded snapshots per controller, interleaved (a tail percentile from one
pass is mostly the machine's noise at that moment)."""

DECODE_ITERATION_S = 0.006
"""The uncontended batch-1 decode step of the SGLang notes: the strictest budget a decision
shares the scheduler loop with."""


def print_latency(
    latency: dict[str, dict[str, float]], console: Console, calibrated_decode_s: float
) -> None:
    """Decision latency against the decode iteration it delays: the SGLang notes' step (the
    strict bound) and the calibration's batch-1 decode (this machine's)."""
    table = Table(title=f"decision latency per tick (median of {LATENCY_REPS} interleaved "
                  "passes; p99 range: lowest and highest pass)")
    for column in ("controller", "mean us", "p99 us", "p99 range us",
                   f"mean / {DECODE_ITERATION_S * 1e3:g} ms",
                   f"p99 / {DECODE_ITERATION_S * 1e3:g} ms",
                   f"mean / {calibrated_decode_s * 1e3:.1f} ms (calibrated)"):
        table.add_column(column, justify="left" if column == "controller" else "right")
    for name, t in latency.items():
        table.add_row(name, f"{t['mean_s'] * 1e6:.1f}", f"{t['p99_s'] * 1e6:.1f}",
                      f"{t['p99_low_s'] * 1e6:.1f}-{t['p99_high_s'] * 1e6:.1f}",
                      f"{t['mean_s'] / DECODE_ITERATION_S:.3%}",
                      f"{t['p99_s'] / DECODE_ITERATION_S:.3%}",
                      f"{t['mean_s'] / calibrated_decode_s:.3%}")
    console.print(table)


def restore_rule(args: argparse.Namespace, meta: dict) -> RestoreRule:
    """The restore rule the checkpoint was trained under, with the settings the command line
    gives instead (to choose a rule on validation windows); a max window below the window is
    raised to it, so ``--restore-window`` alone may go past the checkpoint's max window."""
    rule = RestoreRule.from_metadata(meta)
    window = rule.window_s if args.restore_window is None else args.restore_window
    max_window = rule.max_window_s if args.restore_max_window is None else args.restore_max_window
    return rule.overridden(window, max(window, max_window), args.restore_load_drop)


def load_inputs(
    args: argparse.Namespace,
) -> tuple[dict, RLPolicy, MorphEnv, IterationModel | None]:
    """The checkpoint's metadata and policy, the environment and the calibration; UsageError
    naming the option whose file or value cannot be used."""
    try:
        meta = read_metadata(args.checkpoint)
        rl = RLPolicy.load(args.checkpoint)
    except CheckpointError as err:
        raise UsageError(f"--checkpoint: {err}") from err
    calibration = (read_input("--calibration", lambda: load_calibration(args.calibration))
                   if args.calibration else None)
    windows = None
    if args.windows == "validation":
        if args.trace or args.time_scale or args.steady:
            raise UsageError("--windows validation replays the checkpoint's own validation "
                             "windows; it accepts neither --trace, --time-scale nor --steady")
        windows = [tuple(w) for w in meta["val_windows"]]
    env = read_input("--trace", lambda: env_from_metadata(
        meta, windows=windows, trace=args.trace, time_scale=args.time_scale,
        calibration=calibration, restore=restore_rule(args, meta), steady_rate=args.steady))
    return meta, rl, env, calibration


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, evaluate, print both tables."""
    parser = argparse.ArgumentParser(prog="python -m rl_controller.evaluate", description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="NAME.zip with NAME.json beside it (default: the shipped policy)")
    parser.add_argument("--trace", help="trace to replay (default: the training trace, on its "
                        "held-out windows; another trace is replayed whole)")
    parser.add_argument("--time-scale", type=positive_float,
                        help="load level (default: training's)")
    parser.add_argument("--calibration", help="iteration-time calibration JSON (default: the "
                        "one the checkpoint was trained with)")
    parser.add_argument("--windows", choices=("test", "validation"), default="test",
                        help="the checkpoint's held-out test windows (the report's, replay "
                        "once) or its validation windows (to choose settings on)")
    parser.add_argument("--restore-window", type=seconds,
                        help="restore stabilization window in s (default: the one the "
                        "checkpoint was trained under)")
    parser.add_argument("--steady", type=positive_float, metavar="RATE",
                        help="replay a steady load instead of windows: 5 min of Poisson "
                        "arrivals at RATE req/s, shapes from the training part of the trace")
    parser.add_argument("--restore-max-window", type=seconds,
                        help="the longest the restore window grows to (default: the "
                        "checkpoint's)")
    parser.add_argument("--restore-load-drop", type=share,
                        help="restores also wait for the arrival rate to fall this fraction "
                        "below its peak (0: off; default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        meta, rl, env, calibration = load_inputs(args)
    except UsageError as err:
        exit_with(err)
    console = Console()

    # Every policy on every window; the heuristic's snapshots are kept to time decisions on.
    snapshots: list[LoadSnapshot] = []
    results = evaluate_policies(env, standard_policies(args.checkpoint), snapshots)
    trace = args.trace or meta["trace"]
    scale = args.time_scale or meta["time_scale"]
    which = f"{args.windows} windows" if trace == meta["trace"] else "windows"
    load = (f"steady Poisson load of {trace} shapes at {args.steady:g} req/s for "
            f"{STEADY_S:g} s" if args.steady else
            f"{trace}, time scale {scale:g}, {len(env.windows)} {which} of {meta['window_s']:g} s")
    print_results(
        results,
        f"{load}, SLO TTFT {env.replica.ttft_slo_s * 1e3:.1f} ms, TPOT "
        f"{env.replica.tpot_slo_s * 1e3:.1f} ms, restore window {env.restore.window_s:g}-"
        f"{env.restore.max_window_s:g} s, load drop {env.restore.load_drop:g} (simulator)",
        console,
    )

    # Decision latency of each controller over those snapshots.
    latency = decision_latency(
        {"heuristic": HeuristicPolicy, "rl": lambda: rl, "rl+fallback": lambda: FallbackPolicy(rl)},
        snapshots, LATENCY_REPS,
    )
    engine = calibration or IterationModel(**meta["calibration"])
    print_latency(latency, console, engine.iteration_s(0, 1, 0))


if __name__ == "__main__":
    main()
