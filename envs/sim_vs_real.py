"""``python -m envs.sim_vs_real``: test windows on the simulator and on the real engine, under
each controller.

The simulator is what the policy is trained in, so its error under control bounds what training
and evaluation in it mean. This replays N test windows of a checkpoint (the busiest, unless
``--window-index`` names them) under each policy twice over: once in the simulator (the
checkpoint's environment, at the runtime's 50-ms tick) and ``--reps`` times on a real server
that runs the same policy in-process (``--morph-policy``, the code path of serving: no HTTP
between decision and action). Engine repetitions are interleaved: each rep serves every policy
in turn, one server per policy, every window on it. A cell is one (window, policy); its error
is (simulator P95 TTFT - engine mean P95 TTFT) / engine mean, and the summary is the median of
the absolute errors over all cells. Writes ``{"cells": [...], "median_abs_error": m, ...}`` to
``--out`` and a PNG beside it. Input that cannot be used exits with status 2 and one line
before any server starts; a server that fails, with 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from envs.calibration import IterationModel, load_calibration, load_replica
from envs.episodes import env_from_metadata
from envs.morph_env import MorphEnv, Window
from envs.policies import make_policy
from envs.simulator import ReplicaConfig
from eval.replay import Replayer, RequestRecord, prompt_ids, usable_token_ids
from eval.servers import replay_polling, start_server, system_flags
from eval.traces import Trace, select_window
from rl_controller.rl_policy import CheckpointError, RLPolicy, read_metadata
from sglang_morph.cli import (
    FAILURE_STATUS,
    UsageError,
    exit_with,
    output_path,
    positive_int,
    read_input,
)
from sglang_morph.client import MorphClient
from sglang_morph.config import RestoreRule
from sglang_morph.data import resolve_model
from sglang_morph.paths import DEFAULT_CHECKPOINT, REPO_ROOT, absolute, repo_relative
from sglang_morph.server_process import Server, ServerError

POLICIES = ("fp", "static-int4", "heuristic", "rl")
"""What the comparison can run: no layer in int4, every layer in int4 from the start, the
paper's rule, the checkpoint."""
SIM_POLICY = {"fp": "fp", "static-int4": "int4", "heuristic": "heuristic", "rl": "rl"}
"""Each policy's name in ``envs.policies.make_policy``."""
ENGINE_SYSTEM = {"fp": "static-k:0", "static-int4": "static-int4", "heuristic": "morph-heuristic",
                 "rl": "morph-rl"}
"""Each policy's server configuration in ``eval.servers.system_flags``. fp is the manual policy
with no layer swapped: a runtime that observes every tick and answers the state reads the
calibration was measured with, but never acts."""
REST_TIMEOUT_S = 300.0
"""Longest wait between two windows for the server to be idle with no layer in int4 (restores
come one stabilization window apart: 10 s each at the default windows, longer after restores
were undone)."""


@dataclass
class Replay:
    """What one backend did with one window under one policy."""

    requests: int
    finished: int
    late: int
    p50_ttft_s: float
    p95_ttft_s: float
    swapped_layers: int
    mean_layers: float


def summarise(ttfts: list[float], requests: int, slo_s: float, swaps: int,
              mean_layers: float) -> Replay:
    """A replay's figures from its requests' TTFTs (unfinished requests count as late)."""
    arr = np.asarray(ttfts, dtype=float)
    late = int((arr > slo_s).sum()) + requests - len(arr)
    pct = (lambda q: float(np.percentile(arr, q))) if len(arr) else (lambda q: 0.0)
    return Replay(requests, len(arr), late, pct(50), pct(95), swaps, mean_layers)


