"""``python -m sglang_morph.bench``: the runtime's speed and memory targets, measured side by side.

Starts one real server (manual policy, a memory budget) and, under a steady decode load,
measures in the same run:
- the swap stall per layer (the scheduler-side commit) against the median decode iteration;
- the KV resize step per segment (grow and shrink);
- KV capacity gained per layer swapped against the freed bytes / KV bytes per token.
Prints a table and writes it as JSON (``--out``); docs/benchmarks.md records the latest figures.
A budget or output path that cannot be used exits with status 2 and one line before the server
starts; a server that fails exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from sglang_morph.cli import (
    FAILURE_STATUS,
    UsageError,
    exit_with,
    output_path,
    positive_int,
    read_input,
)
from sglang_morph.client import MorphClient
from sglang_morph.data import resolve_model
from sglang_morph.memory import parse_budget
from sglang_morph.server_process import Server, ServerError

LOAD_WORKERS = 2
"""Concurrent decode streams kept running, so stalls are measured while serving."""


def _decode_load(server: Server, stop: threading.Event) -> None:
    """Greedy 64-token decodes back to back until ``stop``."""
    while not stop.is_set():
        server.client.post("/generate", {
            "input_ids": [11] * 32, "sampling_params": {
                "max_new_tokens": 64, "ignore_eos": True, "temperature": 0}}, timeout_s=300)


def _swap_cycles(client: MorphClient, reps: int) -> tuple[list[float], list[dict], list[float]]:
    """``reps`` times: quantize each layer alone in the profile's order, then restore all at
    once. Returns every swap stall, each quantize's capacity gain against its freed tokens, and
    each quantize's KV resize step per segment."""
    st0 = client.wait_settled(30)
    bpt, segment = st0["kv_bytes_per_token"], st0["kv_segment_tokens"]
    stalls, gains, resize = [], [], []
    for _ in track(range(reps), description="swap / restore / resize cycles"):
        for layer in st0["layer_order"]:
            before = client.wait_settled(30)
            client.swap([layer], "int4")
            after = client.wait_settled(30)
            stalls.append(after["swap_stall_last_s"])
            fmt = after["layers"][layer]["bytes_by_format"]
            gain = after["kv_capacity_tokens"] - before["kv_capacity_tokens"]
            gains.append({
                "layer": layer,
                "freed_tokens": (fmt["fp"] - fmt["int4"]) / bpt,
                "capacity_gain": gain,
                "segments": max(1, gain // segment),
            })
            resize.append(after["kv_resize_last_step_s"] / gains[-1]["segments"])
        client.swap(list(range(len(st0["layers"]))), "fp")
        stalls.append(client.wait_settled(30)["swap_stall_last_s"])
    return stalls, gains, resize


def run(budget: int, reps: int, model: str) -> dict:
    """Start the server, measure ``reps`` swap cycles under load, stop it; the figures."""
    start = time.perf_counter()
    server = Server(["--morph-policy", "manual", "--morph-memory-budget", str(budget),
                     "--model-path", model])
    healthy_s = time.perf_counter() - start
    stop = threading.Event()
    workers = [threading.Thread(target=_decode_load, args=(server, stop))
               for _ in range(LOAD_WORKERS)]
    for w in workers:
        w.start()
    try:
        stalls, gains, resize = _swap_cycles(server.client, reps)
        state = server.client.state()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=300)
        server.stop()
    stalls.sort()
    resize.sort()
    return {
        "model": Path(model).name,
        "budget_bytes": budget,
        "server_healthy_s": healthy_s,
        "decode_iteration_median_s": state["decode_iteration_median_s"],
        "swap_stall_median_s": stalls[len(stalls) // 2],
        "swap_stall_max_s": stalls[-1],
        "swap_stall_max_over_decode": stalls[-1] / state["decode_iteration_median_s"],
        "kv_resize_step_per_segment_median_s": resize[len(resize) // 2],
        "kv_resize_step_per_segment_max_s": resize[-1],
        "capacity_gain_vs_freed": gains[: len(state["layers"])],  # the first cycle
        "max_gap_tokens": max(g["freed_tokens"] - g["capacity_gain"] for g in gains),
        "cycles": reps,
    }


def print_table(res: dict) -> None:
    """The figures a reader compares with the targets."""
    t = Table(title=f"sglang-morph runtime benchmark ({res['model']}, CPU)")
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_row("server start to healthy", f"{res['server_healthy_s']:.1f} s")
    t.add_row("decode iteration, median", f"{res['decode_iteration_median_s'] * 1e3:.2f} ms")
    t.add_row("swap stall per layer, median / max",
              f"{res['swap_stall_median_s'] * 1e3:.3f} / {res['swap_stall_max_s'] * 1e3:.3f} ms")
    t.add_row("max swap stall / decode iteration", f"{res['swap_stall_max_over_decode']:.3f}")
    t.add_row("KV resize step per segment, median / max",
              f"{res['kv_resize_step_per_segment_median_s'] * 1e3:.3f} / "
              f"{res['kv_resize_step_per_segment_max_s'] * 1e3:.3f} ms")
    t.add_row("freed tokens - capacity gain, worst layer", f"{res['max_gap_tokens']:.1f} tokens")
    Console().print(t)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, measure, write ``--out`` and print the table."""
    p = argparse.ArgumentParser(prog="python -m sglang_morph.bench",
                                description=__doc__.splitlines()[0])
    p.add_argument("--model-path", default=None,
                   help="model directory (default: the embedded stories260K; e.g. a "
                   "`sglang_morph.tiny_model --preset gpu-ratio` model, whose weights dwarf its "
                   "KV as on a GPU)")
    p.add_argument("--budget", default=None,
                   help="memory budget, e.g. 2100000 or 2.1MB (default: the evaluation's "
                   "default budget)")
    p.add_argument("--reps", type=positive_int, default=3,
                   help="swap cycles: every layer quantized one by one, then all restored")
    p.add_argument("--out", type=Path, default=Path("runs/bench_runtime.json"),
                   help="JSON of the figures (default: runs/bench_runtime.json)")
    args = p.parse_args(argv)
    try:
        model = read_input("--model-path", lambda: resolve_model(args.model_path))
        budget = read_input("--budget", lambda: parse_budget(args.budget, model))
        out = output_path("--out", args.out)
    except UsageError as err:
        exit_with(err)
    try:
        res = run(budget, args.reps, model)
    except ServerError as err:
        exit_with(err, FAILURE_STATUS)
    out.write_text(json.dumps(res, indent=2))
    print_table(res)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
