"""``python -m eval.run``: replay one trace against several systems and report SLOs and quality.

Every system (fp, static-int8, static-int4, morph-heuristic, morph-rl) is served in turn with
the same model and the same memory budget, and receives the same requests (same arrival
times, same prompt token ids). All input is checked before the first server starts, so a typo
costs seconds, not a half-finished run. With no arguments it runs a short demo (the first 20 s
of azure-code's burstiest minute at time scale 0.25, fp / static-int4 / morph-heuristic, a few
minutes on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from eval import metrics, report
from eval.metrics import FormatKey, Slo
from eval.replay import Replayer, RequestRecord, measure_unloaded, prompt_ids, usable_token_ids
from eval.servers import (
    DEFAULT_RL_CHECKPOINT,
    SYSTEMS,
    get_state,
    poll_state,
    start_server,
    stop_server,
    system_flags,
)
from eval.traces import (
    LengthMapping,
    Trace,
    TraceError,
    burstiest_window,
    load_trace,
    map_lengths,
    scale_time,
    select_window,
)
from sglang_morph.config import GROUP_SIZES, QUANT_METHODS, parse_bytes
from sglang_morph.data import resolve_model
from sglang_morph.memory import DEFAULT_FP_KV_TOKENS, fp_kv_tokens
from sglang_morph.model_info import ModelInfo, context_length, read_model_info
from sglang_morph.server_process import Server, ServerError

DEMO_SYSTEMS = "fp,static-int4,morph-heuristic"
DEMO_WINDOW = (569.0, 589.0)
"""The demo's window of azure-code: the first 20 s of its burstiest minute (569-629 s), a burst
of about 25 requests/s that then halves. At time scale 0.25 it is 80 s per system, long enough
for full precision to queue and for a morphing server to quantize and restore."""
CALIBRATION_REQUESTS = 5
CALIBRATION_MIN_OUTPUT = 16
"""Probe requests decode at least this many tokens, so their TPOT is not a 1-2 gap estimate."""

console = Console(stderr=True)


class UsageError(ValueError):
    """Bad command-line input, found before any server starts."""


def build_parser() -> argparse.ArgumentParser:
    """The CLI; its defaults are the demo that ``python -m eval.run`` runs."""
    p = argparse.ArgumentParser(
        prog="python -m eval.run",
        description="Replay a trace open-loop against each system (same model, budget and "
        "requests) and write summary.json, report.md, figures and per-request records.",
    )
    p.add_argument(
        "--trace",
        default="azure-code",
        help="azure-code, azure-conv, or a file: Azure 2023 CSV, BurstGPT CSV, "
        "Mooncake JSONL (default: azure-code)",
    )
    p.add_argument(
        "--trace-format",
        choices=("azure", "burstgpt", "mooncake"),
        default=None,
        help="format of a trace file (default: detected)",
    )
    p.add_argument("--data-dir", default=None, help="directory holding the shared data")
    p.add_argument(
        "--systems",
        default=DEMO_SYSTEMS,
        help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: {DEMO_SYSTEMS})",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default: runs/<trace>-<date>-<time>)"
    )
    p.add_argument("--model", default=None, help="HF model directory (default: stories260K)")
    win = p.add_mutually_exclusive_group()
    win.add_argument(
        "--window", default=None, metavar="START:END", help="seconds of the source trace to replay"
    )
    win.add_argument(
        "--burstiest",
        type=float,
        default=None,
        metavar="LENGTH_S",
        help="replay the LENGTH_S-second window with the most arrivals (default when no "
        "--window: 60; for azure-code with neither option the demo window "
        f"{DEMO_WINDOW[0]:g}:{DEMO_WINDOW[1]:g})",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=0.25,
        help="speed-up: arrival times are divided by it (default: 0.25, a load at which "
        "stories260K on a 2-core CPU queues in full precision)",
    )
    d = LengthMapping()
    for side in ("input", "output"):
        p.add_argument(
            f"--{side}-div",
            type=float,
            default=getattr(d, f"{side}_div"),
            help=f"{side} tokens = clip(round(trace {side} / DIV), MIN, MAX)",
        )
        p.add_argument(f"--{side}-min", type=int, default=getattr(d, f"{side}_min"))
        p.add_argument(f"--{side}-max", type=int, default=getattr(d, f"{side}_max"))
    p.add_argument(
        "--budget",
        default=None,
        help="memory budget for weights + KV, e.g. 2000000 or 2MB, the same for "
        "all systems (default: weights + --fp-kv-tokens KV tokens)",
    )
    p.add_argument(
        "--fp-kv-tokens",
        type=int,
        default=DEFAULT_FP_KV_TOKENS,
        help=f"KV tokens the default budget gives the fp model (default: {DEFAULT_FP_KV_TOKENS})",
    )
    p.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in seconds")
    p.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in seconds")
    p.add_argument(
        "--slo-scale",
        type=float,
        default=5.0,
        help="SLOs not given are this multiple of the fp server's unloaded median "
        "TTFT/TPOT, measured in the same run (default: 5)",
    )
    p.add_argument("--reps", type=int, default=1, help="repetitions of every system")
    p.add_argument(
        "--rl-checkpoint",
        default=DEFAULT_RL_CHECKPOINT,
        help=f"policy for morph-rl (default: {DEFAULT_RL_CHECKPOINT})",
    )
    p.add_argument(
        "--quant-method",
        choices=QUANT_METHODS,
        default="rtn",
        help="quantization of the quantized layers, for servers and quality (default: rtn)",
    )
    p.add_argument(
        "--group-size",
        type=int,
        choices=GROUP_SIZES,
        default=32,
        help="quantization group size, for servers and quality (default: 32)",
    )
    p.add_argument(
        "--profile",
        default=None,
        help="layer-importance profile JSON, given to every server and to quality",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra launcher argument for every server (repeat; use --server-arg=--x)",
    )
    p.add_argument("--port", type=int, default=31500, help="server port (default: 31500)")
    p.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds before a request counts as failed (default: 120)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt token ids")
    return p


@dataclass
class Plan:
    """Everything validated and derived from the command line before a server starts."""

    trace: Trace
    systems: list[str]
    model_path: str
    num_layers: int
    budget_bytes: int
    budget_how: str
    prompts: list[list[int]]
    vocab: object
    out_dir: Path
    args: argparse.Namespace
    profile: dict | None = None


@dataclass
class SystemRun:
    """One replay of one system: its records, timeline and the server state around it."""

    system: str
    rep: int
    records: list[RequestRecord] = field(default_factory=list)
    timeline: list[dict] = field(default_factory=list)
    state_start: dict | None = None
    state_end: dict | None = None


def _parse_window(text: str) -> tuple[float, float]:
    try:
        start, end = (float(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--window must be START:END in seconds, got {text!r}") from None
    return start, end


def _check_options(args: argparse.Namespace) -> list[str]:
    """The systems to run, after checking every option that needs no file or trace."""
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise UsageError(f"unknown system(s) {unknown or systems}; offered: {', '.join(SYSTEMS)}")
    if len(set(systems)) != len(systems):
        raise UsageError(f"--systems lists a system twice: {args.systems}")
    if "morph-rl" in systems and not Path(args.rl_checkpoint).is_file():
        raise UsageError(
            f"morph-rl needs a policy checkpoint: {args.rl_checkpoint} does not exist "
            "(train one, or pass --rl-checkpoint PATH)"
        )
    if args.reps < 1 or args.request_timeout <= 0 or args.slo_scale <= 0:
        raise UsageError("--reps, --request-timeout and --slo-scale must be positive")
    for flag in ("slo_ttft", "slo_tpot"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be a positive number of seconds")
    return systems


def _shape_trace(args: argparse.Namespace) -> Trace:
    """Load, window (source seconds), speed up, then map lengths: the order reports state."""
    trace = load_trace(args.trace, args.trace_format, args.data_dir)
    if args.window:
        window = _parse_window(args.window)
    elif args.burstiest is None and args.trace == "azure-code":
        window = DEMO_WINDOW
    else:
        window = burstiest_window(trace, args.burstiest or 60.0)
    trace = select_window(trace, *window)
    if not trace.requests:
        raise UsageError(f"window {window[0]:g}:{window[1]:g} s holds no requests")
    mapping = LengthMapping(
        args.input_div,
        args.input_min,
        args.input_max,
        args.output_div,
        args.output_min,
        args.output_max,
    )
    return map_lengths(scale_time(trace, args.time_scale), mapping)


def _budget(args: argparse.Namespace, info: ModelInfo, longest: int) -> tuple[int, str]:
    """The shared memory budget in bytes and how it was chosen; it must hold the longest
    request in fp, or fp would fail requests rather than queue them."""
    if args.budget is None:
        if args.fp_kv_tokens <= 0:
            raise UsageError("--fp-kv-tokens must be positive")
        budget = info.budget_bytes(args.fp_kv_tokens)
        how = (
            f"fp weights {info.weight_bytes} B + {args.fp_kv_tokens} KV tokens x "
            f"{info.kv_bytes_per_token} B"
        )
    else:
        try:
            budget = parse_bytes(args.budget)
        except ValueError as err:
            raise UsageError(f"--budget: {err}") from err
        how = f"--budget {args.budget}"
    fp_tokens = fp_kv_tokens(info, budget)
    if fp_tokens < longest:
        raise UsageError(
            f"budget {budget} B leaves fp {max(fp_tokens, 0)} KV tokens, less than the longest "
            f"request ({longest} tokens): raise --budget or --fp-kv-tokens"
        )
    return budget, how


def make_plan(args: argparse.Namespace) -> Plan:
    """Validate the arguments and shape the trace; raises UsageError or TraceError."""
    systems = _check_options(args)
    profile = None
    if args.profile is not None:
        from sglang_morph.profile_file import load_profile

        try:
            profile = load_profile(args.profile)
        except (OSError, ValueError) as err:
            raise UsageError(f"--profile {args.profile}: {err}") from err
    trace = _shape_trace(args)
    try:
        model_path = resolve_model(args.model, args.data_dir)
        info = read_model_info(model_path)
        context = context_length(model_path)
    except (OSError, KeyError, ValueError) as err:
        raise UsageError(f"model: {err}") from err
    longest = max(r.input_tokens + r.output_tokens for r in trace.requests)
    if context is not None and longest > context:
        raise UsageError(
            f"the length mapping makes requests of up to {longest} tokens, more than the "
            f"model's {context}-token context; lower --input-max/--output-max"
        )
    budget, how = _budget(args, info, longest)
    vocab = usable_token_ids(model_path)
    prompts = [
        prompt_ids(vocab, r.input_tokens, i, args.seed) for i, r in enumerate(trace.requests)
    ]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or f"runs/{trace.name}-{stamp}")
    return Plan(
        trace,
        systems,
        model_path,
        info.num_layers,
        budget,
        how,
        prompts,
        vocab,
        out_dir,
        args,
        profile,
    )


def launch(plan: Plan, system: str, rep: int, slo: Slo | None) -> Server:
    """Start ``system``'s server with the shared model and budget."""
    args = plan.args
    flags = system_flags(system, plan.budget_bytes, args.rl_checkpoint)
    if slo is not None:
        flags += ["--morph-ttft-slo", f"{slo.ttft_s:.6f}"]
    flags += ["--morph-quant-method", args.quant_method, "--morph-group-size", str(args.group_size)]
    if args.profile:
        flags += ["--morph-profile", args.profile]
    flags += args.server_arg
    log = plan.out_dir / system / f"server-rep{rep}.log"
    console.print(f"[bold]starting {system}[/] (rep {rep}) on port {args.port}; log {log}")
    return start_server(plan.model_path, args.port, flags, log)