def simulate(env: MorphEnv, policy_name: str, checkpoint: str, drain_s: float) -> Replay:
    """``env``'s only window under a fresh ``policy_name``, served until every request has
    finished (at most ``drain_s`` past the window)."""
    policy = make_policy(SIM_POLICY[policy_name], checkpoint)
    env.reset(options={"window": 0})
    window_ticks = int(np.ceil((env.window[1] - env.window[0]) / env.tick_s))
    max_ticks = window_ticks + int(np.ceil(drain_s / env.tick_s))
    layer_ticks = steps = 0
    for steps in range(1, max_ticks + 1):
        snap = env.snapshot
        assert snap is not None
        _, _, _, _, info = env.step(policy.decide(snap))
        layer_ticks += info["target"]
        snap = env.snapshot
        if steps >= window_ticks and snap.queue_len == 0 and snap.running_reqs == 0:
            break
    return summarise(list(env.stats.ttfts), env.stats.requests, env.replica.ttft_slo_s,
                     env.stats.swapped_layers, layer_ticks / max(steps, 1))


def engine_flags(policy: str, replica: ReplicaConfig, budget: int, checkpoint: str,
                 profile: str, restore: RestoreRule) -> list[str]:
    """Launcher flags of ``policy``'s server: the checkpoint's budget, layer order, SLOs and
    restore stabilization (windows, load drop), so that the policy in the server sees and is
    held back as in the simulator."""
    return [*system_flags(ENGINE_SYSTEM[policy], budget, checkpoint),
            "--morph-ttft-slo", f"{replica.ttft_slo_s:.6f}",
            "--morph-tpot-slo", f"{replica.tpot_slo_s:.6f}",
            "--morph-profile", profile,
            "--morph-restore-window", f"{restore.window_s:g}",
            "--morph-restore-max-window", f"{restore.max_window_s:g}",
            "--morph-restore-load-drop", f"{restore.load_drop:g}"]


def wait_resting(client: MorphClient, policy: str, timeout_s: float = REST_TIMEOUT_S) -> dict:
    """Wait until nothing is queued or running and, for a morphing policy, every layer is back
    in full precision (the state each simulated window starts from); returns the state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = client.state()
        idle = state["queue_len"] == 0 and state["running_reqs"] == 0
        rested = policy in ("fp", "static-int4") or state["quantized_layers"] == 0
        if (idle and rested and state.get("kv_resize_complete", True)) \
                or time.monotonic() > deadline:
            return state
        time.sleep(0.25)


def engine_replay(server: Server, policy: str, window: Trace, prompts: list[list[int]],
                  slo_s: float) -> tuple[Replay, dict]:
    """One window on a running server; returns its figures and what the server says it ran
    (policy, fallbacks, the layer count it started from, failed requests)."""
    client = MorphClient(server.url)
    start = wait_resting(client, policy)
    replayer = Replayer(server.url, window.requests, prompts, label=f"engine {policy}")
    timeline: list[dict] = []
    asyncio.run(replay_polling(replayer, server.url, timeline))
    end = client.state()
    records: list[RequestRecord] = replayer.records
    ttfts = [r.ttft_s for r in records if r.ok and r.ttft_s is not None]
    layers = [row["quantized_layers"] for row in timeline
              if row.get("quantized_layers") is not None]
    replay = summarise(ttfts, len(window.requests), slo_s,
                       end["transitions"] - start["transitions"],
                       float(np.mean(layers)) if layers else 0.0)
    ran = {"policy": end.get("policy"), "fallbacks": end.get("fallbacks", 0),
           "start_quantized_layers": start["quantized_layers"],
           "failed_requests": sum(r.error is not None for r in records)}
    return replay, ran


def not_what_was_asked(policy: str, ran: dict) -> str | None:
    """Why an engine replay did not measure ``policy`` (another policy ran, the RL policy fell
    back, requests failed, a morphing server did not start from full precision); None when it
    did."""
    expected = {"fp": "manual", "static-int4": None, "heuristic": "heuristic", "rl": "rl"}[policy]
    if expected is not None and ran["policy"] != expected:
        return f"the server ran policy {ran['policy']!r}, not {expected!r}"
    if ran["fallbacks"]:
        return f"{ran['fallbacks']} ticks fell back to the heuristic"
    if ran["failed_requests"]:
        return f"{ran['failed_requests']} requests failed"
    if policy in ("heuristic", "rl") and ran["start_quantized_layers"]:
        return f"started with {ran['start_quantized_layers']} int4 layers"
    return None


def relative_error(sim: float, engine: list[float]) -> float:
    """(sim - mean engine) / mean engine; 0 when the engine mean is 0."""
    mean = statistics.fmean(engine)
    return (sim - mean) / mean if mean else 0.0


def median_abs_error(cells: list[dict]) -> float:
    """Median of |error| over the cells: the comparison's one figure."""
    return float(np.median([abs(c["error"]) for c in cells]))


