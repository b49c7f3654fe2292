"""Fine-tune a trained controller on the real engine, where the simulator is wrong (PPO, top to
bottom).

    python -m rl_controller.finetune --episodes 16 --out runs/finetune/morph-ppo-engine.zip

The simulator predicts P95 TTFT well under full precision and much worse under control
(docs/controller.md, "Simulator vs real engine"), so the policy trained there goes on learning
where it serves: PPO continues from ``--checkpoint`` on a real sglang-morph server
(``envs.engine_backend``: the manual policy, the runtime computes every observation and this
process decides), one training window per episode and one update per episode. The update runs
between windows while the server is idle: the backend starts a window's replay at its first
step. Episodes draw from the ``--busiest`` training windows with the most arrivals; a window
that never loads the server teaches nothing and costs its whole length in wall-clock time.

Then the figures decide. The ``--val-windows`` busiest validation windows are replayed on the
same server by the heuristic, the checkpoint fine-tuning started from and the fine-tuned one,
in turn window by window, and training's own rule (``envs.episodes.choose_candidate``: the one
that dominates the heuristic by the wider margin) names the better checkpoint. The fine-tuned
checkpoint is written to ``--out`` either way (NAME.zip, NAME.actor.npz, NAME.json with the
parent's sha256, the episodes and the verdict, and NAME.png); the test windows are not touched
here: ``eval.run`` reports them.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from rich.console import Console
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm import TqdmExperimentalWarning

from envs.engine_backend import EngineBackend
from envs.episodes import (
    choose_candidate,
    env_from_metadata,
    print_results,
    run_episode,
    total,
)
from envs.morph_env import EpisodeStats, Window, prepare_trace, select_window
from eval.metrics import Slo
from eval.plan import machine_kind, resolve_slo
from eval.traces import LengthMapping, Trace
from rl_controller.actor_export import export_actor
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.policy import Policy
from rl_controller.rl_policy import (
    CheckpointError,
    RLPolicy,
    file_sha256,
)
from sglang_morph.cli import (
    FAILURE_STATUS,
    UsageError,
    exit_with,
    output_path,
    positive_float,
    positive_int,
    seconds,
)
from sglang_morph.data import DEFAULT_MODEL
from sglang_morph.paths import DEFAULT_CHECKPOINT, absolute, repo_relative


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rl_controller.finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="the checkpoint to go on training (default: the shipped one)")
    parser.add_argument("--out", default="runs/finetune/morph-ppo-engine.zip",
                        help="the fine-tuned checkpoint; .actor.npz, .json and .png go beside it "
                        "(default: %(default)s)")
    parser.add_argument("--episodes", type=positive_int, default=16,
                        help="engine episodes of PPO, one training window each, one update "
                        "after each (default: %(default)s)")
    parser.add_argument("--busiest", type=positive_int, default=24,
                        help="episodes draw from this many training windows, those with the "
                        "most arrivals (default: %(default)s)")
    parser.add_argument("--val-windows", type=positive_int, default=4,
                        help="validation windows (the busiest) replayed by the heuristic and "
                        "both checkpoints to decide (default: %(default)s)")
    parser.add_argument("--episode-s", type=seconds, default=0.0,
                        help="replay only the first S seconds of every window (default 0: "
                        "whole windows)")
    parser.add_argument("--learning-rate", type=positive_float, default=1e-4,
                        help="Adam step size (default: %(default)s, the simulator training's)")
    parser.add_argument("--n-epochs", type=positive_int, default=10,
                        help="passes over each episode's ticks (default: %(default)s)")
    parser.add_argument("--minibatches", type=positive_int, default=4,
                        help="minibatches per pass (default: %(default)s)")
    parser.add_argument("--ttft-slo", type=positive_float, default=None,
                        help="TTFT SLO (s) the server and the reward use (default: "
                        "eval/slos.json's entry for the model and this machine, as eval.run)")
    parser.add_argument("--tpot-slo", type=positive_float, default=None,
                        help="TPOT SLO (s), likewise")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the window draw and of PPO (default: %(default)s)")
    parser.add_argument("--url", default="",
                        help="drive this running --morph-policy manual server instead of "
                        "starting one")
    return parser.parse_args(argv)


def slo_targets(args: argparse.Namespace) -> Slo:
    """The options, else the SLOs ``eval.run`` judges the model by on this machine
    (``eval.plan.resolve_slo`` with ``--slo fixed``), so fine-tuning optimizes what the
    evaluation counts; UsageError when there are none (``eval.run`` would measure them on an
    fp server, which this command does not start)."""
    given = argparse.Namespace(slo_ttft=args.ttft_slo, slo_tpot=args.tpot_slo, slo="fixed",
                               slo_scale=None)
    slo, _, _ = resolve_slo(given, DEFAULT_MODEL)
    if slo is None:
        raise UsageError(f"eval/slos.json has no SLOs for {DEFAULT_MODEL} on {machine_kind()}: "
                         "give --ttft-slo and --tpot-slo (seconds)")
    return slo


def busiest(trace: Trace, windows: list[Window], n: int, episode_s: float) -> list[Window]:
    """The ``n`` windows with the most arrivals (in their first ``episode_s`` seconds when that
    is > 0), cut to that length, in trace order."""
    cut = [(s, min(e, s + episode_s)) if episode_s > 0 else (s, e) for s, e in windows]
    ranked = sorted(cut, key=lambda w: -len(select_window(trace, *w).requests))
    return sorted(ranked[:n])


class EpisodeLog(BaseCallback):
    """Each engine episode's return, violations, quality cost and swaps, printed as it ends."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.rows: list[dict] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info and "morph_episode" in info:
                row = {"timestep": self.num_timesteps, "return": float(info["episode"]["r"]),
                       **info["morph_episode"]}
                self.rows.append(row)
                self.console.print(
                    f"episode {len(self.rows)}: return {row['return']:.1f}, late "
                    f"{row['late']}/{row['requests']}, TPOT late {row['tpot_late']}, quality/"
                    f"token {row['quality_cost'] / max(row['generated_tokens'], 1):.4f}, "
                    f"swaps {row['swapped_layers']}")
        return True


