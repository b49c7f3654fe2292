"""``python -m envs.calibrate``: measure the real engine and fit the simulator to it.

Three sources of iteration samples (one scheduler-loop pass each, ``GET /morph/iterations``):

- ``--launch``: start a real sglang-morph server (manual policy, ``--budget``), drive it (below),
  read its samples, stop it. This is how ``envs/calibrations/stories260K-cpu.json`` is made.
- ``--server URL [--drive]``: a server that is already running, driven first with ``--drive``.
- ``--samples FILE``: a JSON file of samples saved earlier (``--samples-out`` writes one).

Driving: two replays from the trace's training part (``--trace``, ``--time-scale``, the default
length mapping), each at k = 0 and at k = L quantized layers (int4, stepping one layer at a time
in the server's importance order, which times each swap): the training window with the most
requests (``--window-s``, the unit training and evaluation use) and the burstiest ``--burst-s``
seconds (a burst far past capacity). They go through ``eval.replay``'s streaming client while
/morph/state is read every ``eval.servers.STATE_POLL_S``, as in evaluation: arrivals spread over
time, every token streamed through the detokenizer, tokenizer manager and HTTP on the same
cores. Synthetic rounds of non-streamed concurrent requests see less of that loop overhead than
replays do, and a simulator fitted to them queues too little. The two loads are both needed: a
linear model fitted to either alone misses the busy time of a held-out window (the two in
opposite directions), fitted to both it does not (docs/controller.md has the figures). The
driver also records the replica the simulator must reproduce (KV capacity at each k, layer
count) and the unloaded TTFT, a multiple of which is the TTFT SLO (``eval.run``'s default rule).

Input that cannot be used (a flag's value, a file it names) exits with status 2 and one line
before any server starts; a failure while measuring or fitting exits with status 1.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import requests
from rich.console import Console
from rich.progress import Progress

from envs.calibration import (
    COEFFICIENTS,
    CalibrationError,
    IterationModel,
    fit_iteration_model,
    load_calibration,
    parse_samples,
    save_calibration,
)
from envs.morph_env import TRAIN_FRAC, prepare_trace, split_windows
from eval.replay import Replayer, probe_prompts, prompt_ids, usable_token_ids
from eval.servers import STATE_POLL_S
from eval.traces import LengthMapping, Trace, TraceError, burstiest_window, select_window
from sglang_morph.cli import (
    FAILURE_STATUS,
    UsageError,
    exit_with,
    output_path,
    positive_float,
    read_input,
)
from sglang_morph.client import MorphClient, MorphRequestError
from sglang_morph.config import UNLOADED_SLO_MULTIPLE
from sglang_morph.data import resolve_model
from sglang_morph.memory import parse_budget
from sglang_morph.paths import DEFAULT_CALIBRATION
from sglang_morph.server_process import Server, ServerError

_NAN = float("nan")
_UNKNOWN = IterationModel(_NAN, _NAN, _NAN, _NAN, _NAN, source="", response_s=_NAN,
                          per_context_token_s=_NAN)
"""Base of ``--base none``: NaN marks what neither the samples nor a flag supplied."""

PROBE_REQUESTS = 5
"""Sequential requests of the unloaded-latency probe the SLO is a multiple of."""


def _iterations(url: str) -> list[dict]:
    return MorphClient(url).iterations()


def _swap_one(url: str, layer: int, fmt: str, expect: int) -> tuple[dict, float]:
    """Swap ``layer`` to ``fmt``, wait until the scheduler has ``expect`` quantized layers;
    returns the state and the scheduler stall of that swap (``swap_stall_last_s``)."""
    client = MorphClient(url)
    try:
        client.swap([layer], fmt)
    except MorphRequestError as err:
        raise CalibrationError(f"swap refused: {err} (start with --morph-policy manual)") from err
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = client.state()
        if state["quantized_layers"] == expect and state["kv_resize_complete"]:
            return state, float(state["swap_stall_last_s"])
        time.sleep(0.05)
    raise CalibrationError(f"layer {layer} did not reach {fmt} within 30 s")


def _replay(url: str, vocab: np.ndarray, load: Trace, seed: int) -> None:
    """Replay ``load`` open-loop through ``eval.replay``'s streaming client and wait for
    every request (a failed one aborts calibration). Prompts are seeded per call, so no replay
    hits the radix cache of an earlier one."""
    prompts = [prompt_ids(vocab, r.input_tokens, i, seed) for i, r in enumerate(load.requests)]
    records = asyncio.run(_observed(Replayer(url, load.requests, prompts, progress=False)))
    failed = [r for r in records if not r.ok]
    if failed:
        raise CalibrationError(f"{len(failed)} of {len(records)} replayed requests failed, "
                               f"first: {failed[0].error}")


async def _observed(replayer: Replayer) -> list:
    """Run the replay while reading /morph/state as the harness and the engine environment do
    (``STATE_POLL_S``): each read runs in the scheduler loop, and the simulator must include
    that time to match them."""
    client = MorphClient(replayer.base_url)
    poller = asyncio.create_task(client.poll_state(lambda state: None, STATE_POLL_S))
    try:
        return await replayer.run()
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


def drive_loads(
    trace: Trace, window_s: float, burst_s: float, train_frac: float = TRAIN_FRAC
) -> list[Trace]:
    """What the drive replays, all from the trace's training part (calibration never replays
    held-out seconds): the training window (``envs.morph_env.split_windows``) with the most
    requests, and the burstiest ``burst_s`` seconds, a burst far past capacity."""
    train, _ = split_windows(trace, window_s, train_frac)
    window = max((select_window(trace, *w) for w in train), key=lambda t: len(t.requests))
    part = select_window(trace, 0.0, trace.duration_s * train_frac)
    return [window, select_window(part, *burstiest_window(part, burst_s))]


def drive(url: str, model_path: str, loads: list[Trace], seed: int = 0) -> dict:
    """Replay each of ``loads`` with no layer and with every layer in int4, stepping one layer
    at a time in between (see the module docstring); returns the samples file's content:
    iterations recorded meanwhile, swap stalls, replica, SLO."""
    vocab = usable_token_ids(model_path)
    client = MorphClient(url)
    state = client.state()
    order, num_layers = state["layer_order"], len(state["layers"])
    if state["quantized_layers"]:
        raise CalibrationError("start the drive from a server with every layer in fp")
    median_in = int(statistics.median(r.input_tokens for r in loads[0].requests))
    median_out = max(2, int(statistics.median(r.output_tokens for r in loads[0].requests)))
    probe = probe_prompts(vocab, median_in, PROBE_REQUESTS)
    ttft, tpot = client.unloaded_latency(probe, median_out)
    before = len(_iterations(url))
    swaps, capacity = [], [int(state["kv_capacity_tokens"])]
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task(f"replaying {' + '.join(str(len(t.requests)) for t in loads)} "
                            f"requests at k = 0 and {num_layers}", total=2 * len(loads))
        for i, load in enumerate(loads):
            _replay(url, vocab, load, 1000 * seed + i)
            bar.advance(task)
        for k in range(1, num_layers + 1):
            state, stall = _swap_one(url, order[k - 1], "int4", k)
            swaps.append({"layers": 1, "seconds": stall, "direction": "quantize"})
            capacity.append(int(state["kv_capacity_tokens"]))
        for i, load in enumerate(loads):
            _replay(url, vocab, load, 1000 * seed + len(loads) + i)
            bar.advance(task)
        for k in range(num_layers, 0, -1):
            _, stall = _swap_one(url, order[k - 1], "fp", k - 1)
            swaps.append({"layers": 1, "seconds": stall, "direction": "restore"})
    iterations = _iterations(url)[before:]
    steps = np.diff(capacity)
    return {
        "note": f"measured by envs.calibrate at {time.strftime('%Y-%m-%d %H:%M')}"
        f" (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)",
        "drive": [load.meta for load in loads],
        "iterations": iterations,
        "swaps": swaps,
        "replica": {
            "base_capacity_tokens": capacity[0],
            "tokens_per_layer": int(round(float(np.mean(steps)))) if len(steps) else 0,
            "capacity_by_k": capacity,
            "num_layers": num_layers,
            "budget_bytes": state["budget_bytes"],
            "kv_bytes_per_token": state["kv_bytes_per_token"],
            "kv_floor_tokens": state["kv_min_tokens"],
            "kv_segment_tokens": state["kv_segment_tokens"],
            "ttft_slo_s": UNLOADED_SLO_MULTIPLE * ttft,
            "unloaded_ttft_s": ttft,
            "unloaded_tpot_s": tpot,
            "unloaded_prefill_tokens": median_in,
            "unloaded_probe": f"{median_in} in / {median_out} out tokens (medians of the window)",
        },
    }


def _launch_and_drive(budget: int, loads: list[Trace], seed: int) -> dict:
    """Drive a fresh manual-policy server of the embedded model."""
    Console(stderr=True).print(f"starting a manual-policy server with budget {budget} ...")
    server = Server(["--morph-policy", "manual", "--morph-memory-budget", str(budget)])
    try:
        return drive(server.url, resolve_model(None), loads, seed)
    finally:
        server.stop()


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sample source, the drive's load, the fit's fallbacks, the output."""
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
    parser.add_argument("--trace", default="azure-code", help="trace whose training part drives "
                        "the engine (default: azure-code)")
    parser.add_argument("--time-scale", type=positive_float, default=0.25,
                        help="speed-up of the driving trace, as in training and eval.run "
                        "(default: 0.25)")
    parser.add_argument("--window-s", type=positive_float, default=60.0,
                        help="length of the training windows, as in training (default: 60)")
    parser.add_argument("--burst-s", type=positive_float, default=30.0,
                        help="length of the burst slice (default: 30)")
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
    return parser