def choose_windows(env: MorphEnv, count: int, indices: list[int] | None) -> list[int]:
    """Indices of the windows to replay: ``indices`` as given, else the ``count`` with the most
    requests (where control matters), in time order."""
    if indices is not None:
        return indices
    counts = [len(select_window(env.trace, *w).requests) for w in env.windows]
    return sorted(int(i) for i in np.argsort(counts, kind="stable")[::-1][:count])


def plot(cells: list[dict], path: Path, title: str) -> None:
    """Simulator against engine P95 TTFT, one point per cell (engine reps as a range)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5.5))
    colors = {"fp": "tab:gray", "static-int4": "tab:blue", "heuristic": "tab:orange",
              "rl": "tab:green"}
    for policy in dict.fromkeys(c["policy"] for c in cells):
        mine = [c for c in cells if c["policy"] == policy]
        x = [1e3 * statistics.fmean(c["engine_p95_ttft_s"]) for c in mine]
        y = [1e3 * c["sim_p95_ttft_s"] for c in mine]
        lo = [xi - 1e3 * min(c["engine_p95_ttft_s"]) for xi, c in zip(x, mine, strict=True)]
        hi = [1e3 * max(c["engine_p95_ttft_s"]) - xi for xi, c in zip(x, mine, strict=True)]
        ax.errorbar(x, y, xerr=[lo, hi], fmt="o", label=policy, color=colors.get(policy))
    values = [1e3 * c["sim_p95_ttft_s"] for c in cells] + [
        1e3 * v for c in cells for v in c["engine_p95_ttft_s"]]
    span = np.array([max(min(values), 1.0) / 1.5, max(values) * 1.5])
    ax.plot(span, span, "k-", lw=1, label="simulator = engine")
    ax.fill_between(span, span * 0.85, span * 1.15, color="k", alpha=0.08, label="within 15%")
    ax.set(xscale="log", yscale="log", xlabel="engine P95 TTFT (ms, mean of reps, range)",
           ylabel="simulator P95 TTFT (ms)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_indices(text: str | None) -> list[int] | None:
    """``--window-index`` as a list of ints (comma-separated); None when not given."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise UsageError(f"--window-index {text}: expected comma-separated window indices") \
            from err


