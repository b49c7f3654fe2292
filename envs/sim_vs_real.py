"""``python -m envs.sim_vs_real``: one trace window on the simulator and on the real engine.

The simulator is what the policy is trained in, so its error bounds what evaluation in it
means. This replays the same held-out window (a checkpoint's, by default the busiest) under the
same controller on both backends of ``MorphEnv`` and prints P95 TTFT, SLO violations and
layer swaps of each, and the simulator's relative error on P95 TTFT. Both runs continue past the
window's end until every request has finished (at most ``--drain-s``), so slow requests count.
The engine run takes the window's length in wall time plus a server start. Input that cannot
be used exits with status 2 and one line before the server starts; a server that fails, with 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from envs.episodes import env_from_metadata
from envs.morph_env import MorphEnv, Window
from envs.policies import POLICY_NAMES, make_policy
from eval.traces import select_window
from rl_controller.policy import Policy
from rl_controller.rl_policy import CheckpointError, RLPolicy, read_metadata
from sglang_morph.cli import (
    FAILURE_STATUS,
    UsageError,
    exit_with,
    output_path,
    positive_float,
    read_input,
)
from sglang_morph.paths import DEFAULT_CHECKPOINT
from sglang_morph.server_process import ServerError


@dataclass
class BackendRun:
    """One backend's replay of the window."""

    backend: str
    requests: int
    finished: int
    late: int
    p50_ttft_s: float
    p95_ttft_s: float
    swapped_layers: int
    mean_layers: float


def replay(env: MorphEnv, policy: Policy, drain_s: float, label: str) -> BackendRun:
    """Run ``env``'s only window with ``policy`` and drain; collect TTFTs of every request."""
    env.reset(options={"window": 0})
    window_ticks = int(np.ceil((env.window[1] - env.window[0]) / env.tick_s))
    max_ticks = window_ticks + int(np.ceil(drain_s / env.tick_s))
    layer_ticks = steps = 0
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=window_ticks)
        for steps in range(1, max_ticks + 1):
            snap = env.snapshot
            assert snap is not None
            _, _, _, _, info = env.step(policy.decide(snap))
            layer_ticks += info["target"]
            bar.advance(task)
            snap = env.snapshot
            if steps >= window_ticks and snap.queue_len == 0 and snap.running_reqs == 0:
                break
    ttfts = np.array(env.stats.ttfts)
    return BackendRun(
        backend=label,
        requests=env.stats.requests,
        finished=len(ttfts),
        late=env.stats.late,
        p50_ttft_s=float(np.percentile(ttfts, 50)) if len(ttfts) else 0.0,
        p95_ttft_s=float(np.percentile(ttfts, 95)) if len(ttfts) else 0.0,
        swapped_layers=env.stats.swapped_layers,
        mean_layers=layer_ticks / max(steps, 1),
    )


def busiest(env: MorphEnv) -> int:
    """Index of the window of ``env`` with the most requests."""
    counts = [len(select_window(env.trace, *w).requests) for w in env.windows]
    return int(np.argmax(counts))


def print_runs(runs: list[BackendRun], console: Console) -> None:
    """The two backends' replays side by side."""
    table = Table(title="simulator vs real engine, same window and controller")
    for column in ("backend", "finished", "SLO violations", "P50 TTFT ms", "P95 TTFT ms",
                   "layer swaps", "mean int4 layers"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for r in runs:
        table.add_row(r.backend, f"{r.finished}/{r.requests}", str(r.late),
                      f"{r.p50_ttft_s * 1e3:.0f}", f"{r.p95_ttft_s * 1e3:.0f}",
                      str(r.swapped_layers), f"{r.mean_layers:.2f}")
    console.print(table)


def load_inputs(args: argparse.Namespace) -> tuple[dict, MorphEnv, int]:
    """The checkpoint's metadata, the simulator environment it describes and the window to
    replay; UsageError naming the option that cannot be used."""
    try:
        meta = read_metadata(args.checkpoint)
        if args.policy == "rl":
            RLPolicy.load(args.checkpoint)
    except CheckpointError as err:
        raise UsageError(f"--checkpoint: {err}") from err
    sim_env = read_input("--checkpoint", lambda: env_from_metadata(meta))
    count = len(sim_env.windows)
    index = busiest(sim_env) if args.window_index is None else args.window_index
    if not 0 <= index < count:
        raise UsageError(f"--window-index {index}: the checkpoint has {count} held-out windows "
                         f"(accepted: 0..{count - 1})")
    if args.drain_s < 0:
        raise UsageError(f"--drain-s {args.drain_s:g}: expected 0 or more seconds")
    if args.out:
        output_path("--out", args.out)
    return meta, sim_env, index


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, replay on both backends, print the comparison (and --out JSON)."""
    parser = argparse.ArgumentParser(prog="python -m envs.sim_vs_real", description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="its metadata gives trace, time scale, lengths, windows, replica "
                        "(default: the shipped policy)")
    parser.add_argument("--window-index", type=int, default=None,
                        help="held-out window to replay (default: the busiest)")
    parser.add_argument("--policy", default="fp", choices=POLICY_NAMES,
                        help="controller of both runs (default: fp)")
    parser.add_argument("--tick-s", type=positive_float, default=0.25,
                        help="controller tick of both runs (the engine's HTTP round trips "
                        "need more than the 50-ms training tick)")
    parser.add_argument("--drain-s", type=float, default=60.0,
                        help="longest time to keep serving after the window")
    parser.add_argument("--out", help="write both runs as JSON here")
    args = parser.parse_args(argv)
    try:
        meta, sim_env, index = load_inputs(args)
    except UsageError as err:
        exit_with(err)
    window: Window = sim_env.windows[index]
    console = Console()
    console.print(f"{meta['trace']} held-out window {index} {window} (time scale "
                  f"{meta['time_scale']:g}), policy {args.policy}, tick {args.tick_s:g} s")
    runs = []
    for backend in ("simulator", "engine"):
        try:
            env = env_from_metadata(meta, [window], backend=backend, tick_s=args.tick_s)
        except ServerError as err:
            exit_with(err, FAILURE_STATUS)
        try:
            policy = make_policy(args.policy, args.checkpoint)
            runs.append(replay(env, policy, args.drain_s, backend))
        finally:
            env.close()
    print_runs(runs, console)
    sim, real = runs
    error = (sim.p95_ttft_s - real.p95_ttft_s) / real.p95_ttft_s if real.p95_ttft_s else 0.0
    console.print(f"simulator P95 TTFT relative to the engine's: {error:+.1%} (target within 20%)")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"window": window, "window_index": index, "policy": args.policy,
                       "runs": [asdict(r) for r in runs], "p95_ttft_rel_error": error}, fh,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