def calibrate(plan: Plan, server: Server) -> Slo:
    """SLOs from the unloaded fp server (absolute ones from the command line win)."""
    args = plan.args
    if args.slo_ttft is not None and args.slo_tpot is not None:
        return Slo(args.slo_ttft, args.slo_tpot, "absolute (--slo-ttft, --slo-tpot)")
    inp = int(statistics.median(r.input_tokens for r in plan.trace.requests))
    out = max(
        CALIBRATION_MIN_OUTPUT, int(statistics.median(r.output_tokens for r in plan.trace.requests))
    )
    probe = measure_unloaded(server.url, plan.vocab, inp, out, CALIBRATION_REQUESTS)
    ttft, tpot = asyncio.run(probe)
    scale = args.slo_scale
    how = (
        f"{scale:g} x the fp server's unloaded median (TTFT {1000 * ttft:.1f} ms, TPOT "
        f"{1000 * tpot:.2f} ms; {CALIBRATION_REQUESTS} sequential requests of {inp} in / {out} out "
        "tokens)"
    )
    if args.slo_ttft is not None or args.slo_tpot is not None:
        how += "; the other SLO given on the command line"
    return Slo(args.slo_ttft or scale * ttft, args.slo_tpot or scale * tpot, how)


async def _replay_and_watch(replayer: Replayer, base_url: str, timeline: list[dict]) -> None:
    t0 = time.perf_counter()
    poller = asyncio.create_task(poll_state(base_url, t0, timeline))
    try:
        await replayer.run(t0)
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller


