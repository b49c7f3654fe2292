"""Train the morph controller with PPO in the simulator (CleanRL style: one file, top to bottom).

    python -m rl_controller.train --trace azure-code --timesteps 200000 \\
        --out checkpoints/morph-ppo.zip --seeds 1,2,3 --n-envs 4 --window-s 60 --time-scale 0.25

The trace is cut by time into consecutive windows: the first ``--train-frac`` trains, the next
``--val-frac`` validates, the rest is the test part. One candidate is trained per seed, per
``--quality-weights`` entry and per ``--learning-rates`` entry. The heuristic is replayed on
the validation windows too, and the candidate kept is the one that beats it there by the
widest margin with at most 1.5x its layer swaps (``choose_candidate``: the learned controller
is there to dominate the heuristic, without chattering); only then is every candidate
replayed once on the test windows, for the report.
Writes NAME.zip (SB3 PPO), NAME.actor.npz (its actor for numpy, what the server loads),
NAME.json (everything needed to rebuild the environment and check compatibility, with
repository-relative paths, the split, every candidate's validation and test results and the
selection) and NAME.png (the kept candidate's training curve).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
import stable_baselines3
import torch
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import DummyVecEnv
from tqdm import TqdmExperimentalWarning

from envs.calibration import IterationModel, load_calibration
from envs.episodes import (
    PolicyResult,
    choose_candidate,
    env_from_metadata,
    evaluate_policies,
    print_results,
)
from envs.morph_env import TRAIN_FRAC, VAL_FRAC, MorphEnv, Window, prepare_trace, split_protocol
from envs.policies import standard_policies
from envs.reward import DEFAULT_QUALITY_TABLE, RewardWeights, load_quality_table
from envs.simulator import ReplicaConfig
from eval.traces import LengthMapping, Trace
from rl_controller.actor_export import export_actor
from rl_controller.heuristic import HeuristicPolicy
from rl_controller.observation import FEATURES, OBS_SIZE, OBS_VERSION
from rl_controller.policy import KV_FRACTIONS, RLActions
from rl_controller.rl_policy import RLPolicy, action_metadata
from sglang_morph.cli import (
    UsageError,
    exit_with,
    output_path,
    positive_float,
    positive_int,
    read_input,
    seconds,
    share,
)
from sglang_morph.config import (
    RESTORE_LOAD_DROP,
    RESTORE_MAX_WINDOW_S,
    RESTORE_WINDOW_S,
    RestoreRule,
)
from sglang_morph.paths import (
    DEFAULT_CALIBRATION,
    DEFAULT_CHECKPOINT,
    default_profile,
    repo_relative,
)
from sglang_morph.profile_file import layer_order, load_profile


def _arg(default: object, text: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A dataclass field carrying its --help text and its parser (default: the default's type;
    ``positive_*`` turn a value that cannot run into a usage error, exit status 2)."""
    return field(default=default, metadata={"help": text, "type": parse or type(default)})


def _fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