@dataclass(frozen=True)
class Inputs:
    """What the flags name, read before any server starts."""

    samples: Any | None
    """The decoded ``--samples`` file, or None when the samples are to be measured."""
    loads: list[Trace] | None
    """What the drive replays (``--launch``, ``--drive``)."""
    budget: int | None
    """The memory budget of ``--launch``'s server."""
    fallback: IterationModel
    out: Path
    samples_out: Path | None


def check_inputs(args: argparse.Namespace) -> Inputs:
    """Every file and value the flags name, checked before any server starts or any sample is
    taken; UsageError naming the option that cannot be used."""
    if args.drive and not args.server:
        raise UsageError("--drive drives the server given with --server URL (--launch always "
                         "drives the server it starts)")
    fallback = read_input("--base", lambda: fallback_model(args))
    samples = None
    if args.samples:
        samples = read_input("--samples", lambda: _read_samples(Path(args.samples)))
    loads = budget = None
    if args.launch or args.drive:
        loads = read_input("--trace", lambda: drive_loads(
            prepare_trace(args.trace, LengthMapping(), args.time_scale), args.window_s,
            args.burst_s))
    if args.launch:
        budget = read_input("--budget", lambda: parse_budget(args.budget, resolve_model(None)))
    samples_out = args.samples_out
    if samples_out is None and (args.launch or args.drive):
        samples_out = str(Path(args.out).with_suffix("")) + "-samples.json"
    return Inputs(
        samples, loads, budget, fallback, output_path("--out", args.out),
        output_path("--samples-out", samples_out) if samples_out else None,
    )