def replay_system(plan: Plan, server: Server, run: SystemRun) -> None:
    """Replay the plan's requests to ``server``, filling ``run`` as it goes (so an interrupt
    leaves the finished part in place)."""
    replayer = Replayer(
        server.url,
        plan.trace.requests,
        plan.prompts,
        request_timeout_s=plan.args.request_timeout,
        label=f"{run.system} rep {run.rep}",
    )
    run.records = replayer.records
    run.state_start = get_state(server.url)
    try:
        asyncio.run(_replay_and_watch(replayer, server.url, run.timeline))
    finally:
        for record in run.records:
            if record.error is None and record.e2e_s is None:
                record.error = "interrupted"
    run.state_end = get_state(server.url)


def _evaluate(plan: Plan, key: FormatKey, cache: dict, notes: list[str]) -> dict | None:
    """Quality of one layer-format configuration, computed once per run (lazy import: the
    quality module pulls in torch and transformers)."""
    if key in cache:
        return cache[key]
    try:
        from eval.quality import evaluate_formats

        value = dict(
            evaluate_formats(
                plan.model_path,
                dict(key),
                group_size=plan.args.group_size,
                quant_method=plan.args.quant_method,
                profile=plan.profile,
            )
        )
        if not key:
            value["kl"] = 0.0
    except Exception as err:  # quality is reported as missing, the latency results still stand
        notes.append(f"quality of {dict(key) or 'fp'} not computed: {type(err).__name__}: {err}")
        value = None
    cache[key] = value
    return value


