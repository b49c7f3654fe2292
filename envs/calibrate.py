"""``python -m envs.calibrate``: measure the real engine and fit the simulator to it.

Three sources of iteration samples (one scheduler forward each, from ``GET /morph/iterations``):

- ``--launch``: start a real sglang-morph server (manual policy, ``--budget``), drive it (below),
  read its samples, stop it. This is how ``envs/calibrations/stories260K-cpu.json`` is made.
- ``--server URL [--drive]``: a server that is already running, driven first with ``--drive``.
- ``--samples FILE``: a JSON file of samples saved earlier (``--samples-out`` writes one).

Driving: for k = 0..L quantized layers (int4, one more layer per step in the server's importance
order, so each step also times one swap), rounds of 1, 2, 4, 8 and 16 concurrent requests of
random prompt lengths. That varies prefill batch sizes, decode batch sizes and k independently,
which is what the linear model of ``envs.calibration`` needs to identify each coefficient. The
driver also records the replica the simulator must reproduce (KV capacity at each k, layer
count) and the unloaded TTFT, of which 5x is the TTFT SLO (``eval.run``'s default rule).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import requests
from rich.console import Console
from rich.progress import Progress

from envs.calibration import (
    DEFAULT_CALIBRATION,
    CalibrationError,
    IterationModel,
    fit_iteration_model,
    load_calibration,
    parse_samples,
    save_calibration,
)
from eval.replay import measure_unloaded, prompt_ids, usable_token_ids
from eval.traces import LengthMapping, load_trace, map_lengths

_NAN = float("nan")
_UNKNOWN = IterationModel(_NAN, _NAN, _NAN, _NAN, _NAN, source="")
"""Base of ``--base none``: NaN marks what neither the samples nor a flag supplied."""

CONCURRENCY = (1, 2, 4, 8, 16)
OUTPUT_TOKENS = 16
SLO_MULTIPLE = 5.0
"""TTFT SLO = this multiple of the unloaded median TTFT, as ``eval.run`` sets it by default."""


def _state(url: str) -> dict:
    r = requests.get(f"{url}/morph/state", timeout=30)
    r.raise_for_status()
    return r.json()


def _iterations(url: str) -> list[dict]:
    r = requests.get(f"{url}/morph/iterations", params={"limit": 100_000}, timeout=60)
    r.raise_for_status()
    return r.json()


def _swap_one(url: str, layer: int, fmt: str, expect: int) -> tuple[dict, float]:
    """Swap ``layer`` to ``fmt``, wait until the scheduler has ``expect`` quantized layers;
    returns the state and the scheduler stall of that swap (``swap_stall_last_s``)."""
    r = requests.post(f"{url}/morph/swap", json={"layers": [layer], "format": fmt}, timeout=60)
    if r.status_code != 200:
        raise CalibrationError(f"POST /morph/swap refused: {r.text} (start with --morph-policy "
                               "manual)")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = _state(url)
        if state["quantized_layers"] == expect and state["kv_resize_complete"]:
            return state, float(state["swap_stall_last_s"])
        time.sleep(0.05)
    raise CalibrationError(f"layer {layer} did not reach {fmt} within 30 s")


def _round(url: str, vocab: np.ndarray, lengths: list[int], seed: int) -> None:
    """Send ``len(lengths)`` requests at once and wait for all (errors abort calibration)."""

    def one(i: int) -> None:
        body = {"input_ids": prompt_ids(vocab, lengths[i], i, seed),
                "sampling_params": {"max_new_tokens": OUTPUT_TOKENS, "ignore_eos": True,
                                    "temperature": 0.0}}
        r = requests.post(f"{url}/generate", json=body, timeout=600)
        r.raise_for_status()

    with ThreadPoolExecutor(len(lengths)) as pool:
        list(pool.map(one, range(len(lengths))))


def drive(url: str, model_path: str, seed: int = 0) -> dict:
    """Load the server at every k and concurrency (see the module docstring); returns the
    samples file's content: iterations recorded meanwhile, swap stalls, replica, SLO."""
    vocab = usable_token_ids(model_path)
    rng = np.random.default_rng(seed)
    state = _state(url)
    order, num_layers = state["layer_order"], len(state["layers"])
    if state["quantized_layers"]:
        raise CalibrationError("start the drive from a server with every layer in fp")
    trace = map_lengths(load_trace("azure-code"), LengthMapping())
    median_in = int(statistics.median(r.input_tokens for r in trace.requests))
    median_out = max(2, int(statistics.median(r.output_tokens for r in trace.requests)))
    ttft, tpot = asyncio.run(measure_unloaded(url, vocab, median_in, median_out))
    before = len(_iterations(url))
    swaps, capacity = [], [int(state["kv_capacity_tokens"])]
    round_seed = 1000 * seed
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("driving the engine", total=(num_layers + 1) * len(CONCURRENCY))
        for k in range(num_layers + 1):
            if k:
                state, stall = _swap_one(url, order[k - 1], "int4", k)
                swaps.append({"layers": 1, "seconds": stall, "direction": "quantize"})
                capacity.append(int(state["kv_capacity_tokens"]))
            for n in CONCURRENCY:
                round_seed += 1
                _round(url, vocab, rng.integers(8, 240, n).tolist(), round_seed)
                bar.advance(task)
        for k in range(num_layers, 0, -1):
            _, stall = _swap_one(url, order[k - 1], "fp", k - 1)
            swaps.append({"layers": 1, "seconds": stall, "direction": "restore"})
    iterations = _iterations(url)[before:]
    steps = np.diff(capacity)
    return {
        "note": f"measured by envs.calibrate at {time.strftime('%Y-%m-%d %H:%M')}"
        f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        "iterations": iterations,
        "swaps": swaps,
        "replica": {
            "base_capacity_tokens": capacity[0],
            "tokens_per_layer": int(round(float(np.mean(steps)))) if len(steps) else 0,
            "capacity_by_k": capacity,
            "num_layers": num_layers,
            "budget_bytes": state["budget_bytes"],
            "kv_bytes_per_token": state["kv_bytes_per_token"],
            "ttft_slo_s": SLO_MULTIPLE * ttft,
            "unloaded_ttft_s": ttft,
            "unloaded_tpot_s": tpot,
            "unloaded_probe": f"{median_in} in / {median_out} out tokens (azure-code medians)",
        },
    }