@dataclass
class Args:
    trace: str = _arg("azure-code", "trace name or file (eval.traces.load_trace)")
    timesteps: int = _arg(200_000, "controller ticks of PPO experience (after cloning)",
                          positive_int)
    out: str = _arg(str(DEFAULT_CHECKPOINT), "checkpoint path; .actor.npz, .json and .png go "
                    "beside it")
    seeds: str = _arg("1,2,3", "comma-separated seeds of PPO, the networks and the window "
                      "choice: one candidate each")
    n_envs: int = _arg(4, "simulator environments stepped together", positive_int)
    window_s: float = _arg(60.0, "episode length: one window of the trace", positive_float)
    time_scale: float = _arg(0.25, "trace speed-up (eval.traces.scale_time); 1 = real time, "
                             "0.25 = the load eval.run and envs.calibrate use", positive_float)
    train_frac: float = _arg(TRAIN_FRAC, "windows inside this leading fraction of the trace train",
                             _fraction)
    val_frac: float = _arg(VAL_FRAC, "the next fraction validates (chooses the candidate); the "
                           "rest is the test part", _fraction)
    tick_s: float = _arg(0.05, "controller tick (simulated s per step; the runtime's default)",
                         positive_float)
    restore_window: float = _arg(RESTORE_WINDOW_S, "the runtime's restore stabilization "
                                 "window (s) the policy is trained under "
                                 "(--morph-restore-window; give the server the same)", seconds)
    restore_max_window: float = _arg(RESTORE_MAX_WINDOW_S, "the longest the window grows to "
                                     "(--morph-restore-max-window)", seconds)
    restore_load_drop: float = _arg(RESTORE_LOAD_DROP, "restores also wait for the arrival "
                                    "rate to fall this fraction below its peak "
                                    "(--morph-restore-load-drop)", share)
    calibration: str = _arg(str(DEFAULT_CALIBRATION), "iteration-time calibration JSON")
    quality: str = _arg("", "quality-by-k JSON or eval.quality output (envs.reward); empty = "
                        "documented default")
    profile: str = _arg(str(default_profile("int4")),
                        "layer-importance profile the server quantizes in (recorded; give the "
                        "server the same --morph-profile)")
    slo_weight: float = _arg(RewardWeights.slo, "reward cost of one TTFT SLO violation")
    tpot_weight: float = _arg(RewardWeights.tpot, "reward cost of one TPOT SLO violation")
    quality_weights: str = _arg(str(RewardWeights.quality), "comma-separated costs of a token "
                                "at quality delta 1: one candidate each (per seed)")
    transition_weight: float = _arg(RewardWeights.transition, "cost of one layer swap")
    max_step: int = _arg(1, "most layers the policy may quantize in one tick (its layer head: "
                         "restore one, hold, quantize 1..N); restores stay one at a time",
                         positive_int)
    learning_rates: str = _arg("1e-4", "comma-separated Adam step sizes of PPO: one candidate "
                               "each (per seed and quality weight); small ones refine the cloned "
                               "heuristic, larger ones may leave it")
    bc_epochs: int = _arg(30, "epochs of behaviour cloning of the heuristic (0 = none)")
    bc_learning_rate: float = _arg(1e-3, "Adam step size of the cloning")
    n_steps: int = _arg(512, "rollout ticks per environment between updates", positive_int)
    batch_size: int = _arg(256, "minibatch size", positive_int)
    n_epochs: int = _arg(10, "passes over each rollout", positive_int)
    gamma: float = _arg(0.99, "discount: ~100-tick (5 s) horizon, enough to see a queue drain")
    gae_lambda: float = _arg(0.95, "GAE lambda")
    ent_coef: float = _arg(0.01, "entropy bonus")
    hidden: int = _arg(64, "width of the two hidden layers (actor and critic)", positive_int)

    def restore_rule(self) -> RestoreRule:
        """The restore rule of the three ``--restore-*`` options: one value for every
        environment of the run (the policy is trained and judged under the rule the server
        must be given); ValueError naming the option that cannot be used."""
        return RestoreRule(self.restore_window, self.restore_max_window, self.restore_load_drop)


PATH_ARGS = ("out", "calibration", "quality", "profile")
"""Arguments that name files: recorded relative to the checkout, so metadata travels."""


def parse_args(argv: list[str] | None = None) -> Args:
    """The command line as ``Args`` (every field a ``--flag`` with its help and default)."""
    parser = argparse.ArgumentParser(prog="python -m rl_controller.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, type=f.metadata["type"], default=f.default,
                            help=f"{f.metadata['help']} (default: %(default)s)")
    return Args(**vars(parser.parse_args(argv)))


class EpisodeLog(BaseCallback):
    """Collects each finished episode's return, TTFT and TPOT violations and quality cost."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []

    def _on_step(self) -> bool:
        for info in self.locals["infos"]:
            if "episode" in info and "morph_episode" in info:
                self.rows.append(
                    {"timestep": self.num_timesteps, "return": float(info["episode"]["r"]),
                     **info["morph_episode"]}
                )
        return True


def heuristic_demonstration(env: MorphEnv, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Observations and RL actions (rows of indices into the env's layer deltas and KV
    fractions) of the heuristic on a window, moving toward its target as far as the delta head
    allows in one tick, at the KV limit it chose."""
    obs, _ = env.reset(options={"window": window})
    policy, observations, actions, done = HeuristicPolicy(), [], [], False
    while not done:
        assert env.snapshot is not None
        action = env.actions.indices(policy.decide(env.snapshot), env.snapshot.quantized_layers)
        observations.append(obs)
        actions.append(action)
        obs, _, terminated, truncated, _ = env.step(action)
        done = terminated or truncated
    return np.array(observations), np.array(actions)