def _read_samples(path: Path) -> Any:
    """A samples file's decoded JSON, checked to hold usable samples."""
    raw = json.loads(path.read_text())
    parse_samples(raw)
    return raw


def collect_samples(args: argparse.Namespace, inputs: Inputs) -> tuple[Any, str]:
    """The samples (decoded JSON) from the source the flags name, and where they came from."""
    if inputs.samples is not None:
        return inputs.samples, f"samples file: {args.samples}"
    url = args.server.rstrip("/") if args.server else None
    if url is not None and not args.drive:
        return _iterations(url), f"measured: {url}/morph/iterations"
    assert inputs.loads is not None
    if url is None:
        assert inputs.budget is not None
        return _launch_and_drive(inputs.budget, inputs.loads, args.seed), "measured: --launch"
    return drive(url, resolve_model(None), inputs.loads, args.seed), f"measured: {url}"


def save_samples(raw: Any, path: Path) -> str:
    """Write the samples compactly (they are refitted later, never read by hand); returns the
    note for the calibration's provenance."""
    path.write_text(json.dumps(raw, separators=(",", ":")) + "\n")
    return f" (samples saved in {path.name})"


def fallback_model(args: argparse.Namespace) -> IterationModel:
    """Where the coefficients the samples cannot identify come from: ``--base`` (or NaN with
    ``none``), each overridden by its flag when given."""
    fallback = _UNKNOWN if args.base == "none" else load_calibration(args.base)
    overrides = {
        "per_prefill_token_s": args.prefill_s_per_token,
        "per_quantized_layer_s": args.quantized_layer_s,
        "swap_s_per_layer": args.swap_s_per_layer,
    }
    return replace(fallback, **{k: v for k, v in overrides.items() if v is not None})


