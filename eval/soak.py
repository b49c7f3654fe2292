"""``python -m eval.soak``: an hour of steady serving, watched for anything that grows.

A morphing server (heuristic policy, the default budget) serves a looping Azure trace at a
fraction of full precision's capacity for ``--minutes``. Each minute it prints, and writes to
``--out``, the resident memory and open file descriptors of every server process, the iteration
log's bytes on disk and the sizes of the runtime's internal buffers (``/morph/state``'s
``internal_sizes``). It exits 1 when a request fails, when a buffer or the log exceeds the bound
the runtime declares for it (``internal_bounds``), or when memory or descriptors grow by more
than ``--max-growth`` between the early and the late part of the run (after a warm-up).

Full precision's capacity is measured first, on a ``--morph-policy off`` server under a closed
loop of the trace's request shapes, so that "70% load" means 70% of what this machine serves.
Input that cannot be used exits with status 2 and one line before any server starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from eval.capacity import CAPACITY_PROBE_S, fp_capacity
from eval.replay import Replayer, prompt_ids, usable_token_ids
from eval.traces import LengthMapping, Trace, TraceError, load_trace, map_lengths, scale_time
from sglang_morph.cli import FAILURE_STATUS, UsageError, exit_with, output_path, read_input
from sglang_morph.data import resolve_model
from sglang_morph.memory import default_budget
from sglang_morph.paths import absolute
from sglang_morph.server_process import Server, ServerError, process_tree, rss_bytes

console = Console(stderr=True)
WARMUP_MIN = 5


@dataclass(frozen=True)
class Load:
    """The looping request stream: the trace's shapes, arrivals scaled to the wanted rate."""

    trace: Trace
    period_s: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.soak", description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=int, default=60, help="soak length (default: 60)")
    p.add_argument("--load", type=float, default=0.7,
                   help="arrival rate as a fraction of fp capacity (default: 0.7)")
    p.add_argument("--trace", default="azure-code", help="trace to loop (default: azure-code)")
    p.add_argument("--trace-minutes", type=float, default=10.0,
                   help="minutes of the source trace that loop (default: 10)")
    p.add_argument("--max-growth", type=float, default=0.05,
                   help="allowed growth of any watched figure after warm-up (default: 0.05)")
    p.add_argument("--out", default="runs/soak.json", help="per-minute figures (JSON)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.minutes < 2 or not 0 < args.load <= 2 or args.trace_minutes <= 0:
        p.error("--minutes must be >= 2, --load in (0, 2], --trace-minutes > 0")
    return args


def looping_load(trace: Trace, minutes: float, rate: float) -> Load:
    """The first ``minutes`` of ``trace``, time-scaled so its mean arrival rate is ``rate``."""
    window = tuple(r for r in trace.requests if r.arrival_s < minutes * 60)
    if len(window) < 2:
        raise TraceError(f"{trace.name}: fewer than 2 requests in its first {minutes} minutes")
    native = len(window) / (minutes * 60)
    scaled = scale_time(Trace(trace.name, window, trace.meta), rate / native)
    return Load(scaled, minutes * 60 / (rate / native))


def minute_of_requests(load: Load, minute: int):
    """Arrivals of minute ``minute`` of the loop, relative to that minute's start."""
    lo, hi = minute * 60.0, (minute + 1) * 60.0
    out = []
    for lap in range(int(lo // load.period_s), int(hi // load.period_s) + 1):
        base = lap * load.period_s
        for r in load.trace.requests:
            t = base + r.arrival_s
            if lo <= t < hi:
                out.append(replace(r, arrival_s=t - lo))
    return out


def process_figures(root_pid: int) -> dict:
    """Resident bytes and open descriptors of the launcher and each of its descendants."""
    figures = {}
    for pid in process_tree(root_pid):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            rss = rss_bytes(pid)
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue  # exited between the listing and the read
        figures[f"{name}[{pid}]"] = {"rss_bytes": rss, "open_fds": fds}
    return figures


def flatten(row: dict) -> dict[str, float]:
    """Every watched figure of one minute, by name."""
    flat = {}
    for proc, figs in row["processes"].items():
        for key, value in figs.items():
            flat[f"{proc}.{key}"] = value
    for key, value in row["internal_sizes"].items():
        flat[f"runtime.{key}"] = value
    flat["iteration_log_bytes"] = row["iteration_log_bytes"]
    return flat


def bounds_of(row: dict) -> dict[str, float]:
    """The declared bound of each watched figure that has one (the runtime's buffers and its
    iteration log), by the names of ``flatten``."""
    declared = dict(row.get("internal_bounds", {}))
    out = {f"runtime.{k}": v for k, v in declared.items() if k != "iteration_log_bytes"}
    if "iteration_log_bytes" in declared:
        out["iteration_log_bytes"] = declared["iteration_log_bytes"]
    return out


def growth(rows: list[dict], warmup: int) -> dict[str, float]:
    """Per figure: the late third's maximum over the early third's (after warm-up), minus 1.

    Maxima, not single minutes, so that a load that repeats in cycles reads as flat while
    steady growth does not."""
    late_rows = rows[warmup:]
    third = max(1, len(late_rows) // 3)
    early = [flatten(r) for r in late_rows[:third]]
    late = [flatten(r) for r in late_rows[-third:]]
    out = {}
    for key in early[0]:
        before = max(e.get(key, 0) for e in early)
        after = max(r.get(key, 0) for r in late)
        out[key] = (after - before) / before if before > 0 else (0.0 if after == 0 else 1.0)
    return out


def judge(rows: list[dict], warmup: int, max_growth: float) -> dict[str, str]:
    """What failed, by figure. A figure with a declared bound fails only by exceeding it (a
    buffer or log that fills toward its bound during the hour is doing what it was built to
    do); every other figure (memory, descriptors) fails by growing past ``max_growth``."""
    bounds = bounds_of(rows[-1])
    failures = {}
    for key, bound in bounds.items():
        worst = max(flatten(r).get(key, 0) for r in rows)
        if worst > bound:
            failures[key] = f"{worst:g} above its bound {bound:g}"
    for key, g in growth(rows, warmup).items():
        if key not in bounds and g > max_growth:
            failures[key] = f"grew {g:+.1%} after warm-up"
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        model = read_input("the embedded model", lambda: resolve_model(None))
        trace = read_input("--trace", lambda: map_lengths(load_trace(args.trace),
                                                          LengthMapping()))
        read_input("--trace-minutes", lambda: looping_load(trace, args.trace_minutes, 1.0))
        out = output_path("--out", absolute(args.out))
    except UsageError as err:
        exit_with(err)
    budget = default_budget(model)
    vocab = usable_token_ids(model)

    try:
        console.print(f"measuring fp capacity ({CAPACITY_PROBE_S:.0f} s closed loop) ...")
        capacity = fp_capacity(model, budget, trace, vocab, args.seed)
        rate = args.load * capacity
        load = looping_load(trace, args.trace_minutes, rate)
        console.print(f"fp capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s "
                      f"({args.load:.0%}) for {args.minutes} min, loop period "
                      f"{load.period_s:.0f} s")
        server = Server(["--model-path", model, "--morph-policy", "heuristic",
                         "--morph-memory-budget", str(budget)])
    except ServerError as err:
        exit_with(err, FAILURE_STATUS)
    rows: list[dict] = []
    failed = 0
    try:
        for minute in range(args.minutes):
            reqs = minute_of_requests(load, minute)
            prompts = [prompt_ids(vocab, r.input_tokens, minute * 100_000 + i, args.seed)
                       for i, r in enumerate(reqs)]
            records = asyncio.run(Replayer(server.url, reqs, prompts, progress=False).run())
            failed += sum(not r.ok for r in records)
            state = server.client.state()
            rows.append({
                "minute": minute + 1,
                "requests": len(records),
                "failed": sum(not r.ok for r in records),
                "quantized_layers": state.get("quantized_layers"),
                "transitions": state.get("transitions"),
                "processes": process_figures(server.proc.pid),
                "internal_sizes": state.get("internal_sizes", {}),
                "internal_bounds": state.get("internal_bounds", {}),
                "iteration_log_bytes": state.get("iteration_log_bytes", 0),
            })
            _print_row(rows[-1])
            out.write_text(json.dumps({"rate_req_s": rate, "fp_capacity_req_s": capacity,
                                       "minutes": rows}, indent=1))
    finally:
        server.stop()

    warmup = min(WARMUP_MIN, len(rows) // 2)
    grown = growth(rows, warmup)
    failures = judge(rows, warmup, args.max_growth)
    unbounded = {k: v for k, v in grown.items() if k not in bounds_of(rows[-1])}
    worst = max(unbounded.items(), key=lambda kv: kv[1])
    result = {"rate_req_s": rate, "fp_capacity_req_s": capacity, "minutes": rows,
              "growth": grown, "failures": failures, "failed_requests": failed,
              "ok": not failures and failed == 0}
    out.write_text(json.dumps(result, indent=1))
    console.print(f"largest growth after warm-up of an unbounded figure: {worst[0]} "
                  f"{worst[1]:+.1%}; failed requests {failed}; figures in {out}")
    if failures or failed:
        for key, why in sorted(failures.items()):
            console.print(f"[red]FAIL[/red] {key}: {why}")
        if failed:
            console.print(f"[red]FAIL[/red]: {failed} requests failed")
        return 1
    console.print("[green]OK[/green]: nothing grew, no request failed")
    return 0


def _print_row(row: dict) -> None:
    rss = sum(p["rss_bytes"] for p in row["processes"].values())
    fds = sum(p["open_fds"] for p in row["processes"].values())
    sizes = " ".join(f"{k}={v}" for k, v in sorted(row["internal_sizes"].items()))
    console.print(f"min {row['minute']:3d}: {row['requests']} req ({row['failed']} failed), "
                  f"k={row['quantized_layers']}, RSS {rss / 2**20:.1f} MiB, fds {fds}, "
                  f"log {row['iteration_log_bytes'] / 1e6:.2f} MB, {sizes}")


if __name__ == "__main__":
    sys.exit(main())