def _launch_and_drive(budget: str | None, seed: int) -> dict:
    from sglang_morph.data import resolve_model
    from sglang_morph.memory import default_budget
    from sglang_morph.server_process import Server

    budget = budget or str(default_budget(resolve_model(None)))

    console = Console(stderr=True)
    console.print(f"starting a manual-policy server with budget {budget} ...")
    server = Server(["--morph-policy", "manual", "--morph-memory-budget", budget])
    try:
        return drive(server.url, resolve_model(None), seed)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Obtain samples, fit, print the coefficients and the fit report, write ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m envs.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--launch", action="store_true",
                        help="start a real server, drive it, and fit to its samples")
    source.add_argument("--server", help="base URL of a running sglang-morph server")
    source.add_argument("--samples", help="JSON file of iteration samples")
    parser.add_argument("--drive", action="store_true",
                        help="with --server: drive the load first (manual policy needed)")
    parser.add_argument("--budget", default=None, help="memory budget for --launch (default: "
                        "eval.run's, sglang_morph.memory.default_budget)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the driven prompts")
    parser.add_argument("--out", required=True, help="calibration JSON to write")
    parser.add_argument("--samples-out", help="also save the samples (default with --launch or "
                        "--drive: OUT with -samples.json)")
    parser.add_argument("--base", default=str(DEFAULT_CALIBRATION),
                        help="calibration supplying coefficients the samples cannot identify "
                        "('none': every such coefficient must be given by a flag)")
    parser.add_argument("--source", help="provenance text stored in the file (default: input)")
    parser.add_argument("--prefill-s-per-token", type=float)
    parser.add_argument("--quantized-layer-s", type=float)
    parser.add_argument("--swap-s-per-layer", type=float)
    args = parser.parse_args(argv)
    try:
        if args.launch:
            raw, where = _launch_and_drive(args.budget, args.seed), "measured: --launch"
        elif args.server and args.drive:
            from sglang_morph.data import resolve_model

            url = args.server.rstrip("/")
            raw, where = drive(url, resolve_model(None), args.seed), f"measured: {url}"
        elif args.server:
            url = args.server.rstrip("/") + "/morph/iterations"
            raw, where = requests.get(url, timeout=30).json(), f"measured: {url}"
        else:
            raw = json.loads(Path(args.samples).read_text())
            where = f"samples file: {args.samples}"
        if args.launch or args.drive or args.samples_out:
            samples_out = Path(args.samples_out or str(Path(args.out).with_suffix("")) +
                               "-samples.json")
            samples_out.write_text(json.dumps(raw, indent=1) + "\n")
            where += f" (samples saved in {samples_out.name})"
        fallback = _UNKNOWN if args.base == "none" else load_calibration(args.base)
        overrides = {
            "per_prefill_token_s": args.prefill_s_per_token,
            "per_quantized_layer_s": args.quantized_layer_s,
            "swap_s_per_layer": args.swap_s_per_layer,
        }
        fallback = replace(fallback, **{k: v for k, v in overrides.items() if v is not None})
        samples, swaps = parse_samples(raw)
        model, report = fit_iteration_model(samples, fallback, swaps, args.source or where)
        unknown = [n for n in report["from_fallback"] if math.isnan(getattr(model, n))]
        if unknown:
            raise CalibrationError(
                f"the samples cannot identify {', '.join(unknown)}; give them with flags or --base"
            )
    except (CalibrationError, OSError, ValueError, requests.RequestException) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if isinstance(raw, dict) and "note" in raw:
        report["samples_note"] = raw["note"]
    replica = raw.get("replica") if isinstance(raw, dict) else None
    save_calibration(model, report, args.out, replica)
    print(f"source: {model.source}")
    for name in ("base_s", "per_prefill_token_s", "per_decode_req_s", "per_quantized_layer_s",
                 "swap_s_per_layer"):
        origin = ("from --base or flag" if name in report["from_fallback"] else
                  "fitted negative, clamped to 0" if name in report["clamped_to_zero"] else
                  "fitted")
        print(f"  {name:24s} {getattr(model, name) * 1e3:9.4f} ms  ({origin})")
    print(f"  samples {report['samples']}, {report['method']}: median relative error "
          f"{report['median_rel_error']:.1%}, max {report['max_rel_error']:.1%}, "
          f"R^2 {report['r2']:.4f}")
    if replica:
        print(f"  replica {replica}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