def fit(
    raw: Any, fallback: IterationModel, source: str
) -> tuple[IterationModel, dict, dict | None]:
    """The fitted model, its report and the measured replica (None in a plain sample list);
    UsageError if a coefficient is left unknown (a flag or ``--base`` must give it)."""
    samples, swaps = parse_samples(raw)
    replica = raw.get("replica") if isinstance(raw, dict) else None
    unloaded = ((int(replica["unloaded_prefill_tokens"]), float(replica["unloaded_ttft_s"]))
                if replica and "unloaded_prefill_tokens" in replica else None)
    model, report = fit_iteration_model(samples, fallback, swaps, source, unloaded)
    unknown = [n for n in report["from_fallback"] if math.isnan(getattr(model, n))]
    if unknown:
        raise UsageError(
            f"the samples cannot identify {', '.join(unknown)}; give them with flags or --base"
        )
    if isinstance(raw, dict) and "note" in raw:
        report["samples_note"] = raw["note"]
    return model, report, replica


def print_fit(model: IterationModel, report: dict, replica: dict | None) -> None:
    """Each coefficient with its origin, then the fit's quality and the replica."""
    print(f"source: {model.source}")
    for name in (*COEFFICIENTS, "swap_s_per_layer", "response_s"):
        origin = ("from --base or flag" if name in report["from_fallback"] else
                  "fitted negative, clamped to 0" if name in report["clamped_to_zero"] else
                  "fitted")
        print(f"  {name:24s} {getattr(model, name) * 1e3:9.4f} ms  ({origin})")
    print(f"  samples {report['samples']}, {report['method']}: median relative error "
          f"{report['median_rel_error']:.1%}, max {report['max_rel_error']:.1%}, "
          f"R^2 {report['r2']:.4f}")
    if replica:
        print(f"  replica {replica}")


def main(argv: list[str] | None = None) -> int:
    """Obtain samples, fit, print the coefficients and the fit report, write ``--out``."""
    args = build_parser().parse_args(argv)
    try:
        inputs = check_inputs(args)
    except UsageError as err:
        exit_with(err)
    try:
        raw, where = collect_samples(args, inputs)
        if inputs.samples_out is not None:
            where += save_samples(raw, inputs.samples_out)
        model, report, replica = fit(raw, inputs.fallback, args.source or where)
    except UsageError as err:
        exit_with(err)
    except (CalibrationError, TraceError, OSError, ValueError, requests.RequestException,
            ServerError) as err:
        exit_with(err, FAILURE_STATUS)
    save_calibration(model, report, inputs.out, replica)
    print_fit(model, report, replica)
    print(f"wrote {inputs.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