def load_inputs(
    args: argparse.Namespace,
) -> tuple[dict, MorphEnv, list[int], list[str], IterationModel | None]:
    """The checkpoint's metadata, its simulator environment, the windows, the policies and the
    engine timing given with ``--calibration`` (None: the checkpoint's); UsageError naming the
    option that cannot be used."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        raise UsageError(f"--policies {args.policies}: accepted: {', '.join(POLICIES)}")
    try:
        meta = read_metadata(args.checkpoint)
        if "rl" in policies:
            RLPolicy.load(args.checkpoint)
    except CheckpointError as err:
        raise UsageError(f"--checkpoint: {err}") from err
    sim_env = read_input("--checkpoint", lambda: env_from_metadata(meta))
    count = len(sim_env.windows)
    indices = parse_indices(args.window_index)
    if indices is not None:
        bad = [i for i in indices if not 0 <= i < count]
        if bad or not indices:
            raise UsageError(f"--window-index {args.window_index}: the checkpoint has {count} "
                             f"test windows (accepted: 0..{count - 1})")
    elif args.windows > count:
        raise UsageError(f"--windows {args.windows}: the checkpoint has {count} test windows")
    if args.drain_s < 0:
        raise UsageError(f"--drain-s {args.drain_s:g}: expected 0 or more seconds")
    output_path("--out", args.out)
    timing = (read_input("--calibration", lambda: load_calibration(args.calibration))
              if args.calibration else None)
    return meta, sim_env, choose_windows(sim_env, args.windows, indices), policies, timing


def collect(sim: dict[tuple[int, str], Replay],
            engine: dict[tuple[int, str], list[tuple[Replay, dict]]],
            all_windows: list[Window], console: Console | None = None) -> dict:
    """The cells measured so far on both backends and their median |error|; each engine
    replay that did not measure its policy is named (and printed to ``console``)."""
    cells = []
    for (i, policy), runs in engine.items():
        if not runs:
            continue
        problems = [not_what_was_asked(policy, ran) for _, ran in runs]
        for problem in problems:
            if problem and console is not None:
                console.print(f"[red]window {i} {policy}: {problem}[/]")
        p95s = [r.p95_ttft_s for r, _ in runs]
        cells.append({
            "window": list(all_windows[i]), "window_index": i, "policy": policy,
            "sim_p95_ttft_s": sim[i, policy].p95_ttft_s, "engine_p95_ttft_s": p95s,
            "error": relative_error(sim[i, policy].p95_ttft_s, p95s),
            "sim": asdict(sim[i, policy]),
            "engine": [{**asdict(r), "ran": ran, "problem": problem}
                       for (r, ran), problem in zip(runs, problems, strict=True)],
        })
    return {"cells": cells, "median_abs_error": median_abs_error(cells) if cells else None}


def print_cells(cells: list[dict], console: Console) -> None:
    """One row per cell."""
    table = Table(title="simulator vs real engine (P95 TTFT)")
    for column in ("window", "policy", "sim ms", "engine ms (reps)", "error", "sim late",
                   "engine late (reps)", "sim swaps", "engine swaps (reps)"):
        table.add_column(column, justify="left" if column in ("window", "policy") else "right")
    for c in cells:
        table.add_row(
            f"{c['window'][0]:g}-{c['window'][1]:g}", c["policy"],
            f"{1e3 * c['sim_p95_ttft_s']:.0f}",
            " ".join(f"{1e3 * v:.0f}" for v in c["engine_p95_ttft_s"]),
            f"{c['error']:+.1%}", str(c["sim"]["late"]),
            " ".join(str(r["late"]) for r in c["engine"]),
            str(c["sim"]["swapped_layers"]),
            " ".join(str(r["swapped_layers"]) for r in c["engine"]),
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, replay every cell on both backends, write JSON and PNG."""
    parser = argparse.ArgumentParser(prog="python -m envs.sim_vs_real", description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="its metadata gives trace, time scale, lengths, test windows, "
                        "replica, tick (default: the shipped policy)")
    parser.add_argument("--windows", type=positive_int, default=5,
                        help="how many test windows: the busiest ones (default 5)")
    parser.add_argument("--window-index", default=None,
                        help="comma-separated test-window indices instead of the busiest")
    parser.add_argument("--policies", default=",".join(POLICIES),
                        help=f"comma-separated, of {', '.join(POLICIES)} (default: all)")
    parser.add_argument("--reps", type=positive_int, default=1,
                        help="engine repetitions (the simulator is deterministic)")
    parser.add_argument("--drain-s", type=float, default=60.0,
                        help="longest simulated time to keep serving after a window")
    parser.add_argument("--calibration", default=None,
                        help="the simulator's engine timing from this calibration (envs.calibrate "
                        "on the machine the engine runs on) instead of the checkpoint's, which "
                        "describes the machine it was trained on; SLOs, budget and windows stay "
                        "the checkpoint's")
    parser.add_argument("--out", default="runs/sim-vs-real.json",
                        help="JSON of every cell; the PNG goes beside it")
    args = parser.parse_args(argv)
    try:
        meta, sim_env, indices, policies, timing = load_inputs(args)
    except UsageError as err:
        exit_with(err)
    checkpoint = absolute(args.checkpoint)
    calibration = REPO_ROOT / meta["args"]["calibration"]
    replica = ReplicaConfig(**meta["replica"])
    if not np.isfinite(replica.tpot_slo_s):  # a checkpoint older than the TPOT SLO
        replica = replace(replica, tpot_slo_s=ReplicaConfig.from_calibration(calibration)
                          .tpot_slo_s)
    meta = {**meta, "replica": asdict(replica)}  # both backends judge by the same SLOs
    windows: list[Window] = [tuple(sim_env.windows[i]) for i in indices]
    console = Console()
    console.print(f"{meta['trace']} test windows {indices} (time scale {meta['time_scale']:g}); "
                  f"policies {', '.join(policies)}; {args.reps} engine rep(s); SLO TTFT "
                  f"{1e3 * replica.ttft_slo_s:.1f} ms, TPOT {1e3 * replica.tpot_slo_s:.1f} ms; "
                  f"simulator timing {timing.source if timing else 'of the checkpoint'}")

    sim: dict[tuple[int, str], Replay] = {}
    for i, window in zip(indices, windows, strict=True):
        env = env_from_metadata(meta, [window], calibration=timing)
        for policy in policies:
            sim[i, policy] = simulate(env, policy, checkpoint, args.drain_s)

    model = resolve_model(None)
    vocab = usable_token_ids(model)
    traces = {i: select_window(sim_env.trace, *w) for i, w in zip(indices, windows, strict=True)}
    prompts = {i: [prompt_ids(vocab, r.input_tokens, n) for n, r in enumerate(t.requests)]
               for i, t in traces.items()}
    budget = int(load_replica(calibration)["budget_bytes"])
    profile = str(REPO_ROOT / meta["profile"])
    engine: dict[tuple[int, str], list[tuple[Replay, dict]]] = {k: [] for k in sim}
    out = Path(args.out)
    for rep in range(args.reps):
        for policy in policies:
            log = out.parent / f"{out.stem}-{policy}-rep{rep}.log"
            flags = engine_flags(policy, replica, budget, checkpoint, profile, sim_env.restore)
            console.print(f"[bold]rep {rep}: {policy}[/] server (log {log})")
            try:
                server = start_server(model, None, flags, log)
            except ServerError as err:
                exit_with(err, FAILURE_STATUS)
            try:
                for i in indices:
                    engine[i, policy].append(engine_replay(
                        server, policy, traces[i], prompts[i], replica.ttft_slo_s))
            finally:
                server.stop()
            partial = collect(sim, engine, sim_env.windows)  # kept should a later server fail
            out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=2) + "\n")

    result = collect(sim, engine, sim_env.windows, console)
    result.update(checkpoint=repo_relative(checkpoint), trace=meta["trace"],
                  time_scale=meta["time_scale"], reps=args.reps, policies=policies,
                  windows=[list(w) for w in windows], ttft_slo_s=replica.ttft_slo_s,
                  tpot_slo_s=replica.tpot_slo_s,
                  calibration=repo_relative(args.calibration) if args.calibration
                  else meta["args"]["calibration"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    cells = result["cells"]
    png = out.with_suffix(".png")
    plot(cells, png, f"simulator vs engine: {len(windows)} test windows x {len(policies)} "
                     f"policies\nmedian |error| of P95 TTFT {result['median_abs_error']:.1%}")
    print_cells(cells, console)
    console.print(f"median |error| of P95 TTFT over {len(cells)} cells: "
                  f"{result['median_abs_error']:.1%} (target <= 15%); {out}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