def nominal_key(plan: Plan, system: str) -> FormatKey | None:
    """The configuration a system is meant to run (used when no timeline was recorded)."""
    if system == "fp":
        return ()
    if system.startswith("static-"):
        fmt = system.split("-", 1)[1]
        return tuple((i, fmt) for i in range(plan.num_layers))
    return None


def system_quality(
    plan: Plan, system: str, runs: Sequence[SystemRun], cache: dict, notes: list[str]
) -> tuple[float | None, float | None, float | None]:
    """(ppl, kl, mean quantized layers) weighted by the tokens each configuration produced."""
    weights: dict[FormatKey, float] = {}
    for run in runs:
        for key, w in metrics.token_weights(run.records, run.timeline).items():
            weights[key] = weights.get(key, 0.0) + w
    if not weights:
        key = nominal_key(plan, system)
        if key is None:
            notes.append(f"{system}: no /morph/state timeline, so no token-weighted quality")
            return None, None, None
        weights = {key: 1.0}
    quality = {k: v for k in weights if (v := _evaluate(plan, k, cache, notes)) is not None}
    ppl, kl = metrics.weighted_quality(weights, quality)
    return ppl, kl, metrics.mean_quantized_layers(weights)


def _counter(run: SystemRun, key: str) -> int | None:
    if not run.state_end or run.state_end.get(key) is None:
        return None
    before = (run.state_start or {}).get(key) or 0
    return int(run.state_end[key]) - int(before)


