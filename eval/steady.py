"""``python -m eval.steady``: does a morphing controller sit still under a steady load?

A controller that quantizes and restores while the load does not change pays swap stalls and
quality for nothing; an independent reproduction of MorphServe found its closed-loop controller
doing exactly that under low load. This measures full precision's capacity on this machine
(``eval.capacity``), then serves constant-rate Poisson arrivals at ``--load`` of it (request
shapes drawn from the trace) for ``--warmup-minutes`` and then ``--minutes`` under each of
``--policies`` in turn, one server each, started as a user would start it (no SLO options: the
server derives its targets at warm-up). ``/morph/state`` is read every
``eval.servers.STATE_POLL_S`` to count layer transitions per minute. Target: at most
``--max-per-minute`` in every measured minute, for every policy. The warm-up minutes are the
step from an idle server to the load (a load that needs four int4 layers takes four
transitions to reach, however good the controller); their transitions are reported beside the
measured ones, not judged.
Writes JSON and a PNG (int4 layers over time per policy); exits 1 when a policy misses the
target, a request fails or the RL policy fell back to the heuristic, 2 on unusable input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from eval.capacity import CAPACITY_PROBE_S, fp_capacity
from eval.replay import Replayer, prompt_ids, usable_token_ids
from eval.servers import DEFAULT_RL_CHECKPOINT, replay_polling, start_server, system_flags
from eval.traces import LengthMapping, TraceRequest, load_trace, map_lengths, poisson_load
from sglang_morph.cli import (
    FAILURE_STATUS,
    UsageError,
    exit_with,
    output_path,
    positive_float,
    positive_int,
    read_input,
)
from sglang_morph.data import resolve_model
from sglang_morph.memory import default_budget
from sglang_morph.paths import absolute, repo_relative
from sglang_morph.server_process import ServerError

console = Console(stderr=True)
SYSTEM = {"heuristic": "morph-heuristic", "rl": "morph-rl"}
"""The policies this benchmark serves, as ``eval.servers`` names their systems."""


def per_minute(timeline: list[dict], minutes: int) -> list[int]:
    """Layer transitions in each minute, from the counter's readings (the last reading at or
    before each minute's end minus the one before its start)."""
    def reading_at(t: float) -> int:
        before = [row["transitions"] for row in timeline
                  if row["t"] <= t and row.get("transitions") is not None]
        return before[-1] if before else 0

    return [reading_at(60.0 * (m + 1)) - reading_at(60.0 * m) for m in range(minutes)]


def run_policy(policy: str, model: str, budget: int, checkpoint: str,
               requests: tuple[TraceRequest, ...], prompts: list[list[int]], warmup: int,
               minutes: int, log: Path) -> dict:
    """One policy's server under the load: transitions per minute (the ``warmup`` minutes
    apart) and what the server ran; P95 TTFT over the requests of the measured minutes."""
    server = start_server(model, None, system_flags(SYSTEM[policy], budget, checkpoint), log)
    try:
        server.client.state()
        timeline: list[dict] = []
        replayer = Replayer(server.url, requests, prompts, label=f"steady {policy}")
        asyncio.run(replay_polling(replayer, server.url, timeline))
        end = server.client.state()
    finally:
        server.stop()
    ttfts = [r.ttft_s for r in replayer.records
             if r.ok and r.ttft_s is not None and r.arrival_s >= 60.0 * warmup]
    counts = per_minute(timeline, warmup + minutes)
    return {
        "policy": policy,
        "ran": {"policy": end.get("policy"), "fallbacks": end.get("fallbacks", 0),
                "policy_loaded": end.get("policy_loaded") and repo_relative(end["policy_loaded"]),
                "profile": end.get("profile") and repo_relative(end["profile"]),
                "ttft_slo_s": end.get("ttft_slo_s"),
                "targets_source": end.get("targets_source"),
                "restore_window_range_s": end.get("restore_window_range_s"),
                "restore_window_s_at_end": end.get("restore_window_s"),
                "held_restores": end.get("held_restores"),
                "restore_load_drop": end.get("restore_load_drop")},
        "warmup_transitions_per_minute": counts[:warmup],
        "transitions_per_minute": counts[warmup:],
        "transitions": end.get("transitions"),
        "failed_requests": sum(not r.ok for r in replayer.records),
        "p95_ttft_s": float(np.percentile(ttfts, 95)) if ttfts else None,
        "layers": [[row["t"], row.get("quantized_layers")] for row in timeline],
    }


def problems(result: dict, max_per_minute: int) -> list[str]:
    """Why a policy's run misses the target or did not measure the policy (empty: it passed)."""
    out = []
    worst = max(result["transitions_per_minute"], default=0)
    if worst > max_per_minute:
        out.append(f"{worst} transitions in one minute (target <= {max_per_minute})")
    if result["ran"]["policy"] != result["policy"]:
        out.append(f"the server ran policy {result['ran']['policy']!r}")
    if result["ran"]["fallbacks"]:
        out.append(f"{result['ran']['fallbacks']} ticks fell back to the heuristic")
    if result["failed_requests"]:
        out.append(f"{result['failed_requests']} requests failed")
    return out