def _agreement(cloned: torch.Tensor, demonstrated: torch.Tensor) -> float | None:
    """Share of rows where the clone picks the demonstrated action (every head of the row, for
    rows of several heads); None without rows."""
    if not len(demonstrated):
        return None
    same = (cloned == demonstrated).reshape(len(demonstrated), -1).all(dim=1)
    return float(same.float().mean())


def behaviour_clone(
    model: PPO, demos: list[tuple[np.ndarray, np.ndarray]], epochs: int, learning_rate: float,
    actions: RLActions,
) -> dict:
    """Fit the policy's action distribution to the demonstrated actions (negative
    log-likelihood of both heads together: the sum of their cross-entropies), and report how
    often the clone picks the demonstrated action: both heads on every tick, the layer head on
    the ticks that move a layer, and the KV head on every tick and on those that limit KV (the
    rare ticks that matter)."""
    demo_obs = torch.as_tensor(np.concatenate([o for o, _ in demos]))
    demo_actions = torch.as_tensor(np.concatenate([a for _, a in demos]))
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=learning_rate)
    for _ in range(epochs):
        for batch in torch.randperm(len(demo_actions)).split(512):
            dist = model.policy.get_distribution(demo_obs[batch])
            loss = -dist.log_prob(demo_actions[batch]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        cloned = model.policy.get_distribution(demo_obs).mode()
    layers, kv = demo_actions[:, 0], demo_actions[:, 1]
    moves = layers != actions.deltas.index(0)
    limited = kv != KV_FRACTIONS.index(1.0)
    return {
        "bc_epochs": epochs,
        "demonstration_ticks": len(demo_actions),
        "demonstration_moves": int(moves.sum()),
        "demonstration_kv_limited": int(limited.sum()),
        "agreement": _agreement(cloned, demo_actions),
        "move_agreement": _agreement(cloned[moves, 0], layers[moves]),
        "kv_agreement": _agreement(cloned[:, 1], kv),
        "kv_limited_agreement": _agreement(cloned[limited, 1], kv[limited]),
    }


def portable_args(args: Args) -> dict:
    """``args`` for the metadata, file arguments relative to the checkout (no machine paths)."""
    return {name: repo_relative(value) if name in PATH_ARGS and value else value
            for name, value in asdict(args).items()}


def plot_training_curve(rows: list[dict], args: Args, seed: int, path: Path) -> None:
    """Return, TTFT and TPOT violation rates and quality cost per episode, each with a rolling
    mean:
    per-episode values are noisy, since windows differ in load."""
    steps = np.array([r["timestep"] for r in rows])
    series = {
        "episode return": np.array([r["return"] for r in rows]),
        "TTFT violation rate": np.array([r["late"] / max(r["requests"], 1) for r in rows]),
        "TPOT violation rate": np.array([r["tpot_late"] / max(r["requests"], 1) for r in rows]),
        "quality cost / token": np.array(
            [r["quality_cost"] / max(r["generated_tokens"], 1) for r in rows]
        ),
    }
    fig = Figure(figsize=(18, 3.8))
    axes = fig.subplots(1, len(series))
    k = max(1, len(rows) // 25)
    for ax, (label, y) in zip(axes, series.items(), strict=True):
        ax.plot(steps, y, ".", alpha=0.2, markersize=3)
        if len(y) >= k:
            ax.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=2)
        ax.set_xlabel("timesteps (controller ticks)")
        ax.set_title(label)
    fig.suptitle(f"PPO on {args.trace} training windows (time scale {args.time_scale:g}, "
                 f"seed {seed}); rolling mean of {k} episodes")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _numbers(flag: str, text: str, kind: type) -> list:
    """A comma-separated list of numbers from the command line; UsageError naming ``flag``."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise UsageError(f"{flag} {text!r}: expected comma-separated {kind.__name__} values")
    return values


@dataclass(frozen=True)
class Inputs:
    """Everything the run reads from files, and the restore rule, checked before any
    training."""

    trace: Trace
    train_windows: list[Window]
    val_windows: list[Window]
    test_windows: list[Window]
    calibration: IterationModel
    quality: tuple[float, ...]
    replica: ReplicaConfig
    order: list[int]
    restore: RestoreRule


def load_inputs(args: Args) -> Inputs:
    """The trace, its windows, the calibration, quality table, profile and restore rule;
    UsageError naming the option whose file or value cannot be used, so training never starts
    on bad input."""
    trace = read_input("--trace", lambda: prepare_trace(args.trace, LengthMapping(),
                                                        args.time_scale))
    train, val, test = split_protocol(trace, args.window_s, args.train_frac, args.val_frac)
    if not train or not val or not test:
        raise UsageError(
            f"--window-s {args.window_s:g} with --train-frac {args.train_frac:g} and --val-frac "
            f"{args.val_frac:g} leaves {len(train)} training, {len(val)} validation and "
            f"{len(test)} test windows in {trace.name} ({trace.duration_s:.0f} s at time scale "
            f"{args.time_scale:g}); each needs at least one"
        )
    quality = (read_input("--quality", lambda: load_quality_table(args.quality))
               if args.quality else DEFAULT_QUALITY_TABLE)
    try:
        restore = args.restore_rule()
    except ValueError as err:
        raise UsageError(str(err)) from err
    return Inputs(
        trace, train, val, test,
        calibration=read_input("--calibration", lambda: load_calibration(args.calibration)),
        quality=quality,
        replica=read_input("--calibration",
                           lambda: ReplicaConfig.from_calibration(args.calibration)),
        order=read_input("--profile", lambda: layer_order(load_profile(args.profile))),
        restore=restore,
    )


@dataclass
class Candidate:
    """One trained candidate: its seed, quality weight and learning rate, files, training log
    and results."""

    seed: int
    quality_weight: float
    learning_rate: float
    path: Path
    meta: dict
    rows: list[dict]
    val: PolicyResult | None = None
    test: PolicyResult | None = None

    def summary(self) -> dict:
        return {"seed": self.seed, "quality_weight": self.quality_weight,
                "learning_rate": self.learning_rate,
                "validation": self.val.as_dict() if self.val else None,
                "test": self.test.as_dict() if self.test else None}


def train_candidate(
    args: Args, inputs: Inputs, weights: RewardWeights, learning_rate: float, seed: int,
    path: Path, console: Console,
) -> Candidate:
    """Clone the heuristic, train PPO for one seed, reward weights and learning rate, and write
    the checkpoint, its actor and its metadata at ``path`` (so that ``RLPolicy.load`` can run
    it)."""
    trace, calibration, replica = inputs.trace, inputs.calibration, inputs.replica
    actions = RLActions.up_to(args.max_step)

    def make_env() -> MorphEnv:
        return MorphEnv(trace, inputs.train_windows, calibration=calibration, replica=replica,
                        quality_table=inputs.quality, weights=weights, tick_s=args.tick_s,
                        actions=actions, restore=inputs.restore)

    envs = DummyVecEnv([lambda: Monitor(make_env())] * args.n_envs)

    # Agent: PPO with a small MLP (the decision must cost microseconds in the scheduler).
    model = PPO(
        "MlpPolicy", envs, learning_rate=learning_rate, n_steps=args.n_steps,
        batch_size=args.batch_size, n_epochs=args.n_epochs, gamma=args.gamma,
        gae_lambda=args.gae_lambda, ent_coef=args.ent_coef, seed=seed, device="cpu",
        policy_kwargs={"net_arch": [args.hidden, args.hidden]}, verbose=0,
    )
    # Warm start: clone the heuristic (toward its target as far as one tick goes, at its KV
    # limit: both heads) before PPO. From a random policy, PPO settles on a constant layer
    # count (every exploratory move pays a swap and the benefit shows up only later); from the
    # heuristic it refines timing instead.
    start = time.time()
    demo_env = make_env()
    demos = [heuristic_demonstration(demo_env, i) for i in range(len(inputs.train_windows))]
    warm_start = behaviour_clone(model, demos, args.bc_epochs, args.bc_learning_rate, actions)
    console.print(f"seed {seed}, quality weight {weights.quality:g}, learning rate "
                  f"{learning_rate:g}: behaviour cloning of the heuristic: {warm_start}")

    log = EpisodeLog()
    model.learn(total_timesteps=args.timesteps, callback=log, progress_bar=True)
    train_s = time.time() - start
    model.save(path)
    export_actor(path)
    meta = {
        "obs_version": OBS_VERSION,
        "obs_size": OBS_SIZE,
        "features": list(FEATURES),
        **action_metadata(actions),
        "num_layers": replica.num_layers,
        "trace": args.trace,
        "time_scale": args.time_scale,
        "length_mapping": asdict(LengthMapping()),
        "window_s": args.window_s,
        "train_frac": args.train_frac,
        "val_frac": args.val_frac,
        "train_windows": inputs.train_windows,
        "val_windows": inputs.val_windows,
        "eval_windows": inputs.test_windows,
        "tick_s": args.tick_s,
        **inputs.restore.metadata(),
        "replica": asdict(replica),
        "calibration": asdict(calibration),
        "profile": repo_relative(args.profile),
        "layer_order": inputs.order,
        "quality_table": list(inputs.quality),
        "quality_source": repo_relative(args.quality) if args.quality
        else "envs.reward.DEFAULT_QUALITY_TABLE",
        "reward_weights": asdict(weights),
        "args": portable_args(args),
        "timesteps": model.num_timesteps,
        "seed": seed,
        "learning_rate": learning_rate,
        "warm_start": warm_start,
        "train_seconds": round(train_s, 1),
        "episodes": len(log.rows),
        "versions": {
            "stable_baselines3": stable_baselines3.__version__,
            "gymnasium": gymnasium.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return Candidate(seed, weights.quality, learning_rate, path, meta, log.rows)


def judged(inputs: Inputs, windows: list[Window], weights: RewardWeights, args: Args) -> MorphEnv:
    """An environment over ``windows`` where every candidate is judged under the same reward
    weights, with absolute-target actions (what ``RLPolicy.decide`` answers)."""
    return MorphEnv(inputs.trace, windows, calibration=inputs.calibration, replica=inputs.replica,
                    quality_table=inputs.quality, weights=weights, tick_s=args.tick_s,
                    action_mode="target", restore=inputs.restore)


def rl_result(env: MorphEnv, path: Path) -> PolicyResult:
    rl = RLPolicy.load(path)
    return evaluate_policies(env, {"rl": lambda: rl})[0]


def main(argv: list[str] | None = None) -> None:
    """Train every candidate, keep the best on validation, then report every candidate on the
    test windows and write the kept one with its metadata, plus the test comparison against the
    heuristic and the static policies and its training curve. Input that cannot be used exits
    with status 2 and one line before any training."""
    args = parse_args(argv)
    try:
        seeds = _numbers("--seeds", args.seeds, int)
        quality_weights = _numbers("--quality-weights", args.quality_weights, float)
        learning_rates = _numbers("--learning-rates", args.learning_rates, float)
        inputs = load_inputs(args)
        out = output_path("--out", args.out)
    except UsageError as err:
        exit_with(err)
    # One thread: the network is tiny, and torch's thread pool on busy cores costs more than
    # the work it splits.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)  # SB3's rich progress bar
    console = Console()
    console.print(f"{inputs.trace.name}: {len(inputs.train_windows)} training, "
                  f"{len(inputs.val_windows)} validation and {len(inputs.test_windows)} test "
                  f"windows, time scale {args.time_scale:g}; calibration: "
                  f"{inputs.calibration.source}; seeds {seeds}, quality weights {quality_weights}, "
                  f"learning rates {learning_rates}")
    def weights_with(quality: float) -> RewardWeights:
        """The command line's reward weights with quality weight ``quality``."""
        return RewardWeights(slo=args.slo_weight, quality=quality,
                             transition=args.transition_weight, tpot=args.tpot_weight)

    reference = weights_with(quality_weights[0])
    workdir = Path(tempfile.mkdtemp(prefix="morph-train-"))
    try:
        # 1. Candidates, each judged on the validation windows only.
        validation = judged(inputs, inputs.val_windows, reference, args)
        heuristic_val = evaluate_policies(validation, {"heuristic": HeuristicPolicy})[0]
        console.print(f"heuristic on validation: reward {heuristic_val.reward:.1f}, TTFT "
                      f"violations {heuristic_val.violation_rate:.2%}, quality/token "
                      f"{heuristic_val.quality_per_token:.4f}")
        candidates = []
        for quality_weight, learning_rate, seed in itertools.product(
                quality_weights, learning_rates, seeds):
            path = workdir / f"q{quality_weight:g}-lr{learning_rate:g}-seed{seed}.zip"
            c = train_candidate(args, inputs, weights_with(quality_weight), learning_rate, seed,
                                path, console)
            c.val = rl_result(validation, path)
            console.print(f"  validation reward {c.val.reward:.1f}, TTFT violations "
                          f"{c.val.violation_rate:.2%}, TPOT violations "
                          f"{c.val.tpot_violation_rate:.2%}, quality/token "
                          f"{c.val.quality_per_token:.4f}")
            candidates.append(c)
        chosen, why = choose_candidate([c.val for c in candidates], heuristic_val)
        best = candidates[chosen]
        console.print(f"kept seed {best.seed}, quality weight {best.quality_weight:g}, learning "
                      f"rate {best.learning_rate:g}: {why}")
        # 2. The test windows, once per candidate, after the choice.
        test = judged(inputs, inputs.test_windows, reference, args)
        for c in candidates:
            c.test = rl_result(test, c.path)
        for suffix in (".zip", ".actor.npz", ".json"):  # the kept candidate's three files
            shutil.copyfile(best.path.with_name(best.path.stem + suffix),
                            out.with_name(out.stem + suffix))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    meta = {**best.meta, "seeds": seeds, "quality_weights": quality_weights,
            "learning_rates": learning_rates,
            "selection": f"{why}; rewards under the reference weights {asdict(reference)}; "
            "test windows replayed only after the choice",
            "validation_heuristic": heuristic_val.as_dict(),
            "candidates": [c.summary() for c in candidates],
            "selected": {"seed": best.seed, "quality_weight": best.quality_weight,
                         "learning_rate": best.learning_rate}}
    meta_path = out.with_suffix(".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    # The kept policy against the heuristic and the static policies on the test windows, in
    # the environment rebuilt from the metadata just written.
    results = evaluate_policies(env_from_metadata(meta), standard_policies(out))
    print_results(results, f"test windows ({len(inputs.test_windows)} x {args.window_s:g} s), "
                  f"seed {best.seed}, quality weight {best.quality_weight:g}, learning rate "
                  f"{best.learning_rate:g}", console)
    table = Table(title="every candidate (chosen on validation; test replayed once)")
    for column in ("seed", "quality weight", "learning rate", "val reward", "val TTFT viol.",
                   "val TPOT viol.", "val quality/token", "test reward", "test TTFT viol.",
                   "test TPOT viol.", "test quality/token"):
        table.add_column(column)
    table.add_row("heuristic", "", "", f"{heuristic_val.reward:.1f}",
                  f"{heuristic_val.violation_rate:.2%}", f"{heuristic_val.tpot_violation_rate:.2%}",
                  f"{heuristic_val.quality_per_token:.4f}", "", "", "", "")
    for c in candidates:
        table.add_row(str(c.seed), f"{c.quality_weight:g}", f"{c.learning_rate:g}",
                      f"{c.val.reward:.1f}", f"{c.val.violation_rate:.2%}",
                      f"{c.val.tpot_violation_rate:.2%}", f"{c.val.quality_per_token:.4f}",
                      f"{c.test.reward:.1f}", f"{c.test.violation_rate:.2%}",
                      f"{c.test.tpot_violation_rate:.2%}", f"{c.test.quality_per_token:.4f}")
    console.print(table)
    meta["eval"] = [r.as_dict() for r in results]
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")

    plot_training_curve(best.rows, args, best.seed, out.with_suffix(".png"))
    console.print(f"wrote {out}, {out.with_name(out.stem + '.actor.npz')}, {meta_path}, "
                  f"{out.with_suffix('.png')} (kept seed {best.seed}, quality weight "
                  f"{best.quality_weight:g}, {best.meta['timesteps']} steps in "
                  f"{best.meta['train_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