def build_summary(
    plan: Plan,
    slo: Slo | None,
    runs: dict[str, list[SystemRun]],
    interrupted: bool,
    quality: dict[str, tuple] | None = None,
    notes: Sequence[str] = (),
) -> dict:
    """summary.json's content from whatever has run so far."""
    trace = plan.trace
    summary: dict = {
        "trace": {
            "name": trace.name,
            "source": trace.meta.get("source"),
            "window": trace.meta.get("window"),
            "time_scale": trace.meta.get("time_scale"),
            "length_mapping": trace.meta.get("length_mapping"),
            "requests": len(trace.requests),
            "duration_s": trace.duration_s,
        },
        "budget": {"bytes": plan.budget_bytes, "how": plan.budget_how},
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "how": slo.how} if slo else None,
        "reps": plan.args.reps,
        "interrupted": interrupted,
        "systems": {},
        "notes": list(notes),
    }
    if slo is None:
        return summary
    for system, system_runs in runs.items():
        records = [r for run in system_runs for r in run.records]
        if not records:
            continue
        row = metrics.summarize(records, slo)
        ppl, kl, mean_k = (quality or {}).get(system, (None, None, None))
        counts = [_counter(run, "transitions") for run in system_runs]
        start = system_runs[0].state_start or {}
        row.update(
            quality_ppl=ppl,
            quality_kl=kl,
            mean_quantized_layers=mean_k,
            transitions=sum(c for c in counts if c is not None)
            if any(c is not None for c in counts)
            else None,
            fallbacks=_counter(system_runs[-1], "fallbacks"),
            kv_capacity_tokens_at_start=start.get("kv_capacity_tokens"),
            quantized_layers_at_start=start.get("quantized_layers"),
            per_rep=[metrics.summarize(run.records, slo) for run in system_runs],
        )
        summary["systems"][system] = row
    return summary


def write_outputs(
    plan: Plan, summary: dict, runs: dict[str, list[SystemRun]], figures: bool
) -> None:
    """Per-system records and timelines, summary.json, report.md, and (at the end) figures."""
    out = plan.out_dir
    for system, system_runs in runs.items():
        report.write_records(
            out / system / "requests.jsonl",
            [{**r.to_json(), "rep": run.rep} for run in system_runs for r in run.records],
        )
        report.write_records(
            out / system / "timeline.jsonl",
            [{**row, "rep": run.rep} for run in system_runs for row in run.timeline],
        )
        if figures and system_runs and system_runs[0].timeline:
            first = system_runs[0]
            report.plot_timeline(
                out / system / "timeline.png", f"{system} (rep 0)", first.records, first.timeline
            )
    if figures:
        pooled = {s: [r for run in rs for r in run.records] for s, rs in runs.items()}
        if any(pooled.values()):
            slo = summary.get("slo") or {}
            report.plot_ttft_cdf(out / "ttft_cdf.png", pooled, slo.get("ttft_s"))
    report.write_summary(out, summary)


def _order(plan: Plan, needs_calibration: bool) -> list[str]:
    systems = list(plan.systems)
    if needs_calibration and "fp" in systems:
        systems.remove("fp")
        systems.insert(0, "fp")
    return systems