def plot_episodes(rows: list[dict], path: Path) -> None:
    """Return and TTFT violation rate per engine episode (windows differ in load, so these are
    noisy: the validation replay decides, not this curve)."""
    fig = Figure(figsize=(10, 3.6))
    left, right = fig.subplots(1, 2)
    episodes = np.arange(1, len(rows) + 1)
    left.plot(episodes, [r["return"] for r in rows], "o-")
    left.set_title("episode return")
    right.plot(episodes, [r["late"] / max(r["requests"], 1) for r in rows], "o-")
    right.set_title("TTFT violation rate")
    for ax in (left, right):
        ax.set_xlabel("engine episode")
    fig.suptitle("PPO fine-tuning on the real engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """Fine-tune, validate against the parent and the heuristic, write the checkpoint. Input
    that cannot be used exits with status 2 before any server starts; a server or engine
    failure exits with status 1."""
    args = parse_args(argv)
    try:
        parent = Path(args.checkpoint).resolve()
        try:
            served = RLPolicy.load(parent)  # runnable as served: metadata, actor and its checks
        except CheckpointError as err:
            raise UsageError(f"--checkpoint: {err}") from err
        meta, actions = served.meta, served.actions
        out = output_path("--out", args.out).resolve()
        if out.suffix != ".zip":
            raise UsageError(f"--out {args.out}: expected a .zip path (SB3's checkpoint)")
        slo = slo_targets(args)
    except UsageError as err:
        exit_with(err)
    torch.set_num_threads(1)  # the server needs the cores; the network is tiny
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
    console = Console()

    # 1. Windows: training ones to learn on, validation ones to decide on (test: untouched).
    trace = prepare_trace(meta["trace"], LengthMapping(**meta["length_mapping"]),
                          meta["time_scale"])
    train_windows = busiest(trace, [tuple(w) for w in meta["train_windows"]], args.busiest,
                            args.episode_s)
    val_windows = busiest(trace, [tuple(w) for w in meta["val_windows"]], args.val_windows,
                          args.episode_s)
    console.print(f"fine-tuning {repo_relative(parent)} on the engine: {args.episodes} "
                  f"episodes drawn from {len(train_windows)} training windows, then "
                  f"{len(val_windows)} validation windows; SLOs {slo.ttft_s:g} s / "
                  f"{slo.tpot_s:g} s ({slo.how})")

    # 2. The engine: one manual-policy server for learning and for the decision.
    try:
        backend = EngineBackend(args.url or None, ttft_slo_s=slo.ttft_s, tpot_slo_s=slo.tpot_s,
                                profile=absolute(meta["profile"]), seed=args.seed)
    except Exception as err:  # the server did not start or is not a manual-policy server
        exit_with(f"engine: {err}", FAILURE_STATUS)
    try:
        # 3. PPO from the parent's weights (and optimizer state), one update per episode.
        env = env_from_metadata(meta, windows=train_windows, backend=backend, actions=actions)
        ticks = int(round((train_windows[0][1] - train_windows[0][0]) / env.tick_s))
        vec = DummyVecEnv([lambda: Monitor(env)])
        model = PPO.load(parent, env=vec, device="cpu", n_steps=ticks,
                         batch_size=max(1, ticks // args.minibatches),
                         learning_rate=args.learning_rate, n_epochs=args.n_epochs,
                         seed=args.seed)
        log = EpisodeLog(console)
        start = time.time()
        model.learn(total_timesteps=args.episodes * ticks, callback=log, progress_bar=True)
        train_s = time.time() - start
        model.save(out)
        export_actor(out)
        meta_out = {
            **meta,
            "finetune": {
                "parent": repo_relative(parent), "parent_sha256": file_sha256(parent),
                "backend": "engine (envs.engine_backend, --morph-policy manual)",
                "episodes": log.rows, "train_windows": train_windows,
                "val_windows": val_windows, "episode_s": args.episode_s,
                "learning_rate": args.learning_rate, "n_epochs": args.n_epochs,
                "batch_size": model.batch_size, "timesteps": model.num_timesteps,
                "seed": args.seed, "slo": asdict(slo),
                "machine": machine_kind(), "train_seconds": round(train_s, 1),
            },
        }
        out.with_suffix(".json").write_text(json.dumps(meta_out, indent=2) + "\n")

        # 4. The decision: heuristic, parent and fine-tuned on the validation windows, in turn.
        judge = env_from_metadata(meta, windows=val_windows, backend=backend)
        policies: dict[str, Callable[[], Policy]] = {  # fresh per window: policies keep state
            "heuristic": HeuristicPolicy, "parent": lambda: RLPolicy.load(parent),
            "fine-tuned": lambda: RLPolicy.load(out)}
        episodes: dict[str, list[EpisodeStats]] = {name: [] for name in policies}
        failed = 0
        for i in range(len(val_windows)):
            for name, make in policies.items():
                console.print(f"validation window {i + 1}/{len(val_windows)}: {name}")
                episodes[name].append(run_episode(judge, make(), i))
                failed += len(backend.failed_requests())
    finally:
        backend.close()

    results = [total(name, runs) for name, runs in episodes.items()]
    heuristic, parent_result, tuned_result = results
    chosen, why = choose_candidate([parent_result, tuned_result], heuristic)
    verdict = "parent" if chosen == 0 else "fine-tuned"
    print_results(results, f"engine, validation windows ({len(val_windows)}), one rep each",
                  console)
    meta_out["finetune"]["validation"] = [r.as_dict() for r in results]
    meta_out["finetune"]["verdict"] = {"better": verdict, "why": why}
    meta_out["finetune"]["validation_failed_requests"] = failed
    out.with_suffix(".json").write_text(json.dumps(meta_out, indent=2) + "\n")
    plot_episodes(log.rows, out.with_suffix(".png"))
    console.print(f"better on validation: the {verdict} checkpoint ({why}); wrote {out}, its "
                  f"actor, metadata and {out.with_suffix('.png').name}; "
                  f"{failed} failed requests in validation")


if __name__ == "__main__":
    main()