def plot(results: list[dict], warmup: int, path: Path, title: str) -> None:
    """int4 layers over time, one line per policy, the warm-up shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for r in results:
        points = [(t, k) for t, k in r["layers"] if k is not None]
        if points:
            t, k = zip(*points, strict=True)
            ax.step(t, k, where="post",
                    label=f"{r['policy']} ({sum(r['transitions_per_minute'])} transitions "
                    "after warm-up)")
    if warmup:
        ax.axvspan(0.0, 60.0 * warmup, color="0.9", label="warm-up (not judged)")
    ax.set(xlabel="seconds", ylabel="int4 layers", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure capacity, serve each policy, judge, write JSON and PNG."""
    parser = argparse.ArgumentParser(prog="python -m eval.steady", description=__doc__)
    parser.add_argument("--minutes", type=positive_int, default=5,
                        help="measured minutes (default 5)")
    parser.add_argument("--warmup-minutes", type=int, default=1,
                        help="minutes of the same load before the measured ones, reported "
                        "but not judged (default 1; 0: judge from the first arrival)")
    parser.add_argument("--load", type=positive_float, default=0.6,
                        help="arrival rate as a fraction of fp capacity (default 0.6)")
    parser.add_argument("--policies", default="heuristic,rl",
                        help=f"comma-separated, of {', '.join(SYSTEM)}")
    parser.add_argument("--rl-checkpoint", default=DEFAULT_RL_CHECKPOINT)
    parser.add_argument("--trace", default="azure-code",
                        help="whose request shapes are drawn (default azure-code)")
    parser.add_argument("--max-per-minute", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/steady.json",
                        help="JSON; the PNG and server logs go beside it")
    args = parser.parse_args(argv)
    try:
        policies = [p.strip() for p in args.policies.split(",") if p.strip()]
        if not policies or any(p not in SYSTEM for p in policies):
            raise UsageError(f"--policies {args.policies}: accepted: {', '.join(SYSTEM)}")
        if args.warmup_minutes < 0:
            raise UsageError(f"--warmup-minutes {args.warmup_minutes}: expected 0 or more")
        if args.load > 2:
            raise UsageError(f"--load {args.load:g}: expected a fraction of capacity in (0, 2]")
        checkpoint = absolute(args.rl_checkpoint)
        if "rl" in policies and not Path(checkpoint).is_file():
            raise UsageError(f"--rl-checkpoint {args.rl_checkpoint}: no such file")
        model = read_input("the embedded model", lambda: resolve_model(None))
        trace = read_input("--trace", lambda: map_lengths(load_trace(args.trace),
                                                          LengthMapping()))
        out = output_path("--out", absolute(args.out))
    except UsageError as err:
        exit_with(err)
    budget = default_budget(model)
    vocab = usable_token_ids(model)

    try:
        console.print(f"measuring fp capacity ({CAPACITY_PROBE_S:.0f} s closed loop) ...")
        capacity = fp_capacity(model, budget, trace, vocab, args.seed)
        rate = args.load * capacity
        total = args.warmup_minutes + args.minutes
        requests = poisson_load(trace, rate, 60.0 * total, args.seed)
        prompts = [prompt_ids(vocab, r.input_tokens, i, args.seed)
                   for i, r in enumerate(requests)]
        console.print(f"fp capacity {capacity:.2f} req/s; Poisson arrivals at {rate:.2f} req/s "
                      f"({args.load:.0%}), {len(requests)} requests over {total} min "
                      f"({args.warmup_minutes} warm-up)")
        results = [run_policy(p, model, budget, checkpoint, requests, prompts,
                              args.warmup_minutes, args.minutes,
                              out.parent / f"{out.stem}-{p}.log") for p in policies]
    except ServerError as err:
        exit_with(err, FAILURE_STATUS)

    table = Table(title=f"steady load: {args.load:.0%} of fp capacity ({rate:.2f} req/s)")
    for column in ("policy", "warm-up transitions", "transitions per minute", "P95 TTFT ms",
                   "failed", "verdict"):
        table.add_column(column)
    failed = False
    for r in results:
        found = problems(r, args.max_per_minute)
        r["problems"] = found
        failed |= bool(found)
        p95 = r["p95_ttft_s"]
        table.add_row(r["policy"], " ".join(map(str, r["warmup_transitions_per_minute"])),
                      " ".join(map(str, r["transitions_per_minute"])),
                      "-" if p95 is None else f"{1e3 * p95:.0f}", str(r["failed_requests"]),
                      "; ".join(found) or "ok")
    Console().print(table)
    out.write_text(json.dumps({
        "fp_capacity_req_s": capacity, "load": args.load, "rate_req_s": rate,
        "minutes": args.minutes, "warmup_minutes": args.warmup_minutes,
        "requests": len(requests), "seed": args.seed,
        "rl_checkpoint": repo_relative(checkpoint), "max_per_minute": args.max_per_minute,
        "policies": results,
    }, indent=1) + "\n")
    plot(results, args.warmup_minutes, out.with_suffix(".png"),
         f"steady Poisson load at {args.load:.0%} of fp capacity ({rate:.2f} req/s)")
    console.print(f"-> {out} and {out.with_suffix('.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