def _calibrated(plan: Plan, server: Server) -> Slo:
    slo = calibrate(plan, server)
    console.print(
        f"SLO: TTFT {1000 * slo.ttft_s:.1f} ms, TPOT {1000 * slo.tpot_s:.2f} ms ({slo.how})"
    )
    return slo


class _Skipped(Exception):
    """A system whose server did not start; the message goes into the report's notes."""


def run_one(
    plan: Plan, system: str, rep: int, slo: Slo | None, runs: dict[str, list[SystemRun]]
) -> Slo:
    """Start, (calibrate,) replay and stop one system; returns the SLO, measured here when it
    is still unknown (only ever on fp, which then runs first).

    A server that fails to start is noted and skipped, unless the SLO still had to be measured
    on it: then nothing else can be judged and the ServerError propagates.
    """
    try:
        server = launch(plan, system, rep, slo)
    except ServerError as err:
        if slo is None:
            raise
        console.print(f"[red]{system}: {err}[/]")
        raise _Skipped(f"{system} rep {rep}: server failed to start: {err}".split("\n")[0]) from err
    try:
        if slo is None:
            slo = _calibrated(plan, server)
        if system in plan.systems:
            run = SystemRun(system, rep)
            runs[system].append(run)
            replay_system(plan, server, run)
    finally:
        stop_server(server)
    return slo


def execute(plan: Plan) -> int:
    """Run every system for every rep; always writes what it has, even on Ctrl-C."""
    args = plan.args
    slo = None
    if args.slo_ttft is not None and args.slo_tpot is not None:
        slo = Slo(args.slo_ttft, args.slo_tpot, "absolute (--slo-ttft, --slo-tpot)")
    order = _order(plan, slo is None)
    runs: dict[str, list[SystemRun]] = {s: [] for s in order}
    notes: list[str] = []
    interrupted = False
    status = 0
    try:
        if slo is None and "fp" not in order:  # an fp server only to measure the SLOs
            slo = run_one(plan, "fp", 0, None, runs)
        for rep in range(args.reps):
            for system in order:
                try:
                    slo = run_one(plan, system, rep, slo, runs)
                except _Skipped as skipped:
                    notes.append(str(skipped))
                    status = 1
                    continue
                write_outputs(plan, build_summary(plan, slo, runs, False, notes=notes), runs, False)
    except ServerError as err:
        notes.append(f"the fp server needed to measure the SLOs did not start: {err}")
        console.print(f"[red]cannot measure the SLOs: {err}[/]")
        status = 1
    except KeyboardInterrupt:
        interrupted = True
        status = 130
        console.print("[yellow]interrupted: writing what has finished[/]")
    quality: dict[str, tuple] = {}
    if interrupted:
        notes.append("interrupted: quality was not computed")
    else:
        cache: dict = {}
        for system, system_runs in runs.items():
            if system_runs:
                quality[system] = system_quality(plan, system, system_runs, cache, notes)
    summary = build_summary(plan, slo, runs, interrupted, quality, notes)
    write_outputs(plan, summary, runs, figures=True)
    if slo is not None:
        report.print_table(summary, Console())
    console.print(f"results in {plan.out_dir}")
    return status


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, validate (exit 2 with a one-line error on bad input), then run.

    SIGTERM is handled like Ctrl-C, so a harness killed by a job runner still stops its server
    and writes what it has.
    """
    args = build_parser().parse_args(argv)
    try:
        plan = make_plan(args)
    except (UsageError, TraceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trace = plan.trace
    console.print(
        f"{trace.name}: {len(trace.requests)} requests over {trace.duration_s:.1f} s "
        f"(window {trace.meta['window'][0]:.1f}-{trace.meta['window'][1]:.1f} s of the source, "
        f"time scale {trace.meta['time_scale']:g}x); systems {', '.join(plan.systems)}; "
        f"budget {plan.budget_bytes} B ({plan.budget_how})"
    )
    signal.signal(signal.SIGTERM, _interrupt)
    return execute(plan)


if __name__ == "__main__":
    sys.exit(main())
